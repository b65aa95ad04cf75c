"""``l2sp demo``: the paper's findings, end to end, on the built-in Fashion-MNIST benchmark.

1. pre-train the source network on the source task (cached: a second call skips it);
2. estimate the diagonal Fisher on source inputs (cached);
3. fine-tune on the target task: every penalty (L2, L2-SP, L2-SP-Fisher, L1-SP, GL-SP, GL-SP-Fisher) at 30
   training images per class, and L2 and L2-SP also at 15 and 100 (the paper's claim: the gain grows as target
   data shrinks). For each (size, penalty), α is chosen on the validation split by the mean of 2 seeds per grid
   point (margin over the runner-up reported against the seeds' noise); the choice then runs with 5 other seeds
   and is scored on the test split;
4. seed-paired comparisons (the same seed gives every penalty the same batches, augmentation and new head):
   each method − L2 and − L2-SP as mean ± std of per-seed differences, 95% interval, paired t-test and exact
   sign-flip p (:mod:`l2sp.analysis.paired`); tables, figures, and conclusions generated from those tests, in a
   Markdown report stating the machine and the time taken.

Sizing (``Plan.full``: 102 runs of 1,000 iterations, about 11 minutes on 2 idle cores): the learning rate is
fixed at 0.02 and the α grids of the kinds compared at one size lose the points that no selection chose on
either of two machines, rather than cutting seeds. The grids were fixed before these runs; the numbers are what
they are.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import copy
import hashlib
import json
import math
import multiprocessing
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from l2sp.errors import L2SPError
from l2sp.experiments.seeds import mean_std
from l2sp.penalties import get_penalty

SOURCE_CLASSES = 5
#: the α grids, per kind, fixed a priori from each penalty's gradient scale (α·d for the quadratic kinds, d ~
#: 1e-2..1e-1; α·sign(d) for L1/GL); the Fisher kinds' α is divided by the mean of F over S, so that their
#: average strength matches L2-SP's grid.
ALPHAS = {
    "l2": [1e-4, 1e-3, 1e-2],
    "l2-sp": [1e-3, 1e-2, 1e-1],
    "l2-sp-fisher": [1e-3, 1e-2, 1e-1],
    "l1-sp": [1e-5, 1e-4, 1e-3],
    "gl-sp": [1e-5, 1e-4, 1e-3],
    "gl-sp-fisher": [1e-5, 1e-4, 1e-3],
}
#: the full demo's grids: ``ALPHAS`` less the points that no selection chose on either machine of the two full
#: runs (Intel Xeon, README; AMD EPYC, issue 17) for the kinds compared at one size only. L2 and L2-SP keep their
#: three points: their α is chosen again at every training-set size.
FULL_ALPHAS = {**ALPHAS, "l2-sp-fisher": [1e-3, 1e-2], "l1-sp": [1e-5, 1e-4], "gl-sp": [1e-5, 1e-4],
               "gl-sp-fisher": [1e-5, 1e-4]}
#: the one learning rate of the full demo: both full runs chose 0.02 over 0.005 in 10 of their 12 selections
LR = 0.02
BETA = 0.01  # "β = 0.01 was always picked" (the paper); β is varied only in the α/β heat map
GRID_SEED0, FINAL_SEED0 = 100, 0  # selection runs use seeds 100, 101, ...; the final runs 0, 1, ...


def _needs_fisher(kind: str) -> bool:
    """The penalty of ``kind`` reads the source Fisher (demo kinds are registered penalties)."""
    return get_penalty(kind).needs_fisher


@dataclass
class Plan:
    """How much the demo runs. ``full()`` fits 15 minutes on 2 CPU cores, ``quick()`` 3 minutes.

    Every kind is compared at ``n_per_class`` training images per class; ``size_kinds`` also at each of
    ``sizes`` (the data-size sweep). α (and lr, if ``lrs`` has several) is chosen for each (size, kind) by the mean
    validation accuracy of ``grid_seeds`` seeds per grid point; the choice then runs with ``seeds`` other seeds.
    """

    name: str
    n_per_class: int = 30
    sizes: list = field(default_factory=lambda: [15, 30, 100])  # 15: the fewest with 5·n ≥ batch 64
    size_kinds: list = field(default_factory=lambda: ["l2", "l2-sp"])
    val_per_class: int = 100
    source_steps: int = 2000
    steps: int = 1000
    milestone: int = 667  # lr/10 after two thirds, as the paper (6000 of 9000)
    lrs: list = field(default_factory=lambda: [LR])
    alphas: dict = field(default_factory=lambda: copy.deepcopy(FULL_ALPHAS))
    kinds: list = field(default_factory=lambda: list(ALPHAS))
    freeze: list = field(default_factory=list)
    betas: list = field(default_factory=list)
    seeds: int = 5
    grid_seeds: int = 2
    fisher_examples: int = 2000
    model_options: dict = field(default_factory=dict)

    @classmethod
    def full(cls) -> Plan:
        return cls("full")

    @classmethod
    def quick(cls) -> Plan:
        return cls("quick", sizes=[15, 30], steps=400, milestone=270, kinds=["l2", "l2-sp"],
                   alphas={"l2": [1e-3, 1e-2], "l2-sp": [1e-3, 1e-2]}, seeds=3, fisher_examples=500)

    @classmethod
    def tiny(cls) -> Plan:
        """Seconds: for tests of the pipeline itself (the numbers mean nothing)."""
        return cls("tiny", n_per_class=15, sizes=[13, 15], val_per_class=10, source_steps=30, steps=12,
                   milestone=8, lrs=[0.01], alphas={k: v[:2] for k, v in ALPHAS.items()},
                   kinds=["l2", "l2-sp", "l2-sp-fisher"], freeze=[1], seeds=3, fisher_examples=64,
                   model_options={"widths": [8, 8, 16]})

    def points(self) -> list[tuple[int, str]]:
        """Every (training images per class, kind) the demo compares."""
        sizes = sorted({*self.sizes, self.n_per_class})
        return [(n, k) for n in sizes for k in (self.kinds if n == self.n_per_class else self.size_kinds)
                if k in self.kinds]

    def run_count(self) -> int:
        """Fine-tuning runs of the plan (selection, freezing, β and final runs), for sizing it."""
        pts = self.points()
        grid = sum(len(self.alphas[k]) * len(self.lrs) for _, k in pts) * self.grid_seeds
        frozen = 2 * len(self.freeze) if self.freeze else 0
        betas = len(self.alphas.get("l2-sp", [])) * len([b for b in self.betas if b != BETA])
        return grid + (frozen + betas) * self.grid_seeds + (len(pts) + (2 if frozen else 0)) * self.seeds


# ---------------------------------------------------------------------------------------------- jobs
def _init_worker() -> None:
    torch.set_num_threads(1)


def _job(spec: dict) -> dict:
    """One fine-tuning run (in a worker process): results, plus the source-task drop when asked."""
    from l2sp.engine.run import finetune, load_run

    res = finetune("fashion-mnist", spec["overrides"], out=spec["out"], quiet=True, overwrite=True)
    res["label"], res["params"] = spec["label"], spec["params"]
    if spec.get("drop"):
        from l2sp.analysis import source_task_drop
        from l2sp.engine.run import build_task

        art = load_run(spec["out"])
        source = build_task(art.config.data, source=True)
        loader = torch.utils.data.DataLoader(source.test, batch_size=512)
        res["source_drop"] = source_task_drop(art.model, art.source_model, art.head_name, loader)
    return res


class Runner:
    """Runs jobs in ``workers`` processes of one thread each (one process per core beats threads here)."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pool = None
        if workers > 1:
            ctx = multiprocessing.get_context("spawn")
            self.pool = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker)

    def map(self, specs: list[dict], progress: str = "") -> list[dict]:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(specs), desc=progress, leave=False, disable=not progress)
        out: list[Any] = [None] * len(specs)
        if self.pool is None:
            for i, s in enumerate(specs):
                out[i] = _job(s)
                bar.update()
        else:
            futures = {self.pool.submit(_job, s): i for i, s in enumerate(specs)}
            for fut in cf.as_completed(futures):
                out[futures[fut]] = fut.result()
                bar.update()
        bar.close()
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


