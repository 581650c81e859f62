"""README.md's config reference states the code's defaults.

Rows of a "## Config reference: <stage>" table read `| `key` | default | meaning |`; a row may
name several keys, `| `a`, `b` | 1, 2 | ... |`, with one default per key in the same order (commas
inside backticks, brackets or parentheses do not split), or a single default shared by all.

How a default cell is read:
- a number (`0 (off)`: a note in parentheses after the value is ignored), `true`/`false`, a
  backticked value (`runs/demo/traces`, `none` the string, `[0.6]` a list) is a literal and must
  equal the dataclass default exactly;
- anything else is words ("none", "all", "the model's", "from set.yaml", "0.9 on GPU, 0.3 on CPU")
  and says the key is unset by default: it matches a None default only.

A stage's keys are looked up in its own section first, then in the sections its section points
to (eval and teacher take generate's prompt-set and engine keys, the teacher every sft key; the
curate stage's keys are the curation table in generate's section). A key no section documents is
left to test_readme_documents_every_config_key.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path
from typing import Any

import pytest

from pipeline.cli import COMMANDS, STAGES
from pipeline.config import parse_yaml

ROOT = Path(__file__).resolve().parents[1]
CLASSES = {name: COMMANDS[name][:2] for name in (*STAGES, "teacher", "study")}
SECTIONS = {"generate": ["generate"], "curate": ["generate"], "sft": ["sft"], "eval": ["eval", "generate"],
            "onpolicy": ["onpolicy", "sft", "generate"],
            "teacher": ["teacher", "sft", "generate"], "study": ["study"], "shrink": ["shrink", "generate"]}
WORDS = None  # what a default written in words stands for
_PART = re.compile(r"(?:`[^`]*`|\[[^\]]*\]|\([^)]*\)|[^,`\[(])+")


def documented_defaults(readme: str, section: str) -> dict[str, list[Any]]:
    """key -> the defaults its rows in "## Config reference: <section>" give (a key may have several rows)."""
    match = re.search(rf"^## Config reference: {section}\n(.*?)(?=^## |\Z)", readme, re.M | re.S)
    assert match, f"README.md has no '## Config reference: {section}' section"
    table: dict[str, list[Any]] = {}
    for line in match.group(1).splitlines():
        if not line.startswith("| `"):
            continue
        keys_cell, default_cell = line.strip("|").split("|")[:2]
        keys = re.findall(r"`([^`]+)`", keys_cell)
        parts = [p.strip() for p in _PART.findall(default_cell) if p.strip()]
        cells = parts if len(keys) > 1 and len(parts) == len(keys) else [default_cell.strip()] * len(keys)
        for key, cell in zip(keys, cells):
            table.setdefault(key, []).append(literal(cell))
    return table


def literal(cell: str) -> Any:
    cell = re.sub(r"\s*\([^)]*\)$", "", cell.strip())  # "0 (off)": the note is not the value
    if re.fullmatch(r"`[^`]*`", cell):
        return parse_yaml(cell[1:-1])
    if cell in ("true", "false"):
        return cell == "true"
    for number in (int, float):
        try:
            return number(cell)
        except ValueError:
            pass
    return WORDS


def test_the_reading_convention() -> None:
    readme = ("## Config reference: x\n\n| key | default | meaning |\n|---|---|---|\n"
              "| `a`, `b`, `c`, `d` | 0 (off), `[all-linear]`, 1e-6, `none` | |\n"
              "| `e`, `f` | from set.yaml, else common names | |\n| `g` | 0.9 on GPU, 0.3 on CPU | |\n"
              "| `h`, `i` | `true`, false | |\n## Next\n| `j` | 1 | |\n")
    assert documented_defaults(readme, "x") == {"a": [0], "b": [["all-linear"]], "c": [1e-6], "d": ["none"],
                                                "e": [None], "f": [None], "g": [None], "h": [True], "i": [False]}


def our_fields(stage: str) -> tuple[str, list[dataclasses.Field]]:
    """The config class's name and the fields this project declares; inherited library ones (TRL's
    SFTConfig) are documented there."""
    module, name = CLASSES[stage]
    cls = getattr(importlib.import_module(module), name)
    ours = {key for base in cls.__mro__ if base.__module__.startswith("pipeline")
            for key in vars(base).get("__annotations__", {})}
    return name, [f for f in dataclasses.fields(cls) if f.name in ours]


@pytest.mark.parametrize("stage", sorted(CLASSES))
def test_readme_documents_every_config_key(stage: str) -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [f.name for f in our_fields(stage)[1] if f"`{f.name}`" not in readme]
    assert not missing, f"README.md's config reference lacks {missing}"


@pytest.mark.parametrize("stage", sorted(CLASSES))
def test_readme_defaults_match_the_code(stage: str) -> None:
    name, fields = our_fields(stage)
    readme = (ROOT / "README.md").read_text()
    tables = [(section, documented_defaults(readme, section)) for section in SECTIONS[stage]]
    wrong = []
    for f in fields:
        found = next(((section, table[f.name]) for section, table in tables if f.name in table), None)
        if found is None:
            continue
        code = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        for doc in found[1]:
            if doc != code or isinstance(doc, bool) != isinstance(code, bool):
                said = "words (unset)" if doc is WORDS else repr(doc)
                wrong.append(f"`{f.name}` in '## Config reference: {found[0]}' says {said}, {name} has {code!r}")
    assert not wrong, ("README.md's config reference disagrees with the code; fix the rows (how a default cell "
                       "is read: tests/test_readme_reference.py's docstring):\n  " + "\n  ".join(wrong))
