"""`ramtag train`: fit RAM's adapters, tokens, prompts and temperatures on labelled images.

The options are built from TrainConfig's fields (ramtag.engine.train.config), which carry each setting's
description once; this module adds only how they are spelt on a command line (short names, metavars, panels).
"""

from __future__ import annotations

import inspect
import types
import typing
from dataclasses import MISSING, Field, fields
from typing import Annotated, Any, Optional

import typer

from ramtag.cli.app import app
from ramtag.cli.options import KCOT_PANEL, MODEL_PANEL
from ramtag.engine.train.config import TrainConfig, option_name

PANELS = {
    "data": "Data",
    "model": MODEL_PANEL,
    "kcot": KCOT_PANEL,
    "images": "Augmentation",
    "optimisation": "Optimisation",
    "run": "Run",
}
"""The help panel of each section of settings."""

SHORT_NAMES = {"output": "-o", "model": "-m", "batch_size": "-b", "num_workers": "-j"}
METAVARS = {"map_prefix": "OLD=NEW", "adapter_layers": "I,J,K", "prompt_layers": "I,J,K"}
SWITCHES = {"resume", "tensorboard"}
"""Flags without a --no- form."""
NOT_OPTIONS = {"train", "token_weight_decay"}
"""Settings without an option: the training data is the DATA argument; the tokens' weight decay is set in a
config file."""

_EPILOG = """
Defaults follow the reference (batch 32, 6 epochs, AdamW + SGD, its cosine schedule, EMA 0.9997, teacher weight 0.05).
Precedence: defaults < --config file (TOML, YAML or JSON; keys as the option names) < options given here.
The resolved settings are logged and saved as OUTPUT/train-config.json; OUTPUT/checkpoint.safetensors is the
model to tag and evaluate with (EMA weights when EMA is on).

Examples:

  ramtag train train_48.json --unseen unseen17.txt --val test_65.json --root /data/coco -o runs/coco

  ramtag train train.jsonl --model demo --epochs 3 --batch-size 16 -o runs/demo

  ramtag train --config coco.toml --resume -o runs/coco

  torchrun --nproc-per-node 4 -m ramtag train 'shards/train-{000..063}.tar' --labels seen.txt \\
    --samples-per-epoch 100000 -o runs/big
"""


def _layers(param: typer.CallbackParam, text: Optional[str]) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        message = f"{param.opts[0]} takes 0-based layer numbers separated by commas, e.g. 9,10,11"
        raise typer.BadParameter(message) from None


def _shown(value: Any) -> str:
    """A default as a person writes it: 5e-5, not 5e-05; 0, not 0.0."""
    if isinstance(value, float):
        if value == int(value):
            return str(int(value))
        if abs(value) < 0.01:
            mantissa, exponent = f"{value:e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return str(value)


def _help(setting: Field) -> str:
    """The setting's description, with its default unless the description states it."""
    text = setting.metadata["help"]
    if isinstance(setting.default, bool):
        default = None if setting.name in SWITCHES else ("on" if setting.default else "off")
    else:
        default = None if setting.default in (None, MISSING) else _shown(setting.default)
    if default is None or "(default:" in text:
        return text
    return f"{text.removesuffix('.')} (default: {default})."


def _option(setting: Field) -> inspect.Parameter:
    """The option of one setting: its name, help and panel from the field, its type from the field's."""
    kind = typing.get_type_hints(TrainConfig)[setting.name]
    if isinstance(kind, types.UnionType):  # `int | None`: options are all optional, None when not given
        kind = next(t for t in typing.get_args(kind) if t is not type(None))
    name = f"--{option_name(setting)}"
    extra: dict[str, Any] = {}
    if kind is bool:
        names = [name] if setting.name in SWITCHES else [f"{name}/--no-{option_name(setting)}"]
    else:
        names = [name, *([SHORT_NAMES[setting.name]] if setting.name in SHORT_NAMES else [])]
        if setting.name in ("adapter_layers", "prompt_layers"):
            kind, extra["callback"] = str, _layers
    if setting.name == "num_workers":
        extra["min"] = 0
    option = typer.Option(
        *names,
        help=_help(setting),
        metavar=METAVARS.get(setting.name),
        rich_help_panel=PANELS[setting.metadata["section"]],
        **extra,
    )
    annotation = Annotated[Optional[kind], option]
    return inspect.Parameter(setting.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)


def _parameters() -> list[inspect.Parameter]:
    data = TrainConfig.__dataclass_fields__["train"]
    parameters = [
        inspect.Parameter(
            "data",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[Optional[list[str]], typer.Argument(metavar="DATA", help=data.metadata["help"])],
        )
    ]
    for setting in fields(TrainConfig):
        if setting.name in NOT_OPTIONS:
            continue
        parameters.append(_option(setting))
        if setting.name == "output":
            config = typer.Option(
                "--config",
                help="Settings file (.toml, .yaml, .json); options given here override it.",
                rich_help_panel=PANELS["data"],
            )
            parameters.append(
                inspect.Parameter(
                    "config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[Optional[str], config]
                )
            )
    return parameters


def train_command(data: Optional[list[str]], config: Optional[str], **options: Any) -> None:
    """Train RAM (Ladder Local Adapters, adapter tokens, deep prompts, temperatures) on labelled images.

    The CLIP backbone stays frozen. Runs on many processes with
    [bold]torchrun --nproc-per-node N -m ramtag train ...[/bold]; the loss, the teacher's minimum and the adapters'
    batch norms then span the global batch.
    """
    from ramtag.engine import dist
    from ramtag.engine.train.recipe import train_from_options
    from ramtag.errors import PartialFailure

    # An option not given is None, and an empty repeatable option is not given either: the config file decides.
    given = {key: (None if value == [] else value) for key, value in {"train": data, **options}.items()}
    result = train_from_options(config, given)
    if dist.info().is_main:
        typer.echo(str(result.checkpoint))
    if result.bad_images:
        raise PartialFailure(
            f"{result.bad_images} training image(s) were missing or unreadable and skipped; see "
            f"{result.output / 'bad-images.txt'}"
        )


train_command.__signature__ = inspect.Signature(_parameters())  # type: ignore[attr-defined]
train_command.__annotations__ = {p.name: p.annotation for p in train_command.__signature__.parameters.values()}
app.command("train", epilog=_EPILOG)(train_command)
