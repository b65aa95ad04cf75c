"""l2sp search on Optuna storages: grid and TPE, resuming a killed search with several workers, pruning on the
validation accuracy, tables and best config, a shared PostgreSQL database."""

import argparse
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import yaml

from l2sp.engine.config import resolve
from l2sp.errors import L2SPError
from l2sp.search import Range, SearchSpace, add_arguments, main, parse_grid, parse_range, worker_devices
from l2sp.search.study import trial_params
from l2sp.search.workers import next_action

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_cli(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return main(parser.parse_args(argv))


def load(out, name="tiny"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{Path(out).resolve() / 'study.db'}")


def completed(study):
    return [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]


# ------------------------------------------------------------------------------------------- parsing, errors
def test_parse_grid_and_range():
    assert parse_grid(["reg.alpha=0.01,0.1,1", "optim.lr=0.5"]) == {"reg.alpha": [0.01, 0.1, 1], "optim.lr": [0.5]}
    assert parse_range(["reg.alpha=1e-4:1", "log"]) == ("reg.alpha", Range(1e-4, 1, True))
    assert parse_range("optim.lr=0.001:0.1") == ("optim.lr", Range(0.001, 0.1, False))
    for bad, words in [
        (["reg.alpha=1e-4:1", "optim.steps=4"], "put overrides before the options"),
        (["reg.alpha=1:1e-4"], "LO < HI"),
        (["reg.alpha=0:1", "log"], "LO > 0"),
        (["reg.alpha"], "KEY=LO:HI"),
    ]:
        with pytest.raises(L2SPError, match=words):
            parse_range(bad)
    with pytest.raises(L2SPError, match="KEY=V1,V2"):
        parse_grid(["reg.alpha"])
    with pytest.raises(L2SPError, match="repeats a value"):
        SearchSpace({"reg.alpha": [0.1, 0.1]})


def test_space_points_labels_and_suggestions():
    space = SearchSpace({"reg.alpha": [0.01, 1], "optim.lr": [0.1, 0.2, 0.3]})
    pts = space.points()
    assert len(pts) == 6 == space.size() and pts[0] == {"reg.alpha": 0.01, "optim.lr": 0.1}
    assert len({space.label(p) for p in pts}) == 6 and space.label(pts[0]) == "alpha=0.01,lr=0.1"
    # two keys ending alike keep their full names; floats written exactly (no collision of close values)
    both = SearchSpace({"reg.alpha": [1], "model.options.alpha": [2]})
    assert both.label({"reg.alpha": 1, "model.options.alpha": 2}) == "reg.alpha=1,model.options.alpha=2"
    cont = SearchSpace(ranges={"reg.alpha": Range(1e-4, 1, True)})
    assert cont.label({"reg.alpha": 0.0123456789}) != cont.label({"reg.alpha": 0.0123456788})
    with pytest.raises(L2SPError, match="--sampler tpe"):
        cont.points()
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        p = cont.suggest(study.ask())
        assert 1e-4 <= p["reg.alpha"] <= 1
    dist = study.trials[0].distributions["reg.alpha"]
    assert isinstance(dist, optuna.distributions.FloatDistribution) and dist.log


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--grid", "reg.alpha"], ["KEY=V1,V2"]),
        (["--grid", "reg.alhpa=1,2"], ["unknown key reg.alhpa"]),
        (["eval.splits=[val, test]", "--grid", "reg.alpha=0.1"], ["test split"]),
        (["--range", "reg.alpha=1e-4:1", "log"], ["--sampler tpe"]),
        (["--sampler", "tpe", "--range", "reg.alpha=1e-4:1", "log"], ["--trials N"]),
        (["--grid", "reg.alpha=0.1", "--pruner", "median"], ["train.eval_every"]),
        (["--grid", "reg.alpha=0.1,1", "--trials", "3"], ["--sampler tpe", "2 points"]),
        (["--grid", "reg.alpha=0.1", "--storage", "nosuchdb://x"], ["cannot open the search storage"]),
    ],
)
def test_bad_input_is_one_line(cfg, tmp_path, argv, words, capsys):
    from l2sp.search.__main__ import run

    assert run([str(cfg), *argv, "--out", str(tmp_path / "s"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("l2sp: error: ") and err.count("\n") == 1
    for w in words:
        assert w in err


def test_refuses_the_test_split(cfg):
    from l2sp.experiments.search import grid_search

    with pytest.raises(L2SPError, match="validation split"):
        grid_search(str(cfg), {"reg.alpha": [0.1]}, metric="test_acc")
    with pytest.raises(SystemExit):
        run_cli([str(cfg), "--grid", "reg.alpha=0.1", "--metric", "test_acc"])


def test_worker_devices(monkeypatch):
    assert worker_devices(3, "0,1") == ["0", "1", "0"]
    assert worker_devices(2, "cuda:1,cuda:3") == ["1", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert worker_devices(4) == ["2", "5", "2", "5"]
    with pytest.raises(L2SPError, match="GPU numbers"):
        worker_devices(2, "gpu0")


def test_next_action():
    from l2sp.search.spec import SearchSpec

    grid = SearchSpec.__new__(SearchSpec)
    grid.sampler, grid.n_trials = "grid", None
    assert next_action(grid, {"waiting": 1, "running": 2}) == "run"
    assert next_action(grid, {"final": 4, "running": 1}) == "wait"  # it may die and be queued again
    assert next_action(grid, {"final": 4}) == "stop"
    tpe = SearchSpec.__new__(SearchSpec)
    tpe.sampler, tpe.n_trials = "tpe", 5
    assert next_action(tpe, {"final": 3, "running": 1}) == "run"
    assert next_action(tpe, {"final": 4, "running": 1}) == "wait"
    assert next_action(tpe, {"final": 5}) == "stop"


# ------------------------------------------------------------------------------------------- grid: table, best, resume
def test_grid_search_table_best_yaml_and_rerun(cfg, tmp_path, capsys):
    out = tmp_path / "search"
    argv = [str(cfg), "optim.steps=4", "--grid", "reg.alpha=0.01,1", "--grid", "optim.lr=0.01,0.05", "--out", str(out)]
    assert run_cli([*argv, "-q"]) == 0
    rows = list(csv.DictReader((out / "search.csv").open()))
    assert len(rows) == 4 and {(r["reg.alpha"], r["optim.lr"]) for r in rows} == {
        ("0.01", "0.01"), ("0.01", "0.05"), ("1", "0.01"), ("1", "0.05")}
    assert all(r["state"] == "complete" for r in rows)
    # run directories named by the values; each holds the run's own val_acc and no test metric
    for r in rows:
        res = json.loads((Path(r["run_dir"]) / "results.json").read_text())
        assert Path(r["run_dir"]).name == f"alpha={r['reg.alpha']},lr={r['optim.lr']}"
        assert res["val_acc"] == pytest.approx(float(r["val_acc"])) and res.get("test_acc") is None
    best = max(rows, key=lambda r: float(r["val_acc"]))
    assert rows[0]["val_acc"] == best["val_acc"]  # best first
    printed = capsys.readouterr().out
    assert f"reg.alpha={float(best['reg.alpha'])}" in printed and "validation split" in printed
    # best.yaml: the user's config (test split evaluated again, checkpoints on) with the best values
    b = resolve(str(out / "best.yaml"))
    assert b.reg.alpha == float(best["reg.alpha"]) and b.optim.lr == float(best["optim.lr"])
    assert b.name == "tiny" and b.eval.splits == ["val", "test"] and b.optim.steps == 4 and b.train.save_checkpoint
    # the same command again: nothing rerun
    mtimes = {r["run_dir"]: (Path(r["run_dir"]) / "results.json").stat().st_mtime_ns for r in rows}
    assert run_cli([*argv, "-q"]) == 0
    assert len(load(out).trials) == 4
    assert mtimes == {r: (Path(r) / "results.json").stat().st_mtime_ns for r in mtimes}
    # a wider grid runs only the new points; other settings in the same study are refused
    assert run_cli([str(cfg), "optim.steps=4", "--grid", "reg.alpha=0.01,1,0.1", "--grid", "optim.lr=0.01,0.05",
                    "--out", str(out), "-q"]) == 0
    assert len(completed(load(out))) == 6
    with pytest.raises(L2SPError, match=r"other settings \(optim.steps: 4 != 5\)"):
        run_cli([str(cfg), "optim.steps=5", "--grid", "reg.alpha=0.01", "--grid", "optim.lr=0.01", "--out", str(out)])


def test_evaluate_a_search_run(cfg, tmp_path, capsys):
    from l2sp.cli import main as l2sp_main
    from l2sp.experiments.search import grid_search

    best, rows = grid_search(str(cfg), {"reg.alpha": [0.01, 1]}, ["optim.steps=4"], out=tmp_path / "s")
    assert len(rows) == 2 and best.reg.alpha == max(rows, key=lambda r: r["val_acc"])["reg.alpha"]
    assert not (Path(rows[0]["run_dir"]) / "checkpoints").exists()  # light by default in grid_search
    assert l2sp_main(["evaluate", rows[0]["run_dir"], "--split", "val", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(rows[0]["val_acc"])


# ------------------------------------------------------------------------------ kill, restart with 2 workers
def _wait_for(out, done, timeout=120):
    """Poll the study's SQLite file until ``done`` trials are complete and one is running."""
    import sqlite3

    db = Path(out) / "study.db"
    t0 = time.time()
    while time.time() - t0 < timeout:
        if db.exists():
            try:
                with sqlite3.connect(db, timeout=5) as con:
                    states = [s for (s,) in con.execute("SELECT state FROM trials")]
            except sqlite3.Error:  # tables not created yet
                states = []
            if states.count("COMPLETE") >= done and "RUNNING" in states:
                return states
        time.sleep(0.1)
    raise AssertionError("the search did not reach the kill point")


@pytest.mark.slow
def test_killed_search_restarts_with_two_workers_and_runs_each_point_once(cfg, tmp_path):
    out = tmp_path / "killed"
    alphas = ["0.001", "0.01", "0.1", "1", "10"]
    args = [sys.executable, "-m", "l2sp.search", str(cfg), "optim.steps=16", "train.ckpt_every=2",
            "--grid", f"reg.alpha={','.join(alphas)}", "--out", str(out), "--heartbeat", "1", "-q"]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(out, 2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = {t.number: t.state.name for t in load(out).get_trials()}
    killed = [n for n, s in before.items() if s == "RUNNING"]
    assert len(killed) == 1 and list(before.values()).count("COMPLETE") >= 2

    r = subprocess.run([*args, "--workers", "2"], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    trials = load(out).get_trials()
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert sorted(trial_params(t)["reg.alpha"] for t in done) == sorted(yaml.safe_load(a) for a in alphas)
    assert len(done) == len(alphas)  # every point exactly once
    assert trials[killed[0]].state.name == "FAIL"  # the trial the kill interrupted, then run again:
    assert [t.system_attrs.get("failed_trial") for t in done].count(killed[0]) == 1
    assert len(list((out / "trials").iterdir())) == len(alphas)
    rows = list(csv.DictReader((out / "search.csv").open()))
    assert len(rows) == len(alphas) and all(r["state"] == "complete" for r in rows)


def test_a_trial_taken_by_a_process_that_died_before_its_first_heartbeat_is_queued_again(tmp_path):
    from l2sp.search.study import POINT_ATTR, STARTED_ATTR, fail_orphans, open_storage

    study = optuna.create_study(study_name="o", storage=open_storage(f"sqlite:///{tmp_path / 'o.db'}", 1))
    study.enqueue_trial({}, user_attrs={POINT_ATTR: {"reg.alpha": 0.1}})
    study.enqueue_trial({}, user_attrs={POINT_ATTR: {"reg.alpha": 1}})
    with pytest.warns(UserWarning, match="Heartbeat"):  # the worker loop takes trials through optimize
        study.ask()  # taken from the queue by a process that died at once
        started = study.ask()  # this one reached its objective
    started.set_user_attr(STARTED_ATTR, "host:1")
    assert fail_orphans(study, grace=60) == 0  # too recent
    assert fail_orphans(study, grace=0) == 1
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "RUNNING", "WAITING"]
    assert trials[2].user_attrs == {POINT_ATTR: {"reg.alpha": 0.1}} and trials[2].system_attrs["failed_trial"] == 0
    assert fail_orphans(study, grace=0) == 0  # once


def _pop_until_empty(url, worker):
    from l2sp.search.study import open_storage

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name="race", storage=open_storage(url, 5))
    while any(t.state.name == "WAITING" for t in study.get_trials(deepcopy=False)):
        study.optimize(lambda t: t.set_user_attr("worker", worker) or 0.0, n_trials=1)


@pytest.mark.slow
def test_sqlite_queue_hands_each_trial_to_one_process(tmp_path):
    """Optuna reads a queued trial's state, then marks it running: on SQLite without BEGIN IMMEDIATE two
    processes can take the same trial (and one then fails with "Cannot tell a COMPLETE trial")."""
    import multiprocessing

    from l2sp.search.study import open_storage

    url = f"sqlite:///{tmp_path / 'race.db'}"
    study = optuna.create_study(study_name="race", storage=open_storage(url, 5))
    for k in range(40):
        study.enqueue_trial({}, user_attrs={"k": k})
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_pop_until_empty, args=(url, i)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0, 0, 0]
    queued = [t for t in study.get_trials() if "k" in t.user_attrs]  # others: the queue was empty when asked
    assert all(t.state.name == "COMPLETE" for t in queued)
    assert sorted(t.user_attrs["k"] for t in queued) == list(range(40))


# ------------------------------------------------------------------------------------------- TPE and pruning
def test_tpe_on_a_log_range_continues_to_more_trials(cfg, tmp_path):
    out = tmp_path / "tpe"
    argv = [str(cfg), "optim.steps=2", "--sampler", "tpe", "--range", "reg.alpha=1e-4:1", "log", "--out", str(out),
            "-q"]
    assert run_cli([*argv, "--trials", "3"]) == 0
    assert len(completed(load(out))) == 3
    assert run_cli([*argv, "--trials", "4"]) == 0
    trials = completed(load(out))
    assert len(trials) == 4 and all(1e-4 <= t.params["reg.alpha"] <= 1 for t in trials)
    assert all(t.distributions["reg.alpha"].log for t in trials)
    assert len({t.user_attrs["run_dir"] for t in trials}) == 4


def test_tpe_trial_interrupted_in_process_is_queued_again_with_its_values(cfg, tmp_path, monkeypatch):
    from l2sp.search import trial as trial_mod

    out = tmp_path / "tpe-int"
    argv = [str(cfg), "optim.steps=2", "--sampler", "tpe", "--range", "reg.alpha=1e-4:1", "log", "--trials", "2",
            "--out", str(out), "-q"]
    real = trial_mod.finetune

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(trial_mod, "finetune", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_cli(argv)
    (first,) = load(out).get_trials()
    assert first.state.name == "FAIL" and "error" not in first.user_attrs
    monkeypatch.setattr(trial_mod, "finetune", real)
    assert run_cli(argv) == 0
    trials = load(out).get_trials()
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(done) == 2 and done[0].params == first.params and done[0].system_attrs["failed_trial"] == 0


def test_median_pruner_stops_a_poor_trial_and_keeps_the_runs_exact(cfg, tmp_path):
    from l2sp.engine.run import finetune

    out = tmp_path / "pruned"
    assert run_cli([str(cfg), "train.eval_every=4", "--grid", "optim.lr=0.05,0.04,0.000001", "--pruner", "median",
                    "--out", str(out), "-q"]) == 0
    trials = {trial_params(t)["optim.lr"]: t for t in load(out).get_trials()}
    assert trials[1e-6].state.name == "PRUNED" and trials[1e-6].user_attrs["pruned_at"] == 4
    good = trials[0.05]
    assert good.state.name == "COMPLETE" and sorted(good.intermediate_values) == [4, 8]
    # run from one evaluation to the next, the trial equals one uninterrupted run
    ref = finetune(str(cfg), ["train.eval_every=4", "optim.lr=0.05"], out=str(tmp_path / "ref"), quiet=True)
    assert good.value == ref["val_acc"]
    curve = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [good.intermediate_values[s] for s in (4, 8)] == [r["val_top1"] for r in curve if "val_top1" in r][:2]
    rows = list(csv.DictReader((out / "search.csv").open()))
    assert [r["state"] for r in rows][-1] == "pruned at step 4" and rows[-1]["val_acc"] == ""


def test_wilcoxon_pruner_stops_a_trial_below_the_best(cfg, tmp_path):
    out = tmp_path / "wilcoxon"
    assert run_cli([str(cfg), "train.eval_every=2", "--grid", "optim.lr=0.05,0.000001", "--pruner", "wilcoxon",
                    "--out", str(out), "-q"]) == 0
    good, bad = load(out).get_trials()
    assert good.state.name == "COMPLETE" and sorted(good.intermediate_values) == [2, 4, 6, 8, 10]
    assert bad.state.name == "PRUNED" and bad.user_attrs["pruned_at"] < 12
    assert all(bad.intermediate_values[s] < good.intermediate_values[s] for s in bad.intermediate_values)


# ------------------------------------------------------------------------------------------- PostgreSQL
def _postgres_url():
    """``L2SP_TEST_POSTGRES_URL`` (set by .ci/run), else a PostgreSQL already installed here, started by
    .ci/postgres.sh (root, nothing installed); the test is skipped only where neither gives a server."""
    url = os.environ.get("L2SP_TEST_POSTGRES_URL")
    script = Path(__file__).resolve().parents[1] / ".ci" / "postgres.sh"
    if not url and script.is_file():
        r = subprocess.run(["bash", str(script)], env={**os.environ, "L2SP_PG_INSTALL": "0"}, capture_output=True,
                           text=True, timeout=60)
        url = r.stdout.strip() if r.returncode == 0 else None
    if not url:
        pytest.skip("no PostgreSQL server could be started (.ci/run installs one and sets L2SP_TEST_POSTGRES_URL)")
    try:
        import sqlalchemy

        with sqlalchemy.create_engine(url).connect():
            pass
    except Exception as exc:  # driver missing, server down
        pytest.skip(f"PostgreSQL at {url.split('@')[-1]} not reachable: {str(exc).strip().splitlines()[0]}")
    return url


@pytest.mark.slow
def test_two_workers_share_a_postgresql_study(cfg, tmp_path):
    url = _postgres_url()
    name = f"l2sp-test-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "pg"
    argv = [str(cfg), "optim.steps=2", "--grid", "reg.alpha=0.01,0.1,1", "--storage", url, "--study", name,
            "--out", str(out), "--workers", "2", "-q"]
    try:
        assert run_cli(argv) == 0
        study = optuna.load_study(study_name=name, storage=url)
        done = completed(study)
        assert sorted(trial_params(t)["reg.alpha"] for t in done) == [0.01, 0.1, 1]
        assert not (out / "study.db").exists()
        assert run_cli(argv) == 0  # continues: nothing left to run
        trials = optuna.load_study(study_name=name, storage=url).trials
        # a worker finding the queue emptied by the other in the same instant leaves a trial without values
        assert len([t for t in trials if trial_params(t)]) == 3 == len(trials) - len(
            [t for t in trials if "l2sp:spare" in t.user_attrs])
        rows = list(csv.DictReader((out / "search.csv").open()))
        assert len(rows) == 3 and not any(math.isnan(float(r["val_acc"])) for r in rows)
    finally:
        optuna.delete_study(study_name=name, storage=url)
