"""The iteration-based training loop: SGD steps over an endless, seeded, resumable stream of batches.

Data order and augmentation depend only on (seed, step): the batch of step t is positions
[t·B, (t+1)·B) of epoch ⌊t / ⌊n/B⌋⌋'s permutation (drop_last), and its transforms draw from an RNG seeded
with hash(seed, t). A run resumed at step t therefore sees exactly the batches of an uninterrupted run,
whatever the number of loader workers. Under DDP (:mod:`l2sp.engine.distributed`) every rank builds that
global batch the same way and keeps its contiguous slice, so the numbers do not depend on the number of processes.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info

from l2sp.engine import distributed
from l2sp.engine.evaluate import amp_context
from l2sp.errors import L2SPError


def batch_seed(seed: int, step: int) -> int:
    """A 63-bit seed for the transforms of step ``step`` (splitmix64 of seed and step)."""
    z = (seed * 0x9E3779B97F4A7C15 + step + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


class StepBatchSampler(Sampler):
    """Batches of (index, batch seed) for steps ``start .. total-1``; epoch e is ``randperm(n)`` seeded by
    (seed, e), split into ⌊n/B⌋ batches (the remainder dropped)."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, total: int) -> None:
        if n < batch_size:
            raise L2SPError(
                f"the training split has {n} images, fewer than optim.batch_size={batch_size}; "
                "lower the batch size"
            )
        self.n, self.batch_size, self.seed, self.start, self.total = n, batch_size, seed, start, total
        self.per_epoch = n // batch_size

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, perm = -1, None
        for step in range(self.start, self.total):
            e, pos = divmod(step, self.per_epoch)
            if e != epoch:
                g = torch.Generator().manual_seed(batch_seed(self.seed, -1 - e))
                perm, epoch = torch.randperm(self.n, generator=g).tolist(), e
            s = batch_seed(self.seed, step)
            yield [(i, s) for i in perm[pos * self.batch_size : (pos + 1) * self.batch_size]]


class SeededBatches(Dataset):
    """Wraps a dataset so that the random transforms of a batch draw from torch's RNG seeded by the batch
    seed (forked in the main process, so the caller's RNG stream is left untouched). A dataset with
    ``get_batch(indices) -> (images, labels)`` is read a batch at a time (no per-item tensors).

    ``shard=(r, n)``: the batch is built whole (its augmentation stream is that of one process) and slice r of n
    equal contiguous slices is kept (rank r of a DDP job)."""

    def __init__(self, dataset: Dataset, shard: tuple[int, int] = (0, 1)) -> None:
        self.dataset, self.shard = dataset, shard

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> Any:
        return self.__getitems__([item])[0]

    def __getitems__(self, items: list[tuple[int, int]]) -> list | Collated:
        batch = self._whole(items)
        r, n = self.shard
        if n == 1:
            return batch
        b = len(items) // n
        if isinstance(batch, Collated):
            return Collated(part[r * b:(r + 1) * b] for part in batch)
        return batch[r * b:(r + 1) * b]

    def _whole(self, items: list[tuple[int, int]]) -> list | Collated:
        indices = [i for i, _ in items]
        fork = get_worker_info() is None
        with torch.random.fork_rng(devices=[], enabled=fork):
            torch.default_generator.manual_seed(items[0][1])
            get_batch = getattr(self.dataset, "get_batch", None)
            if get_batch is not None:  # optional fast path: (images, labels) without per-item tensors
                return Collated(get_batch(indices))
            getitems = getattr(self.dataset, "__getitems__", None)
            return list(getitems(indices)) if getitems else [self.dataset[i] for i in indices]


class Collated(tuple):
    """A batch a dataset's ``get_batch(indices) -> (images, labels)`` already collated."""


def collate(batch: list | Collated) -> Any:
    """``default_collate``, except for batches the dataset collated itself."""
    if isinstance(batch, Collated):
        x, y = batch
        return x, torch.as_tensor(y)
    return default_collate(batch)


def train_loader(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    start: int,
    total: int,
    *,
    num_workers: int = 0,
    pin_memory: bool = False,
    shard: tuple[int, int] = (0, 1),
) -> DataLoader:
    """The DataLoader of steps ``start .. total-1`` (one batch per step; ``batch_size`` the global batch, of which
    ``shard=(r, n)`` keeps slice r of n)."""
    sampler = StepBatchSampler(len(dataset), batch_size, seed, start, total)
    # its own generator: creating the iterator must not draw from (and shift) the global RNG
    return DataLoader(
        SeededBatches(dataset, shard),
        collate_fn=collate,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(batch_seed(seed, -(2**40) - start)),
    )


