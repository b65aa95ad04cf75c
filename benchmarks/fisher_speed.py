"""Speed of l2sp.fisher.estimate against a per-example loop and a plain torch.func vmap, measured in one run.

    python benchmarks/fisher_speed.py          # CPU: the built-in small ResNet (5 classes, 1x28x28), < 1 min
    python benchmarks/fisher_speed.py --gpu    # CUDA: torchvision resnet50, 1000 classes, bf16 autocast

Every method computes the same quantity, Σ_n (∂ log p_{y_n}(x_n)/∂w)² with y_n drawn from the model's
prediction (``mc``, one sample per example); ``exact`` is timed per example and per class.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torchvision.models import resnet50

import l2sp.fisher as fisher
from l2sp.models.small_resnet import small_resnet


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def race(
    jobs: dict[str, tuple[int, Callable[[], object]]], device: torch.device, rounds: int, warmup: bool = True
) -> dict[str, float]:
    """Examples/s of each job: one warm-up, then ``rounds`` round-robin passes keeping each job's best time.

    Round-robin keeps the ratios fair on a machine shared with other processes; on CPU the clock is this
    process's CPU time (one thread), which other processes competing for the cores do not inflate.
    """
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    for _, fn in jobs.values() if warmup else ():
        fn()
    _sync(device)
    best = dict.fromkeys(jobs, float("inf"))
    for _ in range(rounds):
        for name, (_, fn) in jobs.items():
            t = clock()
            fn()
            _sync(device)
            best[name] = min(best[name], clock() - t)
    return {name: jobs[name][0] / best[name] for name in jobs}


def per_example_loop(model: nn.Module, x: torch.Tensor, amp: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Batch of 1, one backward per example, one label sampled from the prediction."""
    params = [p for p in model.parameters() if p.requires_grad]
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for i in range(len(x)):
        with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
            logp = torch.log_softmax(model(x[i : i + 1]).float(), -1)[0]
        y = torch.multinomial(logp.detach().exp(), 1)[0]
        for a, g in zip(acc, torch.autograd.grad(logp[y], params)):
            a += g.float() ** 2
    return dict(zip([n for n, p in model.named_parameters() if p.requires_grad], acc))


