"""What the evaluation tests share: a bench of labelled images (two that cannot be decoded), a tiny trained
checkpoint, direct scoring outside the pipeline, score tables as `ramtag tag --all-scores` writes them, and the
`ramtag` command run in-process."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from ramtag.cli import main
from ramtag.data.images import decode_image
from ramtag.data.rows import TagBatch
from ramtag.engine.eval.model import evaluate_model
from ramtag.engine.eval.types import EvalResult, EvalSettings
from tests.io_fixtures import write_image, write_tag_table

LABELS = ("cat", "dog", "car", "tree", "sky", "boat")
UNSEEN = ("car", "boat")
FOREIGN = "/mnt/nas/someone/data"
# Image index -> labels. 9 has none; "missing" and "corrupt" cannot be decoded.
ANNOTATIONS = {
    "0": ["cat", "car"],
    "1": ["dog"],
    "2": ["tree", "sky"],
    "3": ["boat"],
    "4": ["cat", "dog", "sky"],
    "5": ["car", "boat"],
    "6": ["tree"],
    "7": ["dog", "boat"],
    "8": ["sky"],
    "9": [],
    "missing": ["car"],
    "corrupt": ["boat", "dog"],
}
GOOD = [str(i) for i in range(10)]


@dataclass
class Bench:
    root: Path
    checkpoint: Path
    annotations: Path
    unseen: Path

    def key(self, name: str) -> str:
        return f"img/{name}.png"

    def args(self, *extra: str) -> list[str]:
        return [
            "eval", str(self.annotations), "--checkpoint", str(self.checkpoint), "--root", str(self.root),
            "--map-prefix", f"{FOREIGN}=", "--workers", "0", "--device", "cpu", "--batch-size", "64", *extra,
        ]

    def settings(self, **overrides) -> EvalSettings:
        values = dict(root=str(self.root), prefix_map=(f"{FOREIGN}=",), batch_size=64, workers=0)
        values.update(overrides)
        return EvalSettings(**values)


def tiny_checkpoint(path: Path) -> Path:
    """A trained-mode RAM checkpoint around a tiny OpenAI-shaped CLIP, backbone included."""
    import open_clip

    from ramtag.model.checkpoint import save_checkpoint
    from ramtag.model.config import RamConfig
    from ramtag.model.ram import RamModel

    torch.manual_seed(0)
    clip = open_clip.model.CLIP(
        embed_dim=64,
        vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2),
        text_cfg=dict(context_length=16, vocab_size=49408, width=64, heads=1, layers=2),
        quick_gelu=True,
    )
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(100.0))
    config = RamConfig(
        backbone="tiny", pretrained=None, adapter_layers=(1,), adapter_tokens=2, prompt_layers=(1,),
        prompt_tokens=2, trained=True, preprocessing={"image_size": 32},
    )
    model = RamModel(clip, config).eval()
    with torch.no_grad():  # a visible adapter: its output conv starts near zero otherwise
        for name, parameter in model.trainable_parameters().items():
            if "adapter" in name and parameter.ndim > 1:
                parameter.normal_(0.0, 0.05)
    return save_checkpoint(path, model, include_backbone=True)


def make_bench(root: Path) -> Bench:
    """The images, the annotation file (paths under a foreign prefix), the unseen labels and the checkpoint."""
    for index, name in enumerate(GOOD):
        write_image(root / "img" / f"{name}.png", seed=100 + index)
    (root / "img" / "corrupt.png").write_bytes(b"\x89PNG broken")
    document = {
        "images": [[f"{FOREIGN}/img/{name}.png", labels] for name, labels in ANNOTATIONS.items()],
        "classes": list(LABELS),
    }
    annotations = root / "test.json"
    annotations.write_text(json.dumps(document))
    unseen = root / "unseen.txt"
    unseen.write_text("\n".join(UNSEEN) + "\n")
    return Bench(root, tiny_checkpoint(root / "tiny.safetensors"), annotations, unseen)


def evaluate_with_baselines(runtime, bench: Bench) -> EvalResult:
    """ZSL and GZSL with the baselines, as `ramtag eval --unseen ... --baseline` runs them."""
    return evaluate_model(runtime, str(bench.annotations), bench.settings(unseen=UNSEEN, baseline=True))


# Direct scoring encodes only the labels it scores, the pipeline all labels at once: text features differ
# by float rounding of batched matrix products (~1e-7), which the local logit's 1/tau_loc = 500 amplifies.
SCORE_TOLERANCE = 1e-5


def direct_scores(runtime, bench: Bench, names: list[str], labels, field: str = "scores") -> np.ndarray:
    """Score the images in one batch, outside the evaluation pipeline."""
    transform = runtime.transform()
    images = torch.stack([transform(decode_image(bench.root / "img" / f"{name}.png")) for name in names])
    output = runtime.score(images, runtime.encode_labels(list(labels)))
    return getattr(output, field).float().numpy()


def multi_hot(names: list[str], labels) -> np.ndarray:
    return np.array([[int(label in ANNOTATIONS[name]) for label in labels] for name in names], dtype=np.uint8)


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_table(
    path: Path, keys: list[str], scores: np.ndarray, labels, errors: dict[str, str] | None = None, metadata=None
) -> Path:
    """A score table as `ramtag tag --all-scores` writes it (Parquet or JSONL with its sidecar)."""
    meta = {"vocabulary": list(labels)} if metadata is None else metadata
    count = len(keys)
    batches = [
        TagBatch(
            keys=keys, sources=keys, errors=[None] * count, tag_counts=np.zeros(count, np.int64),
            tag_labels=np.zeros(0, np.int64), tag_scores=np.zeros(0, np.float32), scores=scores,
        )
    ]
    if errors:
        batches.append(TagBatch.from_failures(list(errors), list(errors), list(errors.values())))
    write_tag_table(path, list(labels), {0: batches}, metadata=meta, all_scores=True)
    return path


# One bench, one model and one evaluation with the baselines for every evaluation test module (they import these
# fixtures): each module built and evaluated its own before, the same work five times over.
@pytest.fixture(scope="session")
def bench(tmp_path_factory) -> Bench:
    return make_bench(tmp_path_factory.mktemp("eval"))


@pytest.fixture(scope="session")
def runtime(bench: Bench):
    from ramtag.engine.runtime import load_runtime

    return load_runtime(bench.checkpoint, device="cpu")


@pytest.fixture(scope="session")
def evaluated(bench: Bench, runtime) -> EvalResult:
    """ZSL and GZSL with the baselines, as `ramtag eval --unseen ... --baseline` runs them."""
    return evaluate_with_baselines(runtime, bench)
