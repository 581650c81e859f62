"""Trace records on disk: shards written as samples finish, the dataset assembled from them, exports,
and traces read back for training (`load_traces`).

Every write here is atomic (a temporary name, then a rename): a killed run never leaves half a
file behind. Nothing here holds a whole run in memory: shards are read a few key columns at a
time, the dataset is built from them by `datasets` (memory-mapped Arrow on disk), and exports
are written batch by batch. A run of 800k samples with teacher logprobs costs disk, not RAM.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

from pipeline.config import UserError

KEY = ("prompt_id", "temperature", "sample_index")  # one work unit; each is stored exactly once
BATCH = 1024  # rows per batch when streaming a dataset to a file
JSON_BATCH = 128  # rows per batch turned into Python objects for a JSON export (top-k rows are heavy)


def records_to_table(records: list[dict[str, Any]]) -> Any:
    """Records to an Arrow table; [tokens, k] numpy arrays become list<fixed_size_list<k>> of their
    dtype (compact: 20 int32 ids + 20 float16 logprobs per token at k = 20)."""
    import numpy as np
    import pyarrow as pa

    arrays = [k for k, v in records[0].items() if isinstance(v, np.ndarray)]
    table = pa.Table.from_pylist([{k: v for k, v in r.items() if k not in arrays} for r in records])
    for name in arrays:
        values = [r[name] for r in records]
        flat = pa.array(np.concatenate([v.reshape(-1) for v in values]))
        if values[0].ndim == 2:
            flat = pa.FixedSizeListArray.from_arrays(flat, values[0].shape[1])
        offsets = pa.array(np.cumsum([0] + [len(v) for v in values]), type=pa.int32())
        table = table.append_column(name, pa.ListArray.from_arrays(offsets, flat))
    return table


def write_shard(shards: Path, table: Any, replica: int = 0) -> Path:
    """Write one shard atomically. Each replica numbers its own shards (shard-r001-000007), so
    replicas writing into one directory never pick the same name."""
    import pyarrow.parquet as pq

    shards.mkdir(parents=True, exist_ok=True)
    prefix = f"shard-r{replica:03d}-"
    number = 1 + max((int(p.stem.rsplit("-", 1)[1]) for p in shards.glob(prefix + "*.parquet")), default=-1)
    final = shards / f"{prefix}{number:06d}.parquet"
    tmp = final.with_suffix(".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, final)
    return final


def shard_files(shards: Path) -> list[Path]:
    return sorted(shards.glob("shard-*.parquet"))


def stored_keys(shards: Path) -> dict[tuple, Path]:
    """Every stored unit and the shard it is in; a unit stored twice is an error naming both shards."""
    import pyarrow.parquet as pq

    where: dict[tuple, Path] = {}
    for path in shard_files(shards):
        table = pq.read_table(path, columns=list(KEY))
        for key in zip(*(table.column(c).to_pylist() for c in KEY)):
            if key in where:
                raise RuntimeError(f"sample {key} is stored twice, in {where[key]} and {path}: the shards are "
                                   "inconsistent (were two runs writing into one output_dir?)")
            where[key] = path
    return where


def assemble(shards: Path, units: list[tuple], cache_dir: Path) -> Any:
    """The shards as one memory-mapped dataset in `units` order, each unit exactly once."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = shard_files(shards)
    row_of: dict[tuple, int] = {}
    offset = 0
    for path in files:  # global row numbers in the order from_parquet reads the files
        table = pq.read_table(path, columns=list(KEY))
        row_of.update((key, offset + i) for i, key in enumerate(zip(*(table.column(c).to_pylist() for c in KEY))))
        offset += table.num_rows
    if len(row_of) != offset:
        stored_keys(shards)  # raises, naming the shards that hold a unit twice
    missing = [u for u in units if u not in row_of]
    if missing:
        raise RuntimeError(f"{shards}: {len(missing)} samples missing after generation, e.g. {missing[:3]}; "
                           "run the same command again to sample them")
    if not files:
        raise RuntimeError(f"{shards}: no samples to assemble")
    # One schema for all shards: a shard whose reference answers are all missing has a null column.
    schema = pa.unify_schemas([pq.read_schema(p) for p in files], promote_options="permissive")
    dataset = datasets.Dataset.from_parquet([str(p) for p in files], cache_dir=str(cache_dir),
                                            features=datasets.Features.from_arrow_schema(schema))
    release_memory()
    return dataset.select([row_of[u] for u in units])


