"""The demo's tables (Table 2 and Table 5 of the paper, in spirit), plots and Markdown report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from l2sp.analysis import tables
from l2sp.experiments.seeds import mean_std
from l2sp.io import atomic_write_text
from l2sp.penalties import get_penalty, penalty_names

ORDER = [*penalty_names(), "l2+freeze", "l2-sp+freeze"]  # the registered penalties, then the freezing baselines


def label(method: str) -> str:
    """A method's display name: the registered penalty's ``label``; "KIND+freeze" -> "LABEL + freezing"."""
    kind, _, freeze = method.partition("+")
    if kind not in penalty_names():
        return method
    name = get_penalty(kind).label
    return f"{name} + freezing" if freeze else name


TEST, VAL = "target test accuracy (%)", "validation accuracy (%)"


def _pm(values: list[float]) -> str:
    m, s, _ = mean_std(values)
    return f"{m:.2f} ± {s:.2f}"


def _methods(final: list[dict]) -> list[str]:
    present = {r["label"] for r in final}
    return [m for m in ORDER if m in present] + sorted(present - set(ORDER))


def accuracy_rows(final: list[dict], chosen: dict) -> list[dict]:
    """Table 2: target test accuracy (%) of the chosen configuration, mean ± std over seeds."""
    rows = []
    for m in _methods(final):
        rs = [r for r in final if r["label"] == m]
        p = chosen[m]["params"]
        rows.append({"method": label(m), "alpha": p["alpha"], "lr": p["lr"], "frozen blocks": p["freeze"],
                     "val acc (grid)": 100 * chosen[m]["val_acc"], "runs": len(rs),
                     "test accuracy %": _pm([100 * r["test_acc"] for r in rs]),
                     "mean per-class %": _pm([100 * r["test_mean_per_class"] for r in rs])})
    return rows


def drop_rows(final: list[dict]) -> list[dict]:
    """Table 5: source-task accuracy with the source head re-attached, and its drop (points)."""
    rows = []
    for m in _methods(final):
        rs = [r for r in final if r["label"] == m and r.get("source_drop")]
        if rs:
            rows.append({"method": label(m),
                         "source acc. before %": f"{rs[0]['source_drop']['source_acc']:.2f}",
                         "re-attached acc. %": _pm([r["source_drop"]["reattached_acc"] for r in rs]),
                         "drop (points)": _pm([r["source_drop"]["drop"] for r in rs])})
    return rows


def _grid_rows(runs: list[dict]) -> list[dict]:
    return [{**{k: r["params"][k] for k in ("kind", "alpha", "beta", "lr", "freeze")},
             "val_acc": 100 * r["val_acc"]} for r in runs]


def _analysis_plots(out: Path, final: list[dict], fisher_path: Path) -> list[tuple[str, str]]:
    """Fisher per layer, R² per layer and distance to w0 per layer for L2 vs L2-SP (seed 0)."""
    import l2sp.fisher
    from l2sp.analysis import fisher_by_layer, layer_distance, layerwise_r2, plots
    from l2sp.engine.run import load_run

    figs = []
    by_layer = fisher_by_layer(l2sp.fisher.load(fisher_path))
    plots.plot_fisher_boxplots(by_layer, out / "fisher_per_layer.png",
                               title="Diagonal Fisher of the source model per layer (weights)")
    figs.append(("Fisher information per layer (Figure 5)", "fisher_per_layer.png"))
    firsts = {m: min((r for r in final if r["label"] == m), key=lambda r: r["seed"])
              for m in ("l2", "l2-sp") if any(r["label"] == m for r in final)}
    if len(firsts) == 2:
        r2, dist = {}, {}
        for m, r in firsts.items():
            art = load_run(r["run_dir"])
            loader = torch.utils.data.DataLoader(art.task.test, batch_size=256)
            r2[label(m)] = layerwise_r2(art.model, art.source_model, loader, max_images=1000)
            dist[label(m)] = layer_distance(art.model, art.source_model.state_dict())
        plots.plot_r2_boxplots(r2, out / "r2_per_layer.png",
                               title="R² of fine-tuned vs pre-trained activations, per unit (target test images)")
        plots.plot_layer_distance(dist, out / "distance_per_layer.png")
        figs += [("Layer-wise R² of activations, L2 vs L2-SP (Figure 4)", "r2_per_layer.png"),
                 ("Relative distance ‖w − w0‖/‖w0‖ per layer", "distance_per_layer.png")]
    return figs


def write_report(out: Path, *, plan: dict, grid: list[dict], extra: list[dict], final: list[dict],
                 chosen: dict, source_acc: float, fisher_path: Path, elapsed: float, workers: int,
                 machine: str) -> dict[str, Any]:
    """Write tables (Markdown + CSV), plots and ``report.md`` into ``out``; returns the two tables' text."""
    from l2sp.analysis import plots

    out = Path(out)
    acc, drop = accuracy_rows(final, chosen), drop_rows(final)
    t2 = tables.markdown_table(acc, digits=2)
    t5 = tables.markdown_table(drop)
    tables.write_csv(out / "accuracy.csv", acc)
    tables.write_csv(out / "source_drop.csv", drop)
    tables.write_csv(out / "grid.csv", _grid_rows(grid + extra))
    tables.write_csv(out / "runs.csv", [{"method": r["label"], "seed": r["seed"], "test_acc": 100 * r["test_acc"],
                                         "val_acc": 100 * r["val_acc"],
                                         "source_drop": (r.get("source_drop") or {}).get("drop")} for r in final])
    figs = []
    plots.plot_penalty_bars([{"penalty": label(r["label"]), TEST: 100 * r["test_acc"]}
                             for r in final], out / "accuracy_per_penalty.png",
                            value=TEST)
    figs.append(("Target test accuracy per penalty (Figure 2 style)", "accuracy_per_penalty.png"))
    for kind in ("l2", "l2-sp"):
        rows = [{"alpha": r["params"]["alpha"], "lr": r["params"]["lr"], VAL: 100 * r["val_acc"]}
                for r in grid if r["params"]["kind"] == kind]
        if len({r["lr"] for r in rows}) > 1:
            plots.plot_alpha_beta_heatmap(rows, out / f"grid_{kind}.png", y="lr", value=VAL,
                                          title=f"{label(kind)}: validation accuracy vs α and learning rate")
            figs.append((f"{label(kind)}: the α × learning-rate grid", f"grid_{kind}.png"))
    if "l2-sp" in chosen:
        lr = chosen["l2-sp"]["params"]["lr"]
        rows = [{"alpha": r["params"]["alpha"], "beta": r["params"]["beta"], VAL: 100 * r["val_acc"]}
                for r in grid + extra if r["params"]["kind"] == "l2-sp" and r["params"]["lr"] == lr
                and r["params"]["freeze"] == 0]
        if len({r["beta"] for r in rows}) > 1:
            plots.plot_alpha_beta_heatmap(rows, out / "alpha_beta_l2-sp.png", value=VAL,
                                          title="L2-SP: validation accuracy vs α and β (Figure 1)")
            figs.append(("L2-SP: validation accuracy vs α and β (Figure 1)", "alpha_beta_l2-sp.png"))
    frozen_rows = []
    for kind in ("l2", "l2-sp"):
        if kind not in chosen:
            continue
        c = chosen[kind]["params"]
        frozen_rows.append({"penalty": label(kind), "frozen": 0, VAL: 100 * chosen[kind]["val_acc"]})
        frozen_rows += [{"penalty": label(kind), "frozen": r["params"]["freeze"], VAL: 100 * r["val_acc"]}
                        for r in extra if r["label"] == f"{kind}+freeze" and r["params"]["lr"] == c["lr"]]
    if len(frozen_rows) > 2:
        plots.plot_freezing_curve(frozen_rows, out / "freezing.png", value=VAL,
                                  title="Validation accuracy vs number of frozen blocks (Figure 3)")
        figs.append(("Freezing the first blocks, L2 vs L2-SP (Figure 3)", "freezing.png"))
    figs += _analysis_plots(out, final, fisher_path)

    lines = [
        "# l2sp demo: L2-SP and its family on the built-in Fashion-MNIST benchmark", "",
        f"- Machine: {machine}; {workers} worker process(es) of one thread; total time {elapsed / 60:.1f} min.",
        f"- Plan `{plan['name']}`: source = Fashion-MNIST labels 0,2,4,6,8 (all training images), target = "
        f"labels 1,3,5,7,9 with {plan['n_per_class']} training images per class, {plan['val_per_class']} "
        "validation images per class (from the training file), the official test images.",
        f"- Source network: small ResNet pre-trained for {plan['source_steps']} iterations, source test "
        f"accuracy {100 * source_acc:.2f}%. Fisher: exact, {plan['fisher_examples']} source inputs.",
        f"- Fine-tuning: SGD momentum 0.9, batch 64, {plan['steps']} iterations, lr/10 after {plan['milestone']};"
        f" α and lr chosen on validation from lr ∈ {plan['lrs']} and a fixed α grid per kind (β = 0.01); "
        f"the chosen configuration run over {plan['seeds']} seeds (new head, SGD noise).", "",
        "## Target test accuracy (Table 2)", "", t2, "",
        "## Source-task accuracy drop, original classifier re-attached (Table 5)", "", t5, "",
        "## Figures", "",
    ]
    for caption, fname in figs:
        lines += [f"### {caption}", "", f"![{caption}]({fname})", ""]
    lines += ["Raw numbers: `runs.csv` (every final run), `grid.csv` (every selection run), `accuracy.csv`, "
              "`source_drop.csv`.", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    return {"table2": t2, "table5": t5, "accuracy": acc, "drop": drop, "figures": [f for _, f in figs]}
