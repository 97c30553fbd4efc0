"""torch.distributed as torchrun sets it up: one process per GPU (or CPU process on gloo), any node count.

Every collective ramtag uses lives here. Outside torchrun each helper behaves as a world of one (rank 0, world
size 1), so no caller special-cases it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def job_id() -> str | None:
    """torchrun's id for this job, the same across its restarts (a uuid under ``--standalone``, else
    ``--rdzv-id``), or None outside torchrun."""
    if "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return None
    return os.environ.get("TORCHELASTIC_RUN_ID", "none")


def restart_count() -> int:
    """How often torchrun (``--max-restarts``) restarted this worker group: 0 on its first start and outside
    torchrun. A restarted group continues the run its predecessor started (see ramtag.engine.tag)."""
    try:
        return max(0, int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
    except ValueError:
        return 0


def setup(device: str = "auto", timeout_minutes: float = 30.0) -> DistInfo:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU); a no-op otherwise."""
    if not launched_by_torchrun():
        return DistInfo(0, 1, 0)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device != "cpu"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        timeout = timedelta(minutes=timeout_minutes)
        backend = "nccl" if use_cuda else "gloo"
        if restart_count() == 0:
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            # A restarted group may meet the store of the group it replaces (torchrun --standalone keeps its
            # agent's store across restarts), where gloo finds the dead ranks' addresses under the same keys,
            # connects to them, and fails with "Connection refused", costing a restart. Keys of its own attempt
            # keep each group to its own addresses.
            store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
            store = dist.PrefixStore(f"ramtag/attempt-{restart_count()}/", store)
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def info() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo(0, 1, 0)


def device_for(info_: DistInfo, device: str) -> str:
    """Each rank on its own GPU when several share a machine."""
    if device in ("auto", "cuda") and torch.cuda.is_available() and info_.distributed:
        return f"cuda:{info_.local_rank}"
    return device


def barrier() -> None:
    if info().distributed:
        dist.barrier()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_objects(obj):
    """Every rank's `obj`, in rank order (a one-element list outside distributed runs)."""
    if not info().distributed:
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj, src: int = 0):
    if not info().distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_reduce_min(value: torch.Tensor) -> torch.Tensor:
    """The minimum over ranks (no gradient)."""
    return _all_reduce(value, "MIN")


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (no gradient)."""
    return _all_reduce(value, "SUM")


class _AllReduceSumWithGrad(torch.autograd.Function):
    """Sum over ranks; the gradient of each rank's input is the sum of every rank's output gradient."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # autograd signature
        total = tensor.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total


def all_reduce_sum_with_grad(value: torch.Tensor) -> torch.Tensor:
    """The sum over ranks, differentiable: every rank's output depends on every rank's input."""
    if not info().distributed:
        return value
    return _AllReduceSumWithGrad.apply(value)


def _all_reduce(value: torch.Tensor, op: str) -> torch.Tensor:
    # ``op`` names a ReduceOp member, so a single-process run never touches torch.distributed
    if not info().distributed:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=getattr(dist.ReduceOp, op))
    return value


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's tensor along dim 0, keeping gradients for this rank's slice.

    Like open_clip's contrastive loss: gathered copies are constants except this rank's own, so each rank's
    backward covers its own share and the all-reduced gradients equal those of one process on the whole batch.
    """
    if not info().distributed:
        return tensor
    gathered = [torch.zeros_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.detach().contiguous())
    gathered[dist.get_rank()] = tensor
    return torch.cat(gathered, dim=0)


def gather_counts(count: int, device: torch.device) -> list[int]:
    """Every rank's `count`, in rank order."""
    if not info().distributed:
        return [count]
    mine = torch.tensor([count], dtype=torch.int64, device=device)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [int(c) for c in every]


def gather_rows(tensor: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Concatenate every rank's rows (`counts`, which may differ), keeping the gradient of this rank's rows."""
    if len(counts) == 1:
        return tensor
    longest = max(counts)
    if tensor.shape[0] < longest:
        tensor = torch.cat([tensor, tensor.new_zeros((longest - tensor.shape[0], *tensor.shape[1:]))])
    gathered = gather_with_grad(tensor)
    return torch.cat([gathered[r * longest : r * longest + n] for r, n in enumerate(counts)])


def all_reduce_gradients(parameters: list[torch.nn.Parameter]) -> None:
    """Sum the gradients over ranks (not DDP's average): each rank's backward covered its own slice of one
    global loss, so the sum is that loss's gradient. A missing gradient counts as zeros."""
    if not info().distributed:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for parameter, grad in zip(parameters, grads):
        size = grad.numel()
        parameter.grad = flat[offset : offset + size].view_as(grad).clone()
        offset += size


def broadcast_tensors(tensors, src: int = 0) -> None:  # an iterable of tensors
    """Overwrite every rank's `tensors` in place with rank `src`'s."""
    if not info().distributed:
        return
    for tensor in tensors:
        dist.broadcast(tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor, src=src)