# Columns with a value per completion token (the teacher's top-k for offline KD): left out of JSON exports.
PER_TOKEN_COLUMNS = ("topk_ids", "topk_logprobs", "topk_rest_logprob", "token_logprobs", "completion_token_ids")


def save_dataset(dataset: Any, path: Path, export: Iterable[str] = ()) -> None:
    """Save `dataset` to the dir `path`, plus exports beside it (path.jsonl, path.parquet,
    path.messages.jsonl). save_to_disk is not atomic: write beside and swap in, so a reader
    never sees half a dataset."""
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    # datasets writes no shard for 0 rows and then cannot load what it wrote (curation may keep none)
    dataset.save_to_disk(str(tmp), **({"num_shards": 1} if len(dataset) == 0 else {}))
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    for kind in export:
        suffix = {"jsonl": ".jsonl", "parquet": ".parquet", "messages": ".messages.jsonl"}[kind]
        write_export(dataset, path.with_name(path.name + suffix), kind)


def write_export(dataset: Any, target: Path, kind: str) -> None:
    """One export file, written batch by batch (never the whole dataset as one list or string)."""
    import pyarrow.parquet as pq

    tmp = target.with_name(target.name + ".tmp")
    if kind == "parquet":
        with pq.ParquetWriter(tmp, dataset.features.arrow_schema) as writer:
            for batch in dataset.with_format("arrow").iter(batch_size=BATCH):
                writer.write_table(batch)
    else:  # JSON is for reading: the per-token teacher arrays (k numbers a token) stay in parquet and samples/
        dataset = dataset.remove_columns([c for c in PER_TOKEN_COLUMNS if c in dataset.column_names])
        with tmp.open("w") as f:
            for batch in dataset.iter(batch_size=JSON_BATCH):
                for values in zip(*batch.values()):
                    row = dict(zip(batch, values))
                    if kind == "messages":  # open-r1 style: one `messages` list per sample
                        row = {"messages": row.pop("prompt") + row.pop("completion"), **row}
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, target)
    release_memory()


def release_memory() -> None:
    """Hand freed heap pages back to the OS. Without it the allocators (glibc's, Arrow's
    mimalloc) keep the high-water mark of every batch and the RSS of a long run creeps up."""
    import ctypes

    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def vocab_fingerprint(tokenizer: Any) -> str:
    """Names a vocabulary: stored token ids mean the same tokens exactly when fingerprints match
    (R1-Distill-Qwen and Qwen2.5 share a size but not their special tokens)."""
    import hashlib

    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return f"{len(tokenizer.get_vocab())}-{hashlib.sha256(vocab.encode()).hexdigest()[:16]}"


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """A small JSONL file (reports, skip lists), atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    os.replace(tmp, path)


def load_traces(source: str, split: str = "train", needed: Sequence[str] = ("prompt", "completion"),
                hint: str = "") -> Any:
    """A training set: a traces dir (its curated/), a saved dataset, or a hub dataset, cut to the
    `needed` columns and prompt_id/teacher (a missing needed one is an error that adds `hint`)."""
    import datasets

    path = Path(source)
    if (path / "curated").is_dir():
        path = path / "curated"
    if path.is_dir():
        # datasets 5.2 cannot load a dataset that was saved with no rows
        data = None if _saved_empty(path) else datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            data = data[split]
    elif path.exists() or source.startswith((".", "/")) or source.count("/") != 1:
        raise UserError(f"dataset {source} does not exist: make it with `make generate` (or set --dataset "
                                "to your traces: a traces dir, a dataset saved with save_to_disk, or a hub id "
                                "like owner/name)")
    else:
        data = datasets.load_dataset(source, split=split)
    if data is None or len(data) == 0:
        raise UserError(f"dataset {path} is empty: nothing to train on (did curation drop everything? "
                        "see curation.json beside it)")
    missing = [c for c in needed if c not in data.column_names]
    if missing:
        raise UserError(f"dataset {path}: missing column(s) {', '.join(missing)}{hint}; "
                        f"columns present: {', '.join(data.column_names)}")
    keep = list(needed) + [c for c in ("prompt_id", "teacher") if c in data.column_names]
    return data.select_columns(keep)


def _saved_empty(path: Path) -> bool:
    state = path / "state.json"
    return state.is_file() and not json.loads(state.read_text()).get("_data_files")
