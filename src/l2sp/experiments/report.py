"""The demo's tables (Table 2 and Table 5 of the paper, in spirit, and the data-size sweep), paired statistics,
plots and Markdown report.

Every comparison of two methods is paired by seed (the same seed gives both the same data order, augmentation
and head initialization): the per-seed differences D_i, their mean ± std, the 95% t interval, the paired t-test
p and the exact sign-flip p (:func:`l2sp.analysis.paired.paired`). The rule for "significant", fixed before any
result was seen, is :data:`RULE`; the printed conclusions are generated from those tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from l2sp.analysis import tables
from l2sp.errors import L2SPError
from l2sp.experiments.seeds import mean_std, pair_by_seed
from l2sp.io import atomic_write_text
from l2sp.penalties import get_penalty, penalty_names

ORDER = [*penalty_names(), "l2+freeze", "l2-sp+freeze"]  # the registered penalties, then the freezing baselines
RULE = ("A difference is called significant when the two-sided paired t-test over the shared seeds gives "
        "p < 0.05 (its 95% interval excludes 0); marked *. The exact sign-flip p is shown beside it: it assumes no "
        "normality, but with n seeds it cannot go below 2/2ⁿ (0.0625 for 5 seeds), so with 5 seeds or fewer it "
        "cannot reach 0.05 on its own. "
        "The comparisons are not corrected for multiplicity: the primary one is L2-SP − L2 at each training-set "
        "size; the others are secondary. This rule was fixed before any result was seen.")


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


def _at(final: list[dict], n: int, method: str | None = None) -> list[dict]:
    return [r for r in final if r["n"] == n and (method is None or r["label"] == method)]


def _methods(final: list[dict]) -> list[str]:
    present = {r["label"] for r in final}
    return [m for m in ORDER if m in present] + sorted(present - set(ORDER))


def _drop(r: dict) -> float:
    return r["source_drop"]["drop"]


def compare(final: list[dict], n: int, a: str, b: str, value: Any = "test_acc", scale: float = 100.0):
    """The paired comparison a − b at size ``n`` (None when fewer than 2 seeds are shared or a == b)."""
    ra, rb = _at(final, n, a), _at(final, n, b)
    if a == b or len({r["seed"] for r in ra} & {r["seed"] for r in rb}) < 2:
        return None
    return pair_by_seed(ra, rb, value, scale=scale)


def _cell(p) -> str:
    return "" if p is None else str(p)


def accuracy_rows(final: list[dict], chosen: dict, n: int) -> list[dict]:
    """Table 2 at ``n`` images per class: the chosen configuration, its selection margin, target test accuracy
    (%) mean ± std over seeds, and the paired differences to L2 and to L2-SP (``*``: significant)."""
    rows = []
    for m in _methods(_at(final, n)):
        rs, c = _at(final, n, m), chosen[(n, m)]
        p = c["params"]
        rows.append({"method": label(m), "alpha": p["alpha"], "lr": p["lr"], "frozen blocks": p["freeze"],
                     "val % (selection seeds)": 100 * c["val_acc"],
                     "margin over runner-up": "" if c["margin"] is None else
                     f"{c['margin']:.2f}{'' if c['resolved'] else ' (within noise)'}",
                     "runs": len(rs), "test accuracy %": _pm([100 * r["test_acc"] for r in rs]),
                     "− L2 (paired)": _cell(compare(final, n, m, "l2")),
                     "− L2-SP (paired)": _cell(compare(final, n, m, "l2-sp"))})
    return rows


def drop_rows(final: list[dict], n: int) -> list[dict]:
    """Table 5: source-task accuracy with the source head re-attached, its drop (points), and the paired
    difference of the drop to L2's (negative: forgets less)."""
    rows = []
    for m in _methods(_at(final, n)):
        rs = [r for r in _at(final, n, m) if r.get("source_drop")]
        if rs:
            rows.append({"method": label(m),
                         "source acc. before %": f"{rs[0]['source_drop']['source_acc']:.2f}",
                         "re-attached acc. %": _pm([r["source_drop"]["reattached_acc"] for r in rs]),
                         "drop (points)": _pm([_drop(r) for r in rs]),
                         "drop − L2's (paired)": _cell(compare(final, n, m, "l2", _drop, 1.0))})
    return rows


