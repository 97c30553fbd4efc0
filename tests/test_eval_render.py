"""ramtag.engine.eval.render: the JSON report and the terminal table agree with the metrics."""

from __future__ import annotations

import json

import pytest

from ramtag.engine.eval.render import report_dict, results_table
from ramtag.engine.eval.types import GZSL, MODEL_ARM, ZSL
from ramtag.engine.runtime import load_runtime
from tests.eval_fixtures import Bench, evaluate_with_baselines, make_bench


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Bench:
    return make_bench(tmp_path_factory.mktemp("eval"))


@pytest.fixture(scope="module")
def runtime(bench: Bench):
    return load_runtime(bench.checkpoint, device="cpu")


@pytest.fixture(scope="module")
def evaluated(bench: Bench, runtime):
    """ZSL and GZSL with the baselines, as `ramtag eval --unseen ... --baseline` runs them."""
    return evaluate_with_baselines(runtime, bench)


def test_report_renderers_agree_with_the_metrics(evaluated):
    result = evaluated
    report = report_dict(result)
    json.dumps(report, allow_nan=False)
    reported = report["protocols"][ZSL]["arms"][MODEL_ARM]["metrics"]["mAP"]
    assert reported == result.protocols[ZSL].arms[MODEL_ARM].metrics.mAP
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(results_table(result))
    text = console.export_text()
    assert f"{100 * result.protocols[GZSL].arms[MODEL_ARM].metrics.mAP:.2f}" in text
