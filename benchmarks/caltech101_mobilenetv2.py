"""Caltech-101-30 from an ImageNet MobileNetV2 on a CPU: L2, L2-SP, L2-SP-Fisher through ``l2sp.finetune``.

The paper's protocol reduced to what a 2-core CPU runs in about half an hour: all 101 classes and the
Caltech-101-30 split (30 seeded training images per class, the rest up to 50 for test), but small crops
(``--image-size``, default 80 of 91×91 images, 224/256 scaled), batch 32, one seed, and as many SGD steps as
the time budget allows (``--steps auto``: a timed probe sets them; lr/10 after two thirds). The penalties
use the paper's defaults (L2 α=1e-4 on S, β=1e-3 on the new head; L2-SP and L2-SP-Fisher α=0.1, β=0.01);
no α or learning-rate search fits in the budget. Each run goes through the library's trainer
(``l2sp.finetune`` on the preset ``caltech101-mobilenetv2-cpu``); the images are decoded once from the pack of
``benchmarks/caltech101_gpu.py pack`` (made on first use) into the library's on-device datasets (here the
device is the CPU: uint8 in memory, batched random crop, mirror and blur with the per-image pipeline's draws).

Reported per run: target test top-1 and mean per-class accuracy; the source-task accuracy drop on Tiny
ImageNet validation images (20 per class, resized to the crop size) with the original 1000-way classifier
re-attached (``l2sp.analysis``), scored 1000-way and restricted to the 200 Tiny ImageNet classes. Results are
appended to ``OUT/results.jsonl`` as runs finish; the table is printed last.

    OMP_NUM_THREADS=1 python benchmarks/caltech101_mobilenetv2.py [--budget-min 28] [--steps auto|N]
        [--kinds l2,l2-sp,l2-sp-fisher] [--seeds 0] [--image-size 80] [--out runs/caltech101-cpu]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import caltech101_gpu as gpu  # the sibling script: pack, run kinds, source scores, table
import torch

import l2sp
from l2sp import L2SPError
from l2sp.data.device import DeviceImages
from l2sp.penalties import get_penalty

PRESET = "caltech101-mobilenetv2-cpu"


def first_per_class(ds: DeviceImages, k: int | None) -> DeviceImages:
    """The first ``k`` images of each class (the pack holds a seeded draw), as a dataset of the same kind."""
    if k is None:
        return ds
    y = ds.labels.cpu()
    keep = torch.cat([(y == c).nonzero().squeeze(1)[:k] for c in y.unique()]).sort().values
    return DeviceImages(ds.images[keep], y[keep], ds.transform, device=ds.device)


def load(pack: Path, resize: int, image_size: int, tiny_per_class: int | None) -> dict:
    """The pack decoded once on the CPU: Caltech at resize², the Tiny ImageNet images at the crop size."""
    data = gpu.load_data(pack, "cpu", resize, image_size)
    data["source"] = first_per_class(data["source"], tiny_per_class)
    return data


def estimate_fisher(source: torch.nn.Module, data: dict, args: argparse.Namespace, out: Path, src: dict) -> Path:
    """The source network's exact Fisher (truncated to ``--fisher-classes`` + 2 drawn per example) on
    ``--fisher-examples`` Tiny ImageNet training images at the crop size, saved under ``out``."""
    t0 = time.time()
    fisher = l2sp.fisher.estimate(source, (x for x, _ in data["fisher"].batches(50)), method="exact",
                                  max_examples=args.fisher_examples, classes=args.fisher_classes,
                                  tail_samples=2, progress=False)
    path = l2sp.fisher.save(out / "fisher-mobilenet_v2-tiny.safetensors", fisher, source="tiny-imagenet train",
                            size=args.image_size, **fisher.metadata)
    src["fisher_s"] = time.time() - t0
    return path


def time_step(task: object, over: dict, out: Path, steps: int = 8) -> float:
    """Seconds per SGD step of these settings on this machine, now: a short ``l2sp.finetune`` run without
    evaluation."""
    timing = {**over, "optim.steps": steps, "optim.milestones": [steps], "eval.splits": [],
              "train.save_model": False, "name": "timing"}
    r = l2sp.finetune(PRESET, overrides=timing, task=task, out=str(out / "timing"), overwrite=True, quiet=True)
    return r["train_time_s"] / steps


def parse_run(spec: str) -> tuple[str, dict[str, str]]:
    """``"l2-sp:reg.alpha=0.01:train.bn=frozen"`` → ``("l2-sp", {"reg.alpha": 0.01, "train.bn": "frozen"})``:
    a kind of ``KINDS`` and overrides for that run only."""
    from l2sp.engine.config import parse_overrides

    kind, *items = spec.split(":")
    if kind not in gpu.KINDS:
        raise L2SPError(f"unknown run kind {kind!r} in {spec!r}; choose from {', '.join(gpu.KINDS)}")
    return kind, parse_overrides(items)


def run_overrides(spec: str, seed: int, args: argparse.Namespace, weights: Path, fisher: Path | None, steps: int,
                  lr: float) -> dict:
    """The CPU preset with the penalty (and freezing / BN mode) of the run's ``KINDS`` preset, the script's
    settings, ``--set``, then the run's own overrides (``kind:key=value:...``)."""
    from l2sp.engine.config import parse_overrides, resolve

    kind, run_extra = parse_run(spec)
    preset, extra = gpu.KINDS[kind]
    ref = resolve(preset, extra)
    over = {f"reg.{k}": v for k, v in dataclasses.asdict(ref.reg).items()}
    over.update({"train.freeze": ref.train.freeze, "train.bn": ref.train.bn, "model.weights": str(weights),
                 "train.seed": seed, "optim.steps": steps, "optim.milestones": [max(1, round(steps * 2 / 3))],
                 "optim.lr": lr, "optim.batch_size": args.batch, "data.image_size": args.image_size,
                 "data.resize": args.resize, "data.val_per_class": args.holdout,
                 "name": f"{run_name(spec)}-seed{seed}"})
    if get_penalty(ref.reg.kind).needs_fisher:
        over["reg.fisher"] = str(fisher)
    over.update(parse_overrides(args.set))
    over.update(run_extra)
    if "optim.steps" in run_extra and "optim.milestones" not in run_extra:  # lr/10 after two thirds
        over["optim.milestones"] = [max(1, round(int(run_extra["optim.steps"]) * 2 / 3))]
    return over


