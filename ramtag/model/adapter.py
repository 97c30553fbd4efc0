"""The Ladder Local Adapter (LLA): recovers local semantics from a frozen ViT block's output."""

from __future__ import annotations

import torch
from torch import nn


def _conv_stream(width: int, hidden: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(width, hidden, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(hidden),
        nn.GELU(),
    )


def text_cross_attention(query: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    """Parameter-free cross-attention of patch tokens [B, N, D] to label features [C, D] (key = value)."""
    attention = torch.softmax(query @ text.transpose(0, 1) * scale, dim=-1)
    return attention @ text


class LadderLocalAdapter(nn.Module):
    """Dual 1x1/3x3 convolution streams, text cross-attention, spatial gating and a 1x1 projection back.

    Input: the patch tokens of a backbone block's output, [B, N, width] with N a square grid.
    Output: [B, N, width], added to the local stream's patch tokens.
    """

    def __init__(self, width: int, hidden: int, gate_kernel_size: int = 3):
        super().__init__()
        self.stream_point = _conv_stream(width, hidden, 1)
        self.stream_spatial = _conv_stream(width, hidden, 3)
        self.norm_query_point = nn.LayerNorm(hidden)
        self.norm_query_spatial = nn.LayerNorm(hidden)
        self.norm_text = nn.LayerNorm(hidden)
        self.gate = nn.Conv2d(2, 2, gate_kernel_size, padding=gate_kernel_size // 2, bias=False)
        self.project = nn.Conv2d(hidden, width, 1, bias=False)
        self.scale = hidden**-0.5

    def forward(self, patches: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = patches.shape
        side = int(round(tokens**0.5))
        if side * side != tokens:
            raise ValueError(f"adapter needs a square patch grid, got {tokens} tokens")
        grid = patches.transpose(1, 2).reshape(batch, width, side, side)
        text = self.norm_text(text_features)

        streams = []
        for conv, norm in ((self.stream_point, self.norm_query_point), (self.stream_spatial, self.norm_query_spatial)):
            stream = conv(grid).flatten(2).transpose(1, 2)  # [B, N, hidden]
            stream = stream + text_cross_attention(norm(stream), text, self.scale)
            streams.append(stream.transpose(1, 2).reshape(batch, -1, side, side))

        both = torch.cat(streams, dim=1)
        pooled = torch.cat([both.mean(dim=1, keepdim=True), both.amax(dim=1, keepdim=True)], dim=1)
        gates = torch.sigmoid(self.gate(pooled))
        mixed = streams[0] * gates[:, :1] + streams[1] * gates[:, 1:]
        return self.project(mixed).flatten(2).transpose(1, 2)


def adapter_state_from_reference(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename one reference `conv_adapter` module's tensors to this module's names."""
    renames = {
        "conv_adapter_layers1.0.": "stream_point.0.",
        "conv_adapter_layers1.1.": "stream_point.1.",
        "conv_adapter_layers2.0.": "stream_spatial.0.",
        "conv_adapter_layers2.1.": "stream_spatial.1.",
        "adapter_norm_q1.": "norm_query_point.",
        "adapter_norm_q2.": "norm_query_spatial.",
        "adapter_norm_kv.": "norm_text.",
        "conv_adapter_layers.": "gate.",
        "conv_adapter_final.": "project.",
    }
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        for old, new in renames.items():
            if rest.startswith(old):
                out[new + rest[len(old):]] = value
                break
        else:
            raise KeyError(f"unexpected adapter tensor {key}")
    return out


__all__ = ["LadderLocalAdapter", "text_cross_attention", "adapter_state_from_reference"]
