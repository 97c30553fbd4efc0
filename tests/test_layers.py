"""Imports flow one way: cli -> engine -> {model, data, metrics}. model and data never import each other, and
the model layer touches no IO library (PIL, pyarrow, webdataset, typer) and no torch.distributed code of ours."""

from __future__ import annotations

import subprocess
import sys

import pytest

MODEL_MODULES = [
    "ramtag.model.ram",
    "ramtag.model.checkpoint",
    "ramtag.model.kcot",
    "ramtag.model.backbone",
    "ramtag.metrics",
]
DATA_MODULES = [
    "ramtag.data.sources",
    "ramtag.data.writers",
    "ramtag.data.vocab",
    "ramtag.data.annotations",
    "ramtag.data.synth",
]


def _loaded_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return set(result.stdout.split())


@pytest.mark.parametrize("module", MODEL_MODULES)
def test_model_layer_knows_nothing_of_io_engine_or_cli(module):
    loaded = _loaded_after_import(module)
    forbidden = {"ramtag.data", "ramtag.engine", "ramtag.cli", "PIL", "pyarrow", "webdataset", "typer"}
    assert not {
        name for name in loaded if name.split(".")[0] in forbidden or ".".join(name.split(".")[:2]) in forbidden
    }


@pytest.mark.parametrize("module", DATA_MODULES)
def test_data_layer_never_imports_the_model(module):
    loaded = _loaded_after_import(module)
    assert not {name for name in loaded if name.startswith(("ramtag.model", "ramtag.engine", "ramtag.cli"))}
