"""`ramtag train`: fit RAM's adapters, tokens, prompts and temperatures on labelled images."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ramtag.cli.app import app
from ramtag.cli.options import OtMaxIter, OtReg, OtStop, OtTol

DATA_PANEL = "Data"
MODEL_PANEL = "Model"
AUGMENT_PANEL = "Augmentation"
OPTIM_PANEL = "Optimisation"
LOOP_PANEL = "Run"

_EPILOG = """
Defaults follow the reference (batch 32, 6 epochs, AdamW + SGD, its cosine schedule, EMA 0.9997, teacher weight 0.05).
Precedence: defaults < --config file (TOML, YAML or JSON; keys as the option names) < options given here.
The resolved settings are logged and saved as OUTPUT/train-config.json; OUTPUT/checkpoint.safetensors is the
model to tag and evaluate with (EMA weights when EMA is on).

Examples:

  ramtag train train_48.json --unseen unseen17.txt --val test_65.json --root /data/coco -o runs/coco

  ramtag train train.jsonl --model demo --epochs 3 --batch-size 16 -o runs/demo

  ramtag train --config coco.toml --resume -o runs/coco

  torchrun --nproc-per-node 4 -m ramtag train 'shards/train-{000..063}.tar' --labels seen.txt --samples-per-epoch 100000 -o runs/big