def plain_vmap(model: nn.Module, x: torch.Tensor, amp: torch.dtype | None, chunk: int = 32) -> dict:
    """torch.func ``vmap(grad(.))`` over chunks of ``chunk`` examples, one sampled label per example."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def logp_y(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        with torch.autocast(xi.device.type, dtype=amp, enabled=amp is not None):
            out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return torch.log_softmax(out.float(), -1)[0].gather(0, yi.view(1)).squeeze(0)

    per_ex = vmap(grad(logp_y), in_dims=(None, 0, 0))
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    for s in range(0, len(x), chunk):
        xs = x[s : s + chunk]
        with torch.no_grad(), torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
            ys = torch.multinomial(torch.softmax(model(xs).float(), -1), 1)[:, 0]
        for n, g in per_ex(params, xs, ys).items():
            acc[n] += (g.float() ** 2).sum(0)
    return acc


def run(
    model: nn.Module,
    shape: tuple[int, ...],
    device: torch.device,
    amp: torch.dtype | None,
    n_loop: int,
    n_fast: int,
    n_exact: int,
    chunk: int,
    classes: int | None,
    rounds: int,
) -> None:
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    x = torch.randn(max(n_loop, n_fast, n_exact), *shape, device=device)
    with torch.no_grad():
        K = model(x[:2]).shape[-1]
    params = [p for p in model.parameters() if p.requires_grad]
    print(
        f"device={device}, model={type(model).__name__}, params={sum(p.numel() for p in params):,}, "
        f"classes K={K}, input={tuple(shape)}, autocast={amp}, threads={torch.get_num_threads()}"
    )

    def train_step() -> None:
        """Not a Fisher: one batched forward + backward, a floor for any per-example method."""
        for s in range(0, n_fast, chunk):
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = model(x[s : s + chunk]).float().logsumexp(-1).sum()
            torch.autograd.grad(loss, params)

    def est(method: str, backend: str = "auto", n: int = n_fast) -> Callable[[], object]:
        return lambda: fisher.estimate(
            model, [x[:n]], method=method, backend=backend, autocast=amp, chunk_size=chunk, progress=False
        )

    r = race(
        {
            "loop": (n_loop, lambda: per_example_loop(model, x[:n_loop], amp)),
            "vmap": (n_fast, lambda: plain_vmap(model, x[:n_fast], amp)),
            "floor": (n_fast, train_step),
            "hooks": (n_fast, est("mc", "hooks")),
            "func": (n_fast, est("mc", "func")),
        },
        device,
        rounds,
    )
    # exact: K backward passes per chunk; on GPU (K = 1000) timed once, the caches being warm by now
    exact_rounds = 1 if device.type == "cuda" else rounds
    r |= race({"exact": (n_exact, est("exact", n=n_exact))}, device, exact_rounds, warmup=False)
    report(r, K, chunk)
    if classes is not None and classes < K:
        tr = fisher.estimate(
            model, [x[:n_exact]], method="exact", classes=classes, autocast=amp, chunk_size=chunk, progress=False
        )
        print(
            f"exact truncated to the top {classes} of {K} classes by w_c (+1 importance-sampled tail class): "
            f"predicted captured share {tr.metadata['predicted_share']:.3f}"
        )


def report(r: dict[str, float], K: int, chunk: int) -> None:
    """Prints the examples/s of every job of :func:`run` and their ratios to the loop and to plain vmap."""
    loop, vm = r["loop"], r["vmap"]
    print(f"per-example loop (batch 1, one backward per example): {loop:9.1f} examples/s")
    print(f"plain torch.func vmap(grad) over chunks of 32        : {vm:9.1f} examples/s")
    print(
        f"batched forward+backward, no per-example gradients   : {r['floor']:9.1f} examples/s  "
        f"({r['floor'] / loop:.1f}x the loop: a ceiling for any per-example method)"
    )
    for b in ("hooks", "func"):
        print(
            f"l2sp.fisher mc, 1 sample, backend={b:5s} (chunk {chunk:3d}) : {r[b]:9.1f} examples/s  "
            f"= {r[b] / loop:5.2f}x the loop, {r[b] / vm:5.2f}x plain vmap"
        )
    per_ex = 1 / r["exact"]
    print(
        f"l2sp.fisher exact, K={K}: {per_ex * 1e3:.2f} ms/example = "
        f"{per_ex / K * 1e3:.3f} ms per (example, class) "
        f"= {per_ex * r['hooks']:.1f}x the mc (1 sample) cost"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="resnet50 / 1000 classes / bf16 on CUDA")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    ap.add_argument("--rounds", type=int, default=3, help="round-robin repetitions on CPU (best time kept)")
    ap.add_argument("--chunk", type=int, default=None, help="l2sp chunk_size (default 64 CPU, 128 GPU)")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu needs CUDA")
        torch.backends.cudnn.benchmark = True
        run(
            resnet50(num_classes=1000),
            (3, 224, 224),
            torch.device("cuda"),
            torch.bfloat16,
            n_loop=64,
            n_fast=1024,
            n_exact=32,
            chunk=args.chunk or 128,
            classes=20,
            rounds=2,
        )
    else:
        # the built-in benchmark's source network: 1x28x28 Fashion-MNIST inputs, 5 source classes
        run(
            small_resnet(num_classes=5),
            (1, 28, 28),
            torch.device("cpu"),
            None,
            n_loop=64,
            n_fast=512,
            n_exact=128,
            chunk=args.chunk or 64,
            classes=3,
            rounds=args.rounds,
        )


if __name__ == "__main__":
    main()