def selection_rows(chosen: dict) -> list[dict]:
    """How each (size, method) was chosen: the best grid point, the runner-up, the margin and the noise."""
    rows = []
    for (n, m), c in chosen.items():
        p, q = c["params"], c["runner_up"] or {}
        rows.append({"n per class": n, "method": label(m), "chosen α": p["alpha"], "lr": p["lr"],
                     "frozen": p["freeze"], "val % (mean)": 100 * c["val_acc"], "seeds": c["val_seeds"],
                     "runner-up α": q.get("alpha", ""), "runner-up lr": q.get("lr", ""),
                     "runner-up frozen": q.get("freeze", ""),
                     "margin (points)": "" if c["margin"] is None else c["margin"],
                     "2 × noise (points)": 2 * c["noise"],
                     "resolved": {True: "yes", False: "no: within noise", None: ""}[c["resolved"]]})
    return rows


def stats_rows(pairs: list[tuple[str, Any]]) -> list[dict]:
    """Every paired comparison in full: mean ± std of the differences, 95% interval, both p-values."""
    return [{"comparison": name, "seeds": p.n, "mean ± std": f"{p.mean:+.2f} ± {p.std:.2f}",
             "95% interval": f"[{p.low:+.2f}, {p.high:+.2f}]", "p (paired t)": f"{p.p_t:.3g}",
             "p (sign-flip)": f"{p.p_sign:.3g}", "significant": "yes" if p.significant else "no"}
            for name, p in pairs if p is not None]


def size_rows(final: list[dict], chosen: dict) -> list[dict]:
    """The data-size sweep: per size, L2's and L2-SP's α (chosen on validation), test accuracy, the paired
    gain L2-SP − L2 and the paired difference of the source-task drop."""
    rows = []
    for n in sorted({r["n"] for r in final}):
        if not (_at(final, n, "l2") and _at(final, n, "l2-sp")):
            continue
        gain, drop = compare(final, n, "l2-sp", "l2"), compare(final, n, "l2-sp", "l2", _drop, 1.0)
        row = {"n per class": n, "α L2": chosen[(n, "l2")]["params"]["alpha"],
               "α L2-SP": chosen[(n, "l2-sp")]["params"]["alpha"],
               "L2 test %": _pm([100 * r["test_acc"] for r in _at(final, n, "l2")]),
               "L2-SP test %": _pm([100 * r["test_acc"] for r in _at(final, n, "l2-sp")]),
               "L2-SP − L2": _cell(gain)}
        if gain is not None:
            row.update({"95% interval": f"[{gain.low:+.2f}, {gain.high:+.2f}]", "p (t)": f"{gain.p_t:.3g}",
                        "p (sign-flip)": f"{gain.p_sign:.3g}"})
        row.update({"L2 drop": _pm([_drop(r) for r in _at(final, n, "l2")]),
                    "L2-SP drop": _pm([_drop(r) for r in _at(final, n, "l2-sp")]), "drop: L2-SP − L2": _cell(drop)})
        rows.append(row)
    return rows


def _verdict(p, a: str, b: str) -> str:
    if not p.significant:
        return f"no significant difference between {a} and {b}"
    return f"{a} is significantly {'better' if p.mean > 0 else 'worse'} than {b}"


def _stat_text(p, unit: str = "points") -> str:
    return (f"{p.mean:+.2f} {unit} (95% interval [{p.low:+.2f}, {p.high:+.2f}]; paired t p = {p.p_t:.3g}, "
            f"sign-flip p = {p.p_sign:.3g}, {p.n} seeds)")


def _size_conclusions(final: list[dict]) -> list[str]:
    """The headline sentences: L2-SP − L2 per size, the trend over sizes, forgetting per size."""
    lines, gains = [], {}
    for n in sorted({r["n"] for r in final}):
        g = compare(final, n, "l2-sp", "l2")
        if g is None:
            continue
        gains[n] = g
        lines.append(f"{n} images per class: L2-SP − L2 = {_stat_text(g)}: {_verdict(g, 'L2-SP', 'L2')}.")
    if len(gains) >= 2:
        lo, hi = min(gains), max(gains)
        a, b = gains[lo], gains[hi]
        if a.low > b.high:
            lines.append(f"The gain shrinks with more data: its interval at {lo} images per class lies above the "
                         f"one at {hi} ({a.mean:+.2f} vs {b.mean:+.2f}), as the paper observes.")
        elif b.low > a.high:
            lines.append(f"The gain grows with more data here ({a.mean:+.2f} at {lo}, {b.mean:+.2f} at {hi}; "
                         "disjoint intervals), unlike the paper's observation.")
        else:
            lines.append(f"Gain at {lo} vs {hi} images per class: {a.mean:+.2f} vs {b.mean:+.2f}; the intervals "
                         "overlap, so these seeds do not establish a trend with the training-set size.")
    for n in sorted({r["n"] for r in final}):
        d = compare(final, n, "l2-sp", "l2", _drop, 1.0)
        if d is not None:
            less = "less" if d.mean < 0 else "more"
            what = (f"L2-SP forgets significantly {less} of the source task than L2" if d.significant
                    else "no significant difference in forgetting")
            lines.append(f"Forgetting at {n} images per class: source-task drop of L2-SP − L2 = "
                         f"{_stat_text(d)}: {what}.")
    return lines


