"""Images/s of ``l2sp.finetune`` against a bare loop of the same model on pre-loaded tensors, same process.

CPU: the built-in benchmark (small ResNet, Fashion-MNIST target, L2-SP, batch 64). The bare loop does
forward, cross-entropy, backward and an SGD step on one pre-loaded batch, nothing else. The trainer adds
the data pipeline (sampling, augmentation, collation), the L2-SP gradient, logging and the LR schedule.
GPU (when CUDA is available): torchvision resnet50 at 224², synthetic in-memory data, bf16 autocast,
channels_last, both sides alike.
Bare and trainer are measured alternately (bare, trainer, bare, trainer, ...) and the medians compared.

    OMP_NUM_THREADS=1 python benchmarks/trainer_throughput.py [--steps 300] [--repeats 3] [--gpu-only]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import l2sp
from l2sp.data import TaskData
from l2sp.engine.evaluate import amp_context
from l2sp.engine.synthetic import TensorImages, synthetic_task
from l2sp.io import save_tensors
from l2sp.models import create


def bare_loop(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    *,
    lr: float = 0.01,
    amp: str = "none",
    warmup: int = 10,
) -> float:
    """Images/s of forward + backward + SGD step on one pre-loaded batch."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, foreach=True)
    model.train()
    for i in range(warmup + steps):
        if i == warmup:
            if x.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with amp_context(x.device, amp):
            out = model(x)
        loss = F.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if x.is_cuda:
        torch.cuda.synchronize()
    return steps * x.shape[0] / (time.perf_counter() - t0)


def trainer_rate(config: dict, task, out: str, steps: int) -> tuple[float, float]:
    """(images/s over the whole loop, images/s after the first logging window: the steady state, like the
    bare loop's timing after its warm-up steps)."""
    cfg = {**config, "optim": {**config["optim"], "steps": steps, "milestones": [steps // 2]}}
    r = l2sp.finetune(cfg, task=task, out=out, overwrite=True, quiet=True)
    batch = cfg["optim"]["batch_size"]
    recs = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    win = [x for x in recs if "images_per_s" in x]
    steady = win[1:] or win
    steps_in = [b["step"] - a["step"] for a, b in zip(win, win[1:])] or [steps]
    seconds = sum(n * batch / w["images_per_s"] for n, w in zip(steps_in, steady))
    return r["images_per_s"], sum(steps_in) * batch / seconds


def compare(name: str, config: dict, task, model_fn, x, y, steps: int, repeats: int, amp: str) -> float:
    """Alternate bare and trainer measurements; print the medians and the median of the pairwise ratios."""
    bare, whole, steady = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            bare.append(bare_loop(model_fn(), x, y, steps, amp=amp))
            w, s = trainer_rate(config, task, f"{tmp}/run{i}", steps)
            whole.append(w)
            steady.append(s)
    ratio = statistics.median(t / b for t, b in zip(steady, bare))
    ratio_whole = statistics.median(t / b for t, b in zip(whole, bare))
    print(
        f"{name}: bare loop {statistics.median(bare):,.0f} images/s, l2sp finetune "
        f"{statistics.median(steady):,.0f} images/s steady ({statistics.median(whole):,.0f} over the whole "
        f"loop, start-up included): ratio {100 * ratio:.1f}% steady, {100 * ratio_whole:.1f}% whole "
        f"(medians of {repeats} alternating pairs; bare {[round(v) for v in bare]}, "
        f"steady {[round(v) for v in steady]})",
        flush=True,
    )
    return ratio


def cpu(steps: int, repeats: int, workers: list[int]) -> None:
    from l2sp.engine.config import resolve
    from l2sp.engine.run import build_task

    with tempfile.TemporaryDirectory() as tmp:
        src = f"{tmp}/source.safetensors"
        save_tensors(src, create("small_resnet", 5, 1).state_dict())
        config = {
            "model": {"arch": "small_resnet", "weights": src},
            "data": {"task": "fashion-mnist-target", "n_per_class": 200, "val_per_class": 0},
            "reg": {"kind": "l2-sp", "alpha": 0.1, "beta": 0.01},
            "optim": {"lr": 0.01, "batch_size": 64},
            "train": {
                "device": "cpu",
                "log_every": 100,
                "ckpt_every": 0,
                "save_checkpoint": False,
                "tensorboard": False,
                "save_model": False,
                "channels_last": True,
            },
            "eval": {"splits": []},
        }
        task = build_task(resolve(config).data)
        xs, ys = zip(*task.train.__getitems__(list(range(64))))
        x = torch.stack(xs).contiguous(memory_format=torch.channels_last)
        y = torch.as_tensor(ys)

        def model_fn():
            return create("small_resnet", 5, 1).to(memory_format=torch.channels_last)

        # the engine alone: same model and penalty, in-memory tensors without augmentation
        plain = synthetic_task(num_classes=5, n_train=1000, n_val=0, n_test=0, seed=0)
        compare(
            "CPU engine overhead only (no augmentation, data.num_workers=0)",
            {**config, "data": {"task": "synthetic"}},
            plain,
            model_fn,
            x,
            y,
            steps,
            repeats,
            "none",
        )
        for w in workers:
            config["data"]["num_workers"] = w
            compare(
                f"CPU ({torch.get_num_threads()} thread(s), data.num_workers={w}), small_resnet 1×28×28, "
                "batch 64",
                config,
                task,
                model_fn,
                x,
                y,
                steps,
                repeats,
                "none",
            )


def gpu(steps: int, repeats: int, device: str = "cuda", size: int = 224, n: int = 1024) -> None:
    """resnet50 on synthetic in-memory images (``device``/``size``/``n`` only shrink it for a smoke test)."""
    dev = torch.device(device)
    x_all = torch.randn(n, 3, size, size)
    y_all = torch.randint(0, 100, (n,))
    ds = TensorImages(x_all, y_all)
    task = TaskData(
        train=ds,
        val=TensorImages(x_all[:0], y_all[:0]),
        test=TensorImages(x_all[:0], y_all[:0]),
        num_classes=100,
        classes=[str(i) for i in range(100)],
        split={},
    )
    with tempfile.TemporaryDirectory() as tmp:
        src = f"{tmp}/source.safetensors"
        save_tensors(src, create("resnet50", 1000).state_dict())
        config = {
            "model": {"arch": "resnet50", "weights": src},
            "reg": {"kind": "l2-sp", "alpha": 0.1, "beta": 0.01},
            "optim": {"lr": 0.01, "batch_size": 64},
            "data": {"num_workers": 4},
            "train": {
                "device": device,
                "amp": "bf16",
                "channels_last": True,
                "log_every": 20,
                "ckpt_every": 0,
                "save_checkpoint": False,
                "tensorboard": False,
                "save_model": False,
            },
            "eval": {"splits": []},
        }
        x = x_all[:64].to(dev).contiguous(memory_format=torch.channels_last)
        y = y_all[:64].to(dev)

        def model_fn():
            return create("resnet50", 100).to(dev).to(memory_format=torch.channels_last)

        compare(
            f"{dev.type.upper()} resnet50 {size}², batch 64, bf16, channels_last, data.num_workers=4",
            config,
            task,
            model_fn,
            x,
            y,
            steps,
            repeats,
            "bf16",
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gpu-steps", type=int, default=200)
    p.add_argument("--gpu-only", action="store_true")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="data.num_workers values (CPU)")
    a = p.parse_args()
    if not a.gpu_only:
        cpu(a.steps, a.repeats, a.workers)
    if torch.cuda.is_available():
        gpu(a.gpu_steps, a.repeats)


if __name__ == "__main__":
    main()
