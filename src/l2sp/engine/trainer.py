"""The iteration-based training loop: SGD steps over an endless, seeded, resumable stream of batches.

Data order and augmentation depend only on (seed, step): the batch of step t is positions
[t·B, (t+1)·B) of epoch ⌊t / ⌊n/B⌋⌋'s permutation (drop_last), and its transforms draw from an RNG seeded
with hash(seed, t). A run resumed at step t therefore sees exactly the batches of an uninterrupted run,
whatever the number of loader workers.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info

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
    ``get_batch(indices) -> (images, labels)`` is read a batch at a time (no per-item tensors)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> Any:
        return self.__getitems__([item])[0]

    def __getitems__(self, items: list[tuple[int, int]]) -> list | Collated:
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
) -> DataLoader:
    """The DataLoader of steps ``start .. total-1`` (one batch per step)."""
    sampler = StepBatchSampler(len(dataset), batch_size, seed, start, total)
    # its own generator: creating the iterator must not draw from (and shift) the global RNG
    return DataLoader(
        SeededBatches(dataset),
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


class Trainer:
    """Runs SGD steps: forward (AMP optional), cross-entropy, backward, optimizer step (the attached
    regularizer adds ∇Ω inside it), LR schedule; logs every ``log_every`` steps without per-step syncs."""

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
    ) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.forward = forward or model
        self.device, self.amp, self.channels_last = device, amp, channels_last
        self.regularizer = regularizer
        self.log_every, self.ckpt_every, self.eval_every = log_every, ckpt_every, eval_every
        self.metrics_path, self.writer, self.quiet = metrics_path, writer, quiet
        self.save_checkpoint, self.validate = save_checkpoint, validate
        self.scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None

    def _log(self, record: dict) -> None:
        if self.metrics_path is not None:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float):
                    self.writer.add_scalar(f"train/{k}" if k != "val_top1" else "val/top1", v, record["step"])

    def _check(self, losses: torch.Tensor, k: int, first_step: int, state: LoopState) -> list[float]:
        """Move the window's losses to the host (one sync); stop on NaN/Inf naming the step."""
        vals = losses[:k].tolist()
        for i, v in enumerate(vals):
            if not math.isfinite(v):
                step = first_step + i + 1
                good = state.last_good_checkpoint
                self._log({"step": step, "diverged": str(v)})
                where = (
                    f"the last good checkpoint (step {good}) is kept"
                    if good is not None
                    else "no checkpoint had been written"
                )
                raise Diverged(
                    f"loss became {v} at step {step}; training stopped and {where}; "
                    "lower optim.lr or reg.alpha, or use train.amp=none"
                )
        return vals

    def _check_params(self, step: int, state: LoopState) -> None:
        """Stop if an update made a parameter or BN statistic NaN/Inf (one multi-tensor norm, one sync)."""
        params = [t for t in (*self.model.parameters(), *self.model.buffers()) if t.is_floating_point()]
        if params and not bool(torch.stack(torch._foreach_norm(params)).isfinite().all()):
            good = state.last_good_checkpoint
            self._log({"step": step, "diverged": "non-finite parameters"})
            where = (
                f"the last good checkpoint (step {good}) is kept"
                if good is not None
                else "no checkpoint had been written"
            )
            raise Diverged(
                f"parameters or BatchNorm statistics became NaN/Inf at step {step}; "
                f"training stopped and {where}; "
                "lower optim.lr or reg.alpha, or use train.amp=none"
            )

    def run(self, loader: DataLoader, start: int, total: int, *, stop_after: int | None = None) -> LoopState:
        """Steps ``start .. total-1`` (or ``stop_after`` of them, for interrupt tests)."""
        from tqdm.auto import tqdm

        state = LoopState(step=start, last_good_checkpoint=start if start else None)
        model, opt, dev = self.model, self.optimizer, self.device
        model.train()
        nonblock = dev.type == "cuda"
        window = torch.zeros(self.log_every, device=dev)
        k, window_first, t_window = 0, start, time.perf_counter()
        t_start = t_window
        bar = tqdm(
            total=total,
            initial=start,
            disable=self.quiet,
            unit="it",
            dynamic_ncols=True,
            mininterval=0.5,
            leave=False,
        )
        try:
            for x, y in loader:
                x = x.to(dev, non_blocking=nonblock)
                if self.channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                y = y.to(dev, non_blocking=nonblock)
                with amp_context(dev, self.amp):
                    logits = self.forward(x)
                loss = F.cross_entropy(logits.float(), y)
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
                window[k] = loss.detach()
                k += 1
                state.step += 1
                state.steps_this_call += 1
                bar.update(1)
                s = state.step
                boundary = s % self.log_every == 0 or s == total
                ckpt = self.save_checkpoint is not None and self.ckpt_every > 0 and s % self.ckpt_every == 0
                stop = stop_after is not None and state.steps_this_call >= stop_after
                val = self.validate is not None and self.eval_every > 0 and s % self.eval_every == 0
                if boundary or ckpt or stop or val:
                    vals = self._check(window, k, window_first, state)
                    now = time.perf_counter()
                    record = {
                        "step": s,
                        "loss": sum(vals) / k,
                        "lr": lr,
                        "images_per_s": k * x.shape[0] / max(now - t_window, 1e-9),
                        "time": now - t_start,
                    }
                    if self.regularizer is not None:
                        with torch.no_grad():
                            record["penalty"] = float(self.regularizer())
                    if val:
                        record["val_top1"] = self.validate()["top1"]
                        model.train()
                    state.last_loss = vals[-1]
                    self._log(record)
                    bar.set_postfix(
                        loss=f"{record['loss']:.4f}",
                        lr=f"{record['lr']:.2g}",
                        img_s=f"{record['images_per_s']:.0f}",
                        refresh=False,
                    )
                    k, window_first = 0, s
                    t_window = time.perf_counter()
                if ckpt or stop or s == total:
                    self._check_params(s, state)
                if ckpt or stop:
                    self.save_checkpoint(s)
                    state.last_good_checkpoint = s
                    t_window = time.perf_counter()
                if stop:
                    break
        finally:
            bar.close()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        state.train_time = time.perf_counter() - t_start
        return state
