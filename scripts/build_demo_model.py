"""Build the shipped demo CLIP: a small open_clip model pretrained contrastively on synthetic captions.

    python scripts/build_demo_model.py                      # the shipped build, 35 min on 2 cores (resumes)
    python scripts/build_demo_model.py --steps 200 --out /tmp/demo --work /tmp/demo-work   # quick check

Reproducible: the model is initialised from ``--seed`` and training batch ``t`` is always scenes
``t*batch .. (t+1)*batch-1`` of the synthetic stream ``--data-seed`` (captions from the same
indices), so a run interrupted and resumed from its checkpoint sees exactly the same data.
Evaluation uses the disjoint stream ``--eval-seed``: zero-shot mAP with plain CLIP global scoring
(cosine of the image embedding with the embedding of ``template.format(label)``), per split, against
chance (the mAP of random scores on the same images).

Two additions to CLIP's caption loss make a 4-layer ViT from scratch learn what RAM needs (README, "The
demo model"): batches whose objects share two colours (``--shared-palette-steps``), so only shape tells
their captions apart, and a region-phrase term (``--region-weight``) on the value-value path's features.

Output: ``demo-clip.safetensors`` (open_clip ``CLIP`` state dict, fp16) and ``demo-clip.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO))

from ramtag.data import synth  # noqa: E402

TEMPLATE = "a photo of a {}."
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
CAPTION_STYLES = ("full", "shapes", "colours", "label")


@dataclass
class BuildConfig:
    seed: int = 0
    """Seed of the model initialisation."""
    data_seed: int = 1
    """Synthetic stream the training batches are drawn from."""
    eval_seed: int = 2
    """Disjoint synthetic stream for the held-out evaluation."""
    eval_images: int = 1000
    image_size: int = 64
    patch_size: int = 8
    vision_layers: int = 4
    vision_width: int = 128
    text_layers: int = 4
    text_width: int = 128
    context_length: int = 32
    embed_dim: int = 128
    steps: int = 3000
    batch_size: int = 64
    lr: float = 3e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    threads: int = 2
    checkpoint_every_s: float = 180.0
    caption_weights: str = "0.5,0.3,0.1,0.1"
    """Probabilities of the caption styles full, shapes, colours, label. Captions naming only shapes
    force the image tower to encode shape: with full captions, colours alone tell most images apart.
    Single-label captions put the zero-shot prompts themselves in the text tower's training data."""
    single_object_steps: float = 0.1
    """Fraction of the steps (from the start) whose scenes hold one object only: a curriculum that
    makes shape, not only colour, tell batch images apart early on."""
    shared_palette_steps: float = 0.5
    """Fraction of the steps (spread evenly) whose scenes all draw colours from the same two colours,
    chosen per batch: in such a batch colour cannot tell images apart, so the loss rewards shape."""
    region_weight: float = 1.0
    """Weight of a region-phrase term (0: plain CLIP): each object's region feature (the value-value
    path's patch features over the object's mask, as RAM reads them) must pick its own phrase
    ("a photo of a red star.") among the phrases of every object in the batch. A 4-layer CLIP trained
    from scratch does not grow the local semantics RAM reads from large CLIPs' value-value attention;
    region-text pretraining (as in RegionCLIP) asks for them directly, from the generator's masks."""
    sincos_init: bool = True
    snapshot_every: int = 0
    """Also keep work/step-N.pt every this many steps (0: only work/last.pt), to compare checkpoints."""
    log_every: int = 25
    eval_every: int = 0
    """Also print zero-shot mAP on the first 300 held-out images every this many steps (0: only at the end)."""
    out: Path = REPO / "ramtag" / "assets" / "demo"
    work: Path = Path("/work/scratch/demo_build")
    """Checkpoints live here; a run resumes from work/last.pt when it exists and matches this config."""

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        if self.warmup_steps >= self.steps:
            raise ValueError("warmup_steps must be below steps")
        self.out, self.work = Path(self.out), Path(self.work)
        weights = self.style_weights()
        if len(weights) != len(CAPTION_STYLES) or min(weights) < 0 or abs(sum(weights) - 1) > 1e-6:
            raise ValueError(f"caption_weights must be {len(CAPTION_STYLES)} probabilities summing to 1")

    def style_weights(self) -> tuple[float, ...]:
        return tuple(float(w) for w in self.caption_weights.split(","))

    def open_clip_config(self) -> dict:
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {"image_size": self.image_size, "layers": self.vision_layers,
                           "width": self.vision_width, "patch_size": self.patch_size, "head_width": 64},
            "text_cfg": {"context_length": self.context_length, "vocab_size": 49408,
                         "width": self.text_width, "heads": max(self.text_width // 64, 1),
                         "layers": self.text_layers},
            "quick_gelu": False,
        }

    def training_identity(self) -> dict:
        """Settings a checkpoint must share with the run resuming it."""
        keep = ("seed", "data_seed", "image_size", "patch_size", "vision_layers", "vision_width",
                "text_layers", "text_width", "context_length", "embed_dim", "steps", "batch_size", "lr",
                "warmup_steps", "weight_decay", "caption_weights", "single_object_steps", "sincos_init",
                "shared_palette_steps", "region_weight")
        return {k: getattr(self, k) for k in keep}


