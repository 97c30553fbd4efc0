"""Batch-norm statistics over every rank's share of the batch, on CPU (gloo) as well as on CUDA.

The reference converts the adapter's batch norms to torch's SyncBatchNorm, which only runs on accelerators.
`GlobalBatchNorm2d` does the same reduction with plain all-reduces, so that one step of N processes with
batch b equals one step of one process with batch N·b on any device: per-channel sums, then sums of squared
deviations from the global mean, are all-reduced in the forward; their gradients are all-reduced in the
backward (every rank's slice of the loss depends on every rank's inputs through the shared statistics).
Running statistics are updated with the global mean and the unbiased global variance, as SyncBatchNorm does.

Kept out of ramtag.model: the model code never touches torch.distributed. The reductions themselves are
ramtag.engine.dist's.
"""

from __future__ import annotations

import torch
from torch import nn

from ramtag.engine import dist


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics span all ranks (same parameters, buffers and state-dict keys)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # nn.Module signature
        if not (self.training and dist.info().distributed):
            return super().forward(input)
        self._check_input_dim(input)
        channels = input.shape[1]
        x = input.float()
        local_count = torch.tensor([x.numel() // channels], dtype=torch.float64, device=x.device)
        count = float(dist.all_reduce_sum(local_count).item())
        if count < 2:
            raise ValueError("batch norm needs more than one value per channel over all ranks")
        mean = dist.all_reduce_sum_with_grad(x.sum(dim=(0, 2, 3))) / count
        centred = x - mean.view(1, -1, 1, 1)
        variance = dist.all_reduce_sum_with_grad(centred.square().sum(dim=(0, 2, 3))) / count
        out = centred * torch.rsqrt(variance + self.eps).view(1, -1, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), variance.detach() * count / (count - 1))
        return out.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_variance: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased_variance.to(self.running_var.dtype), alpha=factor)


def _replace_batchnorms(module: nn.Module, make) -> int:  # factory of the new module
    replaced = 0
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            setattr(module, name, make(child))
            replaced += 1
        else:
            replaced += _replace_batchnorms(child, make)
    return replaced


def _global_copy(bn: nn.BatchNorm2d) -> GlobalBatchNorm2d:
    new = GlobalBatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    new = new.to(device=bn.weight.device if bn.affine else bn.running_mean.device)
    new.load_state_dict(bn.state_dict())
    new.train(bn.training)
    if bn.affine:
        new.weight.requires_grad_(bn.weight.requires_grad)
        new.bias.requires_grad_(bn.bias.requires_grad)
    return new


def synchronise_batchnorms(module: nn.Module, device: torch.device) -> int:
    """Make `module`'s BatchNorm2d layers compute statistics over all ranks; returns how many were replaced.

    On CUDA this is torch's SyncBatchNorm; elsewhere `GlobalBatchNorm2d`. Parameters and buffers keep their
    names, so checkpoints and optimizers see no difference. Replace before building the optimizer.
    """
    if device.type == "cuda":
        return _replace_batchnorms(module, lambda bn: nn.SyncBatchNorm.convert_sync_batchnorm(bn))
    return _replace_batchnorms(module, _global_copy)