@dataclass
class LoopState:
    step: int = 0  # optimizer steps done
    train_time: float = 0.0  # seconds spent in this call's steps
    steps_this_call: int = 0
    last_loss: float = float("nan")
    last_good_checkpoint: int | None = None
    history: list = field(default_factory=list)


class Diverged(L2SPError):
    pass


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The default training loss: ``F.cross_entropy(output.float(), target)`` (mean over the batch)."""
    return F.cross_entropy(output.float(), target)


class Hook:
    """A callback of the training loop (detectron2's ``HookBase``): override what you need. ``trainer`` is the
    :class:`Trainer` (its ``model``, ``optimizer``, ``scheduler``, ``regularizer``), ``state`` the
    :class:`LoopState` (``state.step`` = optimizer steps done). Under DDP hooks run on every rank
    (``l2sp.engine.distributed.current().main`` tells rank 0, the one that should write files)."""

    def before_train(self, trainer: Trainer, state: LoopState) -> None:
        """Once, before the first step of this call (after a resume: its first step)."""

    def after_step(self, trainer: Trainer, state: LoopState) -> None:
        """After every optimizer step and the schedule's step (no host sync unless the hook makes one)."""

    def after_train(self, trainer: Trainer, state: LoopState) -> None:
        """Once, after the last step of this call (also when stopped by ``stop_after``)."""


@dataclass
class _Window:
    """The losses of the steps since the last log line, kept on the device (read once per window)."""

    losses: torch.Tensor
    k: int = 0  # steps in the window
    first: int = 0  # the step before the window's first
    t_start: float = 0.0  # the loop's start
    t_window: float = 0.0  # the window's start


class Trainer:
    """Runs optimizer steps: forward (AMP optional), ``loss_fn(output, target)``, backward, optimizer step (the
    attached regularizer adds ∇Ω inside it), LR schedule; logs every ``log_every`` steps without per-step syncs.

    Hooks (the shape of detectron2's ``TrainerBase``): ``validate() -> {name: value}`` every ``eval_every`` steps
    (logged as ``val_NAME``), ``save_checkpoint(step)`` every ``ckpt_every`` steps, each after a NaN/Inf check.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        *,
        device: torch.device,
        amp: str = "none",
        channels_last: bool = False,
        forward: nn.Module | None = None,
        regularizer: nn.Module | None = None,
        log_every: int = 50,
        ckpt_every: int = 0,
        eval_every: int = 0,
        metrics_path: Path | None = None,
        writer: Any = None,
        quiet: bool = False,
        save_checkpoint: Callable[[int], None] | None = None,
        validate: Callable[[], dict] | None = None,
        loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] = cross_entropy,
        hooks: Sequence[Hook] = (),
    ) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.forward = forward or model
        self.device, self.amp, self.channels_last = device, amp, channels_last
        self.regularizer, self.loss_fn = regularizer, loss_fn
        self.log_every, self.ckpt_every, self.eval_every = log_every, ckpt_every, eval_every
        self.metrics_path, self.writer, self.quiet = metrics_path, writer, quiet
        self.save_checkpoint, self.validate = save_checkpoint, validate
        self.hooks = list(hooks)
        self.world = distributed.current().world  # images per step = the slice × the number of ranks
        self.scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None

    def _log(self, record: dict) -> None:
        if self.metrics_path is not None:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float):
                    tag = f"val/{k[4:]}" if k.startswith("val_") else f"train/{k}"
                    self.writer.add_scalar(tag, v, record["step"])

    def _diverged(self, step: int, what: str, logged: str, state: LoopState) -> Diverged:
        good = state.last_good_checkpoint
        self._log({"step": step, "diverged": logged})
        where = (f"the last good checkpoint (step {good}) is kept" if good is not None
                 else "no checkpoint had been written")
        return Diverged(f"{what} at step {step}; training stopped and {where}; "
                        "lower optim.lr or reg.alpha, or use train.amp=none")

    def _check(self, losses: torch.Tensor, k: int, first_step: int, state: LoopState) -> list[float]:
        """Move the window's losses (averaged over the ranks under DDP: every rank then takes the same decision)
        to the host (one sync); stop on NaN/Inf naming the step."""
        vals = distributed.mean(losses[:k]).tolist()
        for i, v in enumerate(vals):
            if not math.isfinite(v):
                raise self._diverged(first_step + i + 1, f"loss became {v}", str(v), state)
        return vals

    def _check_params(self, step: int, state: LoopState) -> None:
        """Stop if an update made a parameter or BN statistic NaN/Inf (one multi-tensor norm, one sync)."""
        params = [t for t in (*self.model.parameters(), *self.model.buffers()) if t.is_floating_point()]
        if params and not bool(torch.stack(torch._foreach_norm(params)).isfinite().all()):
            raise self._diverged(step, "parameters or BatchNorm statistics became NaN/Inf",
                                 "non-finite parameters", state)

    def _step(self, x: Any, y: Any) -> tuple[torch.Tensor, float]:
        """One optimizer step on a batch; returns the (device) loss and the learning rate it used."""
        dev = self.device
        nonblock = dev.type == "cuda"
        x = x.to(dev, non_blocking=nonblock)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(dev, non_blocking=nonblock)
        with amp_context(dev, self.amp):
            output = self.forward(x)
        loss = self.loss_fn(output, y)
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(opt)
            self.scaler.update()
        else:
            loss.backward()
            opt.step()
        lr = opt.param_groups[0]["lr"]  # the rate this step used
        self.scheduler.step()
        return loss, lr

    def _report(self, w: _Window, state: LoopState, lr: float, batch: int, validate: bool, bar: Any) -> None:
        """The window's log line (mean loss, lr, images/s, Ω, validation metrics); one host sync."""
        vals = self._check(w.losses, w.k, w.first, state)
        now = time.perf_counter()
        record = {"step": state.step, "loss": sum(vals) / w.k, "lr": lr,
                  "images_per_s": w.k * batch / max(now - w.t_window, 1e-9), "time": now - w.t_start}
        if self.regularizer is not None:
            with torch.no_grad():
                record["penalty"] = float(self.regularizer())
        if validate:
            record.update({f"val_{k}": v for k, v in self.validate().items()})
            self.model.train()
        state.last_loss = vals[-1]
        self._log(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2g}",
                        img_s=f"{record['images_per_s']:.0f}", refresh=False)
        w.k, w.first = 0, state.step
        w.t_window = time.perf_counter()

    def _after_step(self, w: _Window, state: LoopState, total: int, stop_after: int | None, lr: float,
                    batch: int, bar: Any) -> bool:
        """Log, validate, check and checkpoint where the schedule says; True when this call must stop."""
        s = state.step
        boundary = s % self.log_every == 0 or s == total
        ckpt = self.save_checkpoint is not None and self.ckpt_every > 0 and s % self.ckpt_every == 0
        stop = stop_after is not None and state.steps_this_call >= stop_after
        val = self.validate is not None and self.eval_every > 0 and s % self.eval_every == 0
        if boundary or ckpt or stop or val:
            self._report(w, state, lr, batch, val, bar)
        if ckpt or stop or s == total:
            self._check_params(s, state)
        if ckpt or stop:
            self.save_checkpoint(s)
            state.last_good_checkpoint = s
            w.t_window = time.perf_counter()
        return stop

    def run(self, loader: DataLoader, start: int, total: int, *, stop_after: int | None = None) -> LoopState:
        """Steps ``start .. total-1`` (or ``stop_after`` of them, for interrupt tests)."""
        from tqdm.auto import tqdm

        state = LoopState(step=start, last_good_checkpoint=start if start else None)
        self.model.train()
        t0 = time.perf_counter()
        w = _Window(torch.zeros(self.log_every, device=self.device), 0, start, t0, t0)
        bar = tqdm(total=total, initial=start, disable=self.quiet, unit="it", dynamic_ncols=True, mininterval=0.5,
                   leave=False)
        for h in self.hooks:
            h.before_train(self, state)
        try:
            for x, y in loader:
                loss, lr = self._step(x, y)
                w.losses[w.k] = loss.detach()
                w.k += 1
                state.step += 1
                state.steps_this_call += 1
                bar.update(1)
                for h in self.hooks:
                    h.after_step(self, state)
                if self._after_step(w, state, total, stop_after, lr, len(x) * self.world, bar):
                    break
        finally:
            bar.close()
        for h in self.hooks:
            h.after_train(self, state)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        state.train_time = time.perf_counter() - t0
        return state
