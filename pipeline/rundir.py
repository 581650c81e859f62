"""The run contract: every output_dir says how it was made, and a rerun either continues that
very run or is refused. Every stage (generate, curate, shrink, sft, onpolicy, eval) and the
study command go through `open_run`.

    output_dir/config.yaml   the resolved config; it loads as a config file (--config output_dir/config.yaml)
    output_dir/run.json      the record: stage, status (running or complete), fingerprints of the
                             inputs (model files, traces, prompt sets), seconds, and each resume
                             that changed a free key (old and new value)
    output_dir/.lock         held while a run writes here: a second run into it at once is refused

A start finds one of:
- no output_dir, or an empty one: a new run;
- a record with the same result keys and inputs: complete, the stage reuses what is there and
  does nothing; running (a killed run), the stage resumes it (shards, checkpoints, samples);
- a record whose result keys or inputs differ: refused before any work, in one line naming each
  change with its old and new value;
- files but no record (made before this contract, or by something else): refused;
- a record of a run that stopped before it wrote anything else: a new run;
and `--overwrite` on the command line deletes what is there and starts again.

Result keys are all config keys but the stage's `free` ones, which change how fast or how
visibly a run goes and never what it makes (engine memory, save_steps, logging, replicas).
Training stages compare the global batch instead of its factors (per-device batch, gradient
accumulation, processes): a resume may go from 1 to 2 processes at the same global batch.
A stage that writes into another stage's output_dir (curate into generate's) keeps its own
record beside it under its own name (curate.run.json, curate.config.yaml).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from pipeline.config import UserError, config_to_dict, save_config, setting

log = logging.getLogger(__name__)

HASHED_BYTES = 16 << 20  # files up to this size are fingerprinted by content, larger ones by size and mtime
# Left out of a directory's fingerprint: what a later stage may write beside a model (eval's
# scores in README.md), run records, locks, caches and intermediate checkpoints.
UNFINGERPRINTED = ("README.md",)


@dataclass
class RunKeys:
    """Keys every stage has."""

    overwrite: bool = setting(False, "delete what output_dir holds and start again (command line only, so that "
                                     "rerunning a config file never deletes finished work)", cli_only=True)


@dataclass
class Run:
    """An output_dir opened for a stage. `complete`: it was finished by this very config and
    these inputs, so the stage has nothing to do; else the stage (re)starts or resumes in it."""

    out: Path
    record: dict[str, Any]
    complete: bool
    resumed: bool
    is_main: bool
    name: str = "run"

    def elapsed(self) -> float:
        """Seconds the run has taken so far, earlier sessions of a resumed run included."""
        return self.record.get("seconds", 0) + time.time() - self.record.get("_started", time.time())

    def finish(self, config: Any = None, inputs: dict[str, Any] | None = None, **facts: Any) -> None:
        """Mark the run complete (facts: what the stage wants said beside it) and release the lock.
        `config` and `inputs`: what config.yaml and the record now hold, where they may grow from one
        run to the next (eval's models: only the inputs open_run was given are compared)."""
        if self.is_main:
            if inputs is not None:
                self.record["inputs"] = inputs
            if config is not None:
                save_config(config, files(self.out, self.name)[1])
            seconds = round(self.elapsed(), 1)
            self.record.pop("_started", None)
            self.record.update(status="complete", seconds=seconds, **facts)
            _write_json(files(self.out, self.name)[0], self.record)
            _release(files(self.out, self.name)[2])


def open_run(cfg: Any, stage: str, inputs: dict[str, str | None], free: Iterable[str] = (), *,
             derived: dict[str, Any] | None = None, name: str = "run", output_dir: str | Path | None = None,
             reuse: bool = True) -> Run:
    """Open cfg.output_dir (or `output_dir`) for `stage`: check it against its record, lock it,
    record this run. `inputs`: fingerprints (see `fingerprint`) of what the run reads; `derived`:
    result values computed from the config (a training run's global batch); `reuse`: False for a
    stage that always runs again on a finished record (eval: its models may change, each model's
    own run reuses its samples). Under N processes the main one decides and writes; the others
    wait for it and read its record."""
    out = Path(output_dir or cfg.output_dir)
    is_main, wait = _processes(cfg)
    record_path = files(out, name)[0]
    wanted = {"stage": stage, "config": {**result_keys(cfg, free), **(derived or {})}, "inputs": inputs}
    if is_main:
        record = _start(out, record_path, wanted, set(free), cfg, stage, name, reuse)
    wait()
    if not is_main:
        record = json.loads(record_path.read_text())
    complete = record.get("status") == "complete"
    return Run(out, record, complete=complete, resumed=not complete and bool(record.get("resumes")),
               is_main=is_main, name=name)


def files(out: Path, name: str = "run") -> tuple[Path, Path, Path]:
    """(record, config, lock) of the run `name` in `out`: run.json, config.yaml, .run.lock, or
    NAME.run.json, NAME.config.yaml, .NAME.lock for a stage writing into another's output_dir."""
    if name == "run":
        return out / "run.json", out / "config.yaml", out / ".run.lock"
    return out / f"{name}.run.json", out / f"{name}.config.yaml", out / f".{name}.lock"


def result_keys(cfg: Any, free: Iterable[str] = ()) -> dict[str, Any]:
    """The config keys a rerun must keep: every key but output_dir and the `free` ones."""
    skip = {"output_dir", *free}
    return {k: v for k, v in config_to_dict(cfg).items() if k not in skip}


def check_unchanged(cfg: Any, stage: str, free: Iterable[str] = (), *, output_dir: str | Path | None = None) -> None:
    """Refuse now a config that its output_dir's record would refuse at start (the study checks
    every run this way before running any); inputs are compared when the stage itself starts."""
    out = Path(output_dir or cfg.output_dir)
    record_path = files(out)[0]
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("status") == "running" and not _work_in(out):
            return  # it stopped before making anything: it starts as asked
        wanted = {"stage": stage, "config": result_keys(cfg, free), "inputs": record.get("inputs", {})}
        changes = _changes(record, wanted, set(free), compare_derived=False)
        if changes:
            raise UserError(_refusal(out, changes))


def finished(cfg: Any, stage: str, inputs: dict[str, Any]) -> bool:
    """True when output_dir holds a complete run of this very config, free keys and all, from these
    inputs: there is nothing to run (the study skips such runs without starting their process)."""
    record_path = files(Path(cfg.output_dir))[0]
    if not record_path.is_file():
        return False
    record = json.loads(record_path.read_text())
    made = {**record.get("config", {}), **record.get("free", {})}
    return (record.get("status") == "complete" and record.get("stage") == stage and record.get("inputs") == inputs
            and all(made.get(k) == v for k, v in result_keys(cfg).items()))


# ---------------------------------------------------------------------------- the record

def _start(out: Path, record_path: Path, wanted: dict[str, Any], free: set[str], cfg: Any, stage: str,
           name: str, reuse: bool) -> dict[str, Any]:
    _, config_path, lock = files(out, name)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file; pick a directory")
    if getattr(cfg, "overwrite", False) and out.exists():
        _refuse_if_locked(lock)
        if name == "run":
            shutil.rmtree(out)
        else:  # only this stage's record: the directory is another stage's
            record_path.unlink(missing_ok=True)
        log.info(f"--overwrite: {out} {'deleted' if name == 'run' else f'({name} record) reset'}, starting again")
    out.mkdir(parents=True, exist_ok=True)
    _lock(lock)
    saved = json.loads(record_path.read_text()) if record_path.is_file() else None
    if saved is not None and saved.get("status") == "running" and name == "run" and not _work_in(out):
        saved = None  # it stopped before making anything (a bad input, say): start it as asked now
    if saved is None and name == "run" and _work_in(out):
        _release(lock)
        raise UserError(f"output_dir {out} holds files but no {record_path.name}: it was made before runs were "
                        "recorded, or by something else; pick another output_dir, or pass --overwrite on the "
                        "command line to delete it and start again")
    if saved is None:
        record = {**wanted, "status": "running", "created": _now(), "seconds": 0.0}
        save_config(cfg, config_path)
    else:
        changes = _changes(saved, wanted, free)
        if changes:
            _release(lock)
            raise UserError(_refusal(out, changes))
        record = saved
        if saved.get("status") == "complete" and reuse:
            _release(lock)
            return record
        before = saved.get("free", {})
        moved = {k: [before.get(k), v] for k, v in config_to_dict(cfg).items() if k in free and before.get(k) != v}
        record.setdefault("resumes", []).append({"at": _now(), **({"changed": moved} if moved else {})})
        if saved["status"] == "running":
            log.info(f"{out}: resuming an unfinished {stage} run")
        record["status"] = "running"
    record["free"] = {k: v for k, v in config_to_dict(cfg).items() if k in free}
    _write_json(record_path, record)
    record["_started"] = time.time()
    return record


def _work_in(out: Path) -> bool:
    """Whether a run left anything in `out` besides its record, config and lock."""
    return any(p.name not in {f.name for f in files(out)} for p in out.iterdir())


def _changes(saved: dict[str, Any], wanted: dict[str, Any], free: set[str], compare_derived: bool = True) -> list[str]:
    """'key: old -> new' for each result key or input that differs."""
    if saved.get("stage") != wanted["stage"]:
        return [f"stage: {saved.get('stage')} -> {wanted['stage']}"]
    old, new = saved.get("config", {}), wanted["config"]
    keys = sorted(k for k in old.keys() | new.keys() if k not in free and old.get(k) != new.get(k)
                  and (compare_derived or k in new))
    changes = [f"{k}: {_show(old.get(k))} -> {_show(new.get(k))}" for k in keys]
    old_inputs, new_inputs = saved.get("inputs", {}), wanted["inputs"]
    changes += [f"{k} (its files changed): {_show(old_inputs.get(k))} -> {_show(new_inputs.get(k))}"
                for k in sorted(new_inputs) if old_inputs.get(k) != new_inputs.get(k)]
    return changes


def _refusal(out: Path, changes: list[str]) -> str:
    return (f"output_dir {out} was made with other settings ({'; '.join(changes)}): pick another output_dir, or pass "
            "--overwrite on the command line to delete it and start again")


def _show(value: Any) -> str:
    if isinstance(value, str) and value.startswith("sha256:"):
        return value[:19]  # enough to tell two fingerprints apart
    return repr(value)


def _write_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({k: v for k, v in value.items() if not k.startswith("_")}, indent=2) + "\n")
    os.replace(tmp, path)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ---------------------------------------------------------------------------- one run at a time

