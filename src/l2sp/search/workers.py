"""Workers: each takes the next queued (or newly sampled) trial from the study until the search is done. K
workers on one machine are K processes (one torch thread each by default, GPUs assigned round-robin); other
machines run the same command against the same server database."""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from typing import Any

from l2sp.errors import L2SPError
from l2sp.search import study as st
from l2sp.search.spec import SearchSpec
from l2sp.search.trial import TrialRunner


def next_action(spec: SearchSpec, c: dict) -> str:
    """``run`` (a queued trial, or a new one while fewer than ``n_trials`` exist), ``wait`` (only trials
    running elsewhere are left: one of them may die and be queued again), or ``stop``."""
    if c.get("waiting", 0):
        return "run"
    started = c.get("final", 0) + c.get("running", 0)
    if spec.sampler == "tpe" and started < (spec.n_trials or 0):
        return "run"
    return "wait" if c.get("running", 0) else "stop"


def work(spec: SearchSpec, worker: int = 0, task: Any = None, parent: int | None = None, study: Any = None) -> int:
    """Run trials until the study is done; returns how many this worker ran. ``parent``: stop between trials
    once that process is gone; ``study``: the study already opened by this process."""
    import optuna

    study = study if study is not None else st.open_study(spec, worker)
    runner = TrialRunner(spec, task)
    ran = 0
    while parent is None or os.getppid() == parent:
        optuna.storages.fail_stale_trials(study)
        st.fail_orphans(study, 3 * spec.heartbeat)
        action = next_action(spec, st.counts(study))
        if action == "stop":
            break
        if action == "wait":
            time.sleep(min(spec.heartbeat, 5))
            continue
        runner.task()  # the data once per process, and its errors before a trial starts
        study.optimize(runner, n_trials=1, catch=(L2SPError, st.NotQueued), gc_after_trial=False)
        ran += 1
    return ran


def worker_devices(k: int, devices: str | None = None) -> list[str | None]:
    """The CUDA device each of ``k`` workers sees: ``devices`` (``"0,1"`` or ``"cuda:0,cuda:1"``), else
    ``CUDA_VISIBLE_DEVICES``, else every visible GPU, round-robin; None everywhere on a machine without one."""
    if devices:
        ids = [d.strip().removeprefix("cuda:") for d in devices.split(",") if d.strip()]
        if not ids or not all(i.isdigit() for i in ids):
            raise L2SPError(f"--devices {devices!r} should be GPU numbers, e.g. --devices 0,1 (or cuda:0,cuda:1)")
    elif os.environ.get("CUDA_VISIBLE_DEVICES", "").strip():
        ids = [d.strip() for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    else:
        import torch

        ids = [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return [ids[i % len(ids)] if ids else None for i in range(k)]


def _child(spec: SearchSpec, worker: int, device: str | None, threads: int, parent: int) -> None:
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device  # before CUDA starts in this process
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)
    try:
        work(spec, worker, parent=parent)
    except L2SPError as exc:
        print(f"l2sp: error: worker {worker}: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


def run_workers(spec: SearchSpec, k: int, devices: str | None = None, threads: int = 1) -> None:
    """Start ``k`` worker processes (spawned: a clean CUDA state each) and wait for them."""
    if k < 1 or threads < 1:
        raise L2SPError(f"--workers {k} and --threads {threads} must be >= 1")
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_child, args=(spec, i, dev, threads, os.getpid()), name=f"l2sp-search-{i}")
        for i, dev in enumerate(worker_devices(k, devices))
    ]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except BaseException:
        for p in procs:
            p.terminate()
        raise
    bad = [f"worker {i}: exit {p.exitcode}" for i, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise L2SPError(
            f"{len(bad)} of {k} search workers stopped early ({', '.join(bad)}); see their messages above, "
            "then run the same command again to continue the study"
        )