def _method_conclusions(final: list[dict], n: int) -> list[str]:
    """One sentence per baseline: which methods differ significantly from it at ``n``, and which do not."""
    lines = []
    for base in ("l2", "l2-sp"):
        if not _at(final, n, base):
            continue
        better, worse, level = [], [], []
        for m in _methods(_at(final, n)):
            p = compare(final, n, m, base)
            if p is None or m in ("l2", "l2-sp"):  # L2-SP − L2 is the headline's sentence
                continue
            (better if p.significant and p.mean > 0 else worse if p.significant else level).append(
                f"{label(m)} {p}")
        parts = [f"significantly above {label(base)}: {', '.join(better)}" if better else "",
                 f"significantly below: {', '.join(worse)}" if worse else "",
                 f"not distinguishable from it: {', '.join(level)}" if level else ""]
        if any(parts):
            lines.append(f"At {n} images per class, paired with {label(base)} (test points): "
                         + "; ".join(p for p in parts if p) + ".")
    return lines


def conclusions(final: list[dict], n_main: int) -> list[str]:
    """The report's conclusions, each generated from a paired test (never from the order of the means)."""
    return _size_conclusions(final) + _method_conclusions(final, n_main)


def _grid_rows(runs: list[dict]) -> list[dict]:
    return [{**{k: r["params"][k] for k in ("n", "kind", "alpha", "beta", "lr", "freeze", "seed")},
             "val_acc": 100 * r["val_acc"]} for r in runs]


def _analysis_plots(out: Path, final: list[dict], fisher_path: Path | None, n: int) -> list[tuple[str, str]]:
    """Fisher per layer, R² per layer and distance to w0 per layer for L2 vs L2-SP (first seed, size ``n``)."""
    import l2sp.fisher
    from l2sp.analysis import fisher_by_layer, layer_distance, layerwise_r2, plots
    from l2sp.engine.run import load_run

    figs = []
    if fisher_path is not None:
        by_layer = fisher_by_layer(l2sp.fisher.load(fisher_path))
        plots.plot_fisher_boxplots(by_layer, out / "fisher_per_layer.png",
                                   title="Diagonal Fisher of the source model per layer (weights)")
        figs.append(("Fisher information per layer (Figure 5)", "fisher_per_layer.png"))
    firsts = {m: min(_at(final, n, m), key=lambda r: r["seed"]) for m in ("l2", "l2-sp") if _at(final, n, m)}
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


def _size_figure(out: Path, final: list[dict]) -> list[tuple[str, str]]:
    """The headline figure: L2-SP − L2 (test accuracy and source drop) against the training-set size."""
    from l2sp.analysis import plots

    rows = []
    for n in sorted({r["n"] for r in final}):
        for name, value, scale in (("target test accuracy", "test_acc", 100.0), ("source-task drop", _drop, 1.0)):
            p = compare(final, n, "l2-sp", "l2", value, scale)
            if p is not None:
                rows.append({**p.to_dict(), "size": n, "quantity": name})
    if len({r["size"] for r in rows}) < 2:
        return []
    plots.plot_paired_differences(rows, out / "gain_vs_size.png", x="size", ylabel="L2-SP − L2 (points)",
                                  title="L2-SP − L2 per seed pair, mean and 95% interval, vs training-set size")
    return [("L2-SP − L2 vs the number of training images per class (the headline)", "gain_vs_size.png")]