def run_name(spec: str) -> str:
    """A folder-safe name for a run spec."""
    return spec.replace(":", "_").replace("/", "-")


def summarize(rows: list[dict], source: dict) -> str:
    """The GPU script's table (mean ± std over seeds), from ``l2sp.finetune`` results."""
    rows = [{**r, "test_top1": 100 * r["test_acc"], "test_mean_per_class": 100 * r["test_mean_per_class"],
             "train_s": r["train_time_s"], **({"val_top1": 100 * r["val_acc"]} if r.get("val_acc") is not None else {})}
            for r in rows]
    return gpu.summarize(rows, source)


def collect(dirs: list[str]) -> str:
    """The table of every run in ``DIR/results.jsonl`` for ``dirs``: runs with the same spec pool their seeds."""
    rows = []
    for d in dirs:
        path = Path(d) / "results.jsonl"
        if not path.is_file():
            raise L2SPError(f"{path} does not exist; give folders written by this script's --out")
        rows += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise L2SPError(f"no finished run in {', '.join(dirs)}")
    return summarize(split_mixed(rows), rows[0]["source"])


def split_mixed(rows: list[dict]) -> list[dict]:
    """Runs of one spec made with different ``--holdout`` or ``--lr`` are not pooled: their names get the
    setting that differs, e.g. ``l2-sp (lr 0.001)``."""
    settings = {"holdout": lambda r: r["overrides"].get("data.val_per_class", 0), "lr": lambda r: f"{r['lr']:g}"}
    out = [dict(r) for r in rows]
    for key, get in settings.items():
        values: dict[str, set] = {}
        for r in rows:
            values.setdefault(r["run"], set()).add(get(r))
        for r, o in zip(rows, out, strict=True):
            if len(values[r["run"]]) > 1:
                o["run"] += f" ({key} {get(r)})"
    return out


def probe_lr(args: argparse.Namespace, data: dict, weights: Path, fisher: Path | None, out: Path
             ) -> tuple[float, list[dict], float | None, float | None]:
    """``--lr``, or the best of ``--lr-grid`` by the validation accuracy of a ``--probe-steps`` run of
    ``--probe-kind``; returns (lr, probe records, seconds per step, seconds of a run's evaluation)."""
    if args.lr != "auto":
        return float(args.lr), [], None, None
    vtask = gpu.target_task(data, args.image_size, args.val_per_class)
    records, step_s = [], None
    for lr in [float(v) for v in args.lr_grid.split(",")]:
        over = run_overrides(args.probe_kind, 0, args, weights, fisher, args.probe_steps, lr)
        over.update({"eval.splits": ["val"], "data.val_per_class": args.val_per_class})
        t0 = time.time()
        try:
            r = l2sp.finetune(PRESET, overrides=over, task=vtask, out=str(out / f"lr-probe-{lr:g}"), overwrite=True,
                              quiet=True)
            val, step_s = 100 * r["val_acc"], r["train_time_s"] / args.probe_steps
        except L2SPError as exc:  # diverged
            val, r = float("nan"), {"error": str(exc)}
        records.append({"lr": lr, "val_top1": val, "loss": r.get("final_loss"), "s": time.time() - t0})
        print(f"lr probe ({args.probe_kind}, {args.probe_steps} steps, {len(vtask.val)} val images): lr {lr:g} "
              f"→ val top-1 {val:.1f} %, loss {r.get('final_loss', float('nan')):.3f} ({time.time() - t0:.0f} s)",
              flush=True)
    ok = [p for p in records if p["val_top1"] == p["val_top1"]]
    if not ok or step_s is None:
        raise L2SPError("every learning rate of --lr-grid diverged; give lower ones")
    lr = max(ok, key=lambda p: p["val_top1"])["lr"]
    print(f"chosen lr: {lr:g}", flush=True)
    return lr, records, step_s, max(p["s"] for p in records) - args.probe_steps * step_s


