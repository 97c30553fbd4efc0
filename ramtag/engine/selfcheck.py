"""A seconds-long check that the model code works on this machine (no weights, no network)."""

from __future__ import annotations

import torch


def run_selfcheck(seed: int = 0, device: str = "auto") -> list[str]:
    """Forward and backward of a tiny random RAM model on ``device`` (auto, cpu, cuda, cuda:N); raises if wrong."""
    import open_clip

    from ramtag.engine.runtime import resolve_device
    from ramtag.model.config import RamConfig
    from ramtag.model.ram import RamModel, ram_loss

    where = resolve_device(device)
    torch.manual_seed(seed)
    clip = open_clip.model.CLIP(
        embed_dim=64,
        vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "layers": 4, "head_width": 32},
        text_cfg={"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
        quick_gelu=True,
    )
    model = RamModel(
        clip, RamConfig(backbone="selfcheck", pretrained=None, adapter_layers=(2, 3), prompt_layers=(1,), trained=True)
    ).to(where)
    tokens = open_clip.tokenize(["a photo of a cat.", "a photo of a dog.", "a photo of a car."], context_length=16)
    tokens = tokens.to(where)
    images = torch.randn(2, 3, 32, 32).to(where)
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], device=where)
    model.train()
    output = model(
        images,
        model.encode_labels(tokens),
        targets=targets,
        teacher_label_features=model.encode_labels(tokens, use_prompts=False).detach(),
    )
    loss = ram_loss(output, targets)
    loss.backward()
    sums = output.scores.sum(dim=-1)
    if not torch.allclose(sums, torch.ones_like(sums), atol=1e-5) or not torch.isfinite(loss):
        raise RuntimeError("self-check failed: scores are not distributions or the loss is not finite")
    frozen_with_grad = [n for n, p in model.named_parameters() if n.startswith("clip.") and p.grad is not None]
    if frozen_with_grad:
        raise RuntimeError(f"self-check failed: frozen weights received gradients: {frozen_with_grad[:3]}")
    return [
        f"torch {torch.__version__}, open_clip {open_clip.__version__}, cuda available: {torch.cuda.is_available()}",
        f"tiny RAM forward+backward on {where} ok: loss {loss.item():.4f}, "
        f"Sinkhorn iterations {output.sinkhorn_iterations}",
        "self-check passed",
    ]
