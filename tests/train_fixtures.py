"""Tiny training setups built from seeds: an `--init` checkpoint over a tiny CLIP, and labelled PNG images."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ramtag.model.checkpoint import save_checkpoint
from ramtag.model.config import Preprocessing
from ramtag.model.ram import RamModel
from tests.model_fixtures import IMAGE_SIZE, tiny_clip, tiny_config

LABELS = ("red", "green", "blue", "round", "square")


def write_init_checkpoint(path: Path, seed: int = 0, trained: bool = True) -> Path:
    """An untrained RAM checkpoint (trained=True config, or a training-free one) carrying its tiny backbone, so
    --init rebuilds it by itself.

    Three layers of width 64 with one head (what an OpenAI-format state dict implies), adapters and prompts at
    layers 1 and 2; weights rounded to float16, as rebuilding from such a state dict does.
    """
    clip = tiny_clip(seed=seed, embed_dim=64, width=64, layers=3, head_width=64)
    with torch.no_grad():
        for tensor in clip.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    torch.manual_seed(seed + 1)
    layers = (1, 2) if trained else ()
    preprocessing = Preprocessing(image_size=IMAGE_SIZE)
    config = tiny_config(adapter_layers=layers, prompt_layers=layers, trained=trained, preprocessing=preprocessing)
    return save_checkpoint(path, RamModel(clip, config), include_backbone=True)


def _image(rng: np.random.Generator, labels: tuple[str, ...], size: int = 40) -> Image.Image:
    """A noisy image whose colour channels follow its colour labels (so the labels are learnable)."""
    pixels = rng.random((size, size, 3)) * 80
    for channel, colour in enumerate(("red", "green", "blue")):
        if colour in labels:
            pixels[..., channel] += 150
    return Image.fromarray(pixels.clip(0, 255).astype("uint8"))


def labelled_rows(n: int, seed: int) -> list[tuple[str, tuple[str, ...]]]:
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(n):
        count = int(rng.integers(1, 3))
        labels = tuple(str(label) for label in rng.choice(LABELS, size=count, replace=False))
        rows.append((f"img/{seed}-{index}.png", labels))
    return rows


def write_images(root: Path, rows, seed: int) -> None:
    rng = np.random.default_rng(seed + 1000)
    (root / "img").mkdir(parents=True, exist_ok=True)
    for path, labels in rows:
        _image(rng, labels).save(root / path)


def write_reference_json(root: Path, name: str, n: int, seed: int, extra_rows=()) -> Path:
    """`{"images": [[path, [labels]], ...]}` with images under root/img; `extra_rows` are written as given."""
    rows = labelled_rows(n, seed)
    write_images(root, rows, seed)
    entries = [[path, list(labels)] for path, labels in rows] + [[path, list(labels)] for path, labels in extra_rows]
    path = root / name
    path.write_text(json.dumps({"images": entries}))
    return path


def write_shard(path: Path, n: int, seed: int) -> Path:
    """A WebDataset tar: NNNN.png plus NNNN.json holding {"labels": [...]}."""
    rng = np.random.default_rng(seed + 2000)
    with tarfile.open(path, "w") as archive:
        for index, (_, labels) in enumerate(labelled_rows(n, seed)):
            buffer = io.BytesIO()
            _image(rng, labels).save(buffer, format="PNG")
            for suffix, data in (("png", buffer.getvalue()), ("json", json.dumps({"labels": list(labels)}).encode())):
                info = tarfile.TarInfo(f"{seed}-{index:04d}.{suffix}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return path


def write_img2dataset_shard(path: Path, texts: list[str], seed: int) -> Path:
    """A shard as img2dataset writes one: NNNNNNNNN.jpg, NNNNNNNNN.txt (the caption) and NNNNNNNNN.json (url, key,
    caption, status, sizes), with the shard's NNNNN.parquet and NNNNN_stats.json beside it left out."""
    rng = np.random.default_rng(seed + 3000)
    with tarfile.open(path, "w") as archive:
        for index, text in enumerate(texts):
            key = f"{seed:05d}{index:04d}"
            buffer = io.BytesIO()
            _image(rng, tuple(LABELS[: 1 + index % 3])).save(buffer, format="JPEG")
            record = {
                "url": f"https://example.com/images/{key}.jpg", "key": key, "caption": text, "status": "success",
                "error_message": None, "width": 40, "height": 40, "original_width": 640, "original_height": 480,
                "exif": "{}", "sha256": f"{index:064x}",
            }  # fmt: skip
            members = (("jpg", buffer.getvalue()), ("txt", text.encode()), ("json", json.dumps(record).encode()))
            for suffix, data in members:
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return path
