"""Run directories you can trust (issue 16): overwrite deletes only what l2sp wrote, resume checks the split,
a failed set-up does not block the corrected command, one-line errors and notices for ordinary mistakes."""

import json
import os

import pytest

from conftest import tiny_config
from l2sp.cli import main
from l2sp.engine.run import finetune
from l2sp.engine.rundir import MANIFEST, first_difference
from l2sp.engine.synthetic import synthetic_task
from l2sp.errors import L2SPError


@pytest.fixture
def cfg(tmp_path):
    """A smaller synthetic-task config (a few seconds per run)."""
    return tiny_config(tmp_path, widths=(4, 4, 8), classes=3, sizes=(48, 12),
                       optim="lr: 0.05, batch_size: 16, steps: 6, milestones: [4]",
                       train="log_every: 2, ckpt_every: 2, tensorboard: false, device: cpu")


def one_line_error(capsys, *words: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("l2sp: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


# 1. --overwrite deletes only what l2sp wrote, and only in a folder l2sp made
def test_overwrite_refuses_a_folder_l2sp_did_not_make(cfg, tmp_path, capsys):
    proj = tmp_path / "proj"
    (proj / "checkpoints").mkdir(parents=True)
    (proj / "config.yaml").write_text("services: {}\n")
    (proj / "checkpoints" / "important_model.pt").write_text("x")
    (proj / "results.json").write_text("{}")
    (proj / "split.json").write_text("{}")
    assert main(["finetune", str(cfg), "--out", str(proj), "--overwrite", "-q"]) == 2
    one_line_error(capsys, "did not write", MANIFEST)
    for name in ("config.yaml", "checkpoints/important_model.pt", "results.json", "split.json"):
        assert (proj / name).is_file(), name
    assert main(["finetune", str(cfg), "--out", str(proj), "-q"]) == 2  # nor written into without --overwrite
    one_line_error(capsys, "config.yaml l2sp did not write")
    assert (proj / "config.yaml").read_text() == "services: {}\n"


def test_a_plain_run_refuses_a_folder_holding_a_file_of_a_runs_name(cfg, tmp_path, capsys):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "results.json").write_text('{"mine": 1}')
    (proj / "notes.txt").write_text("keep")
    assert main(["finetune", str(cfg), "--out", str(proj), "-q"]) == 2
    one_line_error(capsys, "results.json", "did not write", MANIFEST)
    assert not (proj / MANIFEST).exists()  # not claimed, so a later --overwrite is refused too
    assert main(["finetune", str(cfg), "--out", str(proj), "--overwrite", "-q"]) == 2
    one_line_error(capsys, "did not write")
    assert (proj / "results.json").read_text() == '{"mine": 1}' and (proj / "notes.txt").read_text() == "keep"


def test_a_half_written_metrics_line_does_not_block_resume(cfg, tmp_path):
    out = tmp_path / "run"
    full = finetune(str(cfg), out=str(out))
    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    (out / "results.json").unlink()  # as if killed after the last checkpoint, while appending a line
    metrics.write_text("\n".join(lines[:2]) + '\n{"step": 5, "lo')
    again = finetune(str(cfg), out=str(out), resume=True)
    assert again["test_acc"] == full["test_acc"] and again["steps"] == full["steps"]
    assert all(json.loads(ln) for ln in metrics.read_text().splitlines())


def test_overwrite_keeps_the_users_files_in_a_run_directory(cfg, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["finetune", str(cfg), "--out", str(run), "-q"]) == 0
    assert json.loads((run / MANIFEST).read_text())["written_by"] == "l2sp"
    (run / "checkpoints" / "mine.pt").write_text("keep")
    (run / "notes.txt").write_text("keep")
    first = (run / "results.json").stat().st_mtime_ns
    assert main(["finetune", str(cfg), "optim.lr=0.02", "--out", str(run), "--overwrite", "-q"]) == 0
    assert (run / "checkpoints" / "mine.pt").read_text() == "keep" and (run / "notes.txt").read_text() == "keep"
    assert (run / "results.json").stat().st_mtime_ns != first and (run / "checkpoints" / "last.pt").is_file()


# 2. --resume verifies the recorded split
def test_resume_refuses_another_split(cfg, tmp_path):
    out = str(tmp_path / "run")
    a = synthetic_task(num_classes=3, n_train=48, n_val=12, n_test=12, seed=0)
    b = synthetic_task(num_classes=3, n_train=48, n_val=12, n_test=12, seed=1)
    assert finetune(str(cfg), task=a, out=out, quiet=True, stop_after=2)["interrupted"]
    with pytest.raises(L2SPError, match=r"data split differs .*\(seed: 0 recorded, 1 now\).*--overwrite"):
        finetune(str(cfg), task=b, out=out, quiet=True, resume=True)
    assert json.loads((tmp_path / "run" / "split.json").read_text())["seed"] == 0  # the record is kept
    assert finetune(str(cfg), task=a, out=out, quiet=True, resume=True)["steps"] == 6


def test_first_difference_names_the_place():
    assert first_difference({"a": [1, 2], "b": 1}, {"a": [1, 2], "b": 1}) is None
    assert first_difference({"a": [1, 2]}, {"a": [1, 3]}) == "a[1]: 2 recorded, 3 now"
    assert first_difference({"files": ["x"]}, {"files": ["x", "y"]}) == 'files: ["x"] recorded, ["x", "y"] now'


# 3. a failed set-up does not block the corrected command
def test_a_failed_setup_can_be_corrected_in_place(cfg, tmp_path, capsys):
    out = str(tmp_path / "run")
    bad = ["finetune", str(cfg), f"model.weights={tmp_path / 'missing.safetensors'}", "--out", out, "-q"]
    assert main(bad) == 2
    capsys.readouterr()
    assert not (tmp_path / "run" / "config.yaml").exists()
    assert main(bad) == 2  # the same mistake: the same error, not "already holds this run"
    assert "already holds" not in capsys.readouterr().err
    assert main(["finetune", str(cfg), "--out", out, "-q"]) == 0


def test_a_start_that_failed_before_training_is_replaced(cfg, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["finetune", str(cfg), "optim.batch_size=100", "--out", out, "-q"]) == 2  # > 48 training images
    one_line_error(capsys, "fewer than optim.batch_size")
    assert main(["finetune", str(cfg), "--out", out, "-q"]) == 0


# 4. ordinary mistakes are one line, not a traceback
def test_out_that_is_a_file(cfg, tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    assert main(["finetune", str(cfg), "--out", str(f), "-q"]) == 2
    one_line_error(capsys, "is a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out(cfg, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(["finetune", str(cfg), "--out", str(ro / "run"), "-q"]) == 2
        one_line_error(capsys, "writable --out")
    finally:
        ro.chmod(0o755)


def test_yaml_that_is_not_utf8(tmp_path, capsys):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert main(["finetune", str(p), "--out", str(tmp_path / "r"), "-q"]) == 2
    one_line_error(capsys, "not UTF-8")


def test_unknown_device(cfg, capsys):
    assert main(["finetune", str(cfg), "train.device=tpu9", "-q"]) == 2
    one_line_error(capsys, "train.device=tpu9 is not a device")


# 5. nan learning rate refused at validation
def test_nan_learning_rate(cfg, capsys):
    assert main(["finetune", str(cfg), "optim.lr=.nan", "-q"]) == 2
    one_line_error(capsys, "optim.lr=nan must be a finite number > 0")


# 6. silent acceptance
def test_duplicate_yaml_keys(tmp_path, capsys):
    p = tmp_path / "dup.yaml"
    p.write_text("base: fashion-mnist\noptim: {lr: 0.1}\nreg: {alpha: 0.1}\noptim: {lr: 0.2}\n")
    assert main(["finetune", str(p), "--out", str(tmp_path / "r"), "-q"]) == 2
    one_line_error(capsys, "'optim' appears twice", "line 4")


def test_negative_ckpt_every(cfg, capsys):
    assert main(["finetune", str(cfg), "train.ckpt_every=-1", "-q"]) == 2
    one_line_error(capsys, "train.ckpt_every=-1")


def test_resume_without_a_checkpoint_says_so(cfg, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["finetune", str(cfg), "train.save_checkpoint=false", "optim.steps=2", "--out", out, "-q"]) == 0
    (tmp_path / "run" / "results.json").unlink()
    capsys.readouterr()
    assert main(["finetune", str(cfg), "train.save_checkpoint=false", "optim.steps=2", "--out", out, "--resume",
                 "-q"]) == 0
    err = capsys.readouterr().err
    assert "l2sp: notice:" in err and "no checkpoint to resume from; starting at step 0" in err


def test_a_directory_as_model_weights(cfg, tmp_path, capsys):
    assert main(["finetune", str(cfg), f"model.weights={tmp_path}", "--out", str(tmp_path / "r"), "-q"]) == 2
    one_line_error(capsys, "is a directory", "checkpoint file")


def test_orphan_temporary_checkpoint_is_removed_on_resume(cfg, tmp_path):
    out = tmp_path / "run"
    finetune(str(cfg), out=str(out), quiet=True, stop_after=2)
    orphan = out / "checkpoints" / ".last.pt.abc123.tmp"  # what a kill during torch.save leaves
    orphan.write_bytes(b"partial")
    assert finetune(str(cfg), out=str(out), quiet=True, resume=True)["steps"] == 6
    assert not orphan.exists()