def build_model(config: BuildConfig) -> torch.nn.Module:
    from open_clip.model import CLIP
    from open_clip.pos_embed import get_2d_sincos_pos_embed

    torch.manual_seed(config.seed)
    model = CLIP(**config.open_clip_config())
    if config.sincos_init:
        # Still a learnable embedding (the shipped config is plain open_clip); starting from 2-D
        # sin-cos positions lets a small ViT relate neighbouring patches from the first step.
        grid = config.image_size // config.patch_size
        table = torch.from_numpy(get_2d_sincos_pos_embed(config.vision_width, grid, cls_token=True)).float()
        with torch.no_grad():
            model.visual.positional_embedding.copy_(table * config.vision_width ** -0.5)
    return model


class Tokenizer:
    def __init__(self, context_length: int) -> None:
        from open_clip.tokenizer import SimpleTokenizer

        self._tok = SimpleTokenizer(context_length=context_length)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self._tok(texts)


def to_tensor(images: list) -> torch.Tensor:
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images]) / 255.0
    tensor = torch.from_numpy(array).permute(0, 3, 1, 2)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (tensor - mean) / std


def caption(scene: synth.Scene, data_seed: int, index: int, weights: tuple[float, ...]) -> str:
    rng = np.random.default_rng([data_seed, index, 1])
    style = CAPTION_STYLES[rng.choice(len(CAPTION_STYLES), p=weights)]
    return synth.describe(scene.objects, style=style, rng=rng)


def batch_palette(config: BuildConfig, step: int) -> list[str] | None:
    """The two colours every scene of batch ``step`` uses, or None for the full palette."""
    fraction = config.shared_palette_steps
    if fraction <= 0 or math.floor((step + 1) * fraction) == math.floor(step * fraction):
        return None
    rng = np.random.default_rng([config.data_seed, step, 2])
    return [str(c) for c in rng.choice(list(synth.COLOURS), size=2, replace=False)]


class TrainBatches(torch.utils.data.Dataset):
    """Item ``t`` is training batch ``t``: a pure function of (data_seed, t), so resuming is exact."""

    def __init__(self, config: BuildConfig) -> None:
        self.config = config
        self.tokenizer = Tokenizer(config.context_length)

    def __len__(self) -> int:
        return self.config.steps

    def __getitem__(self, step: int) -> tuple[torch.Tensor, ...]:
        c = self.config
        indices = range(step * c.batch_size, (step + 1) * c.batch_size)
        max_objects = 1 if step < c.single_object_steps * c.steps else synth.MAX_OBJECTS
        palette = batch_palette(c, step)
        scenes = [synth.generate_scene(c.data_seed, i, c.image_size, max_objects, palette) for i in indices]
        texts = [caption(s, c.data_seed, i, c.style_weights()) for s, i in zip(scenes, indices)]
        phrases, owners = object_patches(scenes, c.patch_size)
        return to_tensor([s.image for s in scenes]), self.tokenizer(texts), self.tokenizer(phrases), owners


def object_patches(scenes: list, patch: int, min_cover: float = 0.4) -> tuple[list[str], torch.Tensor]:
    """Each object's phrase, and for every patch the index of the object covering it (-1: none).

    A patch belongs to the object covering most of it, when that is at least ``min_cover``; an object too
    small to cover any patch that much keeps its best-covered patch.
    """
    phrases, grids = [], []
    for scene in scenes:
        size = scene.image.size[0]
        side = size // patch
        cover = np.stack([o.mask.reshape(side, patch, side, patch).mean(axis=(1, 3)).ravel() for o in scene.objects])
        owner = np.where(cover.max(axis=0) >= min_cover, cover.argmax(axis=0), -1)
        for k in range(len(scene.objects)):
            if not (owner == k).any():
                owner[cover[k].argmax()] = k
        grids.append(np.where(owner >= 0, owner + len(phrases), -1))
        phrases += [synth.describe([o]) for o in scene.objects]
    return phrases, torch.from_numpy(np.stack(grids)).long()

