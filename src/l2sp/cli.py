"""The ``l2sp`` command: finetune, fisher, evaluate, analyze, search, segment, demo, presets.

Errors in the input print ``l2sp: error: <message>`` and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from l2sp.errors import L2SPError, guarded
from l2sp.fisher import METHODS as FISHER_METHODS

CONFIG_HELP = "a preset name (see `l2sp presets`) or a YAML file"
OVERRIDE_HELP = "dotted overrides, e.g. reg.alpha=0.1 optim.steps=500 (values parsed as YAML)"


def _print(text: str, quiet: bool = False) -> None:
    if not quiet:
        print(text, flush=True)


def _result(text: str) -> None:
    """A run's result line: printed once, by rank 0 of a torchrun job (every process in one-process runs)."""
    from l2sp.engine.distributed import launched

    if launched().main:
        print(text, flush=True)


def _acc_line(r: dict) -> str:
    parts = [
        f"{k} {100 * r[k]:.2f}%"
        for k in ("val_acc", "test_acc", "test_mean_per_class")
        if r.get(k) is not None
    ]
    return ", ".join(parts) + f" ({r['steps']} steps, {r['images_per_s']:.0f} images/s) -> {r['run_dir']}"


# ----------------------------------------------------------------------------------------------- finetune
def _add_finetune(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help=CONFIG_HELP)
    p.add_argument("overrides", nargs="*", help=OVERRIDE_HELP)
    p.add_argument("--out", help="run directory (default runs/NAME/seedSEED)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="discard what the run directory holds")
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        metavar="N",
        help="repeat with train.seed = 0..N-1 and write a mean ± std table (Markdown and CSV)",
    )
    p.add_argument("--workers", type=int, default=1, metavar="K",
                   help="with --seeds: K seeds at once, one process each (default 1: one after the other)")
    p.add_argument("--devices", default=None, metavar="LIST",
                   help="with --workers: GPUs round-robin, e.g. 0,1 (default CUDA_VISIBLE_DEVICES, else every GPU)")
    p.add_argument("--threads", type=int, default=1, metavar="T", help="with --workers: torch threads per process")
    p.add_argument("--light", action="store_true", help="no checkpoints or TensorBoard (many short runs)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (every key, overrides applied) and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar; print only the result")


