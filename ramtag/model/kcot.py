"""Knowledge-Constrained Optimal Transport: cost, marginals, teacher term and a batched Sinkhorn solver.

Every function works on a whole batch at once ([B, regions, labels]); nothing loops over images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STOP_RULES = ("reference", "marginal")

# exp(-x) for x above this underflows float32 towards denormals within a few iterations of the plain
# scaling loop; beyond it the solver switches to the log domain.
_PLAIN_DOMAIN_LIMIT = 30.0
# Clamp for log-domain potentials before exponentiating them for the `reference` stopping rule.
_MAX_LOG_SCALING = 80.0


@dataclass(frozen=True)
class SinkhornResult:
    plan: torch.Tensor
    iterations: int
    log_domain: bool


def kcot_cost(similarity: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Cost 1 - softmax over labels of (logit_scale * cosine similarity)."""
    return 1.0 - torch.softmax(similarity * logit_scale, dim=-1)


def region_marginal(similarity: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Label presence detection: softmax over regions of each region's best label similarity / temperature."""
    return torch.softmax(similarity.amax(dim=-1) / temperature, dim=-1)


def uniform_label_marginal(similarity: torch.Tensor) -> torch.Tensor:
    batch, _, labels = similarity.shape
    return similarity.new_full((batch, labels), 1.0 / labels)


def teacher_distribution(teacher_similarity: torch.Tensor, logit_scale: float, sharpness: float = 20.0) -> torch.Tensor:
    """The frozen teacher's region-label distribution: softmax over regions of sharpness * softmax over labels."""
    per_region = torch.softmax(teacher_similarity * logit_scale, dim=-1)
    return torch.softmax(per_region * sharpness, dim=1)


def mask_teacher_distribution(
    distribution: torch.Tensor, targets: torch.Tensor, batch_minimum: torch.Tensor | None = None
) -> torch.Tensor:
    """Set the entries of labels an image does not have to the distribution's minimum.

    The reference takes the minimum over the whole (per-rank) batch; pass `batch_minimum` to use a minimum
    reduced elsewhere (over all ranks in distributed training).
    """
    minimum = distribution.amin() if batch_minimum is None else batch_minimum
    absent = (targets <= 0).unsqueeze(1).expand_as(distribution)
    return torch.where(absent, minimum.to(distribution.dtype), distribution)


def sinkhorn(
    source: torch.Tensor,
    target: torch.Tensor,
    cost: torch.Tensor,
    reg: float,
    max_iter: int = 100,
    tol: float = 1e-3,
    stop: str = "reference",
) -> SinkhornResult:
    """Balanced entropic OT for a batch of problems: plan [B, n, m] with row sums `source`, column sums `target`.

    Stopping rules:
    - ``reference``: stop when, for every problem, the mean absolute change of the row scaling r between two
      iterations is below `tol` (the reference implementation's rule, used for parity).
    - ``marginal``: stop when every problem's row sums match `source` within `tol` (max absolute error).

    The plain scaling loop (matrix products, fast) is used where exp(-cost/reg) is safely representable in
    float32; otherwise the same iterations run in the log domain, which gives the same plan where the plain
    loop is finite and never produces NaN or inf. Inputs in half precision are solved in float32.
    """
    if stop not in STOP_RULES:
        raise ValueError(f"unknown Sinkhorn stopping rule {stop!r}; choose from {', '.join(STOP_RULES)}")
    if reg <= 0:
        raise ValueError("Sinkhorn regularisation must be positive")
    work_dtype = torch.float64 if cost.dtype == torch.float64 else torch.float32
    cost = cost.to(work_dtype)
    source = source.to(work_dtype)
    target = target.to(work_dtype)
    scaled = cost / reg
    if float(scaled.amax() - scaled.amin()) <= _PLAIN_DOMAIN_LIMIT:
        return _sinkhorn_plain(source, target, scaled, max_iter, tol, stop)
    return _sinkhorn_log(source, target, scaled, max_iter, tol, stop)


def _sinkhorn_plain(source, target, scaled_cost, max_iter, tol, stop) -> SinkhornResult:
    # Shifting the cost by a constant rescales r and c without changing the plan; it keeps K near 1.
    # The reference rule measures r itself, so the shift is undone when r is compared.
    shift = scaled_cost.amin()
    kernel = torch.exp(-(scaled_cost - shift))
    kernel_t = kernel.transpose(1, 2)
    unshift = torch.exp(shift)  # r_reference = r_shifted * exp(shift)
    row = torch.ones_like(source)
    col = torch.ones_like(target)
    iterations = 0
    for iterations in range(1, max_iter + 1):
        previous = row
        # K c and K^T r as row-vector products ([1, m] @ [m, n]): the same sums, but CPU BLAS runs them
        # several times faster than matrix-vector products (benchmarks/kcot_solver.py).
        row = source / torch.bmm(col.unsqueeze(1), kernel_t).squeeze(1)
        col = target / torch.bmm(row.unsqueeze(1), kernel).squeeze(1)
        if stop == "reference":
            change = ((row - previous) * unshift).abs().mean(dim=1) if iterations > 1 else _first_change(row * unshift)
            if bool((change < tol).all()):
                break
        else:
            row_sums = row * torch.bmm(col.unsqueeze(1), kernel_t).squeeze(1)
            if bool(((row_sums - source).abs().amax(dim=1) < tol).all()):
                break
    plan = row.unsqueeze(-1) * kernel * col.unsqueeze(-2)
    return SinkhornResult(plan=plan, iterations=iterations, log_domain=False)


def _first_change(row: torch.Tensor) -> torch.Tensor:
    # The reference starts r at ones in its own (unshifted) scale.
    return (row - 1.0).abs().mean(dim=1)


def _sinkhorn_log(source, target, scaled_cost, max_iter, tol, stop) -> SinkhornResult:
    log_kernel = -scaled_cost
    log_source = torch.log(source)
    log_target = torch.log(target)
    log_row = torch.zeros_like(source)
    log_col = torch.zeros_like(target)
    iterations = 0
    for iterations in range(1, max_iter + 1):
        previous = log_row
        log_row = log_source - torch.logsumexp(log_kernel + log_col.unsqueeze(1), dim=2)
        log_col = log_target - torch.logsumexp(log_kernel + log_row.unsqueeze(2), dim=1)
        if stop == "reference":
            now = torch.exp(log_row.clamp(max=_MAX_LOG_SCALING))
            before = torch.exp(previous.clamp(max=_MAX_LOG_SCALING))
            if bool(((now - before).abs().mean(dim=1) < tol).all()):
                break
        else:
            row_sums = torch.exp(log_row + torch.logsumexp(log_kernel + log_col.unsqueeze(1), dim=2))
            if bool(((row_sums - source).abs().amax(dim=1) < tol).all()):
                break
    plan = torch.exp(log_row.unsqueeze(-1) + log_kernel + log_col.unsqueeze(-2))
    return SinkhornResult(plan=plan, iterations=iterations, log_domain=True)