class CompactText(torch.nn.Module):
    """Trains only the token-embedding rows the captions use, and only up to the longest caption.

    Both are exact shortcuts, not approximations: rows of the 49,408-token vocabulary that no caption
    contains get zero gradient (and no weight decay), and the text tower's causal mask means tokens
    after the end-of-text token never change the pooled end-of-text feature. They save the dense
    embedding gradient and its optimiser update, and a third of the text tower's work.
    ``write_back`` copies the trained rows into the full open_clip embedding.
    """

    def __init__(self, model: torch.nn.Module, context_length: int) -> None:
        super().__init__()
        words = ["a", "an", "photo", "of", "and", ",", "."] + list(synth.ALL_LABELS)
        used = torch.unique(Tokenizer(context_length)([" ".join(words)])[0])
        self.register_buffer("used", used, persistent=False)
        lookup = torch.full((model.vocab_size,), -1, dtype=torch.long)
        lookup[used] = torch.arange(len(used))  # order-preserving: end-of-text stays the largest id
        self.register_buffer("lookup", lookup, persistent=False)
        self.weight = torch.nn.Parameter(model.token_embedding.weight.detach()[used].clone())
        model.token_embedding.weight.requires_grad_(False)

    def forward(self, model: torch.nn.Module, text: torch.Tensor) -> torch.Tensor:
        length = int((text != 0).sum(dim=1).max())
        text = text[:, :length]
        compact = self.lookup[text]
        if (compact < 0).any():
            raise ValueError("a caption uses a token outside the caption vocabulary")
        x = torch.nn.functional.embedding(compact, self.weight) + model.positional_embedding[:length]
        x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
        x = model.ln_final(x)
        x = x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ model.text_projection
        return torch.nn.functional.normalize(x, dim=-1)

    @torch.no_grad()
    def write_back(self, model: torch.nn.Module) -> None:
        model.token_embedding.weight[self.used] = self.weight.detach()


def encode_image_both(tower, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised global feature [B, D] and normalised region features [B, N, D] of ramtag's dual path.

    ``tower`` is ramtag's ``DualPathVision`` over the CLIP being built, without adapters, so the build trains
    exactly the value-value path RAM reads, with autograd through every layer.
    """
    global_feature, regions = tower(images, use_adapters=False, backbone_grad=True)
    normalize = torch.nn.functional.normalize
    return normalize(global_feature, dim=-1), normalize(regions, dim=-1)


def region_phrase_loss(regions: torch.Tensor, owners: torch.Tensor, phrase_features: torch.Tensor,
                       phrase_class: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each object's mean region feature over the batch's distinct phrases.

    ``phrase_features`` [P, D] are the distinct phrases' features and ``phrase_class`` [objects] each object's
    index among them (``torch.unique(phrase_tokens, dim=0, return_inverse=True)``): equal phrases (two red
    stars in one batch) are one class, not each other's negatives, and are encoded once.
    """
    flat = regions.reshape(-1, regions.shape[-1])
    index = owners.reshape(-1)
    keep = index >= 0
    sums = torch.zeros(len(phrase_class), flat.shape[1], dtype=flat.dtype).index_add_(0, index[keep], flat[keep])
    objects = torch.nn.functional.normalize(sums, dim=-1)
    return torch.nn.functional.cross_entropy(scale * objects @ phrase_features.T, phrase_class)


def lr_at(step: int, config: BuildConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, text: CompactText, config: BuildConfig) -> torch.optim.Optimizer:
    # open_clip's convention: no decay on gains, biases, embeddings and the logit scale.
    decay, no_decay = [], [text.weight]
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or "embedding" in name or "logit_scale" in name or "class_embedding" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-6)


def save_checkpoint(path: Path, model, text: CompactText, optimizer, step: int, config: BuildConfig,
                    history: list, seconds: float) -> None:
    text.write_back(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "identity": config.training_identity(), "history": history, "seconds": seconds}, tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- evaluation


