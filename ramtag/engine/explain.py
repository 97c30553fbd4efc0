"""Region maps from the KCOT transport plan: where in the image each tag was matched.

For image b and label c the plan column T[b, :, c] (which sums to 1/C) says how much of the label's mass each
region carries; scaled by C it is a distribution over regions. Upsampled to the image, it is the heat map.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from ramtag.errors import OutputError
from ramtag.model.ram import RamOutput
from ramtag.selection import Selection

PANEL = 224
CAPTION = 18


def region_maps(output: RamOutput, labels: torch.Tensor) -> torch.Tensor:
    """Maps [B, K, side, side] of the chosen labels [B, K] (each a distribution over regions)."""
    plan = output.plan.float()
    batch, regions, vocabulary = plan.shape
    side = int(round(regions**0.5))
    chosen = plan.gather(2, labels.to(plan.device).unsqueeze(1).expand(batch, regions, labels.shape[1]))
    maps = chosen / chosen.sum(dim=1, keepdim=True).clamp_min(1e-30)
    return maps.transpose(1, 2).reshape(batch, labels.shape[1], side, side)


def peak_position(region_map: torch.Tensor, image_size: tuple[int, int]) -> tuple[float, float]:
    """(x, y) in image pixels of the centre of the map's strongest region."""
    side_y, side_x = region_map.shape[-2:]
    index = int(region_map.flatten().argmax())
    row, col = divmod(index, side_x)
    width, height = image_size
    return (col + 0.5) * width / side_x, (row + 0.5) * height / side_y