def plan_steps(args: argparse.Namespace, task: object, n_source: int, runs: list, deadline: float,
               step_s: float | None, per_eval: float | None, timing_over: dict, out: Path) -> int:
    """``--steps``, or with ``auto`` as many as fit the budget for every run (evaluation included)."""
    if args.steps != "auto":
        return int(args.steps)
    if step_s is None:
        step_s = time_step(task, timing_over, out) * 1.1
    # evaluation: test + source images (two passes), forward only (≈ 1/3 of a training step per image)
    eval_s = 15 + (len(task.test) + 2 * n_source) * step_s / args.batch / 3 + (per_eval or 0)
    left = deadline - time.time() - len(runs) * eval_s - 30
    steps = max(100, int(left / len(runs) / step_s) // 50 * 50)
    print(f"{step_s:.3f} s per training step (batch {args.batch}, {args.image_size}²): {steps} steps per run fit "
          f"the {args.budget_min:.0f}-minute budget for {len(runs)} runs", flush=True)
    return steps


def run_one(spec: str, seed: int, over: dict, task: object, data: dict, source: torch.nn.Module, out: Path) -> dict:
    """One run through ``l2sp.finetune``, then its source-task scores (``l2sp.analysis``)."""
    from l2sp.engine.run import load_run

    run_dir = out / f"{run_name(spec)}-seed{seed}"
    r = l2sp.finetune(PRESET, overrides=over, task=task, out=str(run_dir), overwrite=True, quiet=True)
    art = load_run(run_dir, task=task)
    scores = gpu.drop_scores(art.model, source, art.head_name, data)
    return {"run": spec, "seed": seed, "steps": int(over["optim.steps"]), "lr": float(over["optim.lr"]),
            "test_acc": r["test_acc"], "val_acc": r.get("val_acc") if over.get("data.val_per_class") else None,
            "test_mean_per_class": r["test_mean_per_class"], "train_time_s": r["train_time_s"],
            "final_loss": r["final_loss"], **scores,
            "overrides": {k: v for k, v in over.items() if not k.startswith("model.")}}


def report(row: dict) -> str:
    val = f"val top-1 {100 * row['val_acc']:.2f} %, " if row["val_acc"] is not None else ""
    return (f"{row['run']}/seed{row['seed']}: {val}test top-1 {100 * row['test_acc']:.2f} %, mean per-class "
            f"{100 * row['test_mean_per_class']:.2f} %, source {row['src1000']:.1f} % / {row['src200']:.1f} % "
            f"(1000 / 200-way; with the source BN statistics {row['src1000_srcbn']:.1f} / "
            f"{row['src200_srcbn']:.1f}), train {row['train_time_s'] / 60:.1f} min, loss {row['final_loss']:.3f}")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pack", default="runs/caltech101-pack")
    ap.add_argument("--caltech", default=str(gpu.SHARED / "data" / "caltech101"))
    ap.add_argument("--tiny", default=str(gpu.SHARED / "data" / "tiny-imagenet"))
    ap.add_argument("--weights", default=str(gpu.SHARED / "weights" / gpu.WEIGHTS_FILE))
    ap.add_argument("--out", default="runs/caltech101-cpu")
    ap.add_argument("--kinds", default="l2,l2-sp,l2-sp-fisher",
                    help="runs, comma-separated: a kind, optionally with its own overrides (l2-sp:reg.alpha=0.01)")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", default="auto", help="SGD steps per run, or 'auto' (fill --budget-min)")
    ap.add_argument("--budget-min", type=float, default=28.0, help="wall-clock budget of the whole benchmark")
    ap.add_argument("--image-size", type=int, default=80)
    ap.add_argument("--resize", type=int, default=None, help="default: round(image_size * 256 / 224)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", default="auto", help="learning rate, or 'auto': the best of --lr-grid on validation")
    ap.add_argument("--lr-grid", default="0.01,0.003,0.001")
    ap.add_argument("--probe-steps", type=int, default=120, help="steps of each learning-rate probe")
    ap.add_argument("--probe-kind", default="l2-sp")
    ap.add_argument("--val-per-class", type=int, default=5, help="validation images (of the 30) for the probe")
    ap.add_argument("--source-per-class", type=int, default=20, help="Tiny ImageNet val images per class")
    ap.add_argument("--fisher-examples", type=int, default=400)
    ap.add_argument("--fisher-classes", type=int, default=8)
    ap.add_argument("--holdout", type=int, default=0,
                    help="train every run on 30 - HOLDOUT images per class and report the held-out validation accuracy")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--collect", nargs="+", metavar="DIR",
                    help="train nothing: print the table of the runs in DIR/results.jsonl (e.g. seeds run by "
                    "separate processes)")
    ap.add_argument("--set", action="append", default=[], help="override for every run, e.g. train.bn=frozen")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.collect:
        print(collect(args.collect))
        return
    t_start = time.time()
    torch.set_num_threads(args.threads)
    args.resize = args.resize or round(args.image_size * 256 / 224)
    out, pack = Path(args.out), Path(args.pack)
    out.mkdir(parents=True, exist_ok=True)
    if not (pack / gpu.PACK_FILE).is_file():
        gpu.make_pack(args.caltech, args.tiny, args.weights, pack)
    data = load(pack, args.resize, args.image_size, args.source_per_class)
    task = gpu.target_task(data, args.image_size, args.holdout)
    weights = pack / gpu.WEIGHTS_FILE
    n_src = len(data["source"])
    print(f"data: {len(task.train)} train / {len(task.test)} test Caltech-101 images at {args.resize}² (crops "
          f"{args.image_size}²), {n_src} Tiny ImageNet val images at {args.image_size}², decoded in "
          f"{time.time() - t_start:.0f} s", flush=True)
    source = gpu.source_network(weights, "cpu")
    src = gpu.source_scores(source, data["source"], data["source_indices"])
    kinds = [k for k in args.kinds.split(",") if k]
    runs = [(k, int(s)) for s in args.seeds.split(",") if s for k in kinds]
    fisher = estimate_fisher(source, data, args, out, src) if any("fisher" in parse_run(k)[0] for k in kinds) else None
    print(f"source network on {n_src} Tiny ImageNet val images at {args.image_size}²: {src['src1000']:.1f} % "
          f"(1000-way), {src['src200']:.1f} % (200-way)" + (f"; Fisher on {args.fisher_examples} Tiny ImageNet "
          f"training images (exact, {args.fisher_classes} classes + 2 drawn per example) in {src['fisher_s']:.0f} s"
          if fisher else ""), flush=True)
    deadline = t_start + args.budget_min * 60
    lr, lr_probe, step_s, per_eval = probe_lr(args, data, weights, fisher, out)
    timing = run_overrides(runs[0][0], 0, args, weights, fisher, 8, lr)
    steps = plan_steps(args, task, n_src, runs, deadline, step_s, per_eval, timing, out)
    print(f"protocol: {len(runs)} runs ({', '.join(f'{k}/seed{s}' for k, s in runs)}), {steps} SGD steps, batch "
          f"{args.batch} (≈ {steps * args.batch / len(task.train):.1f} epochs of {len(task.train)} images), lr "
          f"{lr:g} → /10 at step {round(steps * 2 / 3)}, momentum 0.9, {', '.join(args.set) or 'BN in train mode'}",
          flush=True)
    rows = []
    for spec, seed in runs:
        if rows and time.time() + rows[-1]["train_time_s"] > deadline + 120:
            print(f"skipping {spec}/seed{seed}: it would end past the time budget", flush=True)
            continue
        rows.append(run_one(spec, seed, run_overrides(spec, seed, args, weights, fisher, steps, lr), task, data,
                            source, out))
        with open(out / "results.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({**rows[-1], "source": src, "lr_probe": lr_probe}) + "\n")
        print(report(rows[-1]), flush=True)
    print(f"\nCaltech-101-30 (all 101 classes), MobileNetV2 (ImageNet), CPU reduced: {args.image_size}² crops of "
          f"{args.resize}² images, batch {args.batch}, {steps} steps, {args.threads} thread(s); source drop on "
          f"{n_src} Tiny ImageNet val images at {args.image_size}² (source network: {src['src1000']:.1f} % "
          f"1000-way, {src['src200']:.1f} % 200-way); wall {(time.time() - t_start) / 60:.1f} min")
    if rows:
        print(summarize(rows, src))


if __name__ == "__main__":
    main()
