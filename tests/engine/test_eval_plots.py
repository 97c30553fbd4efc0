"""ramtag.engine.eval.plots: PNG plots with matplotlib, and a usage error before anything runs without it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ramtag.engine.eval.render import markdown_summary
from ramtag.engine.eval.types import GZSL, ZSL
from ramtag.errors import UsageError


def test_plots_when_matplotlib_is_installed(evaluated, tmp_path: Path):
    pytest.importorskip("matplotlib")
    from ramtag.engine.eval.plots import write_plots

    result = evaluated
    files = write_plots(result, tmp_path / "plots")
    names = sorted(Path(path).name for path in files)
    assert names == sorted(f"{p}-{kind}.png" for p in (ZSL, GZSL) for kind in ("ap", "pr", "arms"))
    assert all(Path(path).read_bytes()[:4] == b"\x89PNG" for path in files)
    assert "![gzsl-ap]" in markdown_summary(result, plots=files)


def test_without_matplotlib_plots_are_a_usage_error_naming_the_extra(evaluated, tmp_path: Path, monkeypatch):
    from ramtag.engine.eval.plots import require_matplotlib, write_plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as without the 'plots' extra
    for attempt in (require_matplotlib, lambda: write_plots(evaluated, tmp_path / "plots")):
        with pytest.raises(UsageError, match=r"pip install 'ramtag\[plots\]'") as raised:
            attempt()
        assert raised.value.exit_code == 2
    assert not (tmp_path / "plots").exists()