def safe_file_name(key: str, suffix: str = ".png") -> str:
    """A flat, harmless file name for any key (keys can come from archives: never trust them as paths)."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._")[-80:] or "image"
    return f"{readable}-{hashlib.sha1(key.encode('utf-8')).hexdigest()[:8]}{suffix}"


def _heat_colours(values: np.ndarray) -> np.ndarray:
    """A blue-to-red ramp for values in [0, 1] -> uint8 RGB."""
    ramp = np.stack(
        [
            np.clip(1.5 - np.abs(4 * values - 3), 0, 1),
            np.clip(1.5 - np.abs(4 * values - 2), 0, 1),
            np.clip(1.5 - np.abs(4 * values - 1), 0, 1),
        ],
        -1,
    )
    return (ramp * 255).astype(np.uint8)


def overlay(image: Image.Image, region_map: torch.Tensor, alpha: float = 0.5) -> Image.Image:
    width, height = image.size
    upsampled = F.interpolate(
        region_map[None, None].float(), size=(height, width), mode="bilinear", align_corners=False
    )[0, 0]
    values = upsampled.numpy()
    values = (values - values.min()) / max(float(values.max() - values.min()), 1e-12)
    heat = Image.fromarray(_heat_colours(values))
    return Image.blend(image.convert("RGB"), heat, alpha)


def render(image: Image.Image, maps: torch.Tensor, captions: Sequence[str], panel: int = PANEL) -> Image.Image:
    """The image, then one overlay per tag, side by side, each captioned."""
    scale = panel / max(image.size)
    shown = image.convert("RGB").resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR
    )
    panels = [(shown, "image")] + [(overlay(shown, m), c) for m, c in zip(maps, captions)]
    sheet = Image.new("RGB", (panel * len(panels), panel + CAPTION), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (picture, caption) in enumerate(panels):
        sheet.paste(picture, (index * panel + (panel - picture.width) // 2, (panel - picture.height) // 2))
        draw.text((index * panel + 4, panel + 3), caption[:34], fill="black")
    return sheet


def denormalise(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> Image.Image:
    pixels = image.detach().float().cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return Image.fromarray((pixels.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


class MapWriter:
    """Writes one explanation PNG per image (used by `ramtag explain` and `ramtag tag --save-maps`)."""

    def __init__(self, folder: str | Path, labels: Sequence[str], mean: Sequence[float], std: Sequence[float]):
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = self.folder / f".ramtag-write-test-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as exc:
            raise OutputError(f"{self.folder}: cannot write region maps there ({exc.strerror or exc})") from None
        self.labels = list(labels)
        self.mean, self.std = tuple(mean), tuple(std)
        self.written: list[Path] = []

    def write(
        self,
        keys: Sequence[str],
        images: torch.Tensor,
        output: RamOutput,
        selection: Selection,
        originals: Sequence[Image.Image] | None = None,
    ) -> list[Path]:
        paths = []
        offset = 0
        for index, key in enumerate(keys):
            count = int(selection.counts[index])
            chosen = selection.labels[offset:offset + count]
            scores = selection.scores[offset:offset + count]
            offset += count
            picture = originals[index] if originals is not None else denormalise(images[index], self.mean, self.std)
            if count:
                maps = region_maps(_one(output, index), torch.as_tensor(chosen, dtype=torch.long).unsqueeze(0))[0].cpu()
            else:
                maps = torch.zeros(0)
            captions = [f"{self.labels[c]} {s:.2f}" for c, s in zip(chosen, scores)]
            path = self.folder / safe_file_name(key)
            try:
                render(picture, maps, captions).save(path)
            except OSError as exc:
                raise OutputError(f"{path}: cannot write the region map ({exc.strerror or exc})") from None
            paths.append(path)
        self.written.extend(paths)
        return paths


def _one(output: RamOutput, index: int) -> RamOutput:
    return RamOutput(
        scores=output.scores[index : index + 1],
        global_scores=output.global_scores[index : index + 1],
        local_scores=output.local_scores[index : index + 1],
        global_logits=output.global_logits[index : index + 1],
        local_logits=output.local_logits[index : index + 1],
        similarity=output.similarity[index : index + 1],
        plan=output.plan[index : index + 1],
        region_marginal=output.region_marginal[index : index + 1],
        sinkhorn_iterations=output.sinkhorn_iterations,
    )


def run_explain(
    runtime,
    vocabulary,
    inputs: Sequence[str],
    out_dir: str | Path,
    top_k: int = 3,
    batch_size: int = 16,
    max_pixels: int | None = None,
    overwrite: bool = False,
) -> tuple[list[Path], list[tuple[str, str]]]:
    """Explanation PNGs for image files and folders; returns (written files, [(key, error)] of failures).

    A folder that is not empty is refused unless ``overwrite`` (then same-named maps are replaced)."""
    from ramtag.data.images import PIL_LIMIT, ImageDecodeError, decode_image
    from ramtag.data.listing import filesystem_path
    from ramtag.data.sources import plan_inputs
    from ramtag.engine.preflight import check_maps_folder
    from ramtag.selection import select_tags

    check_maps_folder(str(out_dir), overwrite=overwrite)
    plan = plan_inputs(list(inputs))
    if plan.shards:
        from ramtag.errors import UsageError

        raise UsageError("explain reads image files and folders; for shards use `ramtag tag --save-maps DIR`")
    pre = runtime.config.preprocessing
    writer = MapWriter(out_dir, vocabulary.labels, pre.mean, pre.std)
    transform = runtime.transform()
    features = vocabulary.features.to(runtime.device)
    failures: list[tuple[str, str]] = []
    rows = plan.files.to_pylist()
    for start in range(0, len(rows), batch_size):
        keys, originals, tensors = [], [], []
        for row in rows[start:start + batch_size]:
            try:
                if row["error"]:
                    raise ImageDecodeError(row["error"])
                picture = decode_image(
                    filesystem_path(row["path"]), max_pixels=max_pixels if max_pixels is not None else PIL_LIMIT
                )
            except ImageDecodeError as error:
                failures.append((row["key"], error.reason))
                continue
            keys.append(row["key"])
            originals.append(picture)
            tensors.append(transform(picture))
        if not keys:
            continue
        images = torch.stack(tensors)
        output = runtime.score(images, features)
        selection = select_tags(output.scores.float(), top_k=top_k)
        writer.write(keys, images, output, selection, originals=originals)
    return writer.written, failures
