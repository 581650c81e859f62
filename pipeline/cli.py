"""The one command line: `python -m pipeline COMMAND [--config FILE] [--key value ...]`.

Every command's keys come from its config dataclass, and so does `--help` (each field's default
and the one line of help in its metadata). A user error (`UserError`: a bad key, value, file,
a refused rerun, a mismatched tokenizer) prints one line and exits with status 2 in every
command; a traceback means a bug.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import sys
from typing import Any

from pipeline.config import UserError, load_config, parse_cli
from pipeline.stages import STAGES

# command -> (module, config class, what it does); a module is imported only when its command runs.
COMMANDS = {
    **STAGES,
    "study": ("pipeline.study", "StudyConfig", "a grid of runs read back as one table and plot"),
    "gates": ("pipeline.study.gates", "GatesConfig", "is a teacher strong enough for a study: the bench's gates"),
    "teacher": ("pipeline.demo.teacher", "TeacherConfig", "train the demo teacher on a prompt set's solutions"),
    "demo": ("pipeline.demo", "DemoConfig", "generate -> two students -> eval, on a CPU in minutes"),
    "tiny": ("pipeline.demo.tiny", "TinyConfig", "save a tiny random Qwen2/Llama model and tokenizer"),
}
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def main(argv: list[str] | None = None) -> Any:
    """Run a command; a UserError is one line on stderr and exit status 2."""
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except UserError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)  # one line, whatever a library wrote
        sys.exit(2)


def run(argv: list[str]) -> Any:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return None
    if argv[0] not in COMMANDS:
        raise UserError(f"unknown command {argv[0]!r}; the commands: {', '.join(COMMANDS)} (python -m pipeline --help)")
    module_name, class_name, _ = COMMANDS[argv[0]]
    module = importlib.import_module(module_name)
    cls = getattr(module, class_name)
    if any(a in ("-h", "--help") for a in argv[1:]):
        print(help_text(argv[0], cls, module.__doc__ or ""))
        return None
    config_path, overrides = parse_cli(argv[1:])
    setup_logging(overrides, cls)
    load = getattr(module, "load", load_config)  # the study lays its reduced version under the command line
    return module.main(load(cls, config_path, overrides))


def setup_logging(overrides: dict[str, Any], cls: type) -> None:
    """The `pipeline` loggers print on the main process; `--log_level all` on every process (each
    line then says its rank), another level sets how much. A training stage's own `log_level`
    (transformers') also receives the level."""
    level = str(overrides.get("log_level", "info")).lower()
    keeps = "log_level" in {f.name for f in dataclasses.fields(cls)}
    if level == "all" or not keeps:
        overrides.pop("log_level", None)
    if level not in (*LOG_LEVELS, "all"):
        if not keeps:
            raise UserError(f"--log_level {level!r}: accepted values: all, {', '.join(LOG_LEVELS)}")
        level = "info"  # one of transformers' own (passive, detail)
    rank = int(os.environ.get("RANK", "0"))
    logger = logging.getLogger("pipeline")
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s" if level == "all" else "%(message)s"))
    logger.addHandler(handler)
    quiet = rank != 0 and level != "all"
    logger.setLevel(logging.WARNING if quiet else logging.INFO if level == "all" else level.upper())


# ---------------------------------------------------------------------------- help

def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m pipeline COMMAND [--config FILE] [--key value ...]", "",
             "r1-distill: sequence-level and logit distillation of reasoning models.", "", "stages:"]
    for name, (_, _, what) in COMMANDS.items():
        if name == "study":
            lines += ["", "around them:"]
        lines.append(f"  {name:<{width}}  {what}")
    lines += ["", "python -m pipeline COMMAND --help lists every key of a command with its default.",
              "Every command also takes --overwrite (start its output_dir again) and --log_level all|info|...; "
              "a user error prints one line and exits with status 2."]
    return "\n".join(lines)


def help_text(command: str, cls: type, doc: str) -> str:
    """Every key of `cls`: the project's own first, then each library class's, in MRO order."""
    lines = [f"usage: python -m pipeline {command} [--config FILE] [--key value ...]", "",
             doc.strip().splitlines()[0] if doc.strip() else "", ""]
    for title, fields in key_groups(cls):
        lines.append(f"{title}:")
        for f in fields:
            lines.append(f"  --{f.name:<30} {_default(f):<16} {_help(f)}".rstrip())
        lines.append("")
    lines.append("--config FILE: a YAML file of these keys; --key value on the command line wins over it. "
                 "--log_level all: every process logs.")
    return "\n".join(lines)


def key_groups(cls: type) -> list[tuple[str, list[dataclasses.Field]]]:
    """(title, fields) per defining class: r1-distill's keys, then TRL's, transformers' ..."""
    groups: dict[type, list[dataclasses.Field]] = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        owner = next(c for c in cls.__mro__ if f.name in c.__dict__.get("__annotations__", {}))
        groups.setdefault(owner, []).append(f)
    ours = [f for owner, fs in groups.items() if owner.__module__.startswith("pipeline") for f in fs]
    out = [("r1-distill keys", ours)] if ours else []
    for owner, fs in groups.items():
        if not owner.__module__.startswith("pipeline"):
            out.append((f"{owner.__name__} keys ({owner.__module__.split('.')[0]})", fs))
    return out



def config_reference() -> str:
    """docs/config.md (`make docs`): every command's keys, one section each. The project's keys are a
    table of default and help; a library class's keys are listed by name, its own docs give the rest
    (their defaults and help change with the library's version, this page should not)."""
    lines = ["# Config reference", "",
             "Generated by `make docs` from the config dataclasses (`python -m pipeline COMMAND --help` prints "
             "the same keys with every library key's default). Every key is a YAML key of `--config FILE` and "
             "a `--key value` flag; every command also takes `--overwrite` and `--log_level`.", ""]
    for command, (module_name, class_name, what) in COMMANDS.items():
        cls = getattr(importlib.import_module(module_name), class_name)
        lines += [f"## {command}", "", f"`python -m pipeline {command}`: {what}.", ""]
        for title, fields in key_groups(cls):
            if title == "r1-distill keys":
                lines += ["| key | default | help |", "|---|---|---|"]
                lines += [f"| `{f.name}` | `{_default(f)}` | {_help(f).replace('|', '/')} |" for f in fields]
            else:
                owner = title.split()[0]
                lines.append(f"{title}, see the library's documentation of `{owner}`: "
                             + ", ".join(f"`{f.name}`" for f in fields) + ".")
            lines.append("")
    return "\n".join(lines)

def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    text = getattr(value, "value", value)  # enums
    return str(text) if not isinstance(text, str) or text else '""'


def _help(f: dataclasses.Field) -> str:
    text = " ".join(str(f.metadata.get("help", "")).split())
    if len(text) > 110:  # libraries' help runs to paragraphs: its first sentence
        text = text[:110].rsplit(" ", 1)[0] + " ..."
    return text