def eval_set(config: BuildConfig) -> tuple[torch.Tensor, np.ndarray]:
    scenes = [synth.generate_scene(config.eval_seed, i, config.image_size) for i in range(config.eval_images)]
    targets = np.array([[label in s.labels for label in synth.ALL_LABELS] for s in scenes], dtype=np.int64)
    return to_tensor([s.image for s in scenes]), targets


@torch.no_grad()
def zero_shot_scores(model, images: torch.Tensor, labels: list[str], context_length: int) -> np.ndarray:
    model.eval()
    text = model.encode_text(Tokenizer(context_length)([TEMPLATE.format(label) for label in labels]),
                             normalize=True)
    feats = torch.cat([model.encode_image(chunk, normalize=True) for chunk in images.split(250)])
    return (feats @ text.T).numpy()


def evaluate(model, images: torch.Tensor, targets: np.ndarray, config: BuildConfig) -> dict:
    """Zero-shot mAP per label group against chance (ramtag's mAP and demo study), all labels scored at once."""
    from benchmarks.demo_study import LABEL_GROUPS, chance_map
    from ramtag.metrics import average_precision, mean_average_precision

    groups = {**LABEL_GROUPS, "seen": synth.SEEN_LABELS}
    scores = zero_shot_scores(model, images, list(synth.ALL_LABELS), config.context_length)
    result = {}
    for seed, (name, labels) in enumerate(groups.items()):
        cols = [synth.ALL_LABELS.index(label) for label in labels]
        result[name] = {
            "mAP": round(mean_average_precision(scores[:, cols], targets[:, cols])[0], 4),
            "chance": round(chance_map(targets[:, cols], seed), 4),
            "labels": len(labels),
        }
    per_label = {label: None if np.isnan(ap) else round(float(ap), 3)
                 for label, ap in zip(synth.ALL_LABELS, average_precision(scores, targets))}
    return {"groups": result, "per_label": per_label, "images": int(targets.shape[0]),
            "eval_seed": config.eval_seed}


# --------------------------------------------------------------------------- output


