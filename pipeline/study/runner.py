"""Running the study's runs: each one a normal `python -m pipeline STAGE --config OUT/configs/...yaml`
in its own process, under the run contract (pipeline/rundir.py): every config is checked before
any run starts (`check_config`), a finished run is reused without starting its process, and with
`jobs` > 1 a run starts once the runs whose outputs it reads have finished (`waits_on`).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from pipeline import rundir, stages
from pipeline.config import UserError, load_config
from pipeline.study.grid import Run

log = logging.getLogger(__name__)


def check_config(run: Run) -> None:
    """Write the run's config and load it as its stage will, so that a bad key, or a config its
    output_dir's record would refuse (pipeline/rundir.py), stops the study before the first run."""
    run.path.parent.mkdir(parents=True, exist_ok=True)
    run.path.write_text(yaml.safe_dump(run.config, sort_keys=False))
    module, cfg = stage_config(run)
    try:
        rundir.check_unchanged(cfg, run.stage, module.FREE_KEYS)
    except UserError as err:
        raise UserError(f"{run.stage} run {run.name}: {err}") from None


def stage_config(run: Run) -> tuple[Any, Any]:
    """The stage module and the run's config, loaded as `python -m pipeline STAGE` loads it."""
    module, cls = stages.stage(run.stage)
    try:
        return module, load_config(cls, run.path)
    except UserError as err:
        raise UserError(f"{run.stage} run {run.name} ({run.path}): {err}") from None


def execute(run: Run, log_file: Path | None = None, threads: int | None = None) -> None:
    """Run one stage in its own process, unless its output_dir holds this very run finished
    (rundir.finished: same config, same inputs); its output to `log_file` and `threads` CPU
    threads when runs share the machine. A stage resumes or reuses what it can by itself."""
    module, cfg = stage_config(run)
    if rundir.finished(cfg, run.stage, module.inputs(cfg)):
        log.info(f"==> {run.stage} {run.name}: done, reused")
        return
    command = [sys.executable, "-m", "pipeline", run.stage, "--config", str(run.path)]
    log.info(f"\n==> {run.stage} {run.name}: {' '.join(command)}" + (f" > {log_file}" if log_file else ""))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    if log_file:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with log_file.open("w") as sink:
            code = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, env=env).returncode
    else:
        sys.stdout.flush()
        code = subprocess.run(command, env=env).returncode
    if code:
        where = f"see {log_file}" if log_file else "its error is above"
        raise UserError(f"{run.stage} run {run.name} failed (exit status {code}; {where}): fix it and rerun the "
                        "study, finished runs are reused")


def execute_parallel(runs: list[Run], jobs: int, logs: Path) -> None:
    """`jobs` runs at a time; a run starts once every run whose output_dir its config names
    (traces, init, teacher, peer, the student it continues) has finished."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    needs = waits_on(runs)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    finished: set[tuple[str, str]] = set()
    waiting, running = list(runs), {}
    with ThreadPoolExecutor(jobs) as pool:
        while waiting or running:
            for run in [r for r in waiting if needs[(r.stage, r.name)] <= finished][: jobs - len(running)]:
                waiting.remove(run)
                running[pool.submit(execute, run, logs / f"{run.stage}-{run.name}.log", threads)] = run
            if not running:
                raise UserError("study runs wait on each other in a cycle: " + ", ".join(r.name for r in waiting))
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                future.result()  # a failed run stops the study (the others finish first)
                run = running.pop(future)
                finished.add((run.stage, run.name))


def waits_on(runs: list[Run]) -> dict[tuple[str, str], set[tuple[str, str]]]:
    """(stage, name) -> the runs whose output_dir its config names."""
    outputs = {r.config["output_dir"]: (r.stage, r.name) for r in runs}
    return {(r.stage, r.name): {outputs[v] for v in _strings(r.config) if v in outputs} - {(r.stage, r.name)}
            for r in runs}


def _strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    if not isinstance(value, str):
        return []
    path = value.split("=", 1)[-1]  # eval's "name=path", and its ensembles "name=a+b"
    return [value, path, *path.split("+")]
