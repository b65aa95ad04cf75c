"""Cost of the penalty in a full training step (forward, backward, SGD-momentum step), as a ratio to plain SGD.

Variants, all timed in one run and interleaved round by round (so background load hits them alike):
  sgd-wd      plain SGD with the optimizer's own weight decay (the reference, ratio 1.00)
  loop-l2sp   the common implementation: a Python loop adding ½α‖w−w0‖² per parameter to the loss
  <kind>      ``l2sp.regularizer(kind, ...).attach(optimizer)`` for each registered kind (the six built-ins)

CPU: a small ResNet on 32×32 and resnet18 on 64×64, one thread, timed in process CPU time (robust to other
jobs on the machine). CUDA (when present): resnet50 and resnet101, batch 64, 224², bf16 autocast,
channels_last, wall-clock time. Prints the median step time of each variant and its ratio.

    python benchmarks/penalty_overhead.py [--steps 30] [--rounds 5] [--models small,resnet18] [--kinds l2-sp,...]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

import l2sp
from l2sp.penalties import get_penalty, penalty_names


def build(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    if name == "small":
        return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=100), (3, 32, 32)
    shape = (3, 64, 64) if name == "resnet18" else (3, 224, 224)
    return getattr(torchvision.models, name)(num_classes=1000), shape


class Variant:
    def __init__(self, name: str, source: nn.Module, device, channels_last: bool, kinds: tuple[str, ...]):
        model = copy.deepcopy(source)
        w0 = l2sp.snapshot(model)
        head = model.fc
        model.fc = nn.Linear(head.in_features, 10)
        model.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        self.name, self.model, self.loop = name, model, name == "loop-l2sp"
        wd = 1e-4 if name == "sgd-wd" else 0.0
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=wd,
                                   foreach=True)
        if name in kinds:
            kind = get_penalty(name)
            fisher = {n: torch.rand_like(p) for n, p in model.named_parameters()} if kind.needs_fisher else None
            reg = l2sp.regularizer(name, model, w0 if kind.needs_w0 else None, alpha=0.1, beta=0.01,
                                   fisher=fisher)
            reg.attach(self.opt)
        if self.loop:
            self.w0 = {k: v.to(device) for k, v in w0.items()}
            self.shared = [(p, self.w0[n]) for n, p in model.named_parameters()
                           if n in self.w0 and self.w0[n].shape == p.shape]
            self.novel = [p for n, p in model.named_parameters() if n.startswith("fc.")]

    def step(self, x, y, autocast_dtype):
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = nn.functional.cross_entropy(self.model(x), y)
        if self.loop:
            for p, ref in self.shared:
                loss = loss + 0.05 * (p - ref).pow(2).sum()
            for p in self.novel:
                loss = loss + 0.005 * p.pow(2).sum()
        loss.backward()
        self.opt.step()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(model_name: str, device, steps: int, rounds: int, batch: int, autocast_dtype, channels_last: bool,
        kinds: tuple[str, ...], clock=time.perf_counter):
    source, shape = build(model_name)
    names = ["sgd-wd", "loop-l2sp", *kinds]
    variants = [Variant(n, source, device, channels_last, kinds) for n in names]
    x = torch.randn(batch, *shape, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    for v in variants:  # warm-up
        for _ in range(3):
            v.step(x, y, autocast_dtype)
    times = {n: [] for n in names}
    for _ in range(rounds):
        for v in variants:
            for _ in range(max(1, steps // rounds)):
                sync(device)
                t = clock()
                v.step(x, y, autocast_dtype)
                sync(device)
                times[v.name].append(clock() - t)
    base = statistics.median(times["sgd-wd"])
    print(f"\n{model_name} on {device.type}, batch {batch}, input {shape}, "
          f"{len(times['sgd-wd'])} timed steps per variant (median)")
    print("| variant | step (ms) | ratio to SGD |\n|---|---:|---:|")
    for n in names:
        m = statistics.median(times[n])
        print(f"| {n} | {1000 * m:.2f} | {m / base:.3f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--models", default=None,
                    help="comma-separated; default: CPU small,resnet18; CUDA resnet50,resnet101")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--kinds", default=",".join(penalty_names()),
                    help="comma-separated registered kinds (default: all of them)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (default 1: with the process CPU-time clock, other jobs on the machine "
                         "then hardly move the ratios)")
    args = ap.parse_args()
    kinds = tuple(k for k in args.kinds.split(",") if get_penalty(k))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    models = (args.models or ("resnet50,resnet101" if cuda else "small,resnet18")).split(",")
    if cuda:
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if cuda else time.process_time
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"device {torch.cuda.get_device_name() if cuda else 'cpu'}, "
          f"clock {'wall' if cuda else 'process CPU time'}")
    for m in models:
        run(m, device, args.steps, args.rounds, args.batch or 64,
            torch.bfloat16 if cuda else None, channels_last=cuda, kinds=kinds, clock=clock)


if __name__ == "__main__":
    main()