def _print_config(cfg: object, args: argparse.Namespace) -> int:
    """``--print-config``: the resolved config as YAML, every key (``--out``/``-q`` applied), nothing run."""
    import yaml

    if args.out is not None:
        cfg.out = str(args.out)
    if args.quiet:
        cfg.train.quiet = True
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def _seed_worker(config: str, overrides: dict, seeds: list[int], out: str, device: str | None, threads: int,
                 resume: bool, overwrite: bool) -> None:
    """One process of ``--seeds N --workers K``: its seeds one after the other, on its GPU, ``threads`` threads."""
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device  # before CUDA starts in this process
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    import torch

    from l2sp.experiments.seeds import run_seeds

    torch.set_num_threads(threads)
    try:
        run_seeds(config, seeds, overrides, out=out, quiet=True, resume=resume, overwrite=overwrite)
    except L2SPError as exc:
        print(f"l2sp: error: seeds {seeds}: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


def _parallel_seeds(args: argparse.Namespace, overrides: dict, seeds: list[int], out: Path) -> list[dict]:
    """``--seeds N --workers K``: seed i in process i mod K (spawned; GPUs round-robin), then every result."""
    import multiprocessing

    from l2sp.engine.distributed import launched
    from l2sp.engine.runner import read_results
    from l2sp.search.workers import worker_devices

    if args.workers < 1 or args.threads < 1 or launched().distributed:
        raise L2SPError(f"--workers {args.workers} --threads {args.threads}: give numbers >= 1, and do not start "
                        "--workers under torchrun")
    k = min(args.workers, len(seeds))
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_seed_worker, args=(args.config, overrides, seeds[i::k], str(out), dev,
                                                    args.threads, args.resume, args.overwrite))
             for i, dev in enumerate(worker_devices(k, args.devices))]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
    failed = [f"seeds {seeds[i::k]}" for i, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        raise L2SPError(f"{', '.join(failed)} stopped early (see the messages above); run the same command with "
                        "--resume to finish them")
    return [read_results(out / f"seed{s}") for s in seeds]


def _finetune(args: argparse.Namespace) -> int:
    from l2sp.engine.run import finetune
    from l2sp.experiments.seeds import light_overrides, run_seeds, summarize

    ov = light_overrides(args.overrides, args.light)
    if args.print_config:
        from l2sp.engine.config import resolve

        return _print_config(resolve(args.config, ov), args)
    if args.seeds is not None:
        if args.seeds < 1:
            raise L2SPError(f"--seeds {args.seeds}: give the number of runs, at least 1")
        from l2sp.engine.config import resolve

        cfg = resolve(args.config, ov)
        out = Path(args.out) if args.out else Path("runs") / cfg.name
        if args.workers != 1:
            results = _parallel_seeds(args, ov, list(range(args.seeds)), out)
        else:
            results = run_seeds(cfg, args.seeds, task=None, out=out, quiet=args.quiet, resume=args.resume,
                                overwrite=args.overwrite)
        from l2sp.engine.distributed import launched

        if not launched().main:  # under torchrun each seed's run is data-parallel; rank 0 writes the table
            return 0
        for r in results:
            _print(f"seed {r['seed']}: {_acc_line(r)}", args.quiet)
        print(summarize({cfg.name: results}, out / "summary"), end="")
        _print(f"table: {out / 'summary.md'}, {out / 'summary.csv'}", args.quiet)
        return 0
    if args.workers != 1:
        raise L2SPError(f"--workers {args.workers} runs seeds side by side: give --seeds N too")
    r = finetune(
        args.config,
        ov,
        out=args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        quiet=True if args.quiet else None,
    )
    _result(_acc_line(r))
    return 0


# ----------------------------------------------------------------------------------------------- fisher
def _add_fisher(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help=CONFIG_HELP + " (uses model.* and data.source_task)")
    p.add_argument("overrides", nargs="*", help=OVERRIDE_HELP)
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--method", default="exact", choices=list(FISHER_METHODS))
    p.add_argument("--samples", type=int, default=1, help="labels drawn per example (method mc)")
    p.add_argument("--max-examples", type=int, default=None, help="source examples used (default: all)")
    p.add_argument("--classes", type=int, default=None,
                   help="method exact: keep the classes with the largest Fisher share per example (many classes)")
    p.add_argument("--tail-samples", type=int, default=1,
                   help="with --classes: classes drawn from the rest per example (keeps the estimate unbiased)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("-q", "--quiet", action="store_true")


def _fisher(args: argparse.Namespace) -> int:
    import torch

    from l2sp import fisher
    from l2sp.engine.config import expand_path, resolve
    from l2sp.engine.run import build_task, pick_device
    from l2sp.models import pretrained

    cfg = resolve(args.config, args.overrides)
    if cfg.data.source_task is None:
        raise L2SPError(
            "the Fisher is estimated on the source task: set data.source_task=NAME, or call "
            "l2sp.fisher.estimate(model, loader) in Python for your own source data"
        )
    if cfg.model.weights is None:
        raise L2SPError("model.weights is empty: the Fisher needs the pre-trained source network")
    device = pick_device(cfg.train.device)
    src = build_task(cfg.data, source=True)
    model = pretrained(
        cfg.model.arch,
        expand_path(cfg.model.weights),
        src.num_classes,
        getattr(src, "in_channels", 3),
        cfg.model.options,
    ).to(device)
    loader = torch.utils.data.DataLoader(
        src.train, batch_size=args.batch_size, shuffle=False, num_workers=cfg.data.num_workers
    )
    F = fisher.estimate(
        model,
        loader,
        method=args.method,
        samples=args.samples,
        max_examples=args.max_examples,
        **({"classes": args.classes, "tail_samples": args.tail_samples} if args.classes else {}),
        device=device,
        progress=not args.quiet,
    )
    path = fisher.save(
        args.out, F, source_task=cfg.data.source_task, weights=cfg.model.weights, arch=cfg.model.arch
    )
    print(f"Fisher ({args.method}, {len(F)} tensors) -> {path}")
    return 0


# ----------------------------------------------------------------------------------------------- evaluate
def _add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a finished run directory")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--ten-crop", action="store_true", help="evaluate with 10 crops (rebuilds the task)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")


def _evaluate(args: argparse.Namespace) -> int:
    import torch

    from l2sp.engine.evaluate import evaluate
    from l2sp.engine.run import build_task, load_run, pick_device

    run = load_run(args.run_dir)
    device = pick_device(run.config.train.device)
    run.device = device
    if args.ten_crop:
        run.config.data.ten_crop = True
        run._task = build_task(run.config.data)
    ds = getattr(run.task, args.split)
    if len(ds) == 0:
        raise L2SPError(f"the {args.split} split of {args.run_dir} is empty")
    loader = torch.utils.data.DataLoader(
        ds, batch_size=run.config.eval.batch_size, num_workers=run.config.data.num_workers
    )
    r = evaluate(run.model, loader, device, run.task.num_classes, amp=run.config.train.amp)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(
            f"{args.split}: top-1 {100 * r['top1']:.2f}%, mean per-class {100 * r['mean_per_class']:.2f}% "
            f"({r['n']} images)"
        )
    return 0


# ----------------------------------------------------------------------------------------------- presets
def _matrix_lines() -> list[str]:
    """The generated presets as a dataset × penalty table (``PREFIX-PENALTY[-VARIANT]``), labels from the
    penalty registry."""
    from l2sp.engine.config import preset_matrix
    from l2sp.penalties import get_penalty

    rows: dict[str, tuple[str, dict[str, list[str]]]] = {}
    for name, (base, pen, var) in preset_matrix().items():
        prefix = name[: -len(f"-{pen}" + (f"-{var}" if var else ""))]
        cells = rows.setdefault(prefix, (base, {}))[1]
        cells.setdefault(pen, [])
        if var:
            cells[pen].append(var)
    lines = ["", "dataset x penalty matrix (NAME = DATASET-PENALTY[-VARIANT]; a dataset base `configs/_X.yaml` "
             "declares its row):"]
    for prefix, (base, cells) in sorted(rows.items()):
        parts = [get_penalty(p).label + (f" (+{', '.join(v)})" if v else "") for p, v in cells.items()]
        lines.append(f"  {prefix:18s} {base + '.yaml':22s} {'; '.join(parts)}")
    return lines


def _presets(args: argparse.Namespace) -> int:
    from l2sp.engine.config import preset_names, resolve

    for name in preset_names():
        if args.verbose:
            c = resolve(name)
            print(f"{name:32s} {c.model.arch:14s} {c.data.task:22s} {c.reg.kind:13s} alpha={c.reg.alpha:g} "
                  f"beta={c.reg.beta:g} lr={c.optim.lr:g}")
        else:
            print(name)
    if args.verbose:
        print("\n".join(_matrix_lines()))
    seg = preset_names("segmentation")
    if seg:
        print("\nsegmentation (run with `l2sp segment NAME data.root=...`):")
        print("\n".join(seg))
    return 0


# ----------------------------------------------------------------------------------------------- segment
def _add_segment(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="a segmentation preset (see `l2sp segment --list`) or a YAML file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.root=/data/cityscapes optim.steps=500")
    p.add_argument("--out", help="run directory (default runs/NAME/seedSEED)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="discard what the run directory holds")
    p.add_argument("--list", action="store_true", help="list the segmentation presets and exit")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (every key, overrides applied) and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar; print only the result")


def _segment(args: argparse.Namespace) -> int:
    from l2sp.segmentation.config import segmentation_presets

    if args.list:
        print("\n".join(segmentation_presets()))
        return 0
    if args.config is None:
        raise L2SPError("give a segmentation preset or YAML file, e.g. `l2sp segment cityscapes-fcn-l2-sp "
                        "data.root=/data/cityscapes`; `l2sp segment --list` shows the presets")
    if args.print_config:
        from l2sp.segmentation.config import resolve_segmentation

        return _print_config(resolve_segmentation(args.config, args.overrides), args)
    from l2sp.segmentation.run import finetune_segmentation

    r = finetune_segmentation(args.config, args.overrides, out=args.out, resume=args.resume,
                              overwrite=args.overwrite, quiet=True if args.quiet else None)
    pct = [f"{100 * r[k]:.2f}%" if r.get(k) is not None else "n/a" for k in ("val_miou", "val_pixel_acc")]
    _result(f"val mIoU {pct[0]}, pixel accuracy {pct[1]} ({r['steps']} steps, {r['images_per_s']:.1f} images/s) "
            f"-> {r['run_dir']}")
    return 0


# ----------------------------------------------------------------------------------------------- main
#: commands whose module is imported only when named: (name, module with add_arguments, its entry, help)
LAZY = (
    ("search", "l2sp.experiments.search", "main", "hyper-parameter search on the validation split (Optuna study)"),
    ("analyze", "l2sp.analysis.command", "run", "analyses of finished runs"),
    ("demo", "l2sp.experiments.demo", "run", "the built-in Fashion-MNIST benchmark"),
)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; ``analyze`` and ``demo`` modules are imported only when ``command`` names them."""
    from l2sp import __version__

    parser = argparse.ArgumentParser(
        prog="l2sp", description="L2-SP fine-tuning: explicit inductive bias toward the pre-trained model."
    )
    parser.add_argument("--version", action="version", version=f"l2sp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, add, fn, text in (
        ("finetune", _add_finetune, _finetune, "fine-tune from a preset or YAML config"),
        ("fisher", _add_fisher, _fisher, "estimate the diagonal Fisher of the source network"),
        ("evaluate", _add_evaluate, _evaluate, "evaluate a finished run"),
        ("segment", _add_segment, _segment, "fine-tune a segmentation network from a preset or YAML config"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        add(p)
        p.set_defaults(func=fn)
    p = sub.add_parser("presets", help="list the shipped presets")
    p.add_argument("-v", "--verbose", action="store_true", help="one line per preset with its main settings")
    p.set_defaults(func=_presets)
    for name, module, entry, text in LAZY:
        p = sub.add_parser(name, help=text, description=text, add_help=command == name)
        if command != name:
            p.add_argument("args", nargs=argparse.REMAINDER)
            continue
        try:
            mod = __import__(module, fromlist=["add_arguments"])
        except ImportError:
            p.set_defaults(func=lambda a, m=module: _missing(m))
            continue
        mod.add_arguments(p)
        p.set_defaults(func=getattr(mod, entry))
    return parser


def _missing(module: str) -> int:
    raise L2SPError(f"this installation has no {module}; reinstall l2sp")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``l2sp`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)

    def run() -> int | None:
        args = parser.parse_args(argv)
        return args.func(args)

    return guarded(run)


if __name__ == "__main__":
    sys.exit(main())