def export(model, config: BuildConfig, final_loss: float, metrics: dict, build_seconds: float) -> Path:
    from safetensors.torch import save_file

    config.out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    weights_path = config.out / "demo-clip.safetensors"
    save_file(weights, str(weights_path), metadata={"format": "pt"})
    meta = {
        "open_clip_config": config.open_clip_config(),
        "image_size": config.image_size,
        "mean": list(MEAN),
        "std": list(STD),
        "resize": "squash",
        "interpolation": "bilinear",
        "template": TEMPLATE,
        "labels": {"seen": list(synth.SEEN_LABELS), "unseen": list(synth.UNSEEN_LABELS)},
        "training": {
            "script": "scripts/build_demo_model.py",
            "seed": config.seed,
            "data_seed": config.data_seed,
            "steps": config.steps,
            "batch_size": config.batch_size,
            "lr": config.lr,
            "warmup_steps": config.warmup_steps,
            "weight_decay": config.weight_decay,
            "caption_styles": dict(zip(CAPTION_STYLES, config.style_weights())),
            "final_loss": round(final_loss, 4),
            "build_seconds": round(build_seconds),
            "zero_shot": metrics,
        },
    }
    (config.out / "demo-clip.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    verify(config.out)
    return weights_path


def verify(folder: Path) -> None:
    """The exported files load with strict=True into open_clip.model.CLIP(**open_clip_config)."""
    from open_clip.model import CLIP
    from safetensors.torch import load_file

    meta = json.loads((folder / "demo-clip.json").read_text(encoding="utf-8"))
    model = CLIP(**meta["open_clip_config"])
    model.load_state_dict(load_file(str(folder / "demo-clip.safetensors")), strict=True)


# --------------------------------------------------------------------------- training


@torch.no_grad()
def _check_text_shortcut(model, text: CompactText, config: BuildConfig) -> None:
    """The training-time text path must equal open_clip's own encode_text on the written-back model."""
    model.eval()
    tokens = Tokenizer(config.context_length)([TEMPLATE.format(label) for label in synth.ALL_LABELS]
                                              + [synth.generate_scene(config.eval_seed, 0).caption])
    full = model.encode_text(tokens, normalize=True)
    if not torch.allclose(full, text(model, tokens), atol=1e-5):
        raise RuntimeError("compact text path disagrees with open_clip's encode_text")


def log(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, flush=True)


def train(config: BuildConfig) -> None:
    from open_clip.loss import ClipLoss

    torch.set_num_threads(config.threads)
    log(f"config {json.dumps(dataclasses.asdict(config), default=str)}")
    model = build_model(config)
    text = CompactText(model, config.context_length)
    optimizer = make_optimizer(model, text, config)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model {n_params / 1e6:.2f}M parameters, {n_params * 2 / 2**20:.1f} MiB in fp16")

    ckpt_path = config.work / "last.pt"
    start, history, seconds_before = 0, [], 0.0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if state["identity"] != config.training_identity():
            raise SystemExit(f"{ckpt_path} belongs to another configuration; move it away or pass --work")
        model.load_state_dict(state["model"])
        text = CompactText(model, config.context_length)
        optimizer = make_optimizer(model, text, config)
        optimizer.load_state_dict(state["optimizer"])
        start, history = int(state["step"]), list(state["history"])
        seconds_before = float(state["seconds"])
        log(f"resumed at step {start}")

    loss_fn = ClipLoss()
    from ramtag.model.backbone import DualPathVision

    # No parameters of its own (no adapters): it only runs the CLIP's blocks with the value-value path.
    tower = DualPathVision(model.visual, model.text_projection.shape[1], adapter_layers=(), adapter_tokens=0)
    loader = torch.utils.data.DataLoader(
        TrainBatches(config), batch_size=None, num_workers=1, prefetch_factor=4,
        sampler=range(start, config.steps), persistent_workers=False)
    began = time.time()
    last_save = time.time()
    recent: list[float] = []
    if config.eval_every:
        probe_config = dataclasses.replace(config, eval_images=300)
        probe_images, probe_targets = eval_set(probe_config)
    model.train()
    step = start
    for step, (images, texts, phrases, owners) in enumerate(loader, start=start):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        text_features = text(model, texts)
        if config.region_weight > 0:
            image_features, regions = encode_image_both(tower, images)
            distinct, phrase_class = torch.unique(phrases, dim=0, return_inverse=True)
            scale = model.logit_scale.exp()
            loss = loss_fn(image_features, text_features, scale) + config.region_weight * region_phrase_loss(
                regions, owners, text(model, distinct), phrase_class, scale)
        else:
            image_features = model.encode_image(images, normalize=True)
            loss = loss_fn(image_features, text_features, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():  # CLIP's clamp: a temperature below 1/100 destabilises training
            model.logit_scale.clamp_(0, math.log(100))
        recent.append(loss.item())
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            mean_loss = float(np.mean(recent))
            history.append([step + 1, round(mean_loss, 4)])
            rate = (step + 1 - start) / (time.time() - began)
            log(f"step {step + 1}/{config.steps} loss {mean_loss:.4f} lr {lr_at(step, config):.2e} "
                f"scale {model.logit_scale.exp().item():.1f} {rate:.2f} it/s")
            recent = []
        if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < config.steps:
            text.write_back(model)
            quick = evaluate(model, probe_images, probe_targets, config)["groups"]
            log("zero-shot " + " ".join(f"{k} {v['mAP']:.3f}/{v['chance']:.3f}" for k, v in quick.items()))
            model.train()
        if time.time() - last_save > config.checkpoint_every_s and step + 1 < config.steps:
            save_checkpoint(ckpt_path, model, text, optimizer, step + 1, config, history,
                            seconds_before + time.time() - began)
            last_save = time.time()
            log(f"checkpoint at step {step + 1}")
        if config.snapshot_every and (step + 1) % config.snapshot_every == 0 and step + 1 < config.steps:
            save_checkpoint(config.work / f"step-{step + 1}.pt", model, text, optimizer, step + 1, config,
                            history, seconds_before + time.time() - began)
    seconds = seconds_before + time.time() - began
    if start < config.steps:
        save_checkpoint(ckpt_path, model, text, optimizer, config.steps, config, history, seconds)

    text.write_back(model)
    _check_text_shortcut(model, text, config)
    log("evaluating")
    images, targets = eval_set(config)
    metrics = evaluate(model, images, targets, config)
    log(f"zero-shot {json.dumps(metrics)}")
    final_loss = history[-1][1] if history else float("nan")
    path = export(model, config, final_loss, metrics, seconds)
    log(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB); verified strict load into open_clip CLIP")


def parse_args(argv: list[str] | None = None) -> BuildConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(BuildConfig):
        default = f.default
        kind = str if isinstance(default, Path) else type(default)
        if kind is bool:
            parser.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction,
                                default=default)
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=default)
    args = parser.parse_args(argv)
    return BuildConfig(**vars(args))


if __name__ == "__main__":
    train(parse_args())