def _lock(path: Path) -> None:
    """Take the directory's lock, or refuse: a live run (this host) holds it. A lock left by a
    killed run (its process is gone) is taken over."""
    mine = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            _refuse_if_locked(path)
            path.unlink(missing_ok=True)  # stale
            continue
        with os.fdopen(fd, "w") as f:
            f.write(mine)
        atexit.register(_release, path)
        return
    raise UserError(f"could not lock {path}: another run keeps taking it")


def _refuse_if_locked(path: Path) -> None:
    if not path.is_file():
        return
    host, _, pid = path.read_text().partition(" ")
    if host != socket.gethostname():
        raise UserError(f"{path.parent} is locked by a run on {host} (pid {pid}): wait for it, or delete {path} "
                        "if no run is writing there")
    if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
        raise UserError(f"{path.parent} is being written by another run (pid {pid}); wait for it to finish or "
                        "pick another output_dir")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _release(path: Path) -> None:
    try:
        if path.read_text() == f"{socket.gethostname()} {os.getpid()}":
            path.unlink()
    except OSError:
        pass


def _processes(cfg: Any) -> tuple[bool, Callable[[], None]]:
    """(is this the main process, a barrier). One process needs neither torch nor a group."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return True, lambda: None
    if hasattr(type(cfg), "_setup_devices"):
        cfg.device  # noqa: B018 (TrainingArguments makes the process group with its own settings)
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return state.is_main_process, state.wait_for_everyone


# ---------------------------------------------------------------------------- fingerprints

def fingerprint(source: str | Path | None) -> str | None:
    """What a model, traces or prompt set is, for the record: a hub id stands for itself; a local
    file or directory is the hash of its files' names and contents (a file over 16 MB: its size
    and mtime, as hashing gigabytes of weights on every run would cost more than it saves). Left
    out: README.md (eval may write scores there), run records and locks, dot-files, the cache
    files `datasets` writes beside a dataset it maps, and checkpoint-* folders (a training run's
    intermediate states)."""
    if source is None:
        return None
    path = Path(source)
    if not path.exists():
        return str(source)  # a hub id (a missing local path is the stage's error to give)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(
        f for f in path.rglob("*") if f.is_file() and not _skipped(f.relative_to(path)))
    for f in files:
        stat = f.stat()
        digest.update(f"\0{f.relative_to(path) if f != path else f.name}\0{stat.st_size}\0".encode())
        if stat.st_size <= HASHED_BYTES:
            digest.update(f.read_bytes())
        else:
            digest.update(str(stat.st_mtime_ns).encode())
    return "sha256:" + digest.hexdigest()


def _skipped(relative: Path) -> bool:
    name = relative.name
    cache = name.startswith("cache-") and name.endswith(".arrow")  # `datasets` writes a reader's map() beside the data
    return (name in UNFINGERPRINTED or name.endswith(("run.json", ".tmp")) or cache
            or any(p.startswith(".") or p.startswith("checkpoint-") for p in relative.parts))


def prompt_set_fingerprint(prompt_set: str | None) -> str | None:
    """A prompt set's files: its folder's set.yaml and splits (not a model kept inside it), or the file."""
    if prompt_set is None:
        return None
    path = Path(prompt_set)
    if path.is_dir() and (path / "set.yaml").is_file():
        digest = hashlib.sha256()
        for f in sorted(p for p in path.iterdir() if p.is_file() and p.name != "README.md"):
            digest.update(f"\0{f.name}\0".encode() + f.read_bytes())
        return "sha256:" + digest.hexdigest()
    return fingerprint(prompt_set)
