"""Prompt sets: a shipped folder (set.yaml + splits), a JSONL/CSV/Parquet file, a local HF
dataset dir, or a hub dataset id, read into `Prompt` records with their columns mapped.

Every problem with the input is reported with the file and the row or column it concerns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import UserError, setting

# A fallback chat template that keeps <think> blocks in assistant turns (`chat_template: chatml`),
# and the tiny test models' own.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Column names tried, in order, when the config and set.yaml map none.
DEFAULT_COLUMNS = {
    "id": ("id", "prompt_id", "problem_id", "unique_id"),
    "prompt": ("prompt", "question", "problem", "input"),
    "answer": ("answer", "reference_answer", "final_answer", "solution"),
    "system": ("system", "system_prompt"),
}
SET_FILE = "set.yaml"


@dataclass
class Prompt:
    id: str
    text: str  # the user message, template applied
    answer: str | None  # the reference answer, when the set has one
    system: str | None = None
    problem: str = ""  # the prompt before the template (what decontamination compares)
    row: dict[str, Any] = field(default_factory=dict, repr=False)  # the source row, every column


@dataclass
class PromptSource:
    """Config keys that say where prompts come from; shared by the generate and eval stages."""

    # Required by every stage that reads prompts (shrink's every_kth does not): each one checks it.
    prompt_set: str | None = setting(None, help="the prompts: a folder with set.yaml, a .jsonl/.csv/.parquet file, "
                                                "a saved dataset dir or a hub id")
    split: str = setting("train", help="split of the set: a set folder's, a saved DatasetDict's or a hub dataset's")
    id_column: str | None = setting(None, help="column of the prompt ids; unset: from set.yaml, else the first "
                                               "common name present, else made up")
    prompt_column: str | None = setting(None, help="column of the prompt text; unset: from set.yaml, else the first "
                                                   "common name present")
    answer_column: str | None = setting(None, help="column of the reference answer; unset: from set.yaml, else the "
                                                   "first common name present")
    system_column: str | None = setting(None, help="column of a per-row system message; unset: from set.yaml, else "
                                                   "the first common name present")
    template: str | None = setting(None, help='wraps each prompt, must contain "{prompt}"; unset: from set.yaml, '
                                              "else none")
    system_prompt: str | None = setting(None, help="system message for rows without a system column value")
    max_prompts: int | None = setting(None, help="first N prompts only (quick runs); unset: all")

    def __post_init__(self) -> None:
        if self.template is not None and "{prompt}" not in self.template:
            raise ValueError(f"template must contain {{prompt}} where the prompt goes; got {self.template!r}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"max_prompts must be at least 1 or null, got {self.max_prompts}")


@dataclass
class PromptSet:
    source: str  # the file or dataset the rows came from, for messages
    prompts: list[Prompt]
    scorer: str | None  # from set.yaml; the curation and eval stages pick a scorer from it


def load_prompts(src: PromptSource, require_answers: bool = False) -> PromptSet:
    """Read, map and check the prompts `src` points at."""
    columns = {"id": src.id_column, "prompt": src.prompt_column,
               "answer": src.answer_column, "system": src.system_column}
    template, scorer = src.template, None
    path = Path(src.prompt_set)
    if (path / SET_FILE).is_file():  # a shipped set: its set.yaml fills whatever the config leaves unset
        spec = yaml.safe_load((path / SET_FILE).read_text()) or {}
        for field, column in (spec.get("columns") or {}).items():
            if field not in columns:
                raise UserError(f"{path / SET_FILE}: unknown column field {field!r}; "
                                     f"use {', '.join(columns)}")
            columns[field] = columns[field] or column
        template = template or spec.get("template")
        scorer = spec.get("scorer")
        splits = spec.get("splits") or {}
        if src.split not in splits:
            raise UserError(f"{path / SET_FILE}: no split {src.split!r}; it has {', '.join(splits) or 'none'}")
        path = path / splits[src.split]
    source, rows = _read_rows(path, src.split, src.max_prompts)  # only the rows this run uses
    if not rows:
        raise UserError(f"{source}: the prompt set is empty; it needs at least one row")
    names = _resolve_columns(source, rows[0].keys(), columns, require_answers)

    prompts, seen = [], {}
    for i, row in enumerate(rows, start=1):
        text = row.get(names["prompt"])
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{source}, row {i}: column {names['prompt']!r} is empty or not text")
        pid = str(row[names["id"]]) if names["id"] else f"{Path(source).stem}-{i - 1:06d}"
        if pid in seen:
            raise UserError(f"{source}: duplicate id {pid!r} in rows {seen[pid]} and {i}; ids must be unique")
        seen[pid] = i
        answer = row.get(names["answer"]) if names["answer"] else None
        if require_answers and (answer is None or str(answer).strip() == ""):
            raise UserError(f"{source}, row {i}: no reference answer in column {names['answer']!r}")
        system = (row.get(names["system"]) if names["system"] else None) or src.system_prompt
        prompts.append(Prompt(
            id=pid,
            text=template.replace("{prompt}", text) if template else text,
            answer=None if answer is None else str(answer),
            system=system,
            problem=text,
            row=row,
        ))
    return PromptSet(source=source, prompts=prompts, scorer=scorer)


def chat_prompt(prompt: Prompt) -> list[dict[str, str]]:
    """The prompt as chat messages: an optional system message, then the user's."""
    system = [{"role": "system", "content": prompt.system}] if prompt.system else []
    return system + [{"role": "user", "content": prompt.text}]


