"""--help reads like a Unix tool's: value names (FILE, N, DIR), one default style, readable at 80 columns."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from ramtag.cli import app

ROOT = Path(__file__).resolve().parents[2]
# Commands whose help this project's CLI layer owns; eval and train get the same value names from the house style.
COMMANDS = [[], ["tag"], ["explain"], ["vocab"], ["vocab", "encode"], ["vocab", "show"], ["model"], ["model", "fetch"],
            ["data"], ["data", "synth"], ["selfcheck"]]
EVERY_COMMAND = [*COMMANDS, ["eval"], ["train"]]
TYPE_LABELS = re.compile(r"<(str|int|float|bool|list|path|Path)[^>]*>|\[x[<>]=")


def _help(argv: list[str]) -> str:
    result = CliRunner().invoke(app, [*argv, "--help"], env={"COLUMNS": "80", "TERM": "dumb"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("argv", EVERY_COMMAND, ids=lambda argv: " ".join(argv) or "ramtag")
def test_values_are_named_not_typed(argv):
    text = _help(argv)
    assert not TYPE_LABELS.search(text), TYPE_LABELS.search(text).group(0)
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert "{" not in usage  # INPUT..., not {inputs}...


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda argv: " ".join(argv) or "ramtag")
def test_help_fits_80_columns_with_examples_unbroken(argv):
    text = _help(argv)
    assert max(len(line) for line in text.splitlines()) <= 80
    command = _command(argv)
    for paragraph in (command.epilog or "").split("\n\n"):
        if paragraph.startswith("  "):  # an example command line: it must not wrap
            assert len(paragraph) <= 78, paragraph  # 80 less rich's margin on each side


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda argv: " ".join(argv) or "ramtag")
def test_every_option_is_described_and_defaults_have_one_style(argv):
    for param in _command(argv).params:
        assert (param.help or "").strip(), f"{param.name} has no description"
        assert "(default" not in (param.help or ""), f"{param.name}: say a default with show_default, not in prose"


def test_described_defaults_are_the_real_ones():
    from PIL import Image

    from ramtag.model.config import KcotConfig

    tag = _command(["tag"])
    shown = {param.name: param.show_default for param in tag.params}
    kcot = KcotConfig()
    for option, value in (("ot_reg", kcot.reg), ("ot_max_iter", kcot.max_iter), ("ot_tol", kcot.tol),
                          ("ot_stop", kcot.stop)):
        described = shown[option].removeprefix("model's setting, ")
        assert (described if isinstance(value, str) else float(described)) == value, option
    max_pixels = next(param for param in tag.params if param.name == "max_pixels")
    assert max_pixels.default == Image.MAX_IMAGE_PIXELS
    assert "[default: 89,478,485, Pillow's limit]" in _help(["tag"])


def test_paired_flags_are_one_row_and_still_parse():
    text = _help(["tag"])
    assert "--[no-]scale-local-temperat" in text and "--no-scale-local-" not in text
    option = next(param for param in _command(["tag"]).params if param.name == "scale_local_temperature")
    assert option.opts == ["--scale-local-temperature"] and option.secondary_opts == ["--no-scale-local-temperature"]


def test_man_pages_are_installed_where_man_finds_them():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    data_files = config["tool"]["setuptools"]["data-files"]
    assert data_files == {"share/man/man1": ["man/*.1"]}
    pages = sorted(path.name for path in ROOT.glob("man/*.1"))
    assert "ramtag.1" in pages and "ramtag-tag.1" in pages
    assert "\\fB\\-\\-labels, \\-l\\fR \\fIFILE\\fR" in (ROOT / "man" / "ramtag-tag.1").read_text()


def _command(argv: list[str]):
    command = typer.main.get_command(app)
    for name in argv:
        command = command.commands[name]
    return command


def test_local_temperature_rules_are_the_models():
    """--local-temperature is checked while parsing (no torch), against a copy of the model's own list."""
    from ramtag.cli.options import LOCAL_TEMPERATURE_RULES
    from ramtag.engine.runtime import DEMO_LOCAL_TEMPERATURE
    from ramtag.model.config import LOCAL_TEMPERATURES

    assert LOCAL_TEMPERATURE_RULES == LOCAL_TEMPERATURES and DEMO_LOCAL_TEMPERATURE in LOCAL_TEMPERATURES
