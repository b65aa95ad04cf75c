"""Caltech-101-30 from an ImageNet MobileNetV2 on a CPU: L2, L2-SP, L2-SP-Fisher through ``l2sp.finetune``.

The paper's protocol reduced to what a 2-core CPU runs in about half an hour: all 101 classes and the
Caltech-101-30 split (30 seeded training images per class, the rest up to 50 for test), but small crops
(``--image-size``, default 80 of 91×91 images, 224/256 scaled), batch 32, one seed, and as many SGD steps as
the time budget allows (``--steps auto``: a timed probe sets them; lr/10 after two thirds). The penalties
use the paper's defaults (L2 α=1e-4 on S, β=1e-3 on the new head; L2-SP and L2-SP-Fisher α=0.1, β=0.01);
no α or learning-rate search fits in the budget. Each run goes through the library's trainer
(``l2sp.finetune`` on the preset ``caltech101-mobilenetv2-cpu``); the images are decoded once from the pack of
``benchmarks/caltech101_gpu.py pack`` (made on first use) and augmented in memory (random crop, mirror, blur).

Reported per run: target test top-1 and mean per-class accuracy; the source-task accuracy drop on Tiny
ImageNet validation images (20 per class, resized to the crop size) with the original 1000-way classifier
re-attached, scored 1000-way and restricted to the 200 Tiny ImageNet classes. Results are appended to
``OUT/results.jsonl`` as runs finish; the table is printed last.

    OMP_NUM_THREADS=1 python benchmarks/caltech101_mobilenetv2.py [--budget-min 28] [--steps auto|N]
        [--kinds l2,l2-sp,l2-sp-fisher] [--seeds 0] [--image-size 80] [--out runs/caltech101-cpu]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import caltech101_gpu as gpu  # noqa: E402  (pack helpers)

from l2sp import L2SPError  # noqa: E402
from l2sp.data import TaskData  # noqa: E402
from l2sp.data.fashion_mnist import InMemoryImages  # noqa: E402
from l2sp.data.imagenet_subset import local_labels  # noqa: E402
from l2sp.data.transforms import BatchAugment  # noqa: E402

PRESET = "caltech101-mobilenetv2-cpu"
HALF = ([0.5] * 3, [0.5] * 3)


def memory_task(data: dict, crop: int, val_per_class: int = 0) -> TaskData:
    """Caltech-101-30 from decoded uint8 images: the paper's batched transforms (``BatchAugment``)."""
    mean, std = HALF
    val = gpu.carve_val(data["train_y"], val_per_class)
    train_tf = BatchAugment(True, crop, blur=True, mean=mean, std=std)
    eval_tf = BatchAugment(False, crop, mean=mean, std=std)
    tr = InMemoryImages(data["train_x"][~val], data["train_y"][~val], train_tf)
    va = InMemoryImages(data["train_x"][val], data["train_y"][val], eval_tf)
    te = InMemoryImages(data["test_x"], data["test_y"], eval_tf)
    meta = data["meta"]
    split = {
        "task": "caltech101",
        "protocol": meta["protocol"],
        "seed": meta["split_seed"],
        "n_per_class": meta["n_per_class"],
        "val_per_class": val_per_class,
        "image_size": crop,
        "normalization": "half",
        "files": meta["caltech_files"],
        "pack_quality": meta["quality"],
        "pack_short_side": meta["short_side"],
    }
    return TaskData(
        train=tr, val=va, test=te, num_classes=len(meta["classes"]), classes=meta["classes"], split=split
    )


