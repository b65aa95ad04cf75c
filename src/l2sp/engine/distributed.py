"""Data-parallel training under ``torchrun`` (DistributedDataParallel), used by the one runner.

``torchrun --nproc_per_node=N -m l2sp finetune CONFIG`` starts N processes with ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` set; :func:`process_group` then creates the process group (NCCL on CUDA, gloo on CPU), gives each
process the GPU of its local rank and destroys the group at the end (also after an error).

The numbers do not depend on the number of processes N: ``optim.batch_size`` = B is the global batch; every
rank builds the batch of step t exactly as one process does (same examples, same augmentation stream) and keeps
its contiguous slice of B/N examples. The loss of a rank is the mean over its slice, DDP averages the gradients,
so the gradient is the one-process gradient of the global batch: (1/N) Σ_r (N/B) Σ_{i∈slice r} ∇ℓ_i = (1/B) Σ_i ∇ℓ_i.
Ω's gradient is added by the optimizer hook after DDP's all-reduce, once per rank, identically on every rank.
Only rank 0 writes files; evaluation runs on rank 0 alone and its results are broadcast.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from l2sp.errors import L2SPError

T = TypeVar("T")

#: seconds a collective waits for the other ranks (an evaluation on rank 0 included) before failing;
#: ``L2SP_DIST_TIMEOUT`` overrides it
DEFAULT_TIMEOUT_S = 1800


@dataclass(frozen=True)
class Rank:
    """This process's place in the job: ``rank`` of ``world`` processes, ``local`` rank on its machine."""

    rank: int = 0
    world: int = 1
    local: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def launched() -> Rank:
    """The rank torchrun (or any launcher setting ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) gave this process."""
    env = os.environ
    try:
        return Rank(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))
    except ValueError as exc:
        raise L2SPError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({exc}); start the job with torchrun") from exc


def current() -> Rank:
    """The rank of this process in the active process group (rank 0 of 1 without one)."""
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return Rank(dist.get_rank(), dist.get_world_size(), local)
    return Rank()


def _backend(device_name: str) -> str:
    cuda = device_name != "cpu" and torch.cuda.is_available() and dist.is_nccl_available()
    return "nccl" if cuda else "gloo"


@contextmanager
def process_group(device_name: str = "auto") -> Iterator[Rank]:
    """The process group of a torchrun job for the duration of a run (nothing without one, or when the caller
    already made a group): NCCL when ``train.device`` may use CUDA, else gloo; destroyed at the end."""
    r = launched()
    if not r.distributed or (dist.is_available() and dist.is_initialized()):
        yield current()
        return
    backend = _backend(device_name)
    if backend == "nccl":
        torch.cuda.set_device(r.local)
    timeout = timedelta(seconds=float(os.environ.get("L2SP_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
    dist.init_process_group(backend, timeout=timeout)
    try:
        yield current()
        gc.collect()  # a DDP wrapper still held by a reference cycle goes now, while its group lives, not at exit
        dist.barrier()  # every rank has finished before any tears the group down
    finally:
        dist.destroy_process_group()


def device(dev: torch.device) -> torch.device:
    """Under a process group, ``cuda`` (no index) becomes the GPU of this process's local rank; ``cuda:N`` (one
    GPU for every rank) is refused."""
    r = current()
    if not r.distributed or dev.type != "cuda":
        return dev
    if dev.index is not None:
        raise L2SPError(f"train.device={dev} puts every rank on the same GPU; under torchrun use train.device=cuda "
                        "or auto (rank r takes GPU LOCAL_RANK) and choose GPUs with CUDA_VISIBLE_DEVICES")
    return torch.device("cuda", r.local % max(torch.cuda.device_count(), 1))


def local_batch(batch_size: int, world: int | None = None) -> int:
    """B / N, the examples of one rank per step; a one-line error when N does not divide the global batch B."""
    n = current().world if world is None else world
    if batch_size % n:
        lo, hi = batch_size - batch_size % n, batch_size + n - batch_size % n
        raise L2SPError(f"optim.batch_size={batch_size} (the global batch) does not split over {n} processes; "
                        f"use a multiple of {n} ({lo} or {hi}) or another --nproc_per_node")
    return batch_size // n


def on_main(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 only; its result (or its :class:`L2SPError`) is sent to every rank. Also a barrier."""
    r = current()
    if not r.distributed:
        return fn()
    box: list[Any] = [None]
    if r.main:
        try:
            box[0] = ("ok", fn())
        except L2SPError as exc:
            box[0] = ("error", str(exc))
        except BaseException as exc:
            box[0] = ("error", f"rank 0 failed: {type(exc).__name__}: {exc}")
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise L2SPError(value)
    return value


def agree(value: T) -> T:
    """Rank 0's ``value`` on every rank (a decision all ranks must take the same way)."""
    if not current().distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: T) -> list[T]:
    """Every rank's ``value``, in rank order (``[value]`` in one process)."""
    r = current()
    if not r.distributed:
        return [value]
    out: list[Any] = [None] * r.world
    dist.all_gather_object(out, value)
    return out


def seed_rank(base: int) -> None:
    """Give rank r > 0 its own torch RNG stream, seeded with ``base + r`` (dropout masks and other draws inside
    the model); rank 0 keeps the stream of one process. The batches and their augmentation do not use it (they
    are seeded per step)."""
    r = current()
    if r.rank > 0:
        torch.manual_seed((base + r.rank) % 2**63)


def mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over the ranks (``t`` itself in one process)."""
    n = current().world
    if n == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t.div_(n)


def _trains_bn(m: nn.Module) -> bool:
    """A BatchNorm layer that updates its statistics (not kept in eval mode by :mod:`l2sp.freeze`)."""
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and "train" not in m.__dict__


def sync_batchnorm(model: nn.Module) -> int:
    """Replace the BatchNorm layers that train by SyncBatchNorm (same parameters and buffers, statistics of the
    global batch); frozen ones are left alone. Returns the number replaced."""
    targets = [(name, m) for name, m in model.named_modules() if name and _trains_bn(m)]
    for name, m in targets:
        parent, _, child = name.rpartition(".")
        sync = nn.SyncBatchNorm.convert_sync_batchnorm(m)
        setattr(model.get_submodule(parent) if parent else model, child, sync)
    return len(targets)


def wrap(forward: nn.Module, model: nn.Module, dev: torch.device, *, find_unused: bool = False) -> nn.Module:
    """``forward`` in DistributedDataParallel (and, on CUDA, the BatchNorm layers of ``model`` that train turned
    into SyncBatchNorm first); ``forward`` unchanged in one process."""
    if not current().distributed:
        return forward
    if dev.type == "cuda":
        sync_batchnorm(model)
    ids = [dev.index] if dev.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(forward, device_ids=ids, find_unused_parameters=find_unused)