def _selection_figures(out: Path, grid: list[dict], extra: list[dict], chosen: dict, n: int) -> list:
    """The α × lr grids (when several lr), the α/β heat map (Figure 1) and the freezing curve (Figure 3)."""
    from l2sp.analysis import plots

    figs = []
    for kind in ("l2", "l2-sp"):
        rows = [{"alpha": r["params"]["alpha"], "lr": r["params"]["lr"], VAL: 100 * r["val_acc"]}
                for r in grid if r["params"]["kind"] == kind and r["n"] == n]
        if len({r["lr"] for r in rows}) > 1:
            plots.plot_alpha_beta_heatmap(rows, out / f"grid_{kind}.png", y="lr", value=VAL,
                                          title=f"{label(kind)}: validation accuracy vs α and learning rate")
            figs.append((f"{label(kind)}: the α × learning-rate grid", f"grid_{kind}.png"))
    if (n, "l2-sp") in chosen:
        lr = chosen[(n, "l2-sp")]["params"]["lr"]
        rows = [{"alpha": r["params"]["alpha"], "beta": r["params"]["beta"], VAL: 100 * r["val_acc"]}
                for r in grid + extra if r["params"]["kind"] == "l2-sp" and r["params"]["lr"] == lr
                and r["params"]["freeze"] == 0 and r["n"] == n]
        if len({r["beta"] for r in rows}) > 1:
            plots.plot_alpha_beta_heatmap(rows, out / "alpha_beta_l2-sp.png", value=VAL,
                                          title="L2-SP: validation accuracy vs α and β (Figure 1)")
            figs.append(("L2-SP: validation accuracy vs α and β (Figure 1)", "alpha_beta_l2-sp.png"))
    frozen_rows = []
    for kind in ("l2", "l2-sp"):
        if (c := chosen.get((n, kind))) is None:
            continue
        p = c["params"]
        frozen_rows += [{"penalty": label(kind), "frozen": r["params"]["freeze"], VAL: 100 * r["val_acc"]}
                        for r in grid + extra if r["n"] == n and r["params"]["kind"] == kind
                        and r["params"]["alpha"] == p["alpha"] and r["params"]["lr"] == p["lr"]
                        and r["params"]["beta"] == p["beta"]]
    if len({r["frozen"] for r in frozen_rows}) > 1:
        plots.plot_freezing_curve(frozen_rows, out / "freezing.png", value=VAL,
                                  title="Validation accuracy vs number of frozen blocks (Figure 3)")
        figs.append(("Freezing the first blocks, L2 vs L2-SP (Figure 3)", "freezing.png"))
    return figs


def _all_pairs(final: list[dict], n_main: int) -> list[tuple[str, Any]]:
    pairs = [(f"n={n}: L2-SP − L2, target test accuracy (points)", compare(final, n, "l2-sp", "l2"))
             for n in sorted({r["n"] for r in final})]
    pairs += [(f"n={n}: L2-SP − L2, source-task drop (points)", compare(final, n, "l2-sp", "l2", _drop, 1.0))
              for n in sorted({r["n"] for r in final})]
    for base in ("l2", "l2-sp"):
        pairs += [(f"n={n_main}: {label(m)} − {label(base)}, target test accuracy", compare(final, n_main, m, base))
                  for m in _methods(_at(final, n_main)) if m not in ("l2", "l2-sp")]
    return pairs


def _header(plan: dict, source_acc: float, elapsed: float, workers: int, machine: str) -> list[str]:
    lrs = plan["lrs"][0] if len(plan["lrs"]) == 1 else f"chosen from {plan['lrs']}"
    others = [n for n in plan["sizes"] if n != plan["n_per_class"]]
    fisher = (f"Fisher: exact, {plan['fisher_examples']} source inputs." if any(k.endswith("fisher")
              for k in plan["kinds"]) else "")
    return [
        "# l2sp demo: L2-SP and its family on the built-in Fashion-MNIST benchmark", "",
        f"- Machine: {machine}; {workers} worker process(es) of one thread; total time {elapsed / 60:.1f} min.",
        f"- Plan `{plan['name']}`: source = Fashion-MNIST labels 0,2,4,6,8 (all training images), target = "
        f"labels 1,3,5,7,9; every penalty at {plan['n_per_class']} training images per class"
        + (f", {' and '.join(label(k) for k in plan['size_kinds'])} also at {', '.join(map(str, others))}"
           if others else "")
        + f"; {plan['val_per_class']} validation images per class (from the training file), the "
        "official test images (5000).",
        f"- Source network: small ResNet pre-trained for {plan['source_steps']} iterations, source test "
        f"accuracy {100 * source_acc:.2f}%. {fisher}",
        f"- Fine-tuning: SGD momentum 0.9, batch 64, {plan['steps']} iterations, lr {lrs}, /10 after "
        f"{plan['milestone']}; β = 0.01. α chosen for each (size, penalty) on the validation split by the mean of "
        f"{plan['grid_seeds']} seeds per grid point (seeds {100}..), then run with {plan['seeds']} other seeds "
        "(0..), scored on the test split. A seed fixes the data order, augmentation and new head, the same for "
        "every penalty, so methods are compared seed by seed.",
        f"- Significance: {RULE}", "",
    ]


