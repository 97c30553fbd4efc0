"""ramtag.engine.eval.render: the JSON report and the terminal table agree with the metrics."""

from __future__ import annotations

import json

from ramtag.engine.eval.render import report_dict, results_table
from ramtag.engine.eval.types import GZSL, MODEL_ARM, ZSL


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
