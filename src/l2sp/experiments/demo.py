"""``l2sp demo``: the paper's findings, end to end, on the built-in Fashion-MNIST benchmark.

1. pre-train the source network on the source task (cached: a second call skips it);
2. estimate the diagonal Fisher on source inputs (cached);
3. fine-tune on the target task with L2, L2-SP, L2-SP-Fisher, L1-SP, GL-SP, GL-SP-Fisher, and L2 / L2-SP with
   the first blocks frozen: α and the learning rate chosen on the validation split from a small grid
   fixed in advance, then the chosen configuration repeated over seeds and scored on the test split;
4. the Table-2-like (target accuracy) and Table-5-like (source-task accuracy drop) tables, plots, and a
   Markdown report stating the machine and the time taken.

Every grid below was fixed before any result was seen; the numbers are what they are.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import copy
import hashlib
import json
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
BETA = 0.01  # "β = 0.01 was always picked" (the paper); β is varied only in the α/β heat map


@dataclass
class Plan:
    """How much the demo runs. ``full()`` fits 15 minutes on 2 CPU cores, ``quick()`` 3 minutes."""

    name: str
    n_per_class: int = 30
    val_per_class: int = 100
    source_steps: int = 2000
    steps: int = 1500
    milestone: int = 1000
    lrs: list = field(default_factory=lambda: [0.005, 0.02])
    alphas: dict = field(default_factory=lambda: copy.deepcopy(ALPHAS))
    kinds: list = field(default_factory=lambda: list(ALPHAS))
    freeze: list = field(default_factory=lambda: [1, 2, 3])
    betas: list = field(default_factory=lambda: [1e-3, 1e-2, 1e-1])
    seeds: int = 5
    fisher_examples: int = 2000
    model_options: dict = field(default_factory=dict)

    @classmethod
    def full(cls) -> Plan:
        return cls("full")

    @classmethod
    def quick(cls) -> Plan:
        return cls("quick", steps=500, milestone=350, lrs=[0.01],
                   alphas={k: v[1:] for k, v in ALPHAS.items()}, freeze=[2], betas=[], seeds=2,
                   fisher_examples=500)

    @classmethod
    def tiny(cls) -> Plan:
        """Seconds: for tests of the pipeline itself (the numbers mean nothing)."""
        return cls("tiny", n_per_class=15, val_per_class=10, source_steps=30, steps=12, milestone=8,
                   lrs=[0.01], alphas={k: v[1:2] for k, v in ALPHAS.items()}, kinds=["l2", "l2-sp", "l2-sp-fisher"],
                   freeze=[1], betas=[], seeds=2, fisher_examples=64,
                   model_options={"widths": [8, 8, 16]})


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
    key = _digest(resolve("fashion-mnist-source", overrides).to_dict())
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


def _overrides(plan: Plan, weights: Path, fisher: Path, kind: str, alpha: float, beta: float, lr: float,
               freeze: int, seed: int, final: bool) -> dict:
    """The ``fashion-mnist`` preset, with this run's penalty, schedule and bookkeeping."""
    return {
        "name": "demo", "model.weights": str(weights), "model.options": plan.model_options,
        "data.n_per_class": plan.n_per_class, "data.val_per_class": plan.val_per_class,
        "reg.kind": kind, "reg.alpha": alpha, "reg.beta": beta,
        "reg.fisher": str(fisher) if kind.endswith("fisher") else None,
        "optim.lr": lr, "optim.steps": plan.steps, "optim.milestones": [plan.milestone],
        "train.seed": seed, "train.device": "cpu", "train.freeze": freeze, "train.tensorboard": False,
        "train.save_checkpoint": False, "train.ckpt_every": 0, "train.save_model": final,
        "train.log_every": max(1, plan.steps // 10), "eval.splits": ["val", "test"] if final else ["val"],
    }


def _best(results: list[dict]) -> dict:
    """The highest validation accuracy; ties go to the earlier (smaller α, then smaller lr) grid point."""
    return max(results, key=lambda r: r["val_acc"])


def run_demo(plan: Plan, out: str | Path = "runs/demo", *, workers: int | None = None,
             cache: str | Path | None = None, say=print) -> dict:
    """Run the demo; returns the tables as row dicts and writes ``OUT/report.md`` (see the module doc)."""
    from l2sp.engine.config import cache_dir

    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache) if cache is not None else cache_dir() / "demo"
    cache.mkdir(parents=True, exist_ok=True)
    workers = workers or max(1, min(2, os.cpu_count() or 1))
    say(f"l2sp demo ({plan.name}): Fashion-MNIST, source = 5 even labels, target = 5 odd labels, "
        f"{plan.n_per_class} training images per class; fine-tuning {plan.steps} iterations of batch 64 "
        f"(lr/10 after {plan.milestone}), {plan.seeds} seeds; {workers} worker process(es)")
    if plan.name != "full":
        say(f"      {plan.name} mode: fewer iterations, grid points and seeds than `l2sp demo`; "
            "the numbers are indicative only")
    weights, source_acc = pretrain_source(plan, cache, out, say)
    fisher_path, fisher_mean = source_fisher(plan, weights, cache, say)

    def spec(kind, alpha, lr, *, beta=BETA, freeze=0, seed=100, final=False, label=None):
        scaled = alpha / fisher_mean if kind.endswith("fisher") else alpha
        params = {"kind": kind, "alpha": alpha, "alpha_used": scaled, "beta": beta, "lr": lr, "freeze": freeze,
                  "seed": seed}
        name = label or f"{kind}-a{alpha:g}-b{beta:g}-lr{lr:g}-f{freeze}"
        run_out = out / ("final" if final else "grid") / f"{name}-s{seed}"
        return {"overrides": _overrides(plan, weights, fisher_path, kind, scaled, beta, lr, freeze, seed, final),
                "out": str(run_out), "label": label or kind, "params": params, "drop": final}

    runner = Runner(workers)
    try:
        # 3a. grid on the validation split: α × lr for every kind
        grid_specs = [spec(k, a, lr) for k in plan.kinds for a in plan.alphas[k] for lr in plan.lrs]
        say(f"[3/4] choosing α and the learning rate on the validation split: {len(grid_specs)} runs")
        t = time.time()
        grid = runner.map(grid_specs, "grid")
        chosen = {k: _best([r for r in grid if r["params"]["kind"] == k]) for k in plan.kinds}
        # 3b. freezing the first k blocks, for L2 and L2-SP at their chosen α and lr
        freeze_specs = [spec(k, chosen[k]["params"]["alpha"], chosen[k]["params"]["lr"], freeze=f,
                             label=f"{k}+freeze")
                        for k in ("l2", "l2-sp") if k in chosen for f in plan.freeze]
        # 3c. β for L2-SP at its chosen lr (the α/β heat map, Figure 1)
        beta_specs = [spec("l2-sp", a, chosen["l2-sp"]["params"]["lr"], beta=b, label="l2-sp-beta")
                      for a in plan.alphas["l2-sp"] for b in plan.betas if b != BETA] if "l2-sp" in chosen else []
        extra = runner.map(freeze_specs + beta_specs, "freezing / β") if freeze_specs or beta_specs else []
        frozen = [r for r in extra if r["label"].endswith("+freeze")]
        for k in ("l2", "l2-sp"):
            cands = [r for r in frozen if r["label"] == f"{k}+freeze"]
            if cands:
                chosen[f"{k}+freeze"] = _best(cands)
        say(f"      grid done ({time.time() - t:.0f} s); chosen: " + ", ".join(
            f"{m} α={c['params']['alpha']:g} lr={c['params']['lr']:g}"
            + (f" k={c['params']['freeze']}" if c["params"]["freeze"] else "") for m, c in chosen.items()))
        # 3d. the chosen configurations over seeds, on the test split
        final_specs = [spec(c["params"]["kind"], c["params"]["alpha"], c["params"]["lr"],
                            freeze=c["params"]["freeze"], seed=s, final=True, label=m)
                       for m, c in chosen.items() for s in range(plan.seeds)]
        say(f"      {len(final_specs)} final runs ({len(chosen)} methods × {plan.seeds} seeds)")
        t = time.time()
        final = runner.map(final_specs, "final")
        say(f"      done ({time.time() - t:.0f} s)")
    finally:
        runner.close()

    from l2sp.experiments.report import write_report

    say("[4/4] tables, plots and report")
    elapsed = time.time() - t0
    summary = write_report(out, plan=asdict(plan), grid=grid, extra=extra, final=final, chosen=chosen,
                           source_acc=source_acc, fisher_path=fisher_path, elapsed=elapsed, workers=workers,
                           machine=machine_description())
    say("")
    say(summary["table2"])
    say(summary["table5"])
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
    parser.add_argument("--quick", action="store_true", help="≤ 3 minutes: fewer iterations, grid points, seeds")
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: min(2, cores))")
    parser.add_argument("--cache", default=None, help="cache folder for the source model and the Fisher")


def run(args: argparse.Namespace) -> int:
    plan = Plan.quick() if args.quick else Plan.full()
    if args.workers is not None and args.workers < 1:
        raise L2SPError(f"--workers must be >= 1, got {args.workers}")
    run_demo(plan, args.out, workers=args.workers, cache=args.cache)
    return 0