"""


def _layers(text: Optional[str], option: str) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise typer.BadParameter(f"{option} takes 0-based layer numbers separated by commas, e.g. 9,10,11") from None


@app.command("train", epilog=_EPILOG)
def train_command(
    data: Annotated[Optional[list[str]], typer.Argument(metavar="DATA", help="Training data: one annotation file (reference JSON, JSONL manifest, COCO instances) or WebDataset shards with .json/.txt/.cls labels.")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Folder for checkpoints, training state, metrics and logs (default: ramtag-run).", rich_help_panel=DATA_PANEL)] = None,
    config: Annotated[Optional[str], typer.Option("--config", help="Settings file (.toml, .yaml, .json); options given here override it.", rich_help_panel=DATA_PANEL)] = None,
    root: Annotated[Optional[str], typer.Option("--root", help="Folder that relative image paths are resolved against.", rich_help_panel=DATA_PANEL)] = None,
    map_prefix: Annotated[Optional[list[str]], typer.Option("--map-prefix", metavar="OLD=NEW", help="Rewrite annotation paths starting with OLD (repeatable).", rich_help_panel=DATA_PANEL)] = None,
    labels: Annotated[Optional[str], typer.Option("--labels", help="Label space file, one label a line (default: the file's class list, else the labels in the data).", rich_help_panel=DATA_PANEL)] = None,
    unseen: Annotated[Optional[str], typer.Option("--unseen", help="Held-out labels: never trained on; validation reports ZSL and GZSL.", rich_help_panel=DATA_PANEL)] = None,
    val: Annotated[Optional[str], typer.Option("--val", help="Validation annotation file or shards.", rich_help_panel=DATA_PANEL)] = None,
    strict_labels: Annotated[Optional[bool], typer.Option("--strict-labels/--no-strict-labels", help="Fail on training labels outside the label space instead of dropping them.", rich_help_panel=DATA_PANEL)] = None,
    samples_per_epoch: Annotated[Optional[int], typer.Option("--samples-per-epoch", help="Shards: samples per epoch (default: counted once from the shards).", rich_help_panel=DATA_PANEL)] = None,
    resume: Annotated[Optional[bool], typer.Option("--resume", help="Continue the run in --output from its training state.", rich_help_panel=DATA_PANEL)] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="open_clip architecture of the backbone, or 'demo' (default: ViT-B-16-quickgelu).", rich_help_panel=MODEL_PANEL)] = None,
    pretrained: Annotated[Optional[str], typer.Option("--pretrained", help="open_clip pretrained tag or a local weights file (default: openai).", rich_help_panel=MODEL_PANEL)] = None,
    init: Annotated[Optional[str], typer.Option("--init", help="Start from this ramtag checkpoint instead of --model.", rich_help_panel=MODEL_PANEL)] = None,
    adapter_layers: Annotated[Optional[str], typer.Option("--adapter-layers", metavar="I,J,K", help="0-based vision layers with adapters (default: the last three).", rich_help_panel=MODEL_PANEL)] = None,
    prompt_layers: Annotated[Optional[str], typer.Option("--prompt-layers", metavar="I,J,K", help="0-based text layers with deep prompts (default: the last three).", rich_help_panel=MODEL_PANEL)] = None,
    adapter_tokens: Annotated[Optional[int], typer.Option("--adapter-tokens", help="Learnable tokens per adapted layer (default: 8).", rich_help_panel=MODEL_PANEL)] = None,
    prompt_tokens: Annotated[Optional[int], typer.Option("--prompt-tokens", help="Deep prompt tokens per prompted layer (default: 4).", rich_help_panel=MODEL_PANEL)] = None,
    temperature_loc: Annotated[Optional[float], typer.Option("--temperature-loc", help="Initial local temperature (default: 2e-3).", rich_help_panel=MODEL_PANEL)] = None,
    template: Annotated[Optional[str], typer.Option("--template", help="Prompt template with {} (default: 'A photo of a {}.').", rich_help_panel=MODEL_PANEL)] = None,
    ot_reg: OtReg = None,
    ot_max_iter: OtMaxIter = None,
    ot_tol: OtTol = None,
    ot_stop: OtStop = None,
    teacher_weight: Annotated[Optional[float], typer.Option("--teacher-weight", help="Weight of the teacher's knowledge term in KCOT; 0 turns it off (default: 0.05).", rich_help_panel=MODEL_PANEL)] = None,
    image_size: Annotated[Optional[int], typer.Option("--image-size", help="Must equal the backbone's input size (default: the backbone's).", rich_help_panel=AUGMENT_PANEL)] = None,
    padding: Annotated[Optional[int], typer.Option("--padding", help="Pad before the random crop (default: 10).", rich_help_panel=AUGMENT_PANEL)] = None,
    flip: Annotated[Optional[float], typer.Option("--flip", help="Horizontal flip probability (default: 0.5).", rich_help_panel=AUGMENT_PANEL)] = None,
    erase: Annotated[Optional[float], typer.Option("--erase", help="Random erasing probability (default: 0.5).", rich_help_panel=AUGMENT_PANEL)] = None,
    photometric: Annotated[Optional[bool], typer.Option("--photometric/--no-photometric", help="Crop, blur, contrast, affine, noise and brightness augmentation (default: on).", rich_help_panel=AUGMENT_PANEL)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Global batch, split over processes (default: 32).", rich_help_panel=OPTIM_PANEL)] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="(default: 6)", rich_help_panel=OPTIM_PANEL)] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Stop after this many optimizer steps (the schedule still spans --epochs).", rich_help_panel=OPTIM_PANEL)] = None,
    grad_accum: Annotated[Optional[int], typer.Option("--grad-accum", help="Micro-batches per optimizer step (default: 1).", rich_help_panel=OPTIM_PANEL)] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="AdamW rate of the temperatures (default: 5e-5).", rich_help_panel=OPTIM_PANEL)] = None,
    adapter_lr: Annotated[Optional[float], typer.Option("--adapter-lr", help="AdamW rate of the adapters (default: 5e-6).", rich_help_panel=OPTIM_PANEL)] = None,
    token_lr: Annotated[Optional[float], typer.Option("--token-lr", help="SGD rate of adapter tokens and deep prompts (default: 1e-3).", rich_help_panel=OPTIM_PANEL)] = None,
    momentum: Annotated[Optional[float], typer.Option("--momentum", help="SGD momentum (default: 0.9).", rich_help_panel=OPTIM_PANEL)] = None,
    weight_decay: Annotated[Optional[float], typer.Option("--weight-decay", help="(default: 1e-4)", rich_help_panel=OPTIM_PANEL)] = None,
    schedule: Annotated[Optional[str], typer.Option("--schedule", help="reference (60-epoch cosine stepped per epoch), cosine (per step over the run) or constant (default: reference).", rich_help_panel=OPTIM_PANEL)] = None,
    warmup_epochs: Annotated[Optional[float], typer.Option("--warmup-epochs", help="(default: 3 for reference, 5% of the run for cosine)", rich_help_panel=OPTIM_PANEL)] = None,
    clip_grad_norm: Annotated[Optional[float], typer.Option("--clip-grad-norm", help="Clip the gradient norm; 0 = off (default: 0).", rich_help_panel=OPTIM_PANEL)] = None,
    precision: Annotated[Optional[str], typer.Option("--precision", help="auto, fp32, bf16 or fp16 (AMP needs CUDA) (default: auto).", rich_help_panel=OPTIM_PANEL)] = None,
    ema_decay: Annotated[Optional[float], typer.Option("--ema-decay", help="EMA of the trainable weights for validation and export; 0 = off (default: 0.9997).", rich_help_panel=OPTIM_PANEL)] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="(default: 42)", rich_help_panel=OPTIM_PANEL)] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda or cuda:N (default: auto).", rich_help_panel=LOOP_PANEL)] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", "-j", min=0, help="DataLoader worker processes per process (default: 2).", rich_help_panel=LOOP_PANEL)] = None,
    log_every: Annotated[Optional[int], typer.Option("--log-every", help="Steps between metric lines (default: 10).", rich_help_panel=LOOP_PANEL)] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option("--checkpoint-every", help="Steps between checkpoints; 0 = only at the end (default: 500).", rich_help_panel=LOOP_PANEL)] = None,
    val_every: Annotated[Optional[int], typer.Option("--val-every", help="Steps between validations; 0 = by epochs (default: 0).", rich_help_panel=LOOP_PANEL)] = None,
    val_every_epochs: Annotated[Optional[int], typer.Option("--val-every-epochs", help="(default: 1)", rich_help_panel=LOOP_PANEL)] = None,
    val_batch_size: Annotated[Optional[int], typer.Option("--val-batch-size", help="(default: 64)", rich_help_panel=LOOP_PANEL)] = None,
    val_live: Annotated[Optional[bool], typer.Option("--val-live/--no-val-live", help="With EMA, also validate the live weights (default: on).", rich_help_panel=LOOP_PANEL)] = None,
    best_metric: Annotated[Optional[str], typer.Option("--best-metric", help="Picks best.safetensors, e.g. gzsl/mAP, zsl/F1@3 (default: gzsl/mAP with --unseen, else multilabel/mAP).", rich_help_panel=LOOP_PANEL)] = None,
    tensorboard: Annotated[Optional[bool], typer.Option("--tensorboard", help="Also write TensorBoard logs (needs tensorboard).", rich_help_panel=LOOP_PANEL)] = None,
    progress: Annotated[Optional[bool], typer.Option("--progress/--no-progress", help="Progress bar on stderr (default: when stderr is a terminal).", rich_help_panel=LOOP_PANEL)] = None,
) -> None:
    """Train RAM (Ladder Local Adapters, adapter tokens, deep prompts, temperatures) on labelled images.

    The CLIP backbone stays frozen. Runs on many processes with [bold]torchrun --nproc-per-node N -m ramtag train ...[/bold];
    the loss, the teacher's minimum and the adapters' batch norms then span the global batch.
    """
    from ramtag.engine import dist
    from ramtag.engine.train import train_from_options

    options = {
        "train": data or None, "output": output, "root": root, "map_prefix": map_prefix or None, "labels": labels,
        "unseen": unseen, "val": val, "strict_labels": strict_labels, "samples_per_epoch": samples_per_epoch,
        "resume": resume, "model": model, "pretrained": pretrained, "init": init,
        "adapter_layers": _layers(adapter_layers, "--adapter-layers"), "prompt_layers": _layers(prompt_layers, "--prompt-layers"),
        "adapter_tokens": adapter_tokens, "prompt_tokens": prompt_tokens, "temperature_loc": temperature_loc,
        "template": template, "teacher_weight": teacher_weight, "ot_reg": ot_reg, "ot_max_iter": ot_max_iter, "ot_tol": ot_tol, "ot_stop": ot_stop, "image_size": image_size, "padding": padding,
        "flip": flip, "erase": erase, "photometric": photometric, "batch_size": batch_size, "epochs": epochs,
        "max_steps": max_steps, "grad_accum": grad_accum, "lr": lr, "adapter_lr": adapter_lr, "token_lr": token_lr,
        "momentum": momentum, "weight_decay": weight_decay, "schedule": schedule, "warmup_epochs": warmup_epochs,
        "clip_grad_norm": clip_grad_norm, "precision": precision, "ema_decay": ema_decay, "seed": seed,
        "device": device, "num_workers": workers, "log_every": log_every, "checkpoint_every": checkpoint_every,
        "val_every": val_every, "val_every_epochs": val_every_epochs, "val_batch_size": val_batch_size,
        "val_live": val_live, "best_metric": best_metric, "tensorboard": tensorboard, "progress": progress,
    }
    result = train_from_options(config, options)
    if dist.info().is_main:
        typer.echo(str(result.checkpoint))
    if result.bad_images:
        from ramtag.errors import PartialFailure

        raise PartialFailure(f"{result.bad_images} training image(s) were missing or unreadable and skipped; see {result.output / 'bad-images.txt'}")
