"""``l2sp analyze``: the paper's Section 5 analyses for run directories, Fisher files and result tables.

    l2sp analyze drop RUN [RUN ...]        source-task accuracy drop (Table 5)
    l2sp analyze r2 RUN [RUN ...]          layer-wise R² boxplots (Figure 4), runs side by side
    l2sp analyze distance RUN [RUN ...]    ‖w − w0‖/‖w0‖ per layer
    l2sp analyze fisher FILE               diagonal Fisher per layer, log scale (Figure 5)
    l2sp analyze heatmap TABLE.csv         accuracy vs (α, β) (Figure 1)
    l2sp analyze penalties TABLE.csv       accuracy per penalty, mean ± std (Figure 2 style)
    l2sp analyze freezing TABLE.csv        accuracy vs number of frozen layers (Figure 3)
    l2sp analyze theory                    Section 5.5 checks: closed forms vs Monte-Carlo, convex combination

Every analysis writes Markdown and CSV tables and a PNG under ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from l2sp.errors import L2SPError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the analysis subcommands to ``parser`` (the ``analyze`` subcommand of the CLI)."""
    sub = parser.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", default="analysis", help="output folder (default: ./analysis)")

    def runs(p: argparse.ArgumentParser) -> None:
        p.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
        p.add_argument("--labels", nargs="+", help="one label per run (default: penalty, else folder name)")
        p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
        p.add_argument("--batch-size", type=int, default=64)

    p = sub.add_parser("drop", help="source-task accuracy drop with the source classifier re-attached")
    runs(p)
    common(p)
    p = sub.add_parser("r2", help="layer-wise R² of fine-tuned vs pre-trained activations (boxplots)")
    runs(p)
    p.add_argument("--layers", nargs="+", help="module names (default: first conv and each residual block)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="target images to use")
    p.add_argument("--max-images", type=int, default=None, help="use at most this many images")
    common(p)
    p = sub.add_parser("distance", help="relative distance ||w - w0|| / ||w0|| per layer")
    runs(p)
    p.add_argument("--layers", nargs="+", help="module-name prefixes (default: first conv and each block)")
    common(p)
    p = sub.add_parser("fisher", help="boxplots of the diagonal Fisher per layer (log scale)")
    p.add_argument("file", help="Fisher file (.safetensors, or .pt state dict)")
    p.add_argument(
        "--layers", nargs="+", help="module-name prefixes (default: the module owning each tensor)"
    )
    p.add_argument("--all-params", action="store_true", help="include biases and normalization parameters")
    common(p)
    for name, helptext in (
        ("heatmap", "accuracy vs (alpha, beta) heat map"),
        ("penalties", "accuracy per penalty, mean and std over runs"),
        ("freezing", "accuracy vs number of frozen layers, one line per penalty"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("table", help="CSV results table with one row per run")
        p.add_argument("--value", default="accuracy", help="column to plot (default: accuracy)")
        if name == "heatmap":
            p.add_argument("--x", default="alpha", help="column on the x axis (default: alpha)")
            p.add_argument("--y", default="beta", help="column on the y axis (default: beta)")
        else:
            p.add_argument(
                "--penalty", default="penalty", help="column naming the penalty (default: penalty)"
            )
        if name == "freezing":
            p.add_argument("--frozen", default="frozen", help="column with the number of frozen layers")
        common(p)
    p = sub.add_parser("theory", help="Section 5.5: closed forms vs Monte-Carlo, convex combination")
    p.add_argument("--draws", type=int, default=4000, help="Monte-Carlo draws per alpha")
    p.add_argument("--seed", type=int, default=0)
    common(p)


def run(args: argparse.Namespace) -> int:
    """Run the analysis chosen by ``args.analysis``; returns the exit status (0)."""
    out = Path(args.out)
    handler = {
        "drop": _drop,
        "r2": _r2,
        "distance": _distance,
        "fisher": _fisher,
        "heatmap": _table_figure,
        "penalties": _table_figure,
        "freezing": _table_figure,
        "theory": _theory,
    }[args.analysis]
    for path in handler(args, out):
        print(f"wrote {path}")
    return 0


# ------------------------------------------------------------------------------------------------ helpers
def _device(args) -> torch.device:
    if args.device:
        return torch.device(args.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_runs(args) -> list[tuple[str, Any]]:
    from l2sp.engine.run import load_run

    runs = [load_run(r, device=_device(args)) for r in args.runs]
    if args.labels is not None:
        if len(args.labels) != len(runs):
            raise L2SPError(f"got {len(args.labels)} labels for {len(runs)} runs; pass one label per run")
        labels = list(args.labels)
    else:
        kinds = [str(getattr(r, "regularizer_kind", "") or "") for r in runs]
        names = [Path(r).name for r in args.runs]
        labels = kinds if all(kinds) and len(set(kinds)) == len(kinds) else names
        if len(set(labels)) != len(labels):
            labels = [str(Path(r)) for r in args.runs]
    for path, r in zip(args.runs, runs):
        if getattr(r, "source_model", None) is None:
            raise L2SPError(
                f"run {path} has no source model; analyse runs fine-tuned from a pre-trained model"
            )
    return list(zip(labels, runs))


def check_same_source(models: Sequence[tuple[str, torch.nn.Module]]) -> None:
    """All models must hold identical tensors under their common names (one source model for every run)."""
    (first_label, first), *rest = models
    ref = first.state_dict()
    for label, model in rest:
        sd = model.state_dict()
        if set(sd) != set(ref) or any(
            sd[k].shape != ref[k].shape or not torch.equal(sd[k].cpu(), ref[k].cpu()) for k in ref
        ):
            raise L2SPError(
                f"runs {first_label!r} and {label!r} were fine-tuned from different source models; "
                "compare runs that share one source model"
            )


def _loader(data, batch_size: int, what: str):
    if data is None:
        raise L2SPError(f"the run has no {what}; this analysis needs it")
    from torch.utils.data import DataLoader, Dataset

    if isinstance(data, DataLoader):
        return data
    if isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0)
    return data


def _tables(
    out: Path, stem: str, rows: list[dict], title: str, columns: Sequence[str] | None = None, digits: int = 3
) -> list[Path]:
    from l2sp.analysis import tables

    print(f"\n{title}\n\n" + tables.markdown_table(rows, columns, digits=digits))
    return [
        tables.write_markdown(out / f"{stem}.md", rows, columns, title=title, digits=digits),
        tables.write_csv(out / f"{stem}.csv", rows, columns),
    ]


# ------------------------------------------------------------------------------------------------ analyses
def _drop(args, out: Path) -> list[Path]:
    from l2sp.analysis.source_drop import source_task_drop

    rows = []
    for (label, r), path in zip(_load_runs(args), args.runs):
        source_task = getattr(r, "source_task", None)
        if source_task is None or getattr(source_task, "test", None) is None:
            raise L2SPError(
                f"run {path} has no source test set; the source-task drop needs the source task's "
                "test images (fine-tune from a source whose data is available)"
            )
        if not getattr(r, "head_name", None):
            raise L2SPError(f"run {path} does not name its classifier module (head_name); re-create the run")
        res = source_task_drop(
            r.model,
            r.source_model,
            r.head_name,
            _loader(source_task.test, args.batch_size, "source test set"),
            device=_device(args),
        )
        rows.append({"run": label, **res})
    return _tables(
        out,
        "source_drop",
        rows,
        "Source-task accuracy (%) with the source classifier re-attached",
        ["run", "source_acc", "reattached_acc", "drop"],
        digits=2,
    )


def _r2(args, out: Path) -> list[Path]:
    from l2sp.analysis import plots
    from l2sp.analysis.r2 import layerwise_r2, r2_summary
    from l2sp.io import save_tensors

    runs = _load_runs(args)
    check_same_source([(label, r.source_model) for label, r in runs])
    device = _device(args)
    results, rows = {}, []
    for label, r in runs:
        split = getattr(r.task, args.split, None) if getattr(r, "task", None) is not None else None
        loader = _loader(split, args.batch_size, f"target {args.split} split")
        results[label] = layerwise_r2(
            r.model.to(device),
            r.source_model.to(device),
            loader,
            args.layers,
            device=device,
            max_images=args.max_images,
        )
        rows += [{"run": label, **row} for row in r2_summary(results[label])]
    paths = _tables(out, "r2", rows, f"Layer-wise R² per unit (target {args.split} images)")
    paths.append(
        save_tensors(
            out / "r2_units.safetensors",
            {f"{label}/{layer}": v for label, res in results.items() for layer, v in res.items()},
        )
    )
    paths.append(plots.plot_r2_boxplots(results, out / "r2.png"))
    return paths


def _distance(args, out: Path) -> list[Path]:
    from l2sp.analysis import plots
    from l2sp.analysis.distance import layer_distance
    from l2sp.analysis.layers import default_layers

    runs = _load_runs(args)
    check_same_source([(label, r.source_model) for label, r in runs])
    results = {}
    for label, r in runs:
        w0 = r.source_model.state_dict()
        layers = args.layers
        if layers is None:
            shared = {n for n, p in r.model.named_parameters() if n in w0 and w0[n].shape == p.shape}
            layers = [n for n in default_layers(r.model) if any(s.startswith(n + ".") for s in shared)]
        results[label] = layer_distance(r.model, w0, layers)
    layers = list(dict.fromkeys(k for res in results.values() for k in res))
    rows = [
        {"layer": k, **{label: res.get(k, float("nan")) for label, res in results.items()}} for k in layers
    ]
    paths = _tables(out, "distance", rows, "Relative distance ||w - w0|| / ||w0|| per layer", digits=4)
    paths.append(plots.plot_layer_distance(results, out / "distance.png"))
    return paths


def _fisher(args, out: Path) -> list[Path]:
    from l2sp.analysis import plots
    from l2sp.analysis.fisher_layers import fisher_by_layer, fisher_summary
    from l2sp.io import load_state_dict

    if str(args.file).endswith(".safetensors"):
        from l2sp.fisher import load

        fisher = load(args.file)  # validated, in the order it was estimated
    else:
        fisher = load_state_dict(args.file)
    by_layer = fisher_by_layer(fisher, layers=args.layers, weights_only=not args.all_params)
    paths = _tables(out, "fisher", fisher_summary(by_layer), f"Diagonal Fisher per layer ({args.file})")
    paths.append(plots.plot_fisher_boxplots(by_layer, out / "fisher.png"))
    return paths


# results-table analyses: file stem, plot function, its key options (in aggregation order), caption
_TABLE_FIGURES = {
    "heatmap": ("alpha_beta", "plot_alpha_beta_heatmap", ("x", "y"), "{value} vs ({x}, {y})"),
    "penalties": ("penalties", "plot_penalty_bars", ("penalty",), "{value} per penalty (mean, std over runs)"),
    "freezing": ("freezing", "plot_freezing_curve", ("penalty", "frozen"), "{value} vs number of frozen layers"),
}


def _table_figure(args, out: Path) -> list[Path]:
    """heatmap / penalties / freezing: mean and std of ``--value`` per key from a CSV of runs, and the figure."""
    from l2sp.analysis import plots, tables

    stem, plot, options, caption = _TABLE_FIGURES[args.analysis]
    keys = {k: getattr(args, k) for k in options}
    rows = tables.read_csv(args.table)
    agg = tables.aggregate(rows, list(keys.values()), args.value)
    paths = _tables(out, stem, agg, caption.format(value=args.value, **keys))
    paths.append(getattr(plots, plot)(rows, out / f"{stem}.png", value=args.value, **keys))
    return paths


def _theory(args, out: Path) -> list[Path]:
    from l2sp.analysis.theory_report import theory_report

    return list(theory_report(out, draws=args.draws, seed=args.seed).values())
