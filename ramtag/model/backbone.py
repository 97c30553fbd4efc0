"""Dual-path forward through an open_clip vision transformer, and its text encoder with deep prompts.

Both wrap the frozen open_clip modules and only add RAM's trainable parts (adapters, adapter tokens, deep
prompts). The frozen weights are read from the open_clip blocks, never copied.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from ramtag.model.adapter import LadderLocalAdapter


class UnsupportedBackbone(ValueError):
    """The open_clip model's towers cannot carry RAM's local path."""


def _heads(tokens: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, width = tokens.shape
    return tokens.reshape(batch, length, heads, width // heads).transpose(1, 2)


def _merge(tokens: torch.Tensor) -> torch.Tensor:
    batch, heads, length, head_dim = tokens.shape
    return tokens.transpose(1, 2).reshape(batch, length, heads * head_dim)


def _token_init(count: int, width: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(count, width) * 0.02)


def _check_vision_tower(visual: nn.Module) -> None:
    from open_clip.transformer import VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise UnsupportedBackbone(
            f"RAM needs open_clip's own VisionTransformer image tower, not {type(visual).__name__} "
            "(timm, ResNet and SigLIP-style towers cannot carry the value-value local path)"
        )
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
        raise UnsupportedBackbone("RAM needs a class-token ViT (no attentional or average pooling)")
    if getattr(visual, "final_ln_after_pool", False):
        raise UnsupportedBackbone("RAM needs ln_post applied to every token (final_ln_after_pool=False)")


class DualPathVision(nn.Module):
    """The frozen CLIP stream plus RAM's local stream, with Ladder Local Adapters at chosen layers."""

    def __init__(self, visual: nn.Module, embed_dim: int, adapter_layers: tuple[int, ...], adapter_tokens: int):
        super().__init__()
        _check_vision_tower(visual)
        # A plain attribute: the frozen tower belongs to the CLIP model, which the RAM model registers.
        self._visual = [visual]
        blocks = visual.transformer.resblocks
        self.depth = len(blocks)
        self.width = visual.transformer.width
        self.heads = blocks[0].attn.num_heads
        bad = [i for i in adapter_layers if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"adapter layers {bad} outside the backbone's {self.depth} blocks")
        self.adapter_layers = tuple(adapter_layers)
        self.adapters = nn.ModuleDict({str(i): LadderLocalAdapter(self.width, embed_dim) for i in adapter_layers})
        self.adapter_tokens = nn.ParameterDict(
            {str(i): _token_init(adapter_tokens, self.width) for i in adapter_layers if adapter_tokens > 0}
        )

    @property
    def visual(self) -> nn.Module:
        return self._visual[0]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = v.conv1(images).flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        return v.ln_pre(x)

    def _block(self, index, block, x, local, text_features, adapt: bool, with_local: bool):
        length = x.shape[1]
        key = str(index)
        if adapt and key in self.adapter_tokens:
            tokens = self.adapter_tokens[key].to(x.dtype).expand(x.shape[0], -1, -1)
            x = torch.cat([x, tokens], dim=1)
        attn = block.attn
        q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (_heads(t, self.heads) for t in (q, k, v))
        main = attn.out_proj(_merge(F.scaled_dot_product_attention(q, k, v)))
        x = x + block.ls_1(main)
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
        x = x[:, :length]
        if not with_local:
            return x, local
        values = v[:, :, :length]
        local = local + attn.out_proj(_merge(F.scaled_dot_product_attention(values, values, values)))
        if adapt and key in self.adapters:
            recovered = self.adapters[key](x[:, 1:], text_features)
            local = local + F.pad(recovered, (0, 0, 1, 0))
        return x, local

    def forward(
        self,
        images: torch.Tensor,
        text_features: torch.Tensor | None = None,
        use_adapters: bool = True,
        with_local: bool = True,
        backbone_grad: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (global feature [B, D], region features [B, N, D] or None).

        Layers before the first adapter run without autograd: nothing before it trains. ``backbone_grad``
        keeps autograd through every layer, for training the CLIP itself (the demo model's build).
        """
        use_adapters = use_adapters and bool(self.adapter_layers)
        if use_adapters and text_features is None:
            raise ValueError("the adapters attend to label features: pass text_features")
        if backbone_grad:
            first_trainable = 0
        else:
            first_trainable = self.adapter_layers[0] if use_adapters else self.depth
        with torch.no_grad() if first_trainable > 0 else nullcontext():
            x = self.embed(images)
        local = x
        for index, block in enumerate(self.visual.transformer.resblocks):
            adapt = use_adapters and index in self.adapter_layers
            with torch.no_grad() if index < first_trainable else nullcontext():
                x, local = self._block(index, block, x, local, text_features, adapt, with_local)
        v = self.visual
        global_feature = v.ln_post(x[:, 0]) @ v.proj
        regions = v.ln_post(local[:, 1:]) @ v.proj if with_local else None
        return global_feature, regions


class PromptedText(nn.Module):
    """open_clip's text encoder with learnable deep prompt tokens inserted after the start token."""

    def __init__(self, clip_model: nn.Module, prompt_layers: tuple[int, ...], prompt_tokens: int):
        super().__init__()
        tower = getattr(clip_model, "text", clip_model)
        for name in ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection"):
            if not hasattr(tower, name):
                raise UnsupportedBackbone(
                    f"text tower lacks {name}: only open_clip transformer text towers are supported"
                )
        if getattr(tower, "cls_emb", None) is not None or getattr(tower, "text_pool_type", "argmax") != "argmax":
            raise UnsupportedBackbone("RAM needs a text tower pooled at the end-of-text token (argmax pooling)")
        # Kept as a plain attribute: the modules belong to the CLIP model, which the RAM model registers.
        self._tower = [tower]
        self.depth = len(tower.transformer.resblocks)
        bad = [i for i in prompt_layers if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"prompt layers {bad} outside the text encoder's {self.depth} blocks")
        self.prompt_layers = tuple(prompt_layers)
        self.prompt_tokens = prompt_tokens
        width = tower.transformer.width
        self.prompts = nn.ParameterDict(
            {str(i): _token_init(prompt_tokens, width) for i in prompt_layers if prompt_tokens > 0}
        )

    @property
    def tower(self) -> nn.Module:
        return self._tower[0]

    @property
    def context_length(self) -> int:
        return int(self.tower.positional_embedding.shape[0])

    def forward(self, tokens: torch.Tensor, use_prompts: bool = True) -> torch.Tensor:
        """Label features [C, D], unnormalised, from token ids [C, context_length]."""
        t = self.tower
        cast = t.positional_embedding.dtype
        prompted = use_prompts and bool(self.prompts)
        end = tokens.argmax(dim=-1)
        # Under the causal mask nothing after a label's end-of-text token reaches its feature: run only the
        # positions up to the last one (plus room for the prompts, so the tail cut at prompted layers is padding
        # alone). Same features, several times less text compute for short labels.
        context = min(tokens.shape[1], int(end.max()) + 1 + (self.prompt_tokens if prompted else 0))
        kept = tokens[:, :context]
        x = t.token_embedding(kept).to(cast) + t.positional_embedding[:context].to(cast)
        mask = t.attn_mask[:context, :context] if t.attn_mask is not None else None
        for index, block in enumerate(t.transformer.resblocks):
            key = str(index)
            if prompted and key in self.prompts:
                prompts = self.prompts[key].to(x.dtype).expand(x.shape[0], -1, -1)
                joined = torch.cat([x[:, :1], prompts, x[:, 1:]], dim=1)
                # Cut back to the context length: the tail that falls off skips this layer.
                inside, tail = joined[:, :context], joined[:, context:]
                inside = block(inside, attn_mask=mask)
                x = torch.cat([inside[:, :1], inside[:, 1 + self.prompt_tokens:], tail], dim=1)
            else:
                x = block(x, attn_mask=mask)
        x = t.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), end]
        projection = t.text_projection
        return projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection

    def max_label_position(self) -> int:
        """Last token position (0-based) at which the end-of-text token still passes every prompted layer."""
        if not self.prompts:
            return self.context_length - 1
        return self.context_length - 1 - self.prompt_tokens
