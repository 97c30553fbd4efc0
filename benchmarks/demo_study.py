"""Measurements on the synthetic benchmark: zero-shot quality of the scorers and how they degrade with
distractor labels. Used by `demo_vocabulary.py` here (numbers in the README), by the tests and by
scripts/build_demo_model.py.

Arms, all from one forward pass of a training-free model: `clip_global` (CLIP's zero-shot ranking,
softmax(cos/τ_g)), `ram_local` (the KCOT-matched local score), `ram` (their mean, what `ramtag tag` writes).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ramtag.data.synth import ALL_LABELS, COLOURS, SHAPES, UNSEEN_LABELS, generate_scene
from ramtag.metrics import mean_average_precision

ARMS = ("clip_global", "ram_local", "ram")


@dataclass
class LabelledImages:
    images: torch.Tensor
    targets: np.ndarray
    """[N, len(ALL_LABELS)] multi-hot."""
    scenes: list


def synthetic_images(runtime, n: int, seed: int) -> LabelledImages:
    """`n` scenes of the synthetic stream `seed`, preprocessed for `runtime`'s model."""
    transform = runtime.transform()
    size = runtime.config.preprocessing.image_size
    scenes = [generate_scene(seed, index, size=size) for index in range(n)]
    targets = np.array([[label in scene.labels for label in ALL_LABELS] for scene in scenes], dtype=np.float32)
    return LabelledImages(torch.stack([transform(scene.image) for scene in scenes]), targets, scenes)


def distractor_labels(count: int, seed: int, exclude: set[str]) -> list[str]:
    """`count` real words from CLIP's BPE vocabulary (deterministic), none of them a benchmark label."""
    from open_clip.tokenizer import SimpleTokenizer

    words = sorted(
        token[:-4] for token in SimpleTokenizer().encoder
        if token.endswith("</w>") and token[:-4].isalpha() and token[:-4].isascii() and len(token) >= 8
    )
    words = [w for w in words if w not in exclude]
    rng = np.random.default_rng(seed)
    return [words[i] for i in rng.choice(len(words), size=count, replace=False)]


@torch.inference_mode()
def arm_scores(runtime, images: torch.Tensor, labels: list[str], batch_size: int = 64) -> dict[str, np.ndarray]:
    features = runtime.encode_labels(labels)
    parts: dict[str, list[np.ndarray]] = {arm: [] for arm in ARMS}
    for start in range(0, len(images), batch_size):
        out = runtime.score(images[start:start + batch_size], features)
        parts["clip_global"].append(out.global_scores.float().cpu().numpy())
        parts["ram_local"].append(out.local_scores.float().cpu().numpy())
        parts["ram"].append(out.scores.float().cpu().numpy())
    return {arm: np.concatenate(chunks) for arm, chunks in parts.items()}


def chance_map(targets: np.ndarray, seed: int, repeats: int = 20) -> float:
    """Mean mAP of uniformly random scores on the same targets."""
    rng = np.random.default_rng(seed)
    return float(np.mean([mean_average_precision(rng.random(targets.shape), targets)[0] for _ in range(repeats)]))


LABEL_GROUPS: dict[str, tuple[str, ...]] = {
    "all": ALL_LABELS,
    "unseen": UNSEEN_LABELS,
    "shapes": SHAPES,
    "colours": tuple(COLOURS),
}


def zero_shot_report(runtime, data: LabelledImages) -> dict:
    """mAP of every arm per label group (all, unseen, shapes, colours), each group's columns taken from one
    scoring with all labels, against chance on the same columns."""
    scores = arm_scores(runtime, data.images, list(ALL_LABELS))
    columns = {group: [ALL_LABELS.index(label) for label in labels] for group, labels in LABEL_GROUPS.items()}
    report = {"images": len(data.images), "labels": len(ALL_LABELS)}
    for arm, values in scores.items():
        report[arm] = {group: mean_average_precision(values[:, cols], data.targets[:, cols])[0]
                       for group, cols in columns.items()}
    report["chance"] = {group: chance_map(data.targets[:, cols], seed)
                        for seed, (group, cols) in enumerate(columns.items())}
    return report


LOCAL_RULES = {"fixed": ("fixed", False), "scaled": ("fixed", True), "matched": ("matched", False)}
"""Local temperature rules compared: the stored τ_loc, τ_loc · C_ref / C, and 4·τ_g / C (RamConfig)."""


@contextmanager
def local_rule(runtime, rule: str, reference_size: int = len(ALL_LABELS)):
    """Score with one of LOCAL_RULES inside the block; the model's own settings are restored after it."""
    config = runtime.model.config
    saved = (config.local_temperature, config.scale_local_temperature, config.train_vocabulary_size)
    config.local_temperature, config.scale_local_temperature = LOCAL_RULES[rule]
    config.train_vocabulary_size = reference_size
    try:
        yield
    finally:
        config.local_temperature, config.scale_local_temperature, config.train_vocabulary_size = saved


def distractor_study(runtime, data: LabelledImages, counts=(0, 10, 100, 1000), seed: int = 0) -> list[dict]:
    """mAP on the benchmark labels when `count` distractor labels join the vocabulary, under each local
    temperature rule (`scaled` takes the benchmark's own vocabulary size as C_ref)."""
    rows = []
    for count in counts:
        labels = list(ALL_LABELS) + distractor_labels(count, seed, set(ALL_LABELS)) if count else list(ALL_LABELS)
        for rule in LOCAL_RULES:
            with local_rule(runtime, rule):
                scores = arm_scores(runtime, data.images, labels)
            row = {"distractors": count, "local_temperature": rule}
            for arm, values in scores.items():
                row[arm] = mean_average_precision(values[:, : len(ALL_LABELS)], data.targets)[0]
            rows.append(row)
    return rows


def map_peak_hits(runtime, data: LabelledImages, batch_size: int = 64) -> dict:
    """How often the region map of a present label peaks inside a box of an object carrying that label.

    Chance is the fraction of the image those boxes cover (a peak placed uniformly at random). Reported for
    colour labels and shape labels separately, scored with the whole benchmark vocabulary.
    """
    from ramtag.data.synth import COLOURS
    from ramtag.engine.explain import peak_position, region_maps

    labels = list(ALL_LABELS)
    features = runtime.encode_labels(labels)
    size = runtime.config.preprocessing.image_size
    tallies = {"colour": [0, 0, 0.0], "shape": [0, 0, 0.0]}  # hits, trials, summed chance
    for start in range(0, len(data.images), batch_size):
        out = runtime.score(data.images[start:start + batch_size], features)
        for offset, scene in enumerate(data.scenes[start:start + batch_size]):
            for label in scene.labels:
                kind = "colour" if label in COLOURS else "shape"
                boxes = [o.box for o in scene.objects if label in (o.colour, o.shape)]
                column = torch.tensor([[labels.index(label)]])
                region_map = region_maps(_row(out, offset), column)[0, 0]
                x, y = peak_position(region_map, (size, size))
                covered = np.zeros((size, size), dtype=bool)
                for x0, y0, x1, y1 in boxes:
                    covered[y0:y1, x0:x1] = True  # boxes are [x0, y0, x1, y1), end-exclusive
                tallies[kind][0] += int(covered[min(int(y), size - 1), min(int(x), size - 1)])
                tallies[kind][1] += 1
                tallies[kind][2] += float(covered.mean())
    return {
        kind: {"hit_rate": h / max(n, 1), "chance": c / max(n, 1), "trials": n} for kind, (h, n, c) in tallies.items()
    }


def _row(output, index: int):
    from ramtag.engine.explain import _one

    return _one(output, index)
