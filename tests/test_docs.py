"""README.md and docs/ state what exists: links resolve, `make X` is a Makefile target, `python -m pipeline X
--key` is a command and a key of its config, docs/config.md is what `make docs` writes, and every command
shown is run by a test (or marked as needing a GPU or a cluster). Fast: no engine, no process.
"""

from __future__ import annotations

import ast
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

# Each command the docs show -> the tests that run it: "tests/FILE.py::test_name" (comma-separated), then
# optionally " (a note)": what no test here can run (a GPU, a cluster) goes in the note. A row is a command
# name or a longer start of a shown line (the longest row that starts the line is its row), so a line
# that runs a config of its own names the test of that config. A command shown in README.md or docs/
# with no row fails test_every_shown_command_has_a_test, and a row that names no test function fails
# test_every_row_names_real_tests: add the test, then the row.
RUN_BY = {
    "make demo": "tests/test_make.py::test_make_demo_quick_distilled_student_beats_the_untrained_one",
    "make test": "tests/test_make.py::test_make_test_fast_is_the_suite_without_its_slow_tests (what it selects; "
                 "CI runs it whole)",
    "make test-fast": "tests/test_make.py::test_make_test_fast_is_the_suite_without_its_slow_tests",
    "make lint": "tests/test_layout.py::test_ruff_passes_on_the_source_tree (the same `ruff check .`)",
    "make docs": "tests/test_docs.py::test_config_reference_is_generated (what it writes)",
    "make install": "tests/test_make.py::test_make_install_again_does_nothing (a fresh install: CI)",
    "make generate": "tests/test_make.py::test_stages_alone_in_readme_order",
    "make sft": "tests/test_make.py::test_stages_alone_in_readme_order (multi-GPU recipes: GPU only)",
    'make sft ARGS="--kd online --teacher prompts/arithmetic/teacher --feature_kd true --relation_kd true':
        "tests/test_distill.py::test_feature_and_relational_kd_train_beside_the_logit_term_and_resume",
    'make sft ARGS="--generations 2':
        "tests/test_distill.py::test_born_again_generations_each_learn_from_the_one_before",
    'make sft ARGS="--kd online --teacher_server': "tests/test_onpolicy.py::test_one_server_serves_two_runs_at_once",
    "make eval": "tests/test_make.py::test_stages_alone_in_readme_order",
    'make eval ARGS="--models gens=': "tests/test_eval.py::test_an_ensemble_is_scored_and_its_samples_reused",
    "make onpolicy": "tests/test_make.py::test_stages_alone_in_readme_order",
    'make onpolicy ARGS="--model runs/q/student-sft --teacher null --teacher_server':
        "tests/test_onpolicy.py::test_served_teacher_equals_the_local_one_at_full_top_k (a tiny teacher served on "
        "CPU; on GPUs: GPU only)",
    'make onpolicy ARGS="--model runs/q/student-sft --teacher meta-llama/':
        "tests/test_onpolicy.py::test_distillation_across_tokenizers_on_and_off_policy (two tiny tokenizers that "
        "differ; an 8B teacher: GPU only)",
    "make teacher": "tests/test_make.py::test_make_teacher_trains_then_scores",
    "make study": "tests/test_make.py::test_make_study_reduced",
    "make methods": "tests/test_make.py::test_make_study_reduced[methods]",
    "make shrink": "tests/test_make.py::test_stages_alone_in_readme_order",
    "make curate": "tests/test_make.py::test_stages_alone_in_readme_order",
    "make bench": "tests/test_make.py::test_make_bench_quick",
    "make test-gpu": "tests/test_gpu_check.py::test_make_test_gpu_is_skipped_without_cuda_and_needs_no_install, "
                     "tests/test_gpu_check.py::test_smoke_kd_step_and_precision_write_their_figures (on a GPU: by "
                     "hand, docs/scaling.md)",
    "make gpu-wheels": "tests/test_gpu_check.py::test_gpu_wheels_asks_pip_for_the_venvs_versions (pip's downloads "
                       "need PyPI: by hand)",
    "python -m pipeline demo": "tests/test_make.py::test_make_demo_quick_distilled_student_beats_the_untrained_one",
    "python -m pipeline generate": "tests/test_make.py::test_stages_alone_in_readme_order, "
                                   "tests/test_generate.py::test_sweep_rows_columns_ids_and_files (recipes: GPU only)",
    "python -m pipeline curate": "tests/test_curate.py::test_curate_stage_alone_rescoring_an_existing_traces_dir",
    "python -m pipeline shrink": "tests/test_make.py::test_stages_alone_in_readme_order",
    "python -m pipeline sft": "tests/test_make.py::test_stages_alone_in_readme_order, "
                              "tests/test_onpolicy.py::test_one_server_serves_two_runs_at_once (recipes, SLURM: GPU "
                              "only, needs a cluster)",
    "python -m pipeline onpolicy": "tests/test_onpolicy.py::test_two_processes_share_the_prompts (server mode: GPU "
                                   "only)",
    "python -m pipeline eval": "tests/test_make.py::test_stages_alone_in_readme_order (recipes: GPU only)",
    "python -m pipeline study": "tests/test_make.py::test_make_study_reduced",
    "python -m pipeline teacher": "tests/test_make.py::test_make_teacher_trains_then_scores",
    "python -m pipeline gates":
        "tests/test_gates.py::test_the_shipped_keyed_teacher_is_strong_has_choices_and_fixes_slips",
    "python -m pipeline tiny": "tests/test_sft.py::test_bad_inputs_fail_with_their_message (builds a model with it)",
    "python prompts/arithmetic/make.py":
        "tests/test_prompts.py::test_shipped_splits_are_disjoint_and_made_by_the_script[arithmetic]",
    "python prompts/keyed/make.py": "tests/test_gates.py::test_the_shipped_rows_are_what_make_py_writes",
    "python prompts/sums/make.py":
        "tests/test_prompts.py::test_shipped_splits_are_disjoint_and_made_by_the_script[sums]",
    "vllm serve": "tests/test_onpolicy.py::test_served_teacher_equals_the_local_one_at_full_top_k (a tiny teacher "
                  "on CPU; a real one: GPU only)",
    "accelerate launch": "tests/test_sft.py::test_a_killed_run_resumes_from_its_last_checkpoint_on_two_processes, "
                         "tests/test_sft.py::test_two_machines_through_accelerate_multi_node_launch (FSDP/ZeRO-3 on "
                         "GPUs: GPU only)",
}
_REF = r"tests/\w+\.py::\w+(?:\[[^\]]+\])?"
_ROW = re.compile(rf"{_REF}(?:, {_REF})*(?: \(.+\))?")

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


