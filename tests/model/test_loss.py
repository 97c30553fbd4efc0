"""The MMC loss against its formula: one softmax over every image-label pair of the batch."""

from __future__ import annotations

import math

import pytest
import torch

from ramtag.model.loss import mmc_loss


def direct_mmc(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """-(1/Σy) Σ y (z - log Σ exp z), term by term in Python floats (Σy taken as 1 when it is 0)."""
    z = [float(v) for v in logits.reshape(-1)]
    y = [float(v) for v in targets.reshape(-1)]
    top = max(z)
    log_partition = top + math.log(sum(math.exp(v - top) for v in z))
    positives = sum(y) or 1.0
    return -sum(yi * (zi - log_partition) for zi, yi in zip(z, y)) / positives


def random_batch(seed: int, batch: int = 4, labels: int = 7, scale: float = 3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, labels, generator=gen, dtype=torch.float64) * scale
    targets = (torch.rand(batch, labels, generator=gen) < 0.3).double()
    targets[0, 0] = 1.0
    return logits, targets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mmc_matches_direct_formula(seed):
    logits, targets = random_batch(seed)
    expected = direct_mmc(logits, targets)
    assert float(mmc_loss(logits, targets)) == pytest.approx(expected, rel=1e-12)
    # float32 logits (the training dtype) agree to float32 precision.
    assert float(mmc_loss(logits.float(), targets.float())) == pytest.approx(expected, rel=1e-6)


def test_mmc_is_one_softmax_over_the_whole_batch():
    # Not a per-image softmax: moving all of image 1's logits up changes image 0's loss share.
    logits, targets = random_batch(3, batch=2, labels=5)
    shifted = logits.clone()
    shifted[1] += 2.0
    assert float(mmc_loss(shifted, targets)) == pytest.approx(direct_mmc(shifted, targets), rel=1e-12)
    assert float(mmc_loss(shifted, targets)) != pytest.approx(float(mmc_loss(logits, targets)), rel=1e-6)
    # A constant shift of every logit changes nothing.
    assert float(mmc_loss(logits + 7.0, targets)) == pytest.approx(float(mmc_loss(logits, targets)), rel=1e-12)


def test_mmc_without_positives_is_zero_and_finite():
    logits, _ = random_batch(4)
    targets = torch.zeros_like(logits)
    loss = mmc_loss(logits, targets)
    assert torch.isfinite(loss) and float(loss) == 0.0
    logits.requires_grad_(True)
    mmc_loss(logits, targets).backward()
    assert torch.isfinite(logits.grad).all()


def test_mmc_with_fractional_positive_mass_below_guard():
    # Σy below the guard (1e-6) divides by 1, not by the tiny mass.
    logits, _ = random_batch(5)
    targets = torch.zeros_like(logits)
    targets[1, 2] = 1e-8
    expected = -1e-8 * float(logits[1, 2] - torch.logsumexp(logits.reshape(-1), 0))
    assert float(mmc_loss(logits, targets)) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_mmc_is_stable_for_large_logits(dtype):
    # Logits of order 1e4 (temperatures of 2e-4 give such values): exp overflows without max subtraction.
    logits, targets = random_batch(6, scale=1.0)
    large = (logits * 1e4).to(dtype)
    loss = mmc_loss(large, targets.to(dtype))
    assert torch.isfinite(loss)
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(direct_mmc(large.double(), targets), rel=1e-5)


def test_mmc_gradient_matches_finite_differences():
    logits, targets = random_batch(7, batch=3, labels=4)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: mmc_loss(z, targets), (logits,), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_mmc_gradient_formula():
    # d/dz_bc = softmax(z)_bc - y_bc / Σy over the flattened batch.
    logits, targets = random_batch(8)
    logits.requires_grad_(True)
    mmc_loss(logits, targets).backward()
    expected = torch.softmax(logits.detach().reshape(-1), 0).reshape(logits.shape) - targets / targets.sum()
    torch.testing.assert_close(logits.grad, expected, rtol=1e-10, atol=1e-12)
