"""Knowledge-Constrained Optimal Transport: cost, marginals, teacher term and a batched Sinkhorn solver.

Every function works on a whole batch at once ([B, regions, labels]); nothing loops over images. Each image
of the batch is its own transport problem: by default it picks its own solver (plain or log domain) and stops
at its own iteration, so its plan does not depend on which images share its batch, rank or run. The
reference stops the whole batch together (``stop_scope="batch"``); that is kept as an option for parity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STOP_RULES = ("reference", "marginal")
STOP_SCOPES = ("per_image", "batch")

# exp(-x) for x above this underflows float32 towards denormals within a few iterations of the plain
# scaling loop; an image whose scaled cost spans more is solved in the log domain.
_PLAIN_DOMAIN_LIMIT = 30.0
# Clamp for log-domain potentials before exponentiating them for the `reference` stopping rule.
_MAX_LOG_SCALING = 80.0


@dataclass(frozen=True)
class SinkhornResult:
    plan: torch.Tensor
    iterations: int
    """Iterations the loop ran: the most that any image of the batch ran."""
    log_domain: bool
    """True when any image of the batch was solved in the log domain."""
    image_iterations: torch.Tensor
    """[B] iterations each image ran before its stopping rule held (or the limit)."""
    image_log_domain: torch.Tensor
    """[B] bool: which images were solved in the log domain."""


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
    stop_scope: str = "per_image",
) -> SinkhornResult:
    """Balanced entropic OT for a batch of problems: plan [B, n, m] with row sums `source`, column sums `target`.

    Stopping rules, tested on each image:
    - ``reference``: the mean absolute change of the row scaling r between two iterations is below `tol`
      (the reference implementation's rule).
    - ``marginal``: the row sums match `source` within `tol` (max absolute error).

    Stopping scope: ``per_image`` stops each image at the first iteration where its own rule holds (its plan is then
    the one it gets when solved alone, whatever its batch mates); ``batch`` keeps iterating every image until
    the rule holds for all of them at once (the reference's batch-wide stop, for parity with its fixtures).

    Each image uses the plain scaling loop (matrix products, fast) when exp(-cost/reg) is safely representable
    in float32 for it, and otherwise runs the same iterations in the log domain, which gives the same plan
    where the plain loop is finite and never produces NaN or inf. Inputs in half precision are solved in
    float32.
    """
    if stop not in STOP_RULES:
        raise ValueError(f"unknown Sinkhorn stopping rule {stop!r}; choose from {', '.join(STOP_RULES)}")
    if stop_scope not in STOP_SCOPES:
        raise ValueError(f"unknown Sinkhorn stopping scope {stop_scope!r}; choose from {', '.join(STOP_SCOPES)}")
    if reg <= 0:
        raise ValueError("Sinkhorn regularisation must be positive")
    if max_iter < 1:
        raise ValueError("Sinkhorn needs at least one iteration")
    work_dtype = torch.float64 if cost.dtype == torch.float64 else torch.float32
    scaled = cost.to(work_dtype) / reg
    source = source.to(work_dtype)
    target = target.to(work_dtype)
    batch = scaled.shape[0]
    spread = scaled.amax(dim=(1, 2)) - scaled.amin(dim=(1, 2))
    in_log = spread > _PLAIN_DOMAIN_LIMIT
    groups = []
    for solver, members in ((_PlainProblems, ~in_log), (_LogProblems, in_log)):
        index = members.nonzero().squeeze(1)
        if index.numel() == batch:
            groups.append(solver(index, source, target, scaled, stop))
        elif index.numel():
            groups.append(solver(index, source[index], target[index], scaled[index], stop))
    plan = torch.empty_like(scaled)
    image_iterations = torch.zeros(batch, dtype=torch.long, device=scaled.device)
    iteration = 0
    for iteration in range(1, max_iter + 1):
        done = [group.step(first=iteration == 1, tol=tol) for group in groups]
        if stop_scope == "batch":
            if all(bool(converged.all()) for converged in done):
                break
            continue
        for group, converged in zip(groups, done):
            if bool(converged.any()):
                group.retire(converged, plan, image_iterations, iteration)
        groups = [group for group in groups if group.index.numel()]
        if not groups:
            break
    for group in groups:
        group.retire(torch.ones_like(group.index, dtype=torch.bool), plan, image_iterations, iteration)
    return SinkhornResult(
        plan=plan,
        iterations=int(image_iterations.max()) if batch else 0,
        log_domain=bool(in_log.any()),
        image_iterations=image_iterations,
        image_log_domain=in_log,
    )


class _Problems:
    """The images of a batch still being solved in one domain. Images that stop are written out and dropped
    (`retire`), so later iterations neither touch nor wait for them."""

    state: tuple[str, ...]

    def __init__(self, index: torch.Tensor, stop: str):
        self.index = index
        self.stop = stop

    def step(self, first: bool, tol: float) -> torch.Tensor:
        """One Sinkhorn iteration on every image left; returns which of them now meet the stopping rule."""
        raise NotImplementedError

    def plans(self, members: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def retire(self, members: torch.Tensor, plan: torch.Tensor, iterations: torch.Tensor, iteration: int) -> None:
        finished = self.index[members]
        plan[finished] = self.plans(members)
        iterations[finished] = iteration
        keep = ~members
        self.index = self.index[keep]
        for name in self.state:
            setattr(self, name, getattr(self, name)[keep])


class _PlainProblems(_Problems):
    state = ("source", "target", "kernel", "unshift", "row", "col")

    def __init__(self, index, source, target, scaled_cost, stop):
        super().__init__(index, stop)
        # Shifting an image's cost by a constant rescales its r and c without changing its plan, and keeps K
        # near 1. The reference rule measures r itself, so the shift is undone when r is compared.
        shift = scaled_cost.amin(dim=(1, 2), keepdim=True)
        self.kernel = torch.exp(-(scaled_cost - shift))
        self.unshift = torch.exp(shift).squeeze(2)  # [A, 1]: r_reference = r_shifted * exp(shift)
        self.source, self.target = source, target
        self.row = torch.ones_like(source)
        self.col = torch.ones_like(target)

    def _row_products(self) -> torch.Tensor:
        # K c as row-vector products ([1, m] @ [m, n]): the same sums, but CPU BLAS runs them several times
        # faster than matrix-vector products (benchmarks/kcot_solver.py).
        return torch.bmm(self.col.unsqueeze(1), self.kernel.transpose(1, 2)).squeeze(1)

    def step(self, first, tol):
        previous = self.row
        self.row = self.source / self._row_products()
        self.col = self.target / torch.bmm(self.row.unsqueeze(1), self.kernel).squeeze(1)
        if self.stop == "reference":
            if first:  # the reference starts r at ones in its own (unshifted) scale
                change = (self.row * self.unshift - 1.0).abs().mean(dim=1)
            else:
                change = ((self.row - previous) * self.unshift).abs().mean(dim=1)
            return change < tol
        row_sums = self.row * self._row_products()
        return (row_sums - self.source).abs().amax(dim=1) < tol

    def plans(self, members):
        return self.row[members].unsqueeze(-1) * self.kernel[members] * self.col[members].unsqueeze(-2)


class _LogProblems(_Problems):
    state = ("source", "log_source", "log_target", "log_kernel", "log_row", "log_col")

    def __init__(self, index, source, target, scaled_cost, stop):
        super().__init__(index, stop)
        self.log_kernel = -scaled_cost
        self.source = source
        self.log_source = torch.log(source)
        self.log_target = torch.log(target)
        self.log_row = torch.zeros_like(source)
        self.log_col = torch.zeros_like(target)

    def _log_row_products(self) -> torch.Tensor:
        return torch.logsumexp(self.log_kernel + self.log_col.unsqueeze(1), dim=2)

    def step(self, first, tol):
        previous = self.log_row
        self.log_row = self.log_source - self._log_row_products()
        self.log_col = self.log_target - torch.logsumexp(self.log_kernel + self.log_row.unsqueeze(2), dim=1)
        if self.stop == "reference":
            now = torch.exp(self.log_row.clamp(max=_MAX_LOG_SCALING))
            before = torch.exp(previous.clamp(max=_MAX_LOG_SCALING))
            return (now - before).abs().mean(dim=1) < tol
        row_sums = torch.exp(self.log_row + self._log_row_products())
        return (row_sums - self.source).abs().amax(dim=1) < tol

    def plans(self, members):
        return torch.exp(
            self.log_row[members].unsqueeze(-1) + self.log_kernel[members] + self.log_col[members].unsqueeze(-2)
        )