# ---------------------------------------------------------------------------------------------- steps
def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def pretrain_source(plan: Plan, cache: Path, out: Path, say) -> tuple[Path, float]:
    """Train the source network with the ``fashion-mnist-source`` preset once; cached by its configuration.

    The weights are also copied to ``{cache}/fashion-mnist-source.safetensors``, the source of the
    ``fashion-mnist`` preset, so that ``l2sp finetune fashion-mnist`` works after a demo.
    """
    from l2sp.engine.config import cache_dir, resolve
    from l2sp.engine.run import finetune
    from l2sp.io import atomic_write, atomic_write_json

    overrides = {"optim.steps": plan.source_steps, "optim.milestones": [plan.source_steps * 3 // 4],
                 "model.options": plan.model_options, "train.device": "cpu", "train.tensorboard": False,
                 "train.save_checkpoint": False, "train.ckpt_every": 0, "eval.splits": ["test"]}
    # one thread, like every run of the demo: the source weights (and all that follows) must not depend on the
    # number of cores or on OMP_NUM_THREADS (2 threads train another network: reductions add in another order)
    key = _digest({**resolve("fashion-mnist-source", overrides).to_dict(), "threads": 1})
    weights, info = cache / f"source-{key}.safetensors", cache / f"source-{key}.json"
    if weights.is_file() and info.is_file():
        acc = json.loads(info.read_text())["test_acc"]
        say(f"[1/4] source model: cached ({weights}), source test accuracy {100 * acc:.2f}%")
    else:
        say(f"[1/4] pre-training the source network on the source task ({plan.source_steps} iterations)...")
        t = time.time()
        res = finetune("fashion-mnist-source", overrides, out=str(out / "source"), quiet=False, overwrite=True)
        atomic_write(weights, lambda tmp: shutil.copyfile(out / "source" / "model.safetensors", tmp))
        atomic_write_json(info, {"test_acc": res["test_acc"], "overrides": overrides})
        acc = res["test_acc"]
        say(f"      source test accuracy {100 * acc:.2f}% ({time.time() - t:.0f} s)")
    if not plan.model_options:  # the architecture of the fashion-mnist preset
        preset_source = cache_dir() / "fashion-mnist-source.safetensors"
        atomic_write(preset_source, lambda tmp: shutil.copyfile(weights, tmp))
    return weights, acc


def source_fisher(plan: Plan, weights: Path, cache: Path, say) -> tuple[Path, float]:
    """Exact diagonal Fisher of the source model on source inputs (5 classes: all of them); cached."""
    import l2sp.fisher
    from l2sp.data import fashion_mnist
    from l2sp.models import pretrained

    path = cache / f"fisher-{weights.stem}-{plan.fisher_examples}.safetensors"
    if not path.is_file():
        t = time.time()
        model = pretrained("small_resnet", str(weights), SOURCE_CLASSES, 1, plan.model_options)
        x = fashion_mnist.source_inputs(plan.fisher_examples, seed=0)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=256)
        fisher = l2sp.fisher.estimate(model, loader, method="exact")
        l2sp.fisher.save(path, fisher, source="fashion-mnist-source", examples=plan.fisher_examples)
        say(f"[2/4] Fisher: exact, {plan.fisher_examples} source inputs × {SOURCE_CLASSES} classes "
            f"({time.time() - t:.0f} s)")
    else:
        say(f"[2/4] Fisher: cached ({path})")
    fisher = l2sp.fisher.load(path)
    values = torch.cat([v.reshape(-1) for k, v in fisher.items() if not k.startswith("fc.")])
    return path, float(values.mean())


