"""`ramtag tag`: the main job."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, List, Optional

import typer

from ramtag.cli.app import app
from ramtag.cli.options import (
    INPUT_PANEL,
    SPEED_PANEL,
    Labels,
    ModelChoice,
    Template,
    command_line,
    model_options,
    say_when_stdin_is_a_terminal,
)
from ramtag.errors import UsageError, exit_status_help

OUTPUT_PANEL = "Output"
SIDECAR_PANEL = "Sidecars"
RAY_PANEL = "Ray"
MAX_PIXELS = 89_478_485
"""Pillow's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS), the default cap."""
MAX_PIXELS_SHOWN = f"{MAX_PIXELS:,}, Pillow's limit"


@app.command(
    epilog=(
        "Examples:\n\n"
        "  ramtag tag examples/ --labels examples/vocab.txt --model demo -o -\n\n"
        "  ramtag tag ./photos --labels vocab.txt -o tags.parquet\n\n"
        "  find /data -name '*.jpg' | ramtag tag - --labels vocab.txt -o tags.jsonl\n\n"
        "  ramtag tag 'shards/{000..099}.tar' -l vocab.rtv -c ram.safetensors -o out/\n\n"
        "  torchrun --nproc-per-node 8 -m ramtag tag 'shards/{00..99}.tar' -l vocab.txt\n\n"
        "  ramtag tag ./lora -l tags.txt --sidecars txt --prefix 'sks, '\n\n"
        "  ramtag tag 'shards/{0..9}.tar' -l tags.txt --sidecars txt --sidecar-dir c/\n\n"
        "  ramtag tag 'shards/{00..99}.tar' -l vocab.txt --ray auto --ray-actors 1:8\n\n" + exit_status_help()
    )
)
@model_options
def tag(
    inputs: Annotated[
        List[str],
        typer.Argument(
            help=(
                "Folders, image files, @list.txt, '-' (paths on stdin), manifests (.parquet/.csv/.jsonl) or "
                "WebDataset shards (.tar, brace patterns, pipe:)."
            ),
            show_default=False,
        ),
    ],
    labels: Labels,
    output: Annotated[
        str,
        typer.Option(
            "--output",
            "-o",
            help="OUT.parquet, OUT.jsonl, '-' (JSONL on stdout) or DIR/ (partitioned Parquet).",
            rich_help_panel=OUTPUT_PANEL,
        ),
    ] = "tags.parquet",
    top_k: Annotated[
        int,
        typer.Option(
            "--top-k", "-k", min=0, help="At most K tags per image (0: no limit).", rich_help_panel=OUTPUT_PANEL
        ),
    ] = 5,
    threshold: Annotated[
        Optional[float], typer.Option("--threshold", help="Minimum score of a tag.", rich_help_panel=OUTPUT_PANEL)
    ] = None,
    thresholds: Annotated[
        Optional[str],
        typer.Option(
            "--thresholds",
            help="Per-label thresholds TSV from `ramtag eval --calibrate`.",
            rich_help_panel=OUTPUT_PANEL,
        ),
    ] = None,
    all_scores: Annotated[
        bool,
        typer.Option(
            "--all-scores", help="Also write every label's score (vocabulary order).", rich_help_panel=OUTPUT_PANEL
        ),
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Tag only inputs missing from an existing or interrupted output.",
            rich_help_panel=OUTPUT_PANEL,
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing output.", rich_help_panel=OUTPUT_PANEL)
    ] = False,
    retry_errors: Annotated[
        bool,
        typer.Option(
            "--retry-errors", help="With --resume, also retry inputs that failed before.", rich_help_panel=OUTPUT_PANEL
        ),
    ] = False,
    save_maps: Annotated[
        Optional[str],
        typer.Option(
            "--save-maps",
            help="Also write region-map PNGs (see `ramtag explain`) into DIR.",
            rich_help_panel=OUTPUT_PANEL,
        ),
    ] = None,
    path_column: Annotated[
        str, typer.Option("--path-column", help="Manifest column holding image paths.", rich_help_panel=INPUT_PANEL)
    ] = "path",
    keep_columns: Annotated[
        Optional[str],
        typer.Option(
            "--keep-columns",
            help=(
                "Comma-separated columns to carry into the output: manifest or table columns; for shards, members "
                "(txt), JSON fields (json.url) or __key__ (as sample_key). A column named key is written as source_key."
            ),
            rich_help_panel=INPUT_PANEL,
        ),
    ] = None,
    image_column: Annotated[
        Optional[str],
        typer.Option(
            "--image-column",
            metavar="COLUMN",
            help=(
                "Parquet/Arrow inputs (files, folders, Hugging Face save_to_disk folders) hold their images in COLUMN: "
                "binary (img2dataset's jpg) or struct<bytes, path> (Hugging Face)."
            ),
            show_default=False,
            rich_help_panel=INPUT_PANEL,
        ),
    ] = None,
    key_column: Annotated[
        Optional[str],
        typer.Option(
            "--key-column",
            metavar="COLUMN",
            help="With --image-column: the row key column.",
            show_default="the struct's path, else FILE:ROW",
            rich_help_panel=INPUT_PANEL,
        ),
    ] = None,
    root: Annotated[
        Optional[str],
        typer.Option(
            "--root",
            help="Resolve relative paths of lists, stdin and manifests against DIR.",
            show_default="the current directory; a manifest's own folder for its paths",
            rich_help_panel=INPUT_PANEL,
        ),
    ] = None,
    max_pixels: Annotated[
        int,
        typer.Option(
            "--max-pixels",
            min=0,
            help="Refuse images with more pixels (decompression-bomb guard; 0: no cap).",
            show_default=MAX_PIXELS_SHOWN,
            rich_help_panel=INPUT_PANEL,
        ),
    ] = MAX_PIXELS,
    template: Template = None,
    batch_size: Annotated[
        Optional[int],
        typer.Option(
            "--batch-size",
            "-b",
            min=1,
            help="Images per forward pass.",
            show_default="32 on CPU, 256 on CUDA",
            rich_help_panel=SPEED_PANEL,
        ),
    ] = None,
    workers: Annotated[
        Optional[int],
        typer.Option(
            "--workers",
            "-j",
            min=0,
            help="Decoding processes (0: decode in the main process).",
            show_default="cores - 1, at most 8",
            rich_help_panel=SPEED_PANEL,
        ),
    ] = None,
    precision: Annotated[
        str,
        typer.Option(
            "--precision",
            help="auto (bf16 autocast on CUDA where supported, else fp16; fp32 on CPU), fp32, bf16 or fp16.",
            rich_help_panel=SPEED_PANEL,
        ),
    ] = "auto",
    fast_decode: Annotated[
        bool,
        typer.Option(
            "--fast-decode",
            help="Decode JPEGs at reduced scale (faster; pixels differ slightly).",
            rich_help_panel=SPEED_PANEL,
        ),
    ] = False,
    decode: Annotated[
        str,
        typer.Option(
            "--decode",
            help="Where JPEGs decode: cpu (workers), gpu (batched, on the model's device) or auto (gpu on CUDA).",
            rich_help_panel=SPEED_PANEL,
        ),
    ] = "auto",
    compile_forward: Annotated[
        bool,
        typer.Option(
            "--compile",
            help=(
                "Compile the image forward with torch.compile (tens of seconds at start, won back on long GPU runs; "
                "if it cannot compile, one warning and the run goes on uncompiled)."
            ),
            rich_help_panel=SPEED_PANEL,
        ),
    ] = False,
    part_rows: Annotated[
        int,
        typer.Option(
            "--part-rows",
            min=1,
            help="Rows per part file (what an interrupted run can lose at most, besides a minute of work).",
            rich_help_panel=OUTPUT_PANEL,
        ),
    ] = 262_144,
    allow_empty: Annotated[
        bool,
        typer.Option(
            "--allow-empty",
            help="Write an empty table when the inputs hold no image (by default that is a usage error).",
            rich_help_panel=OUTPUT_PANEL,
        ),
    ] = False,
    labels_out: Annotated[
        Optional[str],
        typer.Option(
            "--labels-out",
            metavar="FILE",
            help=(
                "Also write the vocabulary (one label per line, the order of --all-scores) to FILE; for -o -, "
                "whose rows carry no metadata (a file output always gets OUT.labels.txt beside it)."
            ),
            rich_help_panel=OUTPUT_PANEL,
        ),
    ] = None,
    sidecars: Annotated[
        Optional[List[str]],
        typer.Option(
            "--sidecars",
            metavar="KIND",
            help=(
                "Write each image's tags beside it: txt (comma-separated caption, image.txt) and/or xmp "
                "(dc:subject keywords, image.xmp). Repeat or join with commas. Images are never rewritten. "
                "Two images of one name (a.jpg, a.png) would share a.txt: the first listed keeps it, the other "
                "gets none and a warning."
            ),
            show_default=False,
            rich_help_panel=SIDECAR_PANEL,
        ),
    ] = None,
    sidecar_mode: Annotated[
        str,
        typer.Option(
            "--sidecar-mode",
            metavar="MODE",
            help=(
                "An existing sidecar: skip keeps it, overwrite replaces it (an XMP file keeps its other "
                "metadata), append adds the tags it lacks."
            ),
            rich_help_panel=SIDECAR_PANEL,
        ),
    ] = "skip",
    sidecar_dir: Annotated[
        Optional[str],
        typer.Option(
            "--sidecar-dir",
            metavar="DIR",
            help=(
                "Write sidecars under DIR by row key (DIR/sub/a.txt, DIR/shard.tar/key.txt) instead of beside "
                "the images; needed for shards."
            ),
            rich_help_panel=SIDECAR_PANEL,
        ),
    ] = None,
    exclude_tags: Annotated[
        Optional[str],
        typer.Option(
            "--exclude-tags",
            metavar="FILE",
            help="Tags never written to a sidecar (one per line or comma-separated); the table keeps them.",
            rich_help_panel=SIDECAR_PANEL,
        ),
    ] = None,
    replace_underscores: Annotated[
        bool,
        typer.Option(
            "--replace-underscores", help="Write long_hair as long hair in sidecars.", rich_help_panel=SIDECAR_PANEL
        ),
    ] = False,
    prefix: Annotated[
        str,
        typer.Option(
            "--prefix",
            metavar="TEXT",
            help="Start every caption .txt with TEXT, as given (a trigger word: 'sks, ').",
            show_default=False,
            rich_help_panel=SIDECAR_PANEL,
        ),
    ] = "",
    ray: Annotated[
        Optional[str],
        typer.Option(
            "--ray",
            metavar="ADDRESS",
            help="Run on Ray Data: auto (join the cluster `ray start` made), local (start one here) or an address.",
            show_default=False,
            rich_help_panel=RAY_PANEL,
        ),
    ] = None,
    ray_cpus_per_task: Annotated[
        float,
        typer.Option("--ray-cpus-per-task", help="CPUs of each decoding task.", rich_help_panel=RAY_PANEL),
    ] = 1.0,
    ray_gpus_per_actor: Annotated[
        Optional[float],
        typer.Option(
            "--ray-gpus-per-actor",
            help="GPUs of each model actor (fractions share a GPU).",
            show_default="1 where the cluster has GPUs, else 0",
            rich_help_panel=RAY_PANEL,
        ),
    ] = None,
    ray_actors: Annotated[
        Optional[str],
        typer.Option(
            "--ray-actors",
            metavar="MIN:MAX",
            help="Model actors: N, or MIN:MAX for a pool Ray scales between them.",
            show_default="1:(cluster GPUs / GPUs per actor)",
            rich_help_panel=RAY_PANEL,
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary on stderr.")] = False,
    *,
    choice: ModelChoice,
) -> None:
    """Tag images with a vocabulary and write one row per input: [bold]key, source, tags, error[/bold]."""
    from ramtag.engine import dist
    from ramtag.engine.device_feed import check_decode
    from ramtag.engine.preflight import preflight_tag
    from ramtag.engine.sidecars import SidecarOptions, parse_sidecar_kinds
    from ramtag.engine.tag import TagOptions, resume_after_restart, run_tag

    options = TagOptions(
        inputs=list(inputs),
        labels=labels,
        output=output,
        top_k=top_k,
        threshold=threshold,
        thresholds_file=thresholds,
        all_scores=all_scores,
        batch_size=batch_size,
        workers=workers,
        precision=precision,
        resume=resume,
        overwrite=overwrite,
        retry_errors=retry_errors,
        path_column=path_column,
        keep_columns=[c.strip() for c in keep_columns.split(",") if c.strip()] if keep_columns else [],
        root=root,
        max_pixels=max_pixels or None,
        fast_decode=fast_decode,
        decode=decode,
        compile=compile_forward,
        templates=list(template or []),
        quiet=quiet,
        save_maps=save_maps,
        part_rows=part_rows,
        allow_empty=allow_empty,
        command_line=command_line(),
        labels_out=labels_out,
        sidecars=SidecarOptions(
            parse_sidecar_kinds(sidecars), sidecar_mode, sidecar_dir, exclude_tags, replace_underscores, prefix
        ),
        image_column=image_column,
        key_column=key_column,
    )
    if ray is not None and compile_forward:  # the actors load their own model, uncompiled
        raise UsageError("--compile works without --ray only")
    ray_options = _ray_options(ray, ray_cpus_per_task, ray_gpus_per_actor, ray_actors)  # before any model loads
    if ray_options is not None and save_maps:
        from ramtag.engine.ray_run import SAVE_MAPS_ON_RAY

        raise UsageError(SAVE_MAPS_ON_RAY)
    device = choice.device
    if ray_options is not None and decode == "gpu":  # Ray's decoding tasks run on CPUs
        raise UsageError("--decode gpu works without --ray only")
    check_decode(decode, device)
    info = dist.setup(device)
    try:
        choice = replace(
            choice,
            # with --ray the driver only encodes the vocabulary: the head node's GPU is left to the actors
            device=("cpu" if device == "auto" else device) if ray_options else dist.device_for(info, device),
            quiet=quiet,
        )
        options = resume_after_restart(options, is_main=info.is_main)  # before preflight refuses the old run's parts
        preflight_tag(
            options,
            checkpoint=choice.checkpoint,
            model=choice.model,
            pretrained=choice.pretrained,
            is_main=info.is_main,
        )
        if info.is_main and not quiet:
            if labels == "-":
                say_when_stdin_is_a_terminal("labels")
            if "-" in options.inputs:
                say_when_stdin_is_a_terminal("image paths")
        if ray_options is not None:
            from ramtag.engine.ray_run import run_ray_tag

            run_ray_tag(options, choice.load(), ray_options, _runtime_spec(choice, device))
            return
        run_tag(options, choice.load())
    finally:
        dist.teardown()


def _ray_options(address, cpus_per_task, gpus_per_actor, actors):
    """--ray's settings, checked (and Ray's presence) before a model loads; None without --ray."""
    if address is None:
        for name, value in (("--ray-gpus-per-actor", gpus_per_actor), ("--ray-actors", actors)):
            if value is not None:
                raise UsageError(f"{name} needs --ray")
        return None
    from ramtag.engine.ray_run import RayOptions, parse_actors, require_ray

    options = RayOptions(address, cpus_per_task, gpus_per_actor, parse_actors(actors) if actors else None)
    require_ray()
    return options


def _runtime_spec(choice, device: str):
    """What each Ray actor loads: the model the options name, on the device the actor is given."""
    from ramtag.engine.ray_stages import RuntimeSpec

    return RuntimeSpec(choice.checkpoint, choice.model, choice.pretrained, device, choice.overrides())