def _body(tabs: dict, n_main: int, concl: list[str], figs: list) -> list[str]:
    lines = ["## Conclusions (each from a paired test)", "", *[f"- {c}" for c in concl], "",
             "## The headline: L2-SP − L2 vs training images per class", "", tabs["table_sizes"], "",
             f"## Target test accuracy at {n_main} images per class (Table 2)", "", tabs["table2"], "",
             f"## Source-task accuracy drop at {n_main} images per class, original classifier re-attached "
             "(Table 5)", "", tabs["table5"], "",
             "## Every paired comparison", "", tabs["table_stats"], "",
             "## How each configuration was chosen (validation)", "",
             "noise: the standard error of the difference of two grid points' mean validation accuracies (pooled "
             "seed-to-seed spread); a margin under 2 × noise is within noise.", "", tabs["table_selection"], "",
             "## Figures", ""]
    for caption, fname in figs:
        lines += [f"### {caption}", "", f"![{caption}]({fname})", ""]
    return lines + ["Raw numbers: `runs.csv` (every final run), `grid.csv` (every selection run), `accuracy.csv`, "
                    "`source_drop.csv`, `sizes.csv`, `paired.csv`, `selection.csv`.", ""]


def write_report(out: Path, *, plan: dict, grid: list[dict], extra: list[dict], final: list[dict],
                 chosen: dict, source_acc: float, fisher_path: Path | None, elapsed: float, workers: int,
                 machine: str) -> dict[str, Any]:
    """Write tables (Markdown + CSV), plots and ``report.md`` into ``out``; returns the tables' text and rows
    and the conclusions."""
    from l2sp.analysis import plots

    out, n_main = Path(out), plan["n_per_class"]
    if not _at(final, n_main):
        raise L2SPError(f"no final run at n_per_class={n_main}: the plan's sizes and kinds produced nothing")
    rows = {"accuracy": accuracy_rows(final, chosen, n_main), "drop": drop_rows(final, n_main),
            "sizes": size_rows(final, chosen), "paired": stats_rows(_all_pairs(final, n_main)),
            "selection": selection_rows(chosen)}
    for name, rs in rows.items():
        tables.write_csv(out / f"{'source_drop' if name == 'drop' else name}.csv", rs)
    tables.write_csv(out / "grid.csv", _grid_rows(grid + extra))
    tables.write_csv(out / "runs.csv", [{"n": r["n"], "method": r["label"], "seed": r["seed"],
                                         "test_acc": 100 * r["test_acc"], "val_acc": 100 * r["val_acc"],
                                         "source_drop": (r.get("source_drop") or {}).get("drop")} for r in final])
    tabs = {"table2": tables.markdown_table(rows["accuracy"], digits=2), "table5": tables.markdown_table(rows["drop"]),
            "table_sizes": tables.markdown_table(rows["sizes"], digits=3),
            "table_stats": tables.markdown_table(rows["paired"]),
            "table_selection": tables.markdown_table(rows["selection"], digits=2)}
    figs = _size_figure(out, final)
    plots.plot_penalty_bars([{"penalty": label(r["label"]), TEST: 100 * r["test_acc"]} for r in _at(final, n_main)],
                            out / "accuracy_per_penalty.png", value=TEST)
    figs.append((f"Target test accuracy per penalty at {n_main} images per class (Figure 2 style)",
                 "accuracy_per_penalty.png"))
    figs += _selection_figures(out, grid, extra, chosen, n_main) + _analysis_plots(out, final, fisher_path, n_main)
    concl = conclusions(final, n_main)
    lines = _header(plan, source_acc, elapsed, workers, machine) + _body(tabs, n_main, concl, figs)
    atomic_write_text(out / "report.md", "\n".join(lines))
    return {**tabs, **rows, "conclusions": concl, "figures": [f for _, f in figs]}