def load(pack: Path, resize: int, source_size: int, tiny_per_class: int | None) -> dict:
    groups, meta = gpu.read_pack(pack)
    data = {"meta": meta}
    for part in ("train", "test"):
        data[f"{part}_x"] = gpu.decode_group(groups[f"caltech_{part}"], resize)
        data[f"{part}_y"] = groups[f"caltech_{part}"]["labels"]
    tx, ty = gpu.decode_group(groups["tiny_test"], source_size), groups["tiny_test"]["labels"]
    if tiny_per_class is not None:  # the first k of each class (the pack holds a seeded draw)
        keep = torch.cat([(ty == c).nonzero().squeeze(1)[:tiny_per_class] for c in ty.unique()]).sort().values
        tx, ty = tx[keep], ty[keep]
    data["tiny_x"], data["tiny_y"] = tx, ty
    data["tiny_idx"] = meta["tiny_class_indices"]
    data["fisher_x"] = gpu.decode_group(groups["tiny_fisher"], source_size)
    return data


def source_batches(data: dict, batch: int = 128) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Normalized Tiny ImageNet batches (x, ImageNet-1k label)."""
    x = gpu.center(data["tiny_x"], data["tiny_x"].shape[-1])
    y = data["tiny_y"]
    return [
        (x[s : s + batch].contiguous(memory_format=torch.channels_last), y[s : s + batch])
        for s in range(0, len(y), batch)
    ]


@torch.no_grad()
def source_scores(model: torch.nn.Module, data: dict, batches: list) -> dict[str, float]:
    """Top-1 % on the source test images, 1000-way and restricted to the present (200) classes
    (:class:`RestrictLogits` semantics, computed from the same logits)."""
    idx = torch.as_tensor(data["tiny_idx"])
    model.eval()
    hit1000 = hit200 = n = 0
    for x, y in batches:
        z = model(x)
        hit1000 += int((z.argmax(1) == y).sum())
        hit200 += int((z.index_select(1, idx).argmax(1) == local_labels(y, idx)).sum())
        n += len(y)
    return {"src1000": 100 * hit1000 / n, "src200": 100 * hit200 / n}


def estimate_fisher(source: torch.nn.Module, data: dict, args: argparse.Namespace, out: Path, src: dict) -> Path:
    """The source network's exact Fisher (truncated to ``--fisher-classes`` + 2 drawn per example) on
    ``--fisher-examples`` Tiny ImageNet training images at the crop size, saved under ``out``."""
    import l2sp

    t0 = time.time()
    fx = gpu.center(data["fisher_x"][: args.fisher_examples], args.image_size)
    fisher = l2sp.fisher.estimate(
        source,
        [fx[s : s + 50] for s in range(0, len(fx), 50)],
        method="exact",
        classes=args.fisher_classes,
        tail_samples=2,
        progress=False,
    )
    path = l2sp.fisher.save(
        out / "fisher-mobilenet_v2-tiny.safetensors",
        fisher,
        source="tiny-imagenet train",
        size=args.image_size,
        **fisher.metadata,
    )
    src["fisher_s"] = time.time() - t0
    return path


def time_step(crop: int, batch: int, steps: int = 6) -> float:
    """Median seconds of one MobileNetV2 SGD step (101 classes, channels_last) on this machine, now."""
    import torchvision

    m = torchvision.models.mobilenet_v2(num_classes=101).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, foreach=True)
    x = torch.randn(batch, 3, crop, crop).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 101, (batch,))
    ts = []
    for _ in range(steps + 2):
        t = time.perf_counter()
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts[2:])


def parse_run(spec: str) -> tuple[str, dict[str, str]]:
    """``"l2-sp:reg.alpha=0.01:train.bn=frozen"`` → ``("l2-sp", {"reg.alpha": 0.01, "train.bn": "frozen"})``:
    a kind of ``KINDS`` and overrides for that run only."""
    from l2sp.engine.config import parse_overrides

    kind, *items = spec.split(":")
    if kind not in gpu.KINDS:
        raise L2SPError(f"unknown run kind {kind!r} in {spec!r}; choose from {', '.join(gpu.KINDS)}")
    return kind, parse_overrides(items)


def run_overrides(
    spec: str, seed: int, args: argparse.Namespace, weights: Path, fisher: Path | None, steps: int, lr: float
) -> dict:
    """The CPU preset with the penalty (and freezing / BN mode) of the run's ``KINDS`` preset, the script's
    settings, ``--set``, then the run's own overrides (``kind:key=value:...``)."""
    from l2sp.engine.config import parse_overrides, resolve

    kind, run_extra = parse_run(spec)
    preset, extra = gpu.KINDS[kind]
    ref = resolve(preset, extra)
    over = {f"reg.{k}": v for k, v in dataclasses.asdict(ref.reg).items()}
    over.update(
        {
            "train.freeze": ref.train.freeze,
            "train.bn": ref.train.bn,
            "model.weights": str(weights),
            "train.seed": seed,
            "optim.steps": steps,
            "optim.milestones": [max(1, round(steps * 2 / 3))],
            "optim.lr": lr,
            "optim.batch_size": args.batch,
            "data.image_size": args.image_size,
            "data.resize": args.resize,
            "data.val_per_class": args.holdout,
            "name": f"{run_name(spec)}-seed{seed}",
        }
    )
    if ref.reg.kind.endswith("fisher"):
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
    rows = [
        {
            **r,
            "test_top1": 100 * r["test_acc"],
            "test_mean_per_class": 100 * r["test_mean_per_class"],
            "train_s": r["train_time_s"],
            **({"val_top1": 100 * r["val_acc"]} if r.get("val_acc") is not None else {}),
        }
        for r in rows
    ]
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
    settings = {
        "holdout": lambda r: r["overrides"].get("data.val_per_class", 0),
        "lr": lambda r: f"{r['lr']:g}",
    }
    out = [dict(r) for r in rows]
    for key, get in settings.items():
        values: dict[str, set] = {}
        for r in rows:
            values.setdefault(r["run"], set()).add(get(r))
        for r, o in zip(rows, out, strict=True):
            if len(values[r["run"]]) > 1:
                o["run"] += f" ({key} {get(r)})"
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pack", default="runs/caltech101-pack")
    ap.add_argument("--caltech", default=str(gpu.SHARED / "data" / "caltech101"))
    ap.add_argument("--tiny", default=str(gpu.SHARED / "data" / "tiny-imagenet"))
    ap.add_argument("--weights", default=str(gpu.SHARED / "weights" / gpu.WEIGHTS_FILE))
    ap.add_argument("--out", default="runs/caltech101-cpu")
    ap.add_argument(
        "--kinds",
        default="l2,l2-sp,l2-sp-fisher",
        help="runs, comma-separated: a kind, optionally with its own overrides (l2-sp:reg.alpha=0.01)",
    )
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", default="auto", help="SGD steps per run, or 'auto' (fill --budget-min)")
    ap.add_argument("--budget-min", type=float, default=28.0, help="wall-clock budget of the whole benchmark")
    ap.add_argument("--image-size", type=int, default=80)
    ap.add_argument("--resize", type=int, default=None, help="default: round(image_size * 256 / 224)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument(
        "--lr", default="auto", help="learning rate, or 'auto': the best of --lr-grid on validation"
    )
    ap.add_argument("--lr-grid", default="0.01,0.003,0.001")
    ap.add_argument("--probe-steps", type=int, default=120, help="steps of each learning-rate probe")
    ap.add_argument("--probe-kind", default="l2-sp")
    ap.add_argument(
        "--val-per-class", type=int, default=5, help="validation images (of the 30) for the probe"
    )
    ap.add_argument("--source-per-class", type=int, default=20, help="Tiny ImageNet val images per class")
    ap.add_argument("--fisher-examples", type=int, default=400)
    ap.add_argument("--fisher-classes", type=int, default=8)
    ap.add_argument(
        "--holdout",
        type=int,
        default=0,
        help="train every run on 30 - HOLDOUT images per class and report the held-out validation accuracy",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--collect",
        nargs="+",
        metavar="DIR",
        help="train nothing: print the table of the runs in DIR/results.jsonl (e.g. seeds run by separate processes)",
    )
    ap.add_argument("--set", action="append", default=[], help="override for every run, e.g. train.bn=frozen")
    args = ap.parse_args(argv)
    if args.collect:
        print(collect(args.collect))
        return
    t_start = time.time()
    torch.set_num_threads(args.threads)
    args.resize = args.resize or round(args.image_size * 256 / 224)
    import l2sp
    from l2sp.analysis import reattach_head
    from l2sp.engine.run import load_run
    from l2sp.models import pretrained

    out, pack = Path(args.out), Path(args.pack)
    out.mkdir(parents=True, exist_ok=True)
    if not (pack / gpu.PACK_FILE).is_file():
        gpu.make_pack(args.caltech, args.tiny, args.weights, pack)
    data = load(pack, args.resize, args.image_size, args.source_per_class)
    task = memory_task(data, args.image_size, args.holdout)
    weights = pack / gpu.WEIGHTS_FILE
    print(
        f"data: {len(task.train)} train / {len(task.test)} test Caltech-101 images at {args.resize}² "
        f"(crops {args.image_size}²), {len(data['tiny_y'])} Tiny ImageNet val images at {args.image_size}², "
        f"decoded in {time.time() - t_start:.0f} s",
        flush=True,
    )

    source = pretrained("mobilenet_v2", str(weights), 1000).eval()
    batches = source_batches(data)
    src = source_scores(source, data, batches)
    kinds = [k for k in args.kinds.split(",") if k]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    runs = [(k, s) for s in seeds for k in kinds]
    fisher_path = None
    if any("fisher" in parse_run(k)[0] for k in kinds):
        fisher_path = estimate_fisher(source, data, args, out, src)
    print(
        f"source network on {len(data['tiny_y'])} Tiny ImageNet val images at {args.image_size}²: "
        f"{src['src1000']:.1f} % (1000-way), {src['src200']:.1f} % (200-way)"
        + (
            f"; Fisher on {args.fisher_examples} Tiny ImageNet training images (exact, {args.fisher_classes} "
            f"classes + 2 drawn per example) in {src['fisher_s']:.0f} s"
            if fisher_path
            else ""
        ),
        flush=True,
    )

    deadline = t_start + args.budget_min * 60
    per_eval = None
    step_s = None
    lr_probe = []
    if args.lr == "auto":  # one learning rate for every penalty, chosen on the validation split
        vtask = memory_task(data, args.image_size, args.val_per_class)
        for lr in [float(v) for v in args.lr_grid.split(",")]:
            over = run_overrides(args.probe_kind, 0, args, weights, fisher_path, args.probe_steps, lr)
            over["eval.splits"] = ["val"]
            over["data.val_per_class"] = args.val_per_class
            t0 = time.time()
            try:
                r = l2sp.finetune(
                    PRESET,
                    overrides=over,
                    task=vtask,
                    out=str(out / f"lr-probe-{lr:g}"),
                    overwrite=True,
                    quiet=True,
                )
                val = 100 * r["val_acc"]
                step_s = r["train_time_s"] / args.probe_steps
            except l2sp.L2SPError as exc:  # diverged
                val, r = float("nan"), {"error": str(exc)}
            lr_probe.append({"lr": lr, "val_top1": val, "loss": r.get("final_loss"), "s": time.time() - t0})
            print(
                f"lr probe ({args.probe_kind}, {args.probe_steps} steps, {len(vtask.val)} val images): "
                f"lr {lr:g} "
                f"→ val top-1 {val:.1f} %, loss {r.get('final_loss', float('nan')):.3f} "
                f"({time.time() - t0:.0f} s)",
                flush=True,
            )
        ok = [p for p in lr_probe if p["val_top1"] == p["val_top1"]]
        if not ok:
            raise l2sp.L2SPError("every learning rate of --lr-grid diverged; give lower ones")
        lr = max(ok, key=lambda p: p["val_top1"])["lr"]
        per_eval = max(p["s"] for p in lr_probe) - args.probe_steps * step_s
        print(f"chosen lr: {lr:g}", flush=True)
    else:
        lr = float(args.lr)
    if args.steps == "auto":
        if step_s is None:
            step_s = time_step(args.image_size, args.batch) * 1.1
        # evaluation: test + source images (two passes), forward only (≈ 1/3 of a training step per image)
        n_eval = len(task.test) + 2 * len(data["tiny_y"])
        eval_s = 15 + n_eval * step_s / args.batch / 3 + (per_eval or 0)
        left = deadline - time.time() - len(runs) * eval_s - 30
        steps = max(100, int(left / len(runs) / step_s) // 50 * 50)
        print(
            f"{step_s:.3f} s per training step (batch {args.batch}, {args.image_size}²): "
            f"{steps} steps per run fit "
            f"the {args.budget_min:.0f}-minute budget for {len(runs)} runs",
            flush=True,
        )
    else:
        steps = int(args.steps)
    epochs = steps * args.batch / len(task.train)
    print(
        f"protocol: {len(runs)} runs ({', '.join(f'{k}/seed{s}' for k, s in runs)}), {steps} SGD steps, "
        f"batch {args.batch} (≈ {epochs:.1f} epochs of {len(task.train)} images), lr {lr:g} → /10 at step "
        f"{round(steps * 2 / 3)}, momentum 0.9, {', '.join(args.set) or 'BN in train mode'}",
        flush=True,
    )

    source_bn = {k: v for k, v in source.state_dict().items() if "running_" in k}
    rows = []
    for kind, seed in runs:
        if rows and time.time() + rows[-1]["train_time_s"] > deadline + 120:
            print(f"skipping {kind}/seed{seed}: it would end past the time budget", flush=True)
            continue
        over = run_overrides(kind, seed, args, weights, fisher_path, steps, lr)
        run_dir = out / f"{run_name(kind)}-seed{seed}"
        r = l2sp.finetune(PRESET, overrides=over, task=task, out=str(run_dir), overwrite=True, quiet=True)
        model = load_run(run_dir, task=task).model
        back = reattach_head(model, source, "classifier.1")
        scores = source_scores(back, data, batches)
        back.load_state_dict({**back.state_dict(), **source_bn})  # diagnostic: the source BN statistics
        scores.update({f"{k}_srcbn": v for k, v in source_scores(back, data, batches).items()})
        row = {
            "run": kind,
            "seed": seed,
            "steps": int(over["optim.steps"]),
            "lr": float(over["optim.lr"]),
            "test_acc": r["test_acc"],
            "val_acc": r.get("val_acc") if args.holdout else None,
            "test_mean_per_class": r["test_mean_per_class"],
            "train_time_s": r["train_time_s"],
            "final_loss": r["final_loss"],
            **scores,
            "overrides": {k: v for k, v in over.items() if not k.startswith("model.")},
        }
        rows.append(row)
        with open(out / "results.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({**row, "source": src, "lr_probe": lr_probe}) + "\n")
        val = f"val top-1 {100 * row['val_acc']:.2f} %, " if args.holdout else ""
        print(
            f"{kind}/seed{seed}: {val}test top-1 {100 * row['test_acc']:.2f} %, mean per-class "
            f"{100 * row['test_mean_per_class']:.2f} %, "
            f"source {row['src1000']:.1f} % / {row['src200']:.1f} % "
            f"(1000 / 200-way; with the source BN statistics {row['src1000_srcbn']:.1f} / "
            f"{row['src200_srcbn']:.1f}), train {row['train_time_s'] / 60:.1f} min, "
            f"loss {row['final_loss']:.3f}",
            flush=True,
        )
    print(
        f"\nCaltech-101-30 (all 101 classes), MobileNetV2 (ImageNet), CPU reduced: "
        f"{args.image_size}² crops of "
        f"{args.resize}² images, batch {args.batch}, {steps} steps, {args.threads} thread(s); source drop on "
        f"{len(data['tiny_y'])} Tiny ImageNet val images at {args.image_size}² (source network: "
        f"{src['src1000']:.1f} % 1000-way, {src['src200']:.1f} % 200-way); "
        f"wall {(time.time() - t_start) / 60:.1f} min"
    )
    if rows:
        print(summarize(rows, src))


if __name__ == "__main__":
    main()