def render(tokenizer: Any, prompt: Prompt) -> str:
    """The generation prompt as the model's chat template writes it (generate, eval, teacher)."""
    return tokenizer.apply_chat_template(chat_prompt(prompt), tokenize=False, add_generation_prompt=True)


def _read_rows(path: Path, split: str, limit: int | None = None) -> tuple[str, list[dict[str, Any]]]:
    """The first `limit` rows (all: None) of a file, a saved dataset or a hub dataset, with a printable
    name of the source. A jsonl file is read only up to its `limit`-th row."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".csv", ".parquet") and not path.is_file():
        raise UserError(f"prompt file {path} does not exist")
    if suffix in (".jsonl", ".json"):
        return str(path), _read_jsonl(path, limit)
    if suffix == ".csv":
        import pyarrow.csv
        return str(path), pyarrow.csv.read_csv(path).slice(0, limit).to_pylist()
    if suffix == ".parquet":
        import pyarrow.parquet
        return str(path), pyarrow.parquet.read_table(path).slice(0, limit).to_pylist()

    import datasets
    if path.is_dir():
        try:
            data = datasets.load_from_disk(str(path))
        except FileNotFoundError as err:
            raise UserError(f"{path} is neither a prompt set folder (no {SET_FILE}) nor a dataset "
                                 f"saved with save_to_disk: {err}") from None
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise UserError(f"{path}: no split {split!r}; it has {', '.join(data)}")
            data = data[split]
        return str(path), _head(data, limit).to_list()
    if path.exists() or str(path).startswith((".", "/")) or str(path).count("/") != 1:
        raise UserError(f"prompt set {path} does not exist (expected a folder with {SET_FILE}, a "
                             ".jsonl/.csv/.parquet file, a saved dataset dir or a hub id like owner/name)")
    try:
        data = datasets.load_dataset(str(path), split=split)
    except Exception as err:  # offline, unknown id, no such split: all reported the same way
        raise UserError(f"could not load hub dataset {path!s} split {split!r}: {err}") from None
    return f"{path} ({split})", _head(data, limit).to_list()


def _head(data: Any, limit: int | None) -> Any:
    return data if limit is None else data.select(range(min(limit, len(data))))


def _read_jsonl(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    if path.suffix == ".json" and path.read_text().lstrip().startswith("["):
        return json.loads(path.read_text())[:limit]
    rows: list[dict[str, Any]] = []
    with path.open() as lines:
        for lineno, line in enumerate(lines, start=1):
            if len(rows) == limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}, line {lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}, line {lineno}: expected a JSON object per line")
            rows.append(row)
    return rows


def _resolve_columns(source: str, present: Any, wanted: dict[str, str | None],
                     require_answers: bool) -> dict[str, str | None]:
    present = list(present)
    names: dict[str, str | None] = {}
    for key, column in wanted.items():
        if column is not None:
            if column not in present:
                raise UserError(f"{source}: no column {column!r} (set as the {key} column); "
                                     f"columns present: {', '.join(present)}")
            names[key] = column
        else:
            names[key] = next((c for c in DEFAULT_COLUMNS[key] if c in present), None)
    if names["prompt"] is None:
        raise UserError(f"{source}: no prompt column; set prompt_column to one of: {', '.join(present)}")
    if require_answers and names["answer"] is None:
        raise UserError(f"{source}: no reference answer column; set answer_column to one of: "
                             f"{', '.join(present)}")
    return names

