"""README.md and docs/ state what exists: links resolve, `make X` is a Makefile target, `python -m pipeline X
--key` is a command and a key of its config, docs/config.md is what `make docs` writes, and every command
shown is run by a test (or marked as needing a GPU or a cluster). Fast: no engine, no process.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path

import pytest

from pipeline.cli import COMMANDS, config_reference

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
GENERIC = {"config", "overwrite", "log_level", "help"}  # every command takes these (pipeline/cli.py)
MAKE_COMMANDS = {"methods": "study"}  # a make target -> the command its ARGS go to, where the names differ

# Each command the docs show -> the test that runs it, or why none can here. A command shown in README.md or
# docs/ that is not in this table fails test_every_shown_command_has_a_test: add the test, then the row.
RUN_BY = {
    "make demo": "tests/test_make.py::test_make_demo_quick_distilled_student_beats_the_untrained_one",
    "make test": "CI (.ci/run) runs it; no test runs the suite from inside itself",
    "make test-fast": "none yet",
    "make lint": "none yet",
    "make docs": "tests/test_docs.py::test_config_reference_is_generated (what it writes)",
    "make install": "every tests/test_make.py run (the .venv it links in); CI runs it on a fresh machine",
    "make generate": "tests/test_make.py::test_stages_alone_in_readme_order",
    "make sft": "tests/test_make.py::test_stages_alone_in_readme_order (multi-GPU recipes: GPU only)",
    "make eval": "tests/test_make.py::test_stages_alone_in_readme_order",
    "make onpolicy": "tests/test_make.py::test_stages_alone_in_readme_order",
    "make teacher": "tests/test_make.py::test_make_teacher_trains_then_scores",
    "make study": "tests/test_make.py::test_make_study_reduced",
    "make methods": "tests/test_make.py::test_make_study_reduced[methods]",
    "make shrink": "tests/test_make.py::test_stages_alone_in_readme_order",
    "make curate": "none yet",
    "make bench": "tests/test_make.py::test_make_bench_quick",
    "python -m pipeline demo": "tests/test_make.py (make demo runs it)",
    "python -m pipeline generate": "tests/test_generate.py, tests/test_make.py (recipes: GPU only)",
    "python -m pipeline curate": "tests/test_curate.py",
    "python -m pipeline shrink": "tests/test_shrink.py",
    "python -m pipeline sft": "tests/test_sft.py (recipes, SLURM: GPU only, needs a cluster)",
    "python -m pipeline onpolicy": "tests/test_onpolicy.py (server mode: GPU only)",
    "python -m pipeline eval": "tests/test_eval.py (recipes: GPU only)",
    "python -m pipeline study": "tests/test_study.py",
    "python -m pipeline teacher": "tests/test_make.py::test_make_teacher_trains_then_scores",
    "python -m pipeline tiny": "tests/test_demo.py",
    "python prompts/arithmetic/make.py": "tests/test_prompts.py (the shipped splits made again)",
    "python prompts/sums/make.py": "tests/test_prompts.py (the shipped splits made again)",
    "vllm serve": "GPU only (tests/test_onpolicy.py serves a tiny teacher on CPU)",
    "accelerate launch": "tests/test_sft.py (2 processes, 2 machines on one host; FSDP/ZeRO-3 on GPUs: GPU only)",
}

_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
_INLINE = re.compile(r"`([^`\n]+)`")
_COMMAND = re.compile(r"(make [a-z][\w-]*|(?:python )?-m pipeline [a-z]\w*|python prompts/\w+/make\.py"
                      r"|vllm serve|accelerate launch)")


def shown_commands() -> list[tuple[str, str]]:
    """(page, command line) for each command in a code block or inline code span of README.md and docs/."""
    found = []
    for page in PAGES:
        text = page.read_text()
        blocks = [b.replace("\\\n", " ") for b in _FENCE.findall(text)]
        lines = [line for b in blocks for line in b.splitlines()]
        lines += _INLINE.findall(_FENCE.sub("", text))
        for line in lines:
            line = line.split(" # ")[0].strip()
            for match in _COMMAND.finditer(line):
                found.append((page.name, line[match.start():]))
    return found


def command_name(line: str) -> str:
    name = _COMMAND.match(line).group(0)
    return re.sub(r"^(?:python )?-m pipeline", "python -m pipeline", name)


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))


def config_keys(command: str) -> set[str]:
    module_name, class_name, _ = COMMANDS[command]
    return {f.name for f in dataclasses.fields(getattr(importlib.import_module(module_name), class_name))}


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_is_at_most_250_lines() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    text = _FENCE.sub("", page.read_text())
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: link to {target}: no such file"
        assert ROOT in file.parents or file == ROOT, f"{page.name}: link to {target} leaves the repository"
        if anchor and file.suffix == ".md":
            anchors = {slug(h) for h in re.findall(r"^#+ (.*)$", _FENCE.sub("", file.read_text()), re.M)}
            assert anchor in anchors, f"{page.name}: link to {target}: no such heading"


def test_no_path_outside_the_repository() -> None:
    for page in PAGES:
        text = page.read_text()
        assert "../shared" not in text and "/tmp/" not in text, page.name


def test_shown_commands_exist() -> None:
    targets = makefile_targets()
    for page, line in shown_commands():
        name = command_name(line)
        command = None
        if name.startswith("make "):
            assert name[5:] in targets, f"{page}: `{line}`: no Makefile target {name[5:]}"
            command = MAKE_COMMANDS.get(name[5:], name[5:])  # its ARGS go to that command
            line = " ".join(re.findall(r'ARGS="([^"]*)"|ARGS=(\S+)', line)[0]) if "ARGS=" in line else ""
        elif name.startswith("python -m pipeline "):
            command = name.split()[-1]
            assert command in COMMANDS, f"{page}: `{line}`: no command {command} in pipeline.cli.COMMANDS"
        if command in COMMANDS:
            stale = set(re.findall(r"(?<!\S)--(\w+)", line)) - config_keys(command) - GENERIC - {"key"}
            assert not stale, f"{page}: `{line}`: {sorted(stale)} are not keys of {command}"


def test_every_shown_command_has_a_test() -> None:
    missing = {f"{command_name(line)} ({page})" for page, line in shown_commands()} - set(RUN_BY)
    missing = {m for m in missing if m.rsplit(" (", 1)[0] not in RUN_BY}
    assert not missing, f"commands shown with no row in RUN_BY: {sorted(missing)}"


def test_config_reference_is_generated() -> None:
    assert (ROOT / "docs" / "config.md").read_text() == config_reference(), "docs/config.md is stale: make docs"
