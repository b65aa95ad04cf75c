"""Caltech-101-30 from an ImageNet MobileNetV2 on one GPU: the paper's full protocol, several runs at once.

Two steps. ``pack`` (on the CPU machine) writes a compact copy of just the images a run needs, small enough to
travel with the working tree (≤ 64 MiB in all): the 30 training + ≤ 50 test images of each Caltech-101 class
(re-encoded as JPEG, shorter side kept), Tiny ImageNet validation images (the source test set) and training
images (the Fisher's source inputs), byte for byte, and the MobileNetV2 weights (``l2sp.data.pack``). ``run``
(on the GPU machine) decodes the images once per process into on-device datasets (``l2sp.data.pack.images_task``:
uint8 on the GPU, resized 256×256, random 224 crop / mirror / blur there), and trains each run with
``l2sp.finetune`` (the presets, bf16, channels_last), ``--workers`` runs at once (one process each, sharing the
GPU); source-task drop through ``l2sp.analysis``, the Fisher through ``l2sp.fisher.estimate``; a table last.

    python benchmarks/caltech101_gpu.py pack [--caltech ../shared/data/caltech101] \\
        [--tiny ../shared/data/tiny-imagenet] \\
        [--weights ../shared/weights/mobilenet_v2_imagenet.safetensors] \\
        [--out runs/caltech101-pack]
    PYTHONPATH=src python3 benchmarks/caltech101_gpu.py run --pack runs/caltech101-pack \\
        [--kinds l2,l2-sp,l2-sp-fisher] [--seeds 0,1] [--workers 3] [--steps 9000] [--budget-s 480]

Each run's settings come from the presets ``caltech101-mobilenetv2-<kind>`` (``--set key=value`` overrides
them all). The CPU benchmark ``benchmarks/caltech101_mobilenetv2.py`` imports this module for the pack, the
run kinds, the source scores and the table; both are tested on tiny packs in ``tests/test_caltech101_protocol.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import l2sp
from l2sp.data.device import DeviceImages, PaperAugment
from l2sp.data.pack import PACK_FILE, decode_group, images_task, pack_group, read_pack, write_pack
from l2sp.errors import L2SPError
from l2sp.penalties import get_penalty

SHARED = Path(__file__).resolve().parents[2] / "shared"
WEIGHTS_FILE = "mobilenet_v2_imagenet.safetensors"
HALF = [0.5] * 3
#: run kinds: preset, extra overrides
KINDS = {
    "l2": ("caltech101-mobilenetv2-l2", {}),
    "l2-sp": ("caltech101-mobilenetv2-l2-sp", {}),
    "l2-sp-fisher": ("caltech101-mobilenetv2-l2-sp-fisher", {}),
    "l2-freeze": ("caltech101-mobilenetv2-l2-freeze", {}),
    "l2-sp-bnfrozen": ("caltech101-mobilenetv2-l2-sp", {"train.bn": "frozen"}),
    "l2-bnfrozen": ("caltech101-mobilenetv2-l2", {"train.bn": "frozen"}),
}


# ------------------------------------------------------------------------------------------ packing (CPU)
def _task_groups(task: Any, parts: dict[str, str], **encode: Any) -> dict[str, dict[str, torch.Tensor]]:
    """``{group name: pack_group(files of the task's part)}`` for ``parts`` = {part: group name}."""
    root = Path(task.split["root"])
    groups = {}
    for part, name in parts.items():
        items = task.split[part]
        groups[name] = pack_group([str(root / p) for p, _ in items], [c for _, c in items], **encode)
        print(f"  {name}: {len(items)} images, {groups[name]['bytes'].numel() / 2**20:.1f} MiB", flush=True)
    return groups


def make_pack(caltech: str, tiny: str, weights: str, out: str | Path, *, split_seed: int = 0,
              n_per_class: int = 30, test_per_class: int = 50, quality: int = 70, short_side: int | None = 144,
              tiny_test_per_class: int = 20, tiny_fisher_per_class: int = 5, max_mib: float = 56.0) -> Path:
    """Write ``out/images.safetensors`` (Caltech-101-30 re-encoded, Tiny ImageNet val / train subsets byte for
    byte) and copy the weights beside it; returns the folder."""
    from l2sp.data import build_task

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    task = build_task("caltech101", root=caltech, n_per_class=n_per_class, val_per_class=0, seed=split_seed,
                      normalization="half", check="none", test_per_class=test_per_class)
    src = build_task("imagenet-subset", root=tiny, n_per_class=tiny_fisher_per_class, seed=split_seed,
                     test_per_class=tiny_test_per_class, normalization="half", check="none")
    groups = _task_groups(task, {"train": "caltech_train", "test": "caltech_test"}, quality=quality,
                          short_side=short_side)
    groups.update(_task_groups(src, {"test": "tiny_test", "train": "tiny_fisher"}))
    rec = task.split
    meta = {"task": "caltech101", "classes": rec["classes"], "split_seed": split_seed, "n_per_class": n_per_class,
            "test_per_class": test_per_class, "protocol": rec["protocol"], "quality": quality,
            "short_side": short_side, "caltech_files": {p: [x for x, _ in rec[p]] for p in ("train", "test")},
            "tiny_class_indices": src.split["class_indices"], "tiny_test_per_class": tiny_test_per_class,
            "tiny_fisher_per_class": tiny_fisher_per_class, "weights": WEIGHTS_FILE}
    write_pack(out / PACK_FILE, groups, meta)
    shutil.copyfile(weights, out / WEIGHTS_FILE)
    total = sum(p.stat().st_size for p in out.iterdir() if p.is_file()) / 2**20
    print(f"pack {out}: {total:.1f} MiB in {time.perf_counter() - t0:.0f} s", flush=True)
    if total > max_mib:
        raise L2SPError(f"the pack in {out} is {total:.1f} MiB, over --max-mib {max_mib}; lower --quality or "
                        "--short-side, or --tiny-test-per-class")
    return out


# --------------------------------------------------------------------------------- the decoded pack, on device
def load_data(pack: str | Path, device: str | torch.device, resize: int, source_size: int, *,
              decode_device: str | torch.device = "cpu") -> dict:
    """The pack decoded once (PIL on the host by default, as the file datasets; ``decode_device="cuda"``:
    nvJPEG): Caltech images ``(x, y)`` at resize² on ``device``, the source test images and the Fisher's
    inputs as on-device evaluation datasets at source_size² (inputs in [−1, 1])."""
    groups, meta = read_pack(pack)
    device = torch.device(device)

    def images(g: str, size: int) -> torch.Tensor:
        return decode_group(groups[g], size, device=decode_device).to(device)

    def source(g: str) -> DeviceImages:
        tf = PaperAugment(False, source_size, mean=HALF, std=HALF)
        return DeviceImages(images(g, source_size), groups[g]["labels"], tf, device=device)

    return {"meta": meta, "device": device, "tasks": {},
            "train": (images("caltech_train", resize), groups["caltech_train"]["labels"]),
            "test": (images("caltech_test", resize), groups["caltech_test"]["labels"]),
            "source": source("tiny_test"), "fisher": source("tiny_fisher"),
            "source_indices": list(meta["tiny_class_indices"])}


def target_task(data: dict, crop: int, val_per_class: int = 0, *, blur: bool = True, ten_crop: bool = False):
    """The Caltech-101-30 task of the decoded pack (on-device datasets; one per setting, built once)."""
    key = (crop, val_per_class, blur, ten_crop)
    if key not in data["tasks"]:
        meta = data["meta"]
        record = {"task": "caltech101", "files": meta.get("caltech_files"),
                  **{k: meta.get(k) for k in ("protocol", "split_seed", "n_per_class", "quality", "short_side")}}
        data["tasks"][key] = images_task(data["train"], data["test"], classes=meta["classes"], crop=crop,
                                         val_per_class=val_per_class, normalization="half", blur=blur,
                                         ten_crop=ten_crop, device=data["device"], split=record)
    return data["tasks"][key]


def source_network(weights: str | Path, device: str | torch.device, arch: str = "mobilenet_v2") -> torch.nn.Module:
    """The pre-trained network with its 1000-way ImageNet classifier (eval mode)."""
    from l2sp.models import pretrained

    return pretrained(arch, str(weights), 1000, 3).to(device).eval()


def source_scores(model: torch.nn.Module, source: DeviceImages, indices: list[int]) -> dict[str, float]:
    """Top-1 % on the source test images (``l2sp.analysis.accuracy``), 1000-way and restricted to the present
    classes (``RestrictLogits``: 200-way on Tiny ImageNet)."""
    from l2sp.analysis import accuracy
    from l2sp.data.imagenet_subset import RestrictLogits, local_labels

    local = ((x, local_labels(y, indices)) for x, y in source.batches(500))
    return {"src1000": accuracy(model, source.batches(500)),
            "src200": accuracy(RestrictLogits(model, indices), local)}


def drop_scores(model: torch.nn.Module, source_model: torch.nn.Module, head: str, data: dict) -> dict[str, float]:
    """Source scores of the fine-tuned body with the source classifier re-attached (``reattach_head``), and
    again with the source network's BatchNorm statistics (``*_srcbn``: parameter drift alone)."""
    from l2sp.analysis import reattach_head

    back = reattach_head(model, source_model, head)
    res = source_scores(back, data["source"], data["source_indices"])
    stats = {k: v for k, v in source_model.state_dict().items() if "running_" in k}
    back.load_state_dict({**back.state_dict(), **stats})
    res.update({f"{k}_srcbn": v for k, v in source_scores(back, data["source"], data["source_indices"]).items()})
    return res


def resolve_run(kind: str, seed: int, args: argparse.Namespace, pack: Path, fisher: Path | None,
                extra: dict | None = None) -> Any:
    """The run's Config: preset ``KINDS[kind]``, the pack's weights file, the script's settings, ``--set``."""
    from l2sp.engine.config import parse_overrides, resolve

    if kind not in KINDS:
        raise L2SPError(f"unknown run kind {kind!r}; choose from {', '.join(KINDS)}")
    preset, kind_overrides = KINDS[kind]
    over = {"model.weights": str(pack / WEIGHTS_FILE), "train.seed": seed, "optim.steps": args.steps,
            "optim.milestones": [round(args.steps * 2 / 3)], "train.amp": "bf16", "train.channels_last": True,
            "train.compile": bool(getattr(args, "compile", False)), "data.val_per_class": args.val_per_class,
            "train.device": getattr(args, "device", "cuda"), "train.tensorboard": False,
            "train.save_checkpoint": False, "data.on_device": True, "name": f"{kind}-seed{seed}", **kind_overrides}
    if fisher is not None and get_penalty(resolve(preset, kind_overrides).reg.kind).needs_fisher:
        over["reg.fisher"] = str(fisher)
    over.update(parse_overrides(args.set))
    over.update(extra or {})
    return resolve(preset, over)


def train_run(cfg: Any, data: dict, run_dir: str | Path) -> dict:
    """One run: ``l2sp.finetune`` on the decoded pack's task; accuracies (%) and source scores."""
    from l2sp.engine.run import load_run

    task = target_task(data, cfg.data.image_size, cfg.data.val_per_class, blur=cfg.data.blur,
                       ten_crop=cfg.data.ten_crop)
    r = l2sp.finetune(cfg, task=task, out=str(run_dir), overwrite=True, quiet=True)
    res = {"name": cfg.name, "kind": cfg.reg.kind, "seed": cfg.train.seed, "steps": r["steps"],
           "train_s": r["train_time_s"], "images_per_s": r["images_per_s"], "final_loss": r["final_loss"],
           "alpha": cfg.reg.alpha, "beta": cfg.reg.beta, "lr": cfg.optim.lr, "bn": cfg.train.bn,
           "freeze": cfg.train.freeze, "test_top1": 100 * r["test_acc"],
           "test_mean_per_class": 100 * r["test_mean_per_class"]}
    if r.get("val_acc") is not None:
        res["val_top1"] = 100 * r["val_acc"]
    if not math.isfinite(res["final_loss"]):
        res["diverged"] = True
    art = load_run(run_dir, task=task, device=data["device"])
    if cfg.model.weights:
        source = source_network(cfg.model.weights, data["device"], cfg.model.arch)
        res.update(drop_scores(art.model, source, art.head_name, data))
    return res


def _worker(rank: int, jobs: Any, results: Any, args: argparse.Namespace, fisher: str | None) -> None:
    """One process on the shared GPU: decode the pack once, then train the jobs it takes from the queue."""
    from l2sp.io import atomic_write_json

    torch.backends.cudnn.benchmark = True
    if torch.device(args.device).type == "cpu":
        torch.set_num_threads(1)
    data = load_data(args.pack, args.device, args.resize, args.source_size, decode_device=_decoder(args))
    while True:
        job = jobs.get()
        if job is None:
            return
        kind, seed, extra, deadline = job
        if time.time() > deadline:
            results.put({"run": kind, "seed": seed, "skipped": "time budget", **extra})
            continue
        tag = "-".join(f"{k.split('.')[-1]}{v}" for k, v in extra.items() if k != "optim.lr") or "run"
        name = f"{kind}-seed{seed}-lr{extra.get('optim.lr', 'preset')}-{tag}"
        try:
            cfg = resolve_run(kind, seed, args, Path(args.pack), Path(fisher) if fisher else None, extra)
            r = train_run(cfg, data, Path(args.out) / "runs" / name)
        except Exception as exc:  # a diverged or failed run is reported; the other runs go on
            r = {"kind": kind, "seed": seed, "error": f"{type(exc).__name__}: {exc}"}
        r.update(run=kind, worker=rank, **{f"set:{k}": v for k, v in extra.items()})
        atomic_write_json(Path(args.out) / "runs" / f"{name}.json", r)
        results.put(r)
        print(json.dumps({k: v for k, v in r.items() if not isinstance(v, list)}), flush=True)


def _decoder(args: argparse.Namespace) -> str:
    return args.device if getattr(args, "gpu_decode", False) else "cpu"


def run_jobs(jobs: list[tuple[str, int, dict]], args: argparse.Namespace, fisher: Path, deadline: float
             ) -> list[dict]:
    """Train ``jobs`` (kind, seed, overrides) on ``--workers`` processes sharing the GPU; results in order of
    completion."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue, results = ctx.Queue(), ctx.Queue()
    for kind, seed, extra in jobs:
        queue.put((kind, seed, extra, deadline))
    workers = max(1, min(args.workers, len(jobs)))
    for _ in range(workers):
        queue.put(None)
    procs = [ctx.Process(target=_worker, args=(r, queue, results, args, str(fisher))) for r in range(workers)]
    for p in procs:
        p.start()
    rows = [results.get() for _ in jobs]
    for p in procs:
        p.join()
    return rows


def estimate_fisher(out: Path, args: argparse.Namespace) -> tuple[Path, dict]:
    """The source network's scores on the source test images and its diagonal Fisher (``l2sp.fisher.estimate``,
    exact over ``--fisher-classes`` classes + 4 drawn) on the packed Tiny ImageNet training images."""
    data = load_data(args.pack, args.device, args.resize, args.source_size, decode_device=_decoder(args))
    model = source_network(Path(args.pack) / WEIGHTS_FILE, args.device).to(memory_format=torch.channels_last)
    scores = source_scores(model, data["source"], data["source_indices"])
    t0 = time.perf_counter()
    fisher = l2sp.fisher.estimate(model, (x for x, _ in data["fisher"].batches(64)), method="exact",
                                  classes=args.fisher_classes, tail_samples=4, progress=False)
    path = out / "fisher-mobilenet_v2-tiny.safetensors"
    l2sp.fisher.save(path, fisher, source="tiny-imagenet train", size=args.source_size, **fisher.metadata)
    scores["fisher_s"] = time.perf_counter() - t0
    return path, scores


def summarize(rows: list[dict], source: dict) -> str:
    """Markdown table: target top-1 mean ± std over seeds, source drop (1000-way and 200-way, and 200-way
    with the source BatchNorm statistics restored)."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        if "test_top1" in r:
            by.setdefault(r["run"], []).append(r)
    with_val = any("val_top1" in r for rs in by.values() for r in rs)
    lines = [
        "| run | seeds | " + ("val top-1 % | " if with_val else "") + "target top-1 % | mean per-class % | "
        "source drop, 1000-way | source drop, 200-way | 200-way drop, source BN stats | train s/run |",
        "|---|---:|" + ("---:|" if with_val else "") + "---:|---:|---:|---:|---:|---:|",
    ]

    def ms(v: list[float]) -> str:
        if not v:
            return "-"
        return f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}" if len(v) > 1 else f"{v[0]:.1f}"

    for kind, rs in by.items():
        cells = [ms([r["val_top1"] for r in rs if "val_top1" in r])] if with_val else []
        cells += [
            ms([r["test_top1"] for r in rs]),
            ms([r["test_mean_per_class"] for r in rs]),
            ms([source["src1000"] - r["src1000"] for r in rs if "src1000" in r]),
            ms([source["src200"] - r["src200"] for r in rs if "src200" in r]),
            ms([source["src200"] - r["src200_srcbn"] for r in rs if "src200_srcbn" in r]),
            f"{statistics.mean(r['train_s'] for r in rs):.0f}",
        ]
        lines.append(f"| {kind} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def choose_lr(args: argparse.Namespace, fisher: Path, deadline: float) -> tuple[float, list[dict]]:
    """``--lr``, or with ``--lr auto`` the rate of ``--lr-grid`` whose ``--probe-kind`` run of
    ``--probe-steps`` scores best on ``--probe-val`` validation images per class."""
    if args.lr != "auto":
        return float(args.lr), []
    extra = {"data.val_per_class": args.probe_val, "optim.steps": args.probe_steps,
             "optim.milestones": [round(args.probe_steps * 2 / 3)]}
    grid = [float(v) for v in args.lr_grid.split(",")]
    probe = run_jobs([(args.probe_kind, 0, {**extra, "optim.lr": lr}) for lr in grid], args, fisher, deadline)
    ok = [r for r in probe if "val_top1" in r and math.isfinite(r["val_top1"])]
    if not ok:
        raise L2SPError(f"every learning rate of --lr-grid failed ({probe[0].get('error')}); give lower ones")
    for r in probe:
        print(f"lr probe {r.get('set:optim.lr')}: val top-1 {r.get('val_top1', float('nan')):.1f} %", flush=True)
    return max(ok, key=lambda r: r["val_top1"])["lr"], probe


def run_main(args: argparse.Namespace) -> None:
    """Fisher and source scores, the learning-rate probe (``--lr auto``), the runs, the table."""
    from l2sp.io import atomic_write_json

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise L2SPError("the run step needs a CUDA GPU; use benchmarks/caltech101_mobilenetv2.py on a CPU")
    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fisher, source = estimate_fisher(out, args)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(json.dumps({"source": source, "setup_s": round(time.time() - t_start, 1)}), flush=True)
    deadline = t_start + args.budget_s
    lr, probe = choose_lr(args, fisher, deadline)
    print(f"learning rate {lr:g} ({time.time() - t_start:.0f} s)", flush=True)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    runs = [(k, s, {"optim.lr": lr}) for s in seeds for k in args.kinds.split(",") if k]  # each kind's seed 0 first
    rows = run_jobs(runs, args, fisher, deadline)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    atomic_write_json(out / "results.json", {"source": source, "lr_probe": probe, "runs": rows, "args": vars(args),
                                             "device": device, "wall_s": time.time() - t_start})
    print(f"\nCaltech-101-30, MobileNetV2 (ImageNet), {args.steps} steps, batch 64, 224², bf16, lr {lr:g}, "
          f"{args.workers} concurrent runs on {device}; source (Tiny ImageNet val subset at {args.source_size}²): "
          f"{source['src1000']:.1f} % (1000-way), {source['src200']:.1f} % (200-way); "
          f"wall {time.time() - t_start:.0f} s")
    for r in rows:
        if "test_top1" not in r:
            print(f"not finished: {r.get('run')} seed {r.get('seed')}: {r.get('error') or r.get('skipped')}")
    print(summarize(rows, source))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("pack", help="write the compact image pack (CPU machine)")
    pk.add_argument("--caltech", default=str(SHARED / "data" / "caltech101"))
    pk.add_argument("--tiny", default=str(SHARED / "data" / "tiny-imagenet"))
    pk.add_argument("--weights", default=str(SHARED / "weights" / WEIGHTS_FILE))
    pk.add_argument("--out", default="runs/caltech101-pack")
    pk.add_argument("--split-seed", type=int, default=0)
    pk.add_argument("--quality", type=int, default=70, help="JPEG quality of the re-encoded Caltech images")
    pk.add_argument("--short-side", type=int, default=144, help="shrink Caltech images to this shorter side")
    pk.add_argument("--tiny-test-per-class", type=int, default=20)
    pk.add_argument("--tiny-fisher-per-class", type=int, default=5)
    pk.add_argument("--max-mib", type=float, default=56.0)
    rn = sub.add_parser("run", help="train and evaluate on the GPU")
    rn.add_argument("--pack", default="runs/caltech101-pack")
    rn.add_argument("--out", default=os.environ.get("OUT", "runs/caltech101-gpu"))
    rn.add_argument("--kinds", default="l2,l2-sp,l2-sp-fisher", help=f"comma list of {', '.join(KINDS)}")
    rn.add_argument("--seeds", default="0,1")
    rn.add_argument("--workers", type=int, default=3, help="runs trained at once (one process each)")
    rn.add_argument("--steps", type=int, default=9000)
    rn.add_argument("--lr", default="auto", help="learning rate, or 'auto': the best of --lr-grid on validation")
    rn.add_argument("--lr-grid", default="0.01,0.003,0.001")
    rn.add_argument("--probe-steps", type=int, default=1500, help="steps of each learning-rate probe")
    rn.add_argument("--probe-val", type=int, default=5, help="validation images per class (of the 30)")
    rn.add_argument("--probe-kind", default="l2-sp")
    rn.add_argument("--val-per-class", type=int, default=0)
    rn.add_argument("--resize", type=int, default=256)
    rn.add_argument("--source-size", type=int, default=224, help="Tiny ImageNet images upsampled to this")
    rn.add_argument("--fisher-classes", type=int, default=20, help="exact Fisher: classes kept per example")
    rn.add_argument("--budget-s", type=float, default=540, help="start no run after this many seconds")
    rn.add_argument("--compile", action="store_true", help="torch.compile the model")
    rn.add_argument("--gpu-decode", action="store_true", help="decode with nvJPEG (faster; not bit-equal to PIL)")
    rn.add_argument("--device", default="cuda", help="cuda (cpu: smoke tests only)")
    rn.add_argument("--set", action="append", default=[], help="override for every run, e.g. reg.alpha=0.01")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.cmd == "pack":
        make_pack(args.caltech, args.tiny, args.weights, args.out, split_seed=args.split_seed, quality=args.quality,
                  short_side=args.short_side, tiny_test_per_class=args.tiny_test_per_class,
                  tiny_fisher_per_class=args.tiny_fisher_per_class, max_mib=args.max_mib)
    else:
        run_main(args)


if __name__ == "__main__":
    main()
