"""The CamVid benchmark driver (benchmarks/camvid_mobilenetv2.py) on a handful of the shared files: selection,
final runs, source drop, paired table, figure, skipping finished runs, --resume, --collect, one-line errors."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from l2sp.analysis.paired import paired
from l2sp.errors import L2SPError
from l2sp.io import load_tensors
from l2sp.segmentation import finetune_segmentation, score_segmentation_run

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "camvid_mobilenetv2.py"
SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="module")
def bench():
    name = "camvid_mobilenetv2"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCH)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def _need(shared: Path, relative: str) -> Path:
    path = shared / relative
    if not path.exists():
        pytest.skip(f"../shared/{relative} is absent")
    return path


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """A CamVid root with 3 train / 2 val / 2 test frames and a Tiny ImageNet root with 2 classes × 2 val
    images, all links to the shared files."""
    if not SHARED.is_dir():
        pytest.skip("../shared is not beside the checkout")
    camvid, tiny = _need(SHARED, "data/camvid"), _need(SHARED, "data/tiny-imagenet")
    weights = _need(SHARED, "weights/mobilenet_v2_imagenet.safetensors")
    root = tmp_path_factory.mktemp("camvid-bench")
    for split, n in (("train", 3), ("val", 2), ("test", 2)):
        for image in sorted((camvid / split / "images").glob("*.jpg"))[:n]:
            _link(image, root / "camvid" / split / "images" / image.name)
            mask = f"{image.stem}.png"
            _link(camvid / split / "masks" / mask, root / "camvid" / split / "masks" / mask)
    index = json.loads((tiny / "imagenet_index.json").read_text())
    keep = {w: index[w] for w in sorted(index)[:2]}
    for w in keep:
        for split in ("train", "val"):
            for image in sorted((tiny / split / w).glob("*.JPEG"))[:2]:
                _link(image, root / "tiny" / split / w / image.name)
    (root / "tiny" / "imagenet_index.json").write_text(json.dumps(keep))
    return {"camvid": root / "camvid", "tiny": root / "tiny", "weights": weights, "root": root}


def _argv(data: dict, out: Path, *extra: str) -> list[str]:
    return ["--camvid", str(data["camvid"]), "--tiny", str(data["tiny"]), "--weights", str(data["weights"]),
            "--out", str(out), "--model", "fcn", "--scale", "0.25", "--crop", "48x64", "--batch", "2",
            "--steps", "2", "--ckpt-every", "1", "--log-every", "1", "--alphas-l2", "1e-4", "--alphas-l2sp", "0.01",
            "--lrs", "0.01,0.001", "--select-seeds", "0", "--seeds", "0,1", "--source-per-class", "2",
            "--source-size", "32", "--figure-images", "2", "--workers", "1", *extra]


@pytest.mark.slow
def test_driver_end_to_end_resume_and_collect(bench, data, capsys):
    out = data["root"] / "out"
    text = bench.main(_argv(data, out))
    rows = {p.stem: json.loads(p.read_text()) for p in (out / "rows" / "final").glob("*.json")}
    select = {p.stem: json.loads(p.read_text()) for p in (out / "rows" / "select").glob("*.json")}
    assert len(select) == 4 and len(rows) == 4  # (L2, L2-SP) x 2 rates; (L2, L2-SP) x 2 seeds
    for row in [*select.values(), *rows.values()]:  # every row is its run directory's results.json
        res = json.loads((Path(row["run_dir"]) / "results.json").read_text())
        assert res["val"]["images"] == 2 and row["wall_s"] > 0 and row["train_s"] > 0 and "drop" in row["source"]
        if row.get("from_selection"):  # seed 0 at the chosen point: the selection run's network, scored on test
            assert row["phase"] == "final" and row["seed"] == 0 and Path(row["run_dir"]).parent.name == "select"
            assert row["miou"] == score_segmentation_run(row["run_dir"], "test")["miou"]
        else:
            assert row["miou"] == res["val_miou"] == res["miou"] and res["val"]["split"] == row["split"]
    assert sorted(r["seed"] for r in rows.values() if r.get("from_selection")) == [0, 0]
    # ... which is what training it again for the test split gives: the same weights, the same test mIoU
    twin = next(r for r in rows.values() if r.get("from_selection"))
    args = bench.job_args(bench.parser().parse_args(_argv(data, out)))
    run = bench.Run("final", twin["kind"], twin["alpha"], twin["lr"], 0)
    again = finetune_segmentation(bench.preset(run, args), bench.overrides(run, args), out=data["root"] / "again",
                                  quiet=True)
    assert again["val"]["split"] == "test" and again["val_miou"] == twin["miou"]
    a, b = (load_tensors(Path(d) / "model.safetensors")[0] for d in (twin["run_dir"], data["root"] / "again"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert {r["split"] for r in rows.values()} == {"test"} and {r["split"] for r in select.values()} == {"val"}
    # the chosen point: the best val mIoU of each penalty; the final runs use it
    for kind in ("l2", "l2-sp"):
        best = max((r for r in select.values() if r["kind"] == kind), key=lambda r: r["miou"])
        assert {(r["alpha"], r["lr"]) for r in rows.values() if r["kind"] == kind} == {(best["alpha"], best["lr"])}
    s = rows[next(iter(rows))]["source"]
    assert s["source_images"] == 4 and s["drop"] == pytest.approx(s["source_acc"] - s["reattached_acc"])
    # paired L2-SP − L2 over seeds 0, 1, as l2sp.analysis.paired computes it
    by = {(r["kind"], r["seed"]): r for r in rows.values()}
    p = paired([100 * by["l2-sp", k]["miou"] for k in (0, 1)], [100 * by["l2", k]["miou"] for k in (0, 1)])
    table = list(csv.DictReader((out / "camvid_table.csv").open()))
    got = next(r for r in table if r["row"] == "paired" and r["metric"] == "mIoU (pts)")
    assert float(got["diff_mean"]) == pytest.approx(p.mean) and float(got["p_sign"]) == pytest.approx(p.p_sign)
    l2 = next(r for r in table if r["row"] == "method" and r["method"].startswith("L2 "))
    assert float(l2["miou_mean"]) == pytest.approx(50 * (by["l2", 0]["miou"] + by["l2", 1]["miou"]))
    road = [by["l2", k]["per_class_iou"][3] for k in (0, 1)]  # class 3 = road, present in every test frame
    assert float(l2["iou_road"]) == pytest.approx(50 * (road[0] + road[1]))
    assert len(list(csv.DictReader((out / "camvid_runs.csv").open()))) == 8
    png = (out / "camvid_predictions.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert (out / "camvid_table.md").read_text() == text and "Paired differences" in text
    assert f"{100 * by['l2-sp', 0]['miou']:.2f}" in text or "±" in text

    # rerunning skips every finished run (nothing retrained: run directories untouched)
    stamp = {n: (Path(r["run_dir"]) / "results.json").stat().st_mtime_ns for n, r in rows.items()}
    capsys.readouterr()
    assert bench.main(_argv(data, out)) == text
    assert "training" not in capsys.readouterr().out
    assert stamp == {n: (Path(r["run_dir"]) / "results.json").stat().st_mtime_ns for n, r in rows.items()}

    # an interrupted run: without --resume a one-line error, with --resume it finishes from its checkpoint
    victim = rows["l2-sp_a0.01_lr" + f"{by['l2-sp', 1]['lr']:g}" + "_seed1"]
    (Path(victim["run_dir"]) / "results.json").unlink()
    (out / "rows" / "final" / f"{victim['name']}.json").unlink()
    with pytest.raises(L2SPError, match="--resume") as err:
        bench.main(_argv(data, out))
    assert "\n" not in str(err.value)
    bench.main(_argv(data, out, "--resume"))
    again = json.loads((out / "rows" / "final" / f"{victim['name']}.json").read_text())
    assert again["miou"] == pytest.approx(victim["miou"], abs=1e-12)

    # --collect: the same tables and figure from the finished runs, nothing trained
    for name in ("camvid_table.md", "camvid_table.csv", "camvid_runs.csv", "camvid_predictions.png"):
        (out / name).unlink()
    capsys.readouterr()
    assert bench.main(["--collect", str(out), "--camvid", str(data["camvid"]), "--figure-images", "2"]) == text
    assert "L2-SP (α 0.01" in capsys.readouterr().out
    assert (out / "camvid_table.md").read_text() == text and (out / "camvid_predictions.png").stat().st_size > 5000
    assert len(list(csv.DictReader((out / "camvid_runs.csv").open()))) == 8


def test_one_line_errors_for_bad_paths(bench, data, tmp_path):
    cases = [(("--camvid", str(tmp_path / "nope")), "--camvid"), (("--weights", str(tmp_path / "w.safetensors")),
             "--weights"), (("--tiny", str(tmp_path)), "--tiny"), (("--fisher", str(tmp_path / "f.safetensors")),
             "--fisher"), (("--seeds", "0"), "--seeds"), (("--crop", "big"), "--crop"), (("--lrs", "x"), "--lrs")]
    for extra, flag in cases:
        with pytest.raises(L2SPError, match=flag) as err:
            bench.main(_argv(data, tmp_path / "out", *extra))
        assert "\n" not in str(err.value)
    with pytest.raises(L2SPError, match="rows/"):
        bench.main(["--collect", str(tmp_path)])
    assert not (tmp_path / "out" / "runs").exists()


def test_selection_and_margin(bench):
    rows = [{"kind": "l2-sp", "alpha": a, "lr": lr, "miou": m} for a, lr, m in
            ((0.1, 0.01, 0.50), (0.01, 0.01, 0.53), (0.01, 0.003, 0.47), (0.1, 0.01, 0.52))]
    c = bench.choose(rows)["l2-sp"]  # mean over seeds: (0.1, 0.01) 51, (0.01, 0.01) 53, (0.01, 0.003) 47
    assert (c["alpha"], c["lr"], c["seeds"]) == (0.01, 0.01, 1) and c["val_miou"] == pytest.approx(53.0)
    assert (c["runner_up"]["alpha"], c["runner_up"]["lr"]) == (0.1, 0.01)
    assert math.isclose(c["runner_up"]["val_miou"], 51.0) and c["margin"] == pytest.approx(2.0)
    runs = bench.final_runs({"l2": {"alpha": 1e-4, "lr": 0.01}, "l2-sp": c}, [0, 1], fisher=True)
    assert [(r.kind, r.alpha, r.lr, r.seed) for r in runs] == [
        ("l2", 1e-4, 0.01, 0), ("l2", 1e-4, 0.01, 1), ("l2-sp", 0.01, 0.01, 0), ("l2-sp", 0.01, 0.01, 1),
        ("l2-sp-fisher", 0.01, 0.01, 0), ("l2-sp-fisher", 0.01, 0.01, 1)]


@pytest.mark.slow
def test_fisher_estimated_then_l2_sp_fisher_runs(bench, data):
    import l2sp

    out, fisher = data["root"] / "out-fisher", data["root"] / "fisher.safetensors"
    bench.main(_argv(data, out, "--lrs", "0.01", "--fisher", str(fisher), "--fisher-examples", "3"))
    f = l2sp.fisher.load(fisher)
    # the same estimate computed directly: images 0 of both classes, then image 1 of the first
    images, labels, _ = bench.source_images(str(data["tiny"]), 2, 32, split="train")
    x = images[[0, 2, 1]].float() / 127.5 - 1.0
    ref = l2sp.fisher.estimate(bench.source_network(str(data["weights"])), [x], method="exact", classes=8,
                               tail_samples=2, max_examples=3, progress=False,
                               generator=torch.Generator().manual_seed(0))
    assert set(f) == set(ref) and all(k.startswith(("features.", "classifier.")) for k in f)
    for k in ("features.0.0.weight", "classifier.1.weight"):
        torch.testing.assert_close(f[k], ref[k], rtol=1e-4, atol=1e-12)
    rows = [json.loads(p.read_text()) for p in (out / "rows" / "final").glob("l2-sp-fisher_*.json")]
    assert sorted(r["seed"] for r in rows) == [0, 1]
    cfg = (Path(rows[0]["run_dir"]) / "config.yaml").read_text()
    assert "kind: l2-sp-fisher" in cfg and str(fisher) in cfg
    text = (out / "camvid_table.md").read_text()
    assert "L2-SP-Fisher (α 0.01, lr 0.01) − L2" in text


@pytest.mark.slow
def test_a_diverging_selection_point_is_recorded_not_fatal(bench, data):
    out = data["root"] / "out-diverge"
    bench.main(_argv(data, out, "--lrs", "1e6,0.01", "--steps", "3"))
    rows = [json.loads(p.read_text()) for p in (out / "rows" / "select").glob("*.json")]
    bad = [r for r in rows if r["lr"] == 1e6]
    assert len(bad) == 2 and all(r["miou"] is None and "step" in r["diverged"] for r in bad)
    finals = [json.loads(p.read_text()) for p in (out / "rows" / "final").glob("*.json")]
    assert {r["lr"] for r in finals} == {0.01} and len(finals) == 4
    assert "| L2 | 0.0001 | 1e+06 | 1 | diverged |" in (out / "camvid_table.md").read_text()
