"""The files of a synthetic dataset: :func:`ramtag.data.synth.generate_scene`'s scenes written in every format
ramtag reads (image files, reference JSON, a JSONL manifest, WebDataset shards, vocabularies), and the
shipped examples folder. Same seed, same bytes: PNGs are written with fixed settings, shards with mtime 0.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ramtag.data.synth import ALL_LABELS, SEEN_LABELS, UNSEEN_LABELS, generate_scene
from ramtag.errors import UsageError

FORMATS: frozenset[str] = frozenset({"images", "json", "jsonl", "webdataset"})
ALL = FORMATS


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`write_dataset` wrote."""

    out: Path
    n: int
    seed: int
    image_size: int
    formats: frozenset[str]
    files: dict[str, list[Path]]
    label_counts: dict[str, int]


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _write_lines(path: Path, lines: Iterable[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def write_vocab(out: Path) -> dict[str, Path]:
    """Write seen.txt, unseen.txt and all.txt (one label per line) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    return {
        "seen": _write_lines(out / "seen.txt", SEEN_LABELS),
        "unseen": _write_lines(out / "unseen.txt", UNSEEN_LABELS),
        "all": _write_lines(out / "all.txt", ALL_LABELS),
    }


def _reference_json(path: Path, rows: list[tuple[str, tuple[str, ...]]], classes: Sequence[str]) -> Path:
    keep = set(classes)
    images = [[rel, [label for label in labels if label in keep]] for rel, labels in rows]
    path.write_text(json.dumps({"images": images, "classes": list(classes)}), encoding="utf-8")
    return path


def write_dataset(out: Path, n: int, seed: int, image_size: int = 64, formats: Iterable[str] = ALL,
                  shard_size: int = 1000) -> SynthSummary:
    """Generate ``n`` scenes of stream ``seed`` and write them under ``out`` in the chosen formats.

    Layout (paths inside annotations are relative to ``out``)::

        images/000000.png ...        formats "images", "json", "jsonl"
        labels.json                  reference format, all labels: {"images": [[path, [labels]]], "classes"}
        seen.json / unseen.json      the same, labels and classes restricted to the seen / unseen split
        manifest.jsonl               {"image", "labels", "boxes", "caption"} per line
        boxes.json                   {"box_format", "image_size", "images": {path: [{shape, colour, box}]}}
        shards/synth-000000.tar ...  WebDataset: .png, .json {"labels", "boxes", "caption"}, .idx (indices
                                     into all.txt, space-separated; not .cls, which webdataset's default
                                     decoder reads as one int)
        seen.txt unseen.txt all.txt  vocabularies
    """
    formats = frozenset(formats)
    unknown = formats - FORMATS
    if unknown:
        raise UsageError(f"unknown format(s) {sorted(unknown)}; choose from {sorted(FORMATS)}")
    if not formats:
        raise UsageError("choose at least one format")
    if n < 1:
        raise UsageError(f"n must be at least 1, got {n}")
    if shard_size < 1:
        raise UsageError(f"shard_size must be at least 1, got {shard_size}")
    if formats & {"json", "jsonl"}:
        formats = formats | {"images"}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[Path]] = {key: [path] for key, path in write_vocab(out).items()}

    shard_writer = None
    if "webdataset" in formats:
        import webdataset as wds  # only this writer needs it

        (out / "shards").mkdir(exist_ok=True)
        # mtime fixed so the same seed also gives byte-identical shards
        shard_writer = wds.ShardWriter(str(out / "shards" / "synth-%06d.tar"), maxcount=shard_size,
                                       verbose=0, mtime=0.0)
    if "images" in formats:
        (out / "images").mkdir(exist_ok=True)

    rows: list[tuple[str, tuple[str, ...]]] = []
    manifest: list[str] = []
    boxes: dict[str, list[dict]] = {}
    counts = dict.fromkeys(ALL_LABELS, 0)
    index_of = {label: i for i, label in enumerate(ALL_LABELS)}
    try:
        for index in range(n):
            scene = generate_scene(seed, index, image_size)
            key = f"{index:06d}"
            rel = f"images/{key}.png"
            data = _png_bytes(scene.image)
            for label in scene.labels:
                counts[label] += 1
            if "images" in formats:
                (out / rel).write_bytes(data)
            rows.append((rel, scene.labels))
            boxes[rel] = scene.boxes
            manifest.append(json.dumps({"image": rel, "labels": list(scene.labels), "boxes": scene.boxes,
                                        "caption": scene.caption}))
            if shard_writer is not None:
                meta = {"labels": list(scene.labels), "boxes": scene.boxes, "caption": scene.caption}
                shard_writer.write({
                    "__key__": key,
                    "png": data,
                    "json": json.dumps(meta).encode("utf-8"),
                    "idx": " ".join(str(index_of[label]) for label in scene.labels).encode("ascii"),
                })
    finally:
        if shard_writer is not None:
            shard_writer.close()

    if "images" in formats:
        files["images"] = [out / rel for rel, _ in rows]
    if "json" in formats:
        files["json"] = [
            _reference_json(out / "labels.json", rows, ALL_LABELS),
            _reference_json(out / "seen.json", rows, SEEN_LABELS),
            _reference_json(out / "unseen.json", rows, UNSEEN_LABELS),
        ]
    if "jsonl" in formats:
        files["jsonl"] = [_write_lines(out / "manifest.jsonl", manifest)]
    if "webdataset" in formats:
        files["webdataset"] = sorted((out / "shards").glob("synth-*.tar"))
    box_doc = {"box_format": "xyxy pixels, end-exclusive", "image_size": image_size, "images": boxes}
    (out / "boxes.json").write_text(json.dumps(box_doc), encoding="utf-8")
    files["boxes"] = [out / "boxes.json"]
    return SynthSummary(out, n, seed, image_size, formats, files, counts)


DATASET_ENTRIES = (
    "images", "shards", "labels.json", "seen.json", "unseen.json", "manifest.jsonl", "boxes.json",
    "all.txt", "seen.txt", "unseen.txt",
)
"""What :func:`write_dataset` writes into its folder."""


def clear_dataset(out: Path) -> None:
    """Remove an earlier :func:`write_dataset` from ``out``; other files there stay."""
    import shutil

    for name in DATASET_ENTRIES:
        path = Path(out) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


EXAMPLES_SEED = 20250318
EXAMPLES_COUNT = 12


def write_examples(out: Path, seed: int = EXAMPLES_SEED, n: int = EXAMPLES_COUNT, image_size: int = 96) -> list[Path]:
    """Write the shipped examples folder: ``n`` PNGs, ``vocab.txt`` (all labels) and ``labels.jsonl``.

    Files are named ``img01.png`` ... so their names reveal nothing about their content.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    truth: list[str] = []
    for index in range(n):
        scene = generate_scene(seed, index, image_size)
        name = f"img{index + 1:02d}.png"
        (out / name).write_bytes(_png_bytes(scene.image))
        written.append(out / name)
        truth.append(json.dumps({"image": name, "labels": list(scene.labels), "boxes": scene.boxes,
                                 "caption": scene.caption}))
    written.append(_write_lines(out / "vocab.txt", ALL_LABELS))
    written.append(_write_lines(out / "labels.jsonl", truth))
    return written
