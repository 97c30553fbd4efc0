"""Options shared by every command that runs the model, defined once (Annotated aliases)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, List, Optional

import typer

MODEL_PANEL = "Model"
KCOT_PANEL = "KCOT (optimal transport)"
INPUT_PANEL = "Inputs"
SPEED_PANEL = "Speed"

# The defaults of --model, --pretrained and --device (ramtag.engine.runtime's, written here so that parsing the
# command line does not import torch).
DEFAULT_MODEL = "ViT-B-16-quickgelu"
DEFAULT_PRETRAINED = "openai"
DEFAULT_DEVICE = "auto"
KCOT_DEFAULTS = {"reg": "model's setting, 0.1", "max_iter": "model's setting, 100", "tol": "model's setting, 1e-3",
                 "stop": "model's setting, reference"}
"""What --ot-* default to, as help shows it: ramtag.model.config.KcotConfig's values (tests/cli/test_help.py)."""

Checkpoint = Annotated[
    Optional[str],
    typer.Option(
        "--checkpoint",
        "-c",
        help="A ramtag checkpoint (.safetensors) or a reference RAM .pth file.",
        rich_help_panel=MODEL_PANEL,
    ),
]
ModelName = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help=(
            "open_clip architecture for training-free RAM (e.g. ViT-B-16-quickgelu), or 'demo' for the bundled "
            "demo model."
        ),
        rich_help_panel=MODEL_PANEL,
    ),
]
Pretrained = Annotated[
    Optional[str],
    typer.Option(
        "--pretrained",
        help="open_clip pretrained tag (openai, …) or a local weights file.",
        rich_help_panel=MODEL_PANEL,
    ),
]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.", rich_help_panel=MODEL_PANEL)]
ScaleLocalTemperature = Annotated[
    Optional[bool],
    typer.Option(
        "--scale-local-temperature/--no-scale-local-temperature",
        help="Scale the local temperature by training/current vocabulary size.",
        show_default="the model's setting",
        rich_help_panel=MODEL_PANEL,
    ),
]
LOCAL_TEMPERATURE_RULES = ("fixed", "matched")
"""ramtag.model.config.LOCAL_TEMPERATURES, written here so parsing does not import torch (tests/cli/test_help.py)."""
LocalTemperature = Annotated[
    Optional[str],
    typer.Option(
        "--local-temperature",
        metavar="RULE",
        help=(
            "fixed: the model's own local temperature, as the reference (a few labels saturate the local "
            "score); matched: 4 x the global temperature / number of labels, one scale at any vocabulary size."
        ),
        show_default="matched for the demo model, else fixed",
        rich_help_panel=MODEL_PANEL,
    ),
]
OtReg = Annotated[
    Optional[float],
    typer.Option(
        "--ot-reg", help="Sinkhorn entropic regularisation.", show_default=KCOT_DEFAULTS["reg"],
        rich_help_panel=KCOT_PANEL,
    ),
]
OtMaxIter = Annotated[
    Optional[int],
    typer.Option(
        "--ot-max-iter", help="Sinkhorn iteration limit.", show_default=KCOT_DEFAULTS["max_iter"],
        rich_help_panel=KCOT_PANEL,
    ),
]
OtTol = Annotated[
    Optional[float],
    typer.Option(
        "--ot-tol", help="Sinkhorn tolerance.", show_default=KCOT_DEFAULTS["tol"], rich_help_panel=KCOT_PANEL
    ),
]
OtStop = Annotated[
    Optional[str],
    typer.Option(
        "--ot-stop", help="Stopping rule: reference (parity) or marginal.", show_default=KCOT_DEFAULTS["stop"],
        rich_help_panel=KCOT_PANEL,
    ),
]

Labels = Annotated[
    str,
    typer.Option(
        "--labels",
        "-l",
        help=(
            "Label file (one per line, # comments) or a .rtv file from `ramtag vocab encode`; '-' reads labels "
            "from stdin."
        ),
        rich_help_panel=INPUT_PANEL,
    ),
]
Template = Annotated[
    Optional[List[str]],
    typer.Option(
        "--template",
        help="Prompt template with {} (repeatable: an ensemble, training-free models only).",
        rich_help_panel=INPUT_PANEL,
    ),
]
BatchSize = Annotated[
    int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.", rich_help_panel=SPEED_PANEL)
]


