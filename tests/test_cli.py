"""The l2sp command: finetune (with --seeds, --resume after a kill), search, evaluate, presets, errors."""

import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from l2sp.cli import main
from l2sp.io import load_tensors, save_tensors
from l2sp.models import small_resnet

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_finetune_api_and_cli_agree(cfg, tmp_path, capsys):
    import l2sp

    assert main(["finetune", str(cfg), "optim.steps=6", "--out", str(tmp_path / "cli"), "-q"]) == 0
    line = capsys.readouterr().out
    assert "test_acc" in line and str(tmp_path / "cli") in line
    r = l2sp.finetune(str(cfg), overrides=["optim.steps=6"], out=str(tmp_path / "api"), quiet=True)
    a = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert a["test_acc"] == r["test_acc"] and a["val_acc"] == r["val_acc"]
    wa = load_tensors(tmp_path / "cli" / "model.safetensors")[0]
    wb = load_tensors(tmp_path / "api" / "model.safetensors")[0]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize(
    "args, words",
    [
        (["finetune", "fashion-mnist", "reg.alhpa=1"], ["unknown key reg.alhpa", "alpha"]),
        (["finetune", "no-such-preset"], ["unknown preset"]),
        (["finetune", "fashion-mnist", "train.amp=fp4"], ["none, bf16, fp16"]),
        (["search", "fashion-mnist", "--grid", "reg.alpha"], ["KEY=V1,V2"]),
    ],
)
def test_bad_input_prints_one_line_and_exits_2(args, words, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("l2sp: error: ") and err.count("\n") == 1 and "Traceback" not in err
    for w in words:
        assert w in err


def test_run_dir_with_other_config_is_refused(cfg, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["finetune", str(cfg), "optim.steps=2", "--out", out, "-q"]) == 0
    assert main(["finetune", str(cfg), "optim.steps=2", "reg.alpha=0.5", "--out", out, "-q"]) == 2
    assert "different config (reg.alpha: 0.1 != 0.5)" in capsys.readouterr().err


def test_seeds_write_a_mean_std_table(cfg, tmp_path, capsys):
    out = tmp_path / "rep"
    assert (
        main(["finetune", str(cfg), "optim.steps=4", "--seeds", "3", "--out", str(out), "--light", "-q"]) == 0
    )
    res = [json.loads((out / f"seed{s}" / "results.json").read_text()) for s in range(3)]
    assert [r["seed"] for r in res] == [0, 1, 2]
    assert not (out / "seed0" / "checkpoints").exists()  # --light
    rows = list(csv.DictReader((out / "summary.csv").open()))
    accs = [100 * r["test_acc"] for r in res]
    assert float(rows[0]["test_acc_mean"]) == pytest.approx(statistics.mean(accs))
    assert float(rows[0]["test_acc_std"]) == pytest.approx(statistics.stdev(accs))
    md = (out / "summary.md").read_text()
    assert f"{statistics.mean(accs):.2f} ± {statistics.stdev(accs):.2f}" in md
    assert md in capsys.readouterr().out


def test_search_evaluate_and_presets(cfg, tmp_path, capsys):
    out = tmp_path / "search"
    assert (
        main(
            [
                "search",
                str(cfg),
                "optim.steps=4",
                "--grid",
                "reg.alpha=0.01,1",
                "--grid",
                "optim.lr=0.01,0.05",
                "--out",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    rows = list(csv.DictReader((out / "search.csv").open()))
    assert len(rows) == 4 and {(r["reg.alpha"], r["optim.lr"]) for r in rows} == {
        ("0.01", "0.01"),
        ("0.01", "0.05"),
        ("1", "0.01"),
        ("1", "0.05"),
    }
    best = max(rows, key=lambda r: float(r["val_acc"]))
    printed = capsys.readouterr().out
    assert f"reg.alpha={float(best['reg.alpha'])}" in printed and "validation split" in printed
    assert all(
        json.loads((Path(r["run_dir"]) / "results.json").read_text()).get("test_acc") is None for r in rows
    )

    assert main(["evaluate", rows[0]["run_dir"], "--split", "val", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["top1"] == pytest.approx(float(rows[0]["val_acc"]))

    assert main(["presets"]) == 0
    names = capsys.readouterr().out.split()
    assert "fashion-mnist" in names and "dogs120-l2-sp-fisher-star" in names and "_paper" not in names
    assert "cityscapes-fcn-l2-sp" in names  # listed apart, for `l2sp segment`


def test_search_refuses_the_test_split(cfg):
    from l2sp.errors import L2SPError
    from l2sp.experiments.search import grid_search

    with pytest.raises(L2SPError, match="validation split"):
        grid_search(str(cfg), {"reg.alpha": [0.1]}, metric="test_acc")


@pytest.mark.slow
def test_resume_after_killing_the_process(cfg, tmp_path):
    """Kill a CLI run mid-way (SIGKILL after a checkpoint), resume: the weights of an uninterrupted run."""
    steps = ["optim.steps=60", "optim.milestones=[40]", "train.ckpt_every=10", "train.log_every=10"]
    cmd = [sys.executable, "-m", "l2sp.cli", "finetune", str(cfg), *steps, "-q"]
    subprocess.run([*cmd, "--out", str(tmp_path / "full")], env=ENV, check=True, capture_output=True)
    ckpt = tmp_path / "killed" / "checkpoints" / "last.pt"
    proc = subprocess.Popen(
        [*cmd, "--out", str(tmp_path / "killed")],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "killed" / "results.json").exists()
    step = torch.load(ckpt, weights_only=True)["step"]
    assert 10 <= step < 60
    subprocess.run(
        [*cmd, "--out", str(tmp_path / "killed"), "--resume"], env=ENV, check=True, capture_output=True
    )
    a = load_tensors(tmp_path / "full" / "model.safetensors")[0]
    b = load_tensors(tmp_path / "killed" / "model.safetensors")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra = json.loads((tmp_path / "full" / "results.json").read_text())
    rb = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert ra["test_acc"] == rb["test_acc"] and ra["final_loss"] == rb["final_loss"]


def test_fisher_command_with_truncated_classes_and_source_root(tmp_path, capsys):
    """`l2sp fisher` on the built-in source task: --classes/--tail-samples reach the estimator, and
    data.source_root is where the source task is read from (a wrong folder is named in the error)."""
    from l2sp.fisher import load

    torch.manual_seed(0)
    src = tmp_path / "source.safetensors"
    save_tensors(src, small_resnet(5, 1, widths=(8, 8, 16)).state_dict())
    overrides = [f"model.weights={src}", "model.options={widths: [8, 8, 16]}"]
    options = ["--max-examples", "32", "--batch-size", "16", "-q"]
    out = ["--out", str(tmp_path / "f.safetensors")]
    assert main(["fisher", "fashion-mnist", *overrides, *options, *out, "--classes", "2", "--tail-samples", "1"]) == 0
    fisher = load(tmp_path / "f.safetensors")
    assert fisher.metadata["examples"] == 32 and fisher.metadata.get("classes") == 2
    assert all(torch.isfinite(v).all() and (v >= 0).all() for v in fisher.values())
    missing = tmp_path / "no-such-folder"
    assert main(["fisher", "fashion-mnist", *overrides, f"data.source_root={missing}", *options, *out]) == 2
    assert str(missing) in capsys.readouterr().err
