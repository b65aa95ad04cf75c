"""CamVid from an ImageNet MobileNetV2 on a CPU: L2 vs L2-SP (and L2-SP-Fisher), a driver of ``l2sp segment``.

The paper's segmentation experiment (Table 3) reduced to what a 2-core CPU runs in about two hours, in two
phases, every run a run directory of :func:`l2sp.segmentation.finetune_segmentation` (presets
``camvid-{deeplab,fcn}-mobilenetv2-{l2,l2-sp}``):

1. selection on the val split: for L2 and L2-SP, every α of ``--alphas-l2`` / ``--alphas-l2sp`` and learning
   rate of ``--lrs``, ``--select-seeds``; the best val mIoU per penalty and its margin over the runner-up, and
   every point's source-task drop (below);
2. ``--seeds`` per penalty at the chosen settings, scored on the test split: mIoU and per-class IoU, the
   source-task drop of the backbone on Tiny ImageNet validation images (``segmentation_source_drop``: the
   1000-way ImageNet classifier re-attached, also restricted to the 200 Tiny ImageNet classes), and the paired
   L2-SP − L2 differences over the shared seeds (``l2sp.analysis.paired``). With ``--fisher FILE`` (the
   ImageNet classifier's Fisher, ``l2sp fisher``), L2-SP-Fisher too, at L2-SP's chosen α and rate.

CPU reduction (the defaults; docs/camvid.md has the measurement): images at half resolution (``--scale 0.5``:
180×240, whole images with random flips), the FCN head on MobileNetV2 at output stride 16 (``--model
deeplabv3``: DeepLabV3), batch 8, 1,500 SGD steps (≈ 33 epochs of the 367 training images) at the preset's
schedule (FCN: constant rate), BN statistics frozen; predictions made at the same half resolution and scored
against the full-resolution 360×480 masks. Outputs in ``--out``: ``runs/{select,final}/NAME`` (the run directories),
``rows/…json`` (one per finished run: results, source drop, wall-clock time), ``camvid_table.md``,
``camvid_table.csv``, ``camvid_runs.csv`` and ``camvid_predictions.png``.

    OMP_NUM_THREADS=1 python benchmarks/camvid_mobilenetv2.py --camvid ../shared/data/camvid \\
        --tiny ../shared/data/tiny-imagenet --weights ../shared/weights/mobilenet_v2_imagenet.safetensors \\
        --out runs/camvid-cpu --workers 2 [--resume] [--fisher F.safetensors]
    python benchmarks/camvid_mobilenetv2.py --collect runs/camvid-cpu [more dirs]   # the tables, nothing trained

Rerunning the same command skips finished runs; ``--resume`` continues interrupted ones from their checkpoint.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from l2sp.errors import L2SPError

SHARED = Path(__file__).resolve().parents[2] / "shared"
PRESETS = {"deeplabv3": "camvid-deeplab-mobilenetv2-{}", "fcn": "camvid-fcn-mobilenetv2-{}"}
LABELS = {"l2": "L2", "l2-sp": "L2-SP", "l2-sp-fisher": "L2-SP-Fisher"}
#: the paper's Table 3 (Cityscapes val mIoU %, L2 → L2-SP), for comparison
PAPER = "DeepLab 68.6 → 70.4, FCN 66.9 → 67.9 (Cityscapes val, ResNet-101)"


@dataclass(frozen=True)
class Run:
    """One fine-tuning run: phase ``select`` (scored on val) or ``final`` (scored on test)."""

    phase: str
    kind: str
    alpha: float
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.kind}_a{self.alpha:g}_lr{self.lr:g}_seed{self.seed}"

    @property
    def split(self) -> str:
        return "val" if self.phase == "select" else "test"


# ------------------------------------------------------------------------------------------ arguments, paths
def floats(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise L2SPError(f"{what}={text!r} must be comma-separated numbers, e.g. 0.01,0.003") from exc
    if not values or any(v <= 0 for v in values):
        raise L2SPError(f"{what}={text!r} must list positive numbers, e.g. 0.01,0.003")
    return values


def ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise L2SPError(f"{what}={text!r} must be comma-separated integers, e.g. 0,1,2") from exc
    if not values or len(set(values)) != len(values):
        raise L2SPError(f"{what}={text!r} must list distinct integers, e.g. 0,1,2")
    return values


def crop_size(text: str | None, scale: float) -> list[int]:
    """``--crop HxW``; default the whole image at ``scale`` (360×480 CamVid frames)."""
    if text is None:
        return [round(360 * scale), round(480 * scale)]
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise L2SPError(f"--crop {text!r} must be HEIGHTxWIDTH, e.g. 180x240") from exc
    if h < 8 or w < 8:
        raise L2SPError(f"--crop {text!r} is too small; give at least 8x8 pixels")
    return [h, w]


def check_paths(args: argparse.Namespace) -> None:
    """One-line errors for the data, weights and Fisher paths before anything trains."""
    from l2sp.data.imagenet_subset import read_index
    from l2sp.segmentation.data import build_dataset

    for split in ("train", "val", "test"):
        try:
            build_dataset("camvid", args.camvid, split)
        except L2SPError as exc:
            raise L2SPError(f"--camvid {args.camvid}: {exc}") from exc
    if not Path(args.weights).is_file():
        raise L2SPError(f"--weights {args.weights} does not exist; give the ImageNet mobilenet_v2 .safetensors file")
    tiny = Path(args.tiny)
    if not (tiny / "val").is_dir():
        raise L2SPError(f"--tiny {tiny} has no val/ folder; give the Tiny ImageNet folder (val/<wnid>/*.JPEG)")
    read_index(tiny / "imagenet_index.json")
    if args.fisher is not None and not Path(args.fisher).is_file() and args.fisher_examples is None:
        raise L2SPError(f"--fisher {args.fisher} does not exist; add --fisher-examples 400 to estimate it "
                        "(docs/camvid.md)")


# ------------------------------------------------------------------------------------------ one run (a process)
def overrides(run: Run, args: dict) -> dict:
    """The preset's settings with the CPU reduction, the run's penalty, α, rate, seed and scored split."""
    s = args["scale"]
    over = {"data.root": args["camvid"], "model.checkpoint": args["weights"], "data.num_workers": 0,
            "data.crop": args["crop"], "data.scale_range": [s, s], "data.flip": True,
            "data.val_split": run.split, "optim.batch_size": args["batch"], "optim.steps": args["steps"],
            "optim.lr": run.lr, "reg.alpha": run.alpha, "train.seed": run.seed, "eval.scales": [s],
            "eval.flip": False, "train.ckpt_every": args["ckpt_every"], "train.log_every": args["log_every"],
            "name": f"camvid-{run.phase}-{run.name}"}
    if run.kind == "l2-sp-fisher":
        over.update({"reg.kind": "l2-sp-fisher", "reg.fisher": args["fisher"]})
    return over


def preset(run: Run, args: dict) -> str:
    return PRESETS[args["model"]].format("l2" if run.kind == "l2" else "l2-sp")


def run_dir(out: Path, run: Run) -> Path:
    return out / "runs" / run.phase / run.name


def row_path(out: Path, run: Run) -> Path:
    return out / "rows" / run.phase / f"{run.name}.json"


def source_images(tiny: str, per_class: int, size: int, split: str = "val"
                  ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The first ``per_class`` Tiny ImageNet images of each class in ``split`` (sorted names), resized to size²
    (bilinear), uint8; their ImageNet-1k labels; the 200 indices present."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    from l2sp.data.imagenet_subset import read_index

    index = read_index(Path(tiny) / "imagenet_index.json")
    images, labels = [], []
    for wnid in sorted(index):
        for path in sorted((Path(tiny) / split / wnid).glob("*.JPEG"))[:per_class]:
            with Image.open(path) as im:
                x = TF.pil_to_tensor(im.convert("RGB"))
            images.append(TF.resize(x, [size, size], antialias=True))
            labels.append(index[wnid])
    if not images:
        raise L2SPError(f"--tiny {tiny}: no {split}/<wnid>/*.JPEG image found")
    return torch.stack(images), torch.tensor(labels), sorted(set(labels))


class SourceBatches:
    """(x in [−1, 1], ImageNet label) batches of uint8 images (the MobileNetV2 file's input convention), made
    afresh on every pass."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch: int = 100) -> None:
        self.images, self.labels, self.batch = images, labels, batch

    def __iter__(self):
        for i in range(0, len(self.images), self.batch):
            yield self.images[i:i + self.batch].float() / 127.5 - 1.0, self.labels[i:i + self.batch]


def source_network(weights: str) -> torch.nn.Module:
    """The ImageNet classifier (torchvision's mobilenet_v2 with the local weights), eval mode."""
    import torchvision

    from l2sp.io import load_state_dict

    source = torchvision.models.mobilenet_v2()
    source.load_state_dict(load_state_dict(weights))
    return source.eval()


def estimate_fisher(args: argparse.Namespace) -> None:
    """``--fisher FILE`` absent and ``--fisher-examples N``: the source network's diagonal Fisher
    (``l2sp.fisher.estimate``, exact over the 8 most informative classes per example + 2 drawn) on the first N
    Tiny ImageNet training images (spread over the classes) at ``--source-size``², draws seeded, saved to FILE."""
    import l2sp
    from l2sp.data.imagenet_subset import read_index

    n, classes = args.fisher_examples, len(read_index(Path(args.tiny) / "imagenet_index.json"))
    images, labels, _ = source_images(args.tiny, -(-n // classes), args.source_size, split="train")
    if len(labels) < n:
        raise L2SPError(f"--fisher-examples {n}: only {len(labels)} Tiny ImageNet training images; give fewer")
    rank, seen = [], {}
    for y in labels.tolist():  # the i-th image of every class before the (i+1)-th of any
        rank.append(seen.get(y, 0))
        seen[y] = rank[-1] + 1
    order = torch.tensor(sorted(range(len(labels)), key=lambda i: (rank[i], i))[:n])
    data = SourceBatches(images[order], labels[order], 50)
    t0 = time.time()
    fisher = l2sp.fisher.estimate(source_network(args.weights), (x for x, _ in data), method="exact",
                                  max_examples=n, classes=8, tail_samples=2, progress=False,
                                  generator=torch.Generator().manual_seed(0))
    Path(args.fisher).parent.mkdir(parents=True, exist_ok=True)
    l2sp.fisher.save(args.fisher, fisher, source="tiny-imagenet train", size=args.source_size)
    print(f"Fisher of the ImageNet classifier on {n} Tiny ImageNet training images at {args.source_size}² in "
          f"{time.time() - t0:.0f} s: {args.fisher}", flush=True)


def source_drop(path: Path, args: dict) -> dict:
    """``segmentation_source_drop`` of a finished run on the Tiny ImageNet validation images."""
    from l2sp.analysis.source_drop import segmentation_source_drop
    from l2sp.segmentation import load_segmentation_run

    source = source_network(args["weights"])
    images, labels, present = source_images(args["tiny"], args["source_per_class"], args["source_size"])
    r = segmentation_source_drop(load_segmentation_run(path)[0], source, SourceBatches(images, labels),
                                 indices=present)
    return {**r, "source_images": len(labels)}


def run_job(job: tuple[Run, dict]) -> dict:
    """Train (or resume, or find finished) one run through the library, then its source drop (final runs);
    writes and returns its row. A final run whose settings and seed were a selection run is that run's network
    scored on the test split (``score_segmentation_run``), not trained again."""
    run, args = job
    torch.set_num_threads(args["threads"])
    from l2sp.engine.trainer import Diverged
    from l2sp.segmentation import finetune_segmentation, score_segmentation_run

    out, rdir = Path(args["out"]), run_dir(Path(args["out"]), run)
    selected = selection_twin(out, run)
    row = {**asdict(run), "name": run.name, "split": run.split, "steps": args["steps"], "settings": settings(args)}
    if selected is not None:  # the same training as the selection run: its network, scored on test
        rdir, twin = selected
        test = score_segmentation_run(rdir, run.split)
        row.update({"wall_s": twin.get("wall_s"), "train_s": twin.get("train_s"), "from_selection": True,
                    "miou": test["miou"], "pixel_acc": test["pixel_acc"], "classes": test["classes"],
                    "per_class_iou": test["per_class_iou"]}
                   | ({"source": twin["source"], "source_s": twin["source_s"]} if "source" in twin else {}))
    else:
        done, t0 = (rdir / "results.json").is_file(), time.time()
        try:
            res = finetune_segmentation(preset(run, args), overrides(run, args), out=str(rdir), quiet=True,
                                        resume=done or args["resume"])
        except Diverged as exc:  # a selection point that diverges is a result (too high a rate), not a failure
            if run.phase != "select":
                raise
            return write_row(out, run, {**row, "run_dir": str(rdir), "diverged": str(exc), "miou": None,
                                        "wall_s": time.time() - t0})
        row.update({"wall_s": None if done else time.time() - t0, "train_s": training_seconds(rdir),
                    "miou": res["val_miou"], "pixel_acc": res["val_pixel_acc"], "classes": res["val"]["classes"],
                    "per_class_iou": res["val"]["per_class_iou"]})
    row["run_dir"] = str(rdir)
    if "source" not in row:  # every run's forgetting: the selection grid compares α at a fixed rate
        t1 = time.time()
        row["source"] = source_drop(rdir, args)
        row["source_s"] = time.time() - t1
    return write_row(out, run, row)


def training_seconds(rdir: Path) -> float | None:
    """Seconds the run spent training, over all its calls: ``time`` (seconds since the call began) of the
    metrics lines, summed over the calls (a resumed run's clock starts again at 0)."""
    times = [json.loads(x).get("time") for x in (rdir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
             if x.startswith("{") and x.endswith("}")]
    total, last = 0.0, 0.0
    for t in (t for t in times if t is not None):
        total, last = (total + last, t) if t < last else (total, t)
    return total + last if times else None


def selection_twin(out: Path, run: Run) -> tuple[Path, dict] | None:
    """(run directory, row) of the finished selection run a final run repeats (same penalty, α, rate, seed)."""
    if run.phase != "final":
        return None
    twin = Run("select", run.kind, run.alpha, run.lr, run.seed)
    path, rdir = row_path(out, twin), run_dir(out, twin)
    if not path.is_file() or not (rdir / "results.json").is_file():
        return None
    return rdir, json.loads(path.read_text(encoding="utf-8"))


def write_row(out: Path, run: Run, row: dict) -> dict:
    from l2sp.io import atomic_write_json

    path = row_path(out, run)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, row)
    return row


def settings(args: dict) -> dict:
    return {k: args[k] for k in ("model", "scale", "crop", "batch", "steps", "source_per_class", "source_size")}


def execute(runs: list[Run], args: dict, workers: int) -> list[dict]:
    """Rows of ``runs``: finished ones read back, the others trained ``workers`` at a time (one process each,
    ``threads`` torch threads per process)."""
    out = Path(args["out"])
    rows, todo = [], []
    for run in runs:
        path = row_path(out, run)
        row = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        if row is not None and ("diverged" in row or ("source" in row and (Path(row["run_dir"]) / "results.json")
                                                      .is_file())):
            rows.append(row)
        else:
            todo.append(run)
    if todo:
        print(f"{len(runs) - len(todo)} of {len(runs)} {runs[0].phase} runs finished; training {len(todo)}, "
              f"{min(workers, len(todo))} at a time", flush=True)
    if workers <= 1 or not todo:
        fresh = []
        for run in todo:
            fresh.append(run_job((run, args)))
            print(report(fresh[-1]), flush=True)
    else:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(min(workers, len(todo)), maxtasksperchild=1) as pool:
            fresh = []
            for row in pool.imap_unordered(run_job, [(r, args) for r in todo]):
                fresh.append(row)
                print(report(row), flush=True)
    return rows + fresh


def report(row: dict) -> str:
    w = row.get("wall_s")
    wall = "finished before" if not w else (f"{w / 60:.1f} min" if w >= 60 else f"{w:.0f} s")
    if "diverged" in row:
        return f"{row['phase']}/{row['name']}: diverged ({row['diverged']})"
    src = ""
    if "source" in row:
        s = row["source"]
        src = f", source drop {s['drop']:.1f} / {s['drop_restricted']:.1f} pts (1000 / 200-way)"
    return (f"{row['phase']}/{row['name']}: {row['split']} mIoU {100 * row['miou']:.2f} %{src} ({wall})")


# ------------------------------------------------------------------------------------------ selection, table
def grid(args: argparse.Namespace) -> list[Run]:
    seeds = ints(args.select_seeds, "--select-seeds")
    lrs = floats(args.lrs, "--lrs")
    out = []
    for kind, alphas in (("l2", args.alphas_l2), ("l2-sp", args.alphas_l2sp)):
        what = "--alphas-l2" if kind == "l2" else "--alphas-l2sp"
        out += [Run("select", kind, a, lr, s) for a in floats(alphas, what) for lr in lrs for s in seeds]
    return out


def choose(rows: list[dict]) -> dict[str, dict]:
    """Per penalty, the (α, lr) of best mean val mIoU over the selection seeds, with the runner-up and margin."""
    points: dict[tuple, list[float]] = {}
    for r in rows:
        if r["miou"] is None:  # diverged
            continue
        points.setdefault((r["kind"], r["alpha"], r["lr"]), []).append(100 * r["miou"])
    chosen = {}
    for kind in sorted({k for k, _, _ in points}, key=list(LABELS).index):
        ranked = sorted(((statistics.mean(v), a, lr, len(v)) for (k, a, lr), v in points.items() if k == kind),
                        reverse=True)
        best = ranked[0]
        chosen[kind] = {"alpha": best[1], "lr": best[2], "val_miou": best[0], "seeds": best[3],
                        "runner_up": None if len(ranked) < 2 else {"alpha": ranked[1][1], "lr": ranked[1][2],
                                                                      "val_miou": ranked[1][0]},
                        "margin": None if len(ranked) < 2 else best[0] - ranked[1][0]}
    return chosen


def final_runs(chosen: dict[str, dict], seeds: list[int], fisher: bool) -> list[Run]:
    kinds = ["l2", "l2-sp"] + (["l2-sp-fisher"] if fisher else [])
    for k in ("l2", "l2-sp"):
        if k not in chosen:
            raise L2SPError(f"every selection run of {LABELS[k]} diverged; give lower --lrs or alphas")
    pick = {k: chosen["l2-sp" if k == "l2-sp-fisher" else k] for k in kinds}
    return [Run("final", k, pick[k]["alpha"], pick[k]["lr"], s) for k in kinds for s in seeds]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def pm(values: list[float]) -> str:
    m, s = mean_std(values)
    return f"{m:.2f} ± {s:.2f}"


def group(rows: list[dict]) -> dict[str, list[dict]]:
    """Final rows per method (kind, α, lr), seeds sorted; a method is named by its label."""
    out: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: (list(LABELS).index(r["kind"]), r["alpha"], r["lr"], r["seed"])):
        out.setdefault(f"{LABELS[r['kind']]} (α {r['alpha']:g}, lr {r['lr']:g})", []).append(r)
    return out


def paired_rows(methods: dict[str, list[dict]]) -> list[dict]:
    """Paired differences of every -SP method against the L2 method over their shared seeds."""
    from l2sp.analysis.paired import paired

    base = [(m, rs) for m, rs in methods.items() if rs[0]["kind"] == "l2"]
    out = []
    for name, rs in methods.items():
        if rs[0]["kind"] == "l2" or not base:
            continue
        ref = {r["seed"]: r for r in base[0][1]}
        both = [r for r in rs if r["seed"] in ref]
        if len(both) < 2:
            continue
        metrics = {"mIoU (pts)": lambda r: 100 * r["miou"], "source drop 1000-way (pts)":
                   lambda r: r["source"]["drop"], "source drop 200-way (pts)": lambda r: r["source"]["drop_restricted"]}
        for metric, get in metrics.items():
            p = paired([get(r) for r in both], [get(ref[r["seed"]]) for r in both])
            out.append({"comparison": f"{name} − {base[0][0]}", "metric": metric, **p.to_dict(),
                        "seeds": [r["seed"] for r in both]})
    return out


def selection_table(rows: list[dict], chosen: dict[str, dict]) -> str:
    """Markdown: every grid point's val mIoU (mean over its seeds) and wall time; the chosen ones in bold."""
    lines = ["| penalty | α | lr | seeds | val mIoU % | source drop 1000 / 200-way (pts) | train min / run |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    points: dict[tuple, list[dict]] = {}
    for r in sorted(rows, key=lambda r: (list(LABELS).index(r["kind"]), r["alpha"], r["lr"], r["seed"])):
        points.setdefault((r["kind"], r["alpha"], r["lr"]), []).append(r)
    for (kind, a, lr), rs in points.items():
        c = chosen.get(kind, {})
        bold = "**" if (c.get("alpha"), c.get("lr")) == (a, lr) else ""
        ok = [100 * r["miou"] for r in rs if r["miou"] is not None]
        score = f"{bold}{pm(ok)}{bold}" + (f" ({len(rs) - len(ok)} diverged)" if len(ok) < len(rs) else "") \
            if ok else "diverged"
        src = [r["source"] for r in rs if "source" in r]
        drop = (f"{statistics.mean(d['drop'] for d in src):.1f} / "
                f"{statistics.mean(d['drop_restricted'] for d in src):.1f}") if src else "—"
        lines.append(f"| {LABELS[kind]} | {a:g} | {lr:g} | {len(rs)} | {score} | {drop} | {minutes(rs)} |")
    for kind, c in chosen.items():
        margin = "no runner-up" if c["margin"] is None else (
            f"{c['margin']:+.2f} pts over α {c['runner_up']['alpha']:g}, lr {c['runner_up']['lr']:g}")
        lines.append(f"\nchosen for {LABELS[kind]}: α {c['alpha']:g}, lr {c['lr']:g} (val mIoU {c['val_miou']:.2f} %, "
                     f"{margin})")
    return "\n".join(lines)


def minutes(rows: list[dict]) -> str:
    walls = [r["train_s"] / 60 for r in rows if r.get("train_s")]
    return f"{statistics.mean(walls):.1f}" if walls else "—"


def final_table(methods: dict[str, list[dict]]) -> tuple[str, str]:
    """Markdown: mIoU ± std, pixel accuracy, source drop per method; per-class IoU per method."""
    main = ["| method | seeds | test mIoU % | pixel acc % | source drop 1000-way (pts) | source drop 200-way (pts) "
            "| train min / run |", "|---|---:|---:|---:|---:|---:|---:|"]
    classes = next(iter(methods.values()))[0]["classes"] if methods else []
    per = ["| method | " + " | ".join(classes) + " |", "|---|" + "---:|" * len(classes)]
    for name, rs in methods.items():
        main.append(f"| {name} | {len(rs)} | {pm([100 * r['miou'] for r in rs])} | "
                    f"{pm([100 * r['pixel_acc'] for r in rs])} | {pm([r['source']['drop'] for r in rs])} | "
                    f"{pm([r['source']['drop_restricted'] for r in rs])} | {minutes(rs)} |")
        per.append(f"| {name} | " + " | ".join(class_iou(rs, k) for k in range(len(classes))) + " |")
    return "\n".join(main), "\n".join(per)


def class_iou_mean(rows: list[dict], k: int) -> float | None:
    """Mean IoU (%) of class ``k`` over the runs where it is defined (None: absent from every run's split)."""
    values = [100 * r["per_class_iou"][k] for r in rows if r["per_class_iou"][k] is not None]
    return statistics.mean(values) if values else None


def class_iou(rows: list[dict], k: int) -> str:
    value = class_iou_mean(rows, k)
    return "—" if value is None else f"{value:.1f}"


def paired_table(pairs: list[dict]) -> str:
    lines = ["| comparison (paired over seeds) | metric | mean difference | std | 95 % interval | p (t-test) "
             "| p (sign-flip) |", "|---|---|---:|---:|---|---:|---:|"]
    lines += [f"| {p['comparison']} | {p['metric']} | {p['mean']:+.2f} | {p['std']:.2f} | [{p['low']:+.2f}, "
              f"{p['high']:+.2f}] | {p['p_t']:.3f} | {p['p_sign']:.3f} |" for p in pairs]
    return "\n".join(lines)


def markdown(select: list[dict], final: list[dict]) -> str:
    """The whole Markdown report: settings, selection, final table, per-class IoU, paired differences."""
    chosen = choose(select) if select else {}
    methods = group(final)
    parts = []
    any_row = (final or select)[0]
    s = any_row["settings"]
    parts.append(f"CamVid (11 classes), {s['model']} on ImageNet MobileNetV2, CPU-reduced: images at scale "
                 f"{s['scale']:g} (crops {s['crop'][0]}×{s['crop'][1]}), batch {s['batch']}, {s['steps']} steps; "
                 f"source drop on {s['source_per_class']} Tiny ImageNet val images per class at "
                 f"{s['source_size']}². Paper for comparison: {PAPER}.")
    if select:
        parts.append("### Selection (val split)\n\n" + selection_table(select, chosen))
    if final:
        main, per = final_table(methods)
        src = final[0]["source"]
        parts.append(f"### Test split\n\nsource network: {src['source_acc']:.1f} % (1000-way), "
                     f"{src['source_acc_restricted']:.1f} % (200-way) on {src['source_images']} images\n\n{main}")
        parts.append("Per-class IoU % (test, mean over seeds)\n\n" + per)
        pairs = paired_rows(methods)
        if pairs:
            parts.append("### Paired differences\n\n" + paired_table(pairs))
    return "\n\n".join(parts) + "\n"


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    path.write_text(buf.getvalue(), encoding="utf-8")


def csv_tables(select: list[dict], final: list[dict]) -> tuple[list[dict], list[dict]]:
    """(one row per method and one per paired comparison, one row per run) for the CSV files."""
    methods = group(final)
    table = []
    for name, rs in methods.items():
        m, s = mean_std([100 * r["miou"] for r in rs])
        row = {"row": "method", "method": name, "seeds": " ".join(str(r["seed"]) for r in rs), "miou_mean": m,
               "miou_std": s}
        for key, get in (("drop1000", lambda r: r["source"]["drop"]),
                         ("drop200", lambda r: r["source"]["drop_restricted"])):
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std([get(r) for r in rs])
        row.update({f"iou_{c}": class_iou_mean(rs, k) for k, c in enumerate(rs[0]["classes"])})
        table.append(row)
    table += [{"row": "paired", "method": p["comparison"], "metric": p["metric"], "diff_mean": p["mean"],
               "diff_std": p["std"], "low": p["low"], "high": p["high"], "p_t": p["p_t"], "p_sign": p["p_sign"]}
              for p in paired_rows(methods)]
    runs = [{k: r.get(k) for k in ("phase", "kind", "alpha", "lr", "seed", "split", "miou", "pixel_acc",
                                   "wall_s", "train_s")}
            | {f"iou_{c}": v for c, v in zip(r.get("classes", []), r.get("per_class_iou", []), strict=True)}
            | ({"drop1000": r["source"]["drop"], "drop200": r["source"]["drop_restricted"]} if "source" in r else {})
            for r in select + final]
    return table, runs


def write_outputs(out: Path, select: list[dict], final: list[dict]) -> str:
    text = markdown(select, final)
    (out / "camvid_table.md").write_text(text, encoding="utf-8")
    table, runs = csv_tables(select, final)
    write_csv(out / "camvid_table.csv", table)
    write_csv(out / "camvid_runs.csv", runs)
    return text


# ------------------------------------------------------------------------------------------ figure
def figure(final: list[dict], camvid: str, out: Path, n_images: int) -> Path | None:
    """Test images, ground truth and the first shared seed's L2 and L2-SP predictions (``colorize``), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from l2sp.segmentation import colorize, load_segmentation_run, predict_probabilities
    from l2sp.segmentation.data import build_dataset
    from l2sp.segmentation.transforms import eval_transform

    by = {k: {r["seed"]: r for r in final if r["kind"] == k} for k in ("l2", "l2-sp")}
    seeds = sorted(set(by["l2"]) & set(by["l2-sp"]))
    if not seeds or n_images < 1:
        return None
    rows = [by["l2"][seeds[0]], by["l2-sp"][seeds[0]]]
    models = [load_segmentation_run(r["run_dir"])[0] for r in rows]
    scale = rows[0]["settings"]["scale"]
    test = build_dataset("camvid", camvid, "test", transforms=eval_transform(normalization="half"))
    raw = build_dataset("camvid", camvid, "test")
    picks = [round(i * (len(test) - 1) / max(1, n_images - 1)) for i in range(min(n_images, len(test)))]
    fig, axes = plt.subplots(len(picks), 4, figsize=(12, 2.4 * len(picks)), squeeze=False)
    titles = ["image", "ground truth", f"L2 (seed {seeds[0]})", f"L2-SP (seed {seeds[0]})"]
    for i, k in enumerate(picks):
        x, mask = test[k]
        preds = [predict_probabilities(m, x[None], scales=(scale,)).argmax(1)[0] for m in models]
        panels = [raw[k][0].permute(1, 2, 0), colorize(mask), *[colorize(p) for p in preds]]
        for j, panel in enumerate(panels):
            axes[i][j].imshow(panel.numpy())
            axes[i][j].set_axis_off()
            if i == 0:
                axes[i][j].set_title(titles[j])
    from matplotlib.patches import Patch

    from l2sp.segmentation.data import CAMVID_COLORS, CAMVID_NAMES

    fig.legend(handles=[Patch(color=[c / 255 for c in rgb], label=n) for n, rgb in zip(CAMVID_NAMES, CAMVID_COLORS,
                                                                                        strict=True)],
               loc="lower center", ncol=6, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path = out / "camvid_predictions.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ collect, main
def collect(dirs: list[str]) -> tuple[list[dict], list[dict]]:
    """(selection rows, final rows) of every finished run under ``DIR/rows`` of ``dirs``."""
    select, final = [], []
    for d in dirs:
        base = Path(d) / "rows"
        if not base.is_dir():
            raise L2SPError(f"{d} holds no rows/ folder; give --out folders written by this script")
        for phase, rows in (("select", select), ("final", final)):
            rows += [json.loads(p.read_text(encoding="utf-8")) for p in sorted((base / phase).glob("*.json"))]
    if not select and not final:
        raise L2SPError(f"no finished run in {', '.join(dirs)}")
    return select, final


def job_args(args: argparse.Namespace) -> dict:
    return {"camvid": str(args.camvid), "tiny": str(args.tiny), "weights": str(args.weights),
            "fisher": None if args.fisher is None else str(args.fisher), "out": str(args.out),
            "model": args.model, "scale": args.scale, "crop": crop_size(args.crop, args.scale), "batch": args.batch,
            "steps": args.steps, "ckpt_every": args.ckpt_every, "log_every": args.log_every,
            "resume": args.resume, "threads": args.threads, "source_per_class": args.source_per_class,
            "source_size": args.source_size}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--camvid", default=str(SHARED / "data" / "camvid"))
    ap.add_argument("--tiny", default=str(SHARED / "data" / "tiny-imagenet"))
    ap.add_argument("--weights", default=str(SHARED / "weights" / "mobilenet_v2_imagenet.safetensors"))
    ap.add_argument("--fisher", default=None, help="the ImageNet classifier's Fisher (.safetensors): adds L2-SP-Fisher")
    ap.add_argument("--fisher-examples", type=int, default=None,
                    help="estimate --fisher on this many Tiny ImageNet training images when the file is absent")
    ap.add_argument("--out", default="runs/camvid-cpu")
    ap.add_argument("--model", choices=sorted(PRESETS), default="fcn", help="segmentation head (preset family)")
    ap.add_argument("--scale", type=float, default=0.5, help="image scale for training and prediction")
    ap.add_argument("--crop", default=None, help="HxW training crop (default: the whole scaled image)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--alphas-l2", default="1e-4")
    ap.add_argument("--alphas-l2sp", default="0.1,1")
    ap.add_argument("--lrs", default="0.005,0.001")
    ap.add_argument("--select-seeds", default="0")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--source-per-class", type=int, default=10, help="Tiny ImageNet val images per class")
    ap.add_argument("--source-size", type=int, default=160, help="their side after resizing")
    ap.add_argument("--figure-images", type=int, default=4)
    ap.add_argument("--workers", type=int, default=1, help="runs at once (processes)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--ckpt-every", type=int, default=200)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--resume", action="store_true", help="continue interrupted runs from their checkpoints")
    ap.add_argument("--collect", nargs="+", metavar="DIR",
                    help="train nothing: the tables and figure of the finished runs, written to the first DIR")
    return ap


def check_numbers(args: argparse.Namespace) -> None:
    for name in ("batch", "steps", "workers", "threads", "source_per_class", "source_size", "ckpt_every",
                 "fisher_examples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise L2SPError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0 < args.scale <= 2:
        raise L2SPError(f"--scale {args.scale} must lie in (0, 2], e.g. 0.5 for half resolution")
    if len(ints(args.seeds, "--seeds")) < 2:
        raise L2SPError("--seeds needs at least 2 seeds for the paired comparison, e.g. 0,1,2")


def main(argv: list[str] | None = None) -> str:
    """Run (or ``--collect``) the benchmark; returns the Markdown table (also printed and written)."""
    args = parser().parse_args(argv)
    if args.collect:  # the tables (and figure) of every finished run, written to the first folder
        select, final = collect(args.collect)
        text = write_outputs(Path(args.collect[0]), select, final)
        figure(final, args.camvid, Path(args.collect[0]), args.figure_images)
        print(text)
        return text
    check_numbers(args)
    check_paths(args)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.fisher is not None and not Path(args.fisher).is_file():
        estimate_fisher(args)
    jargs, t0 = job_args(args), time.time()
    select = execute(grid(args), jargs, args.workers)
    chosen = choose(select)
    print(selection_table(select, chosen), flush=True)
    final = execute(final_runs(chosen, ints(args.seeds, "--seeds"), args.fisher is not None), jargs, args.workers)
    text = write_outputs(out, select, final)
    fig = figure(final, args.camvid, out, args.figure_images)
    print(f"\n{text}\nwall {(time.time() - t0) / 60:.1f} min; tables in {out}/camvid_table.md, .csv"
          + (f"; figure {fig}" if fig else ""))
    return text


if __name__ == "__main__":
    try:
        main()
    except L2SPError as exc:
        sys.exit(f"error: {exc}")