@dataclass
class ModelChoice:
    checkpoint: str | None
    model: str
    pretrained: str | None
    device: str
    scale_local_temperature: bool | None = None
    local_temperature: str | None = None
    ot_reg: float | None = None
    ot_max_iter: int | None = None
    ot_tol: float | None = None
    ot_stop: str | None = None
    quiet: bool = False
    """No "loading …" line on stderr."""

    def __post_init__(self) -> None:
        from ramtag.errors import UsageError

        if self.local_temperature is not None and self.local_temperature not in LOCAL_TEMPERATURE_RULES:
            raise UsageError(
                f"--local-temperature {self.local_temperature}: not a rule; use {' or '.join(LOCAL_TEMPERATURE_RULES)}"
            )

    def describe(self) -> str:
        """What is loaded, in the words of the options: a checkpoint, the demo, or architecture / weights."""
        if self.checkpoint is not None:
            return f"checkpoint {self.checkpoint}"
        if self.model == "demo":
            return "the bundled demo model"
        return f"{self.model} / {self.pretrained}" if self.pretrained else f"{self.model} (random weights)"

    def load(self):
        """The runtime these options describe (errors become one line in ramtag.cli.main)."""
        from ramtag.engine import dist
        from ramtag.engine.runtime import load_runtime
        from ramtag.errors import UsageError

        if not self.quiet and dist.info().is_main:  # a model takes seconds to a minute to load: say what it is
            say(f"loading {self.describe()} …")
        try:
            return load_runtime(self.checkpoint, self.model, self.pretrained, self.device, self.overrides())
        except ValueError as error:
            raise UsageError(str(error)) from None

    def overrides(self) -> dict:
        """`load_runtime`'s overrides from these options (what Ray's actors load, too)."""
        from ramtag.engine.runtime import model_overrides

        return model_overrides(
            scale_local_temperature=self.scale_local_temperature, local_temperature=self.local_temperature,
            ot_reg=self.ot_reg, ot_max_iter=self.ot_max_iter, ot_tol=self.ot_tol, ot_stop=self.ot_stop,
        )


def command_line() -> str:
    import shlex
    import sys

    return " ".join(shlex.quote(a) for a in ["ramtag", *sys.argv[1:]])


def say(message: str) -> None:
    """One status line on stderr, in the style of every ramtag message."""
    import sys

    print(f"ramtag: {message}", file=sys.stderr, flush=True)


def say_when_stdin_is_a_terminal(what: str) -> None:
    """Reading ``what`` from a terminal looks like a hang: say so, and how to end the input."""
    import sys

    if sys.stdin is not None and sys.stdin.isatty():
        say(f"reading {what} from stdin (the terminal): one per line, end with Ctrl-D")


MODEL_OPTIONS: tuple[tuple[str, Any, Any], ...] = (
    ("checkpoint", Checkpoint, None),
    ("model", ModelName, DEFAULT_MODEL),
    ("pretrained", Pretrained, DEFAULT_PRETRAINED),
    ("device", Device, DEFAULT_DEVICE),
    ("scale_local_temperature", ScaleLocalTemperature, None),
    ("local_temperature", LocalTemperature, None),
    ("ot_reg", OtReg, None),
    ("ot_max_iter", OtMaxIter, None),
    ("ot_tol", OtTol, None),
    ("ot_stop", OtStop, None),
)
"""The model-option block (parameter, option, default), in the order --help lists it: one per ModelChoice field."""


def model_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give ``command`` the model-option block, after its own options, as one ``choice: ModelChoice`` argument.

    Typer reads a command's options from its signature, so the wrapper shows the command's own parameters
    (without ``choice``) followed by :data:`MODEL_OPTIONS`, and packs those into a :class:`ModelChoice`.
    """
    own = [param for param in inspect.signature(command, eval_str=True).parameters.values() if param.name != "choice"]
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
        for name, annotation, default in MODEL_OPTIONS
    ]

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        choice = ModelChoice(**{name: kwargs.pop(name) for name, _, _ in MODEL_OPTIONS})
        return command(*args, choice=choice, **kwargs)

    parameters = [*own, *added]
    wrapper.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {param.name: param.annotation for param in parameters}
    del wrapper.__wrapped__  # typer and inspect read the signature above, not the command's
    return wrapper
