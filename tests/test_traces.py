"""Records on disk: shard names per replica, one schema across shards, a unit stored twice."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.traces import assemble, records_to_table, stored_keys, write_shard


def record(pid: str, answer: str | None) -> dict:
    return {"prompt_id": pid, "temperature": 0.6, "sample_index": 0, "reference_answer": answer,
            "completion": [{"role": "assistant", "content": f"<think>x</think> {pid}"}]}


def test_shards_are_named_per_replica_and_assembled_in_unit_order(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    # Replica 1's shard has no reference answers at all: its column is typed null.
    write_shard(shards, records_to_table([record("b", None)]), replica=1)
    write_shard(shards, records_to_table([record("a", "4"), record("c", "6")]), replica=0)
    write_shard(shards, records_to_table([record("d", "8")]), replica=1)
    assert sorted(p.name for p in shards.iterdir()) == [
        "shard-r000-000000.parquet", "shard-r001-000000.parquet", "shard-r001-000001.parquet"]
    units = [(pid, 0.6, 0) for pid in "abcd"]
    dataset = assemble(shards, units, tmp_path / "cache")
    assert dataset["prompt_id"] == list("abcd") and dataset["reference_answer"] == ["4", None, "6", "8"]
    with pytest.raises(RuntimeError, match=r"1 samples missing after generation, e.g. \[\('e', 0.6, 0\)\]"):
        assemble(shards, units + [("e", 0.6, 0)], tmp_path / "cache")


def test_a_unit_stored_twice_names_both_shards(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    first = write_shard(shards, records_to_table([record("a", "4")]), replica=0)
    second = write_shard(shards, records_to_table([record("a", "4")]), replica=1)
    with pytest.raises(RuntimeError, match=f"stored twice, in {first} and {second}"):
        stored_keys(shards)


def test_a_set_filtered_to_no_rows_is_saved_and_loads(tmp_path: Path) -> None:
    """Curation may keep nothing (a random teacher): datasets alone writes no shard then and cannot load it."""
    import datasets

    from pipeline.traces import save_dataset

    empty = datasets.Dataset.from_list([record("a", "4"), record("b", "6")]).select([])
    save_dataset(empty, tmp_path / "curated", ["jsonl", "parquet"])
    again = datasets.load_from_disk(str(tmp_path / "curated"))
    assert len(again) == 0 and again.features == empty.features
    assert (tmp_path / "curated.jsonl").read_text() == ""
    # a valid parquet file of 0 rows (datasets.Dataset.from_parquet refuses 0 rows; pyarrow and pandas read it)
    assert pq.read_table(tmp_path / "curated.parquet").num_rows == 0