# A path on the machine the docs were written on, not in the repository: absolute (/work/, /home/, /tmp/ ...),
# a home directory (~/, $HOME) or a sibling of the clone (../shared, ../.library). A placeholder such as
# /path/to/ is a reader's own path and allowed; a URL's path is preceded by its host, so it never matches.
_OUTSIDE = re.compile(r"(?<![\w.:/-])(?:/(?:work|home|root|opt|tmp|mnt|scratch|srv|data|usr|var|Users)/"
                      r"|~/|\$HOME\b|\.\./(?:shared|\.library)\b)")


def test_no_path_outside_the_repository() -> None:
    for page in PAGES:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            found = _OUTSIDE.search(line.replace("/path/to/", ""))
            assert not found, f"{page.name}:{number}: {found.group(0)!r} is outside the repository: {line.strip()}"


def test_the_outside_path_check_sees_one() -> None:
    """(A check that cannot fail proves nothing.)"""
    for line in ("cd /work/main", "see /tmp/x", "`~/models`", "../.library/x", "ls ../shared", "$HOME/.cache"):
        assert _OUTSIDE.search(line), line
    for line in ("https://host/home/x", "runs/demo/traces", "/path/to/your/model", "prompts/sums/make.py"):
        assert not _OUTSIDE.search(line.replace("/path/to/", "")), line


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


def run_by_row(line: str) -> str | None:
    """The RUN_BY row of a shown command line: the longest row that starts it."""
    line, name = re.sub(r"^(?:python )?-m pipeline", "python -m pipeline", line), command_name(line)
    rows = [row for row in RUN_BY if row == name or (len(row) > len(name) and line.startswith(row))]
    return max(rows, key=len, default=None)


def test_every_shown_command_has_a_test() -> None:
    missing = sorted({f"{command_name(line)} ({page})" for page, line in shown_commands() if run_by_row(line) is None})
    assert not missing, f"commands shown with no row in RUN_BY: {missing}"


def defined_tests(path: Path) -> set[str]:
    return {node.name for node in ast.parse(path.read_text()).body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_")}


def test_every_row_names_real_tests() -> None:
    """Each RUN_BY row names test functions that exist (free text only as a note after them)."""
    for command, row in RUN_BY.items():
        assert _ROW.fullmatch(row), f"RUN_BY[{command!r}] = {row!r}: name tests/FILE.py::test_name first, then (a note)"
        for ref in re.findall(_REF, row.split(" (")[0]):
            file, name = ref.split("::")
            param = re.search(r"\[(.+)\]$", name)
            name = name.split("[")[0]
            assert (ROOT / file).is_file(), f"RUN_BY[{command!r}]: no {file}"
            assert name in defined_tests(ROOT / file), f"RUN_BY[{command!r}]: {file} defines no {name}"
            if param:
                assert f'"{param.group(1)}"' in (ROOT / file).read_text(), f"RUN_BY[{command!r}]: no [{param.group(1)}]"


def test_the_row_check_refuses_free_text() -> None:
    """(A check that cannot fail proves nothing.)"""
    assert not _ROW.fullmatch("none yet") and not _ROW.fullmatch("CI runs it")
    assert not _ROW.fullmatch("tests/test_make.py (make demo runs it)")
    assert _ROW.fullmatch("tests/test_make.py::test_make_study_reduced[methods] (a note)")
    assert "test_nothing_by_this_name" not in defined_tests(ROOT / "tests/test_make.py")


def test_config_reference_is_generated() -> None:
    assert (ROOT / "docs" / "config.md").read_text() == config_reference(), "docs/config.md is stale: make docs"