def _overrides(plan: Plan, weights: Path, fisher: Path | None, p: dict, final: bool) -> dict:
    """The ``fashion-mnist`` preset, with this run's size, penalty, schedule and bookkeeping (``p``: its params)."""
    return {
        "name": "demo", "model.weights": str(weights), "model.options": plan.model_options,
        "data.n_per_class": p["n"], "data.val_per_class": plan.val_per_class,
        "reg.kind": p["kind"], "reg.alpha": p["alpha_used"], "reg.beta": p["beta"],
        "reg.fisher": str(fisher) if _needs_fisher(p["kind"]) else None,
        "optim.lr": p["lr"], "optim.steps": plan.steps, "optim.milestones": [plan.milestone],
        "train.seed": p["seed"], "train.device": "cpu", "train.freeze": p["freeze"], "train.tensorboard": False,
        "train.save_checkpoint": False, "train.ckpt_every": 0, "train.save_model": final,
        "train.log_every": max(1, plan.steps // 10), "eval.splits": ["val", "test"] if final else ["val"],
    }


def select(runs: list[dict]) -> dict:
    """The grid point of ``runs`` (one kind, one size, several seeds per point) with the highest mean validation
    accuracy (ties: the earlier point, i.e. smaller α, then smaller lr), its runner-up and margin (points).

    noise = s_p·√(2/k): the standard error of the difference of two points' means, s_p the pooled seed-to-seed
    standard deviation of validation accuracy within points, k seeds per point. The choice is *resolved* when
    margin > 2·noise; otherwise the seeds cannot tell the two best points apart (either is a fair choice)."""
    points: dict[tuple, list[dict]] = {}
    for r in runs:
        p = r["params"]
        points.setdefault((p["alpha"], p["lr"], p["beta"], p["freeze"]), []).append(r)
    scored = [(sum(r["val_acc"] for r in rs) / len(rs), key, rs) for key, rs in points.items()]
    ranked = sorted(scored, key=lambda t: -t[0])  # stable: ties keep grid order
    best_mean, _, best_runs = ranked[0]
    variances = [mean_std(100 * r["val_acc"] for r in rs)[1] ** 2 for _, _, rs in scored if len(rs) > 1]
    k = min(len(rs) for _, _, rs in scored)
    noise = math.sqrt(sum(variances) / len(variances) * 2 / k) if variances else float("nan")
    choice = {"params": dict(best_runs[0]["params"]), "val_acc": best_mean, "val_seeds": len(best_runs),
              "noise": noise, "runner_up": None, "runner_up_val": None, "margin": None, "resolved": None}
    if len(ranked) > 1:
        second_mean, _, second_runs = ranked[1]
        choice.update(runner_up=dict(second_runs[0]["params"]), runner_up_val=second_mean,
                      margin=100 * (best_mean - second_mean))
        choice["resolved"] = bool(choice["margin"] > 2 * noise) if not math.isnan(noise) else None
    return choice


class _Specs:
    """Builds the job of one run: the overrides of the ``fashion-mnist`` preset, its folder and its params."""

    def __init__(self, plan: Plan, out: Path, weights: Path, fisher: Path | None, fisher_mean: float):
        self.plan, self.out, self.weights, self.fisher, self.fisher_mean = plan, out, weights, fisher, fisher_mean

    def __call__(self, n: int, kind: str, alpha: float, lr: float, seed: int, *, beta: float = BETA,
                 freeze: int = 0, final: bool = False, label: str | None = None) -> dict:
        scaled = alpha / self.fisher_mean if _needs_fisher(kind) else alpha
        params = {"n": n, "kind": kind, "alpha": alpha, "alpha_used": scaled, "beta": beta, "lr": lr,
                  "freeze": freeze, "seed": seed}
        name = f"n{n}-{kind}-a{alpha:g}-b{beta:g}-lr{lr:g}-f{freeze}"
        run_out = self.out / ("final" if final else "grid") / f"{name}-s{seed}"
        return {"overrides": _overrides(self.plan, self.weights, self.fisher, params, final), "out": str(run_out),
                "label": label or kind, "params": params, "drop": final}

    def grid(self) -> list[dict]:
        """Every (size, kind) × α × lr × selection seed."""
        p = self.plan
        return [self(n, k, a, lr, GRID_SEED0 + s) for n, k in p.points() for a in p.alphas[k] for lr in p.lrs
                for s in range(p.grid_seeds)]

    def extra(self, chosen: dict) -> list[dict]:
        """Freezing the first k blocks (L2, L2-SP at their chosen α, lr) and β for L2-SP, at ``n_per_class``."""
        p, n = self.plan, self.plan.n_per_class
        specs = [self(n, k, c["params"]["alpha"], c["params"]["lr"], GRID_SEED0 + s, freeze=f, label=f"{k}+freeze")
                 for k in ("l2", "l2-sp") if (c := chosen.get((n, k))) for f in p.freeze for s in range(p.grid_seeds)]
        if (c := chosen.get((n, "l2-sp"))) and p.betas:
            specs += [self(n, "l2-sp", a, c["params"]["lr"], GRID_SEED0 + s, beta=b, label="l2-sp-beta")
                      for a in p.alphas["l2-sp"] for b in p.betas if b != BETA for s in range(p.grid_seeds)]
        return specs

    def final(self, chosen: dict) -> list[dict]:
        """The chosen configuration of every (size, method), over the final seeds."""
        return [self(n, c["params"]["kind"], c["params"]["alpha"], c["params"]["lr"], FINAL_SEED0 + s,
                     beta=c["params"]["beta"], freeze=c["params"]["freeze"], final=True, label=m)
                for (n, m), c in chosen.items() for s in range(self.plan.seeds)]


def choose(plan: Plan, grid: list[dict], extra: list[dict] | None = None) -> dict:
    """{(n, method): :func:`select` of its runs}: every (size, kind) of the grid, then "KIND+freeze" at
    ``n_per_class`` among the frozen variants (the unfrozen choice is not a candidate)."""
    chosen = {}
    for n, k in plan.points():
        runs = [r for r in grid if r["params"]["kind"] == k and r["params"]["n"] == n]
        if runs:
            chosen[(n, k)] = select(runs)
    for k in ("l2", "l2-sp"):
        cands = [r for r in extra or [] if r["label"] == f"{k}+freeze"]
        if cands:
            chosen[(plan.n_per_class, f"{k}+freeze")] = select(cands)
    return chosen


def _describe_choices(chosen: dict) -> str:
    return "; ".join(f"n={n} {m}: α={c['params']['alpha']:g}" + (f" lr={c['params']['lr']:g}" if c["margin"] is None
                     or len({c["params"]["lr"], (c["runner_up"] or {}).get("lr")}) > 1 else "")
                     + (f" k={c['params']['freeze']}" if c["params"]["freeze"] else "")
                     + (f" (+{c['margin']:.2f} over the runner-up{'' if c['resolved'] else ', within noise'})"
                        if c["margin"] is not None else "") for (n, m), c in chosen.items())


def _train_all(plan: Plan, specs: _Specs, runner: Runner, say) -> tuple[list, list, dict, list]:
    """Selection runs, the choice per (size, method), freezing / β runs, then the final runs."""
    grid_specs = specs.grid()
    say(f"[3/4] choosing α{' and the learning rate' if len(plan.lrs) > 1 else ''} on the validation split "
        f"({plan.grid_seeds} seeds per grid point): {len(grid_specs)} runs")
    t = time.time()
    grid = runner.map(grid_specs, "grid")
    extra_specs = specs.extra(choose(plan, grid))
    extra = runner.map(extra_specs, "freezing / β") if extra_specs else []
    chosen = choose(plan, grid, extra)
    say(f"      selection done ({time.time() - t:.0f} s); chosen: {_describe_choices(chosen)}")
    final_specs = specs.final(chosen)
    say(f"      {len(final_specs)} final runs ({len(chosen)} (size, method) pairs × {plan.seeds} seeds)")
    t = time.time()
    final = runner.map(final_specs, "final")
    say(f"      done ({time.time() - t:.0f} s)")
    for r in grid + extra + final:
        r["n"] = r["params"]["n"]
    return grid, extra, chosen, final


def run_demo(plan: Plan, out: str | Path = "runs/demo", *, workers: int | None = None,
             cache: str | Path | None = None, say=print) -> dict:
    """Run the demo; returns the tables as row dicts and writes ``OUT/report.md`` (see the module doc)."""
    from l2sp.engine.config import cache_dir
    from l2sp.experiments.report import write_report

    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache) if cache is not None else cache_dir() / "demo"
    cache.mkdir(parents=True, exist_ok=True)
    workers = workers or max(1, min(2, os.cpu_count() or 1))
    say(f"l2sp demo ({plan.name}): Fashion-MNIST, source = 5 even labels, target = 5 odd labels, "
        f"{plan.n_per_class} training images per class ({', '.join(plan.size_kinds)} also at "
        f"{[n for n in plan.sizes if n != plan.n_per_class]}); fine-tuning "
        f"{plan.steps} iterations of batch 64 (lr/10 after {plan.milestone}); {plan.run_count()} runs, "
        f"{workers} worker process(es)")
    if plan.name != "full":
        say(f"      {plan.name} mode: fewer iterations, grid points, kinds and seeds than `l2sp demo`; "
            "the numbers are indicative only")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see pretrain_source
    try:
        weights, source_acc = pretrain_source(plan, cache, out, say)
        if any(_needs_fisher(k) for k in plan.kinds):
            fisher_path, fisher_mean = source_fisher(plan, weights, cache, say)
        else:
            fisher_path, fisher_mean = None, 1.0
            say("[2/4] Fisher: not needed (no Fisher penalty in this plan)")
    finally:
        torch.set_num_threads(threads)
    runner = Runner(workers)
    try:
        grid, extra, chosen, final = _train_all(plan, _Specs(plan, out, weights, fisher_path, fisher_mean),
                                                runner, say)
    finally:
        runner.close()
    say("[4/4] tables, plots and report")
    elapsed = time.time() - t0
    summary = write_report(out, plan=asdict(plan), grid=grid, extra=extra, final=final, chosen=chosen,
                           source_acc=source_acc, fisher_path=fisher_path, elapsed=elapsed, workers=workers,
                           machine=machine_description())
    say("")
    for key in ("table_sizes", "table2", "table5"):
        say(summary[key])
    for line in summary["conclusions"]:
        say(f"- {line}")
    say(f"report: {out / 'report.md'} ({elapsed / 60:.1f} min on {machine_description()})")
    return summary


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} × {cpu}, torch {torch.__version__.split('+')[0]}"


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="≤ 3 minutes: L2 and L2-SP only, at 15 and 30 images per class, 400 iterations, 3 seeds")
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: min(2, cores))")
    parser.add_argument("--cache", default=None, help="cache folder for the source model and the Fisher")


def run(args: argparse.Namespace) -> int:
    plan = Plan.quick() if args.quick else Plan.full()
    if args.workers is not None and args.workers < 1:
        raise L2SPError(f"--workers must be >= 1, got {args.workers}")
    run_demo(plan, args.out, workers=args.workers, cache=args.cache)
    return 0
