"""Training-data provenance: what train.py records and how a benchmark is checked against it."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from data.provenance import (
    check_overlap,
    check_unseen_training_data,
    read_training_data,
    training_data_record,
    write_training_data,
)

SYNTHETIC = OmegaConf.create({"source": "synthetic", "train_seed": 7, "val_seed": 1000003,
                              "train_length": 100, "val_length": 32})


def metas(namespace: str | None, seed: int, n: int = 3) -> list[dict]:
    out = [{"category": "synthetic", "seed": seed, "index": i} for i in range(n)]
    if namespace is not None:
        for m in out:
            m["namespace"] = namespace
    return out


def test_record_round_trips(tmp_path: Path) -> None:
    assert read_training_data(tmp_path) is None
    write_training_data(SYNTHETIC, tmp_path)
    record = read_training_data(tmp_path)
    assert record == training_data_record(SYNTHETIC)
    assert record["train"] == {"source": "synthetic", "namespace": "train", "seed": 7,
                               "length": 100}
    assert record["validation"]["namespace"] == "validation"


def test_statuses() -> None:
    record = training_data_record(SYNTHETIC)
    assert check_overlap(record, metas("benchmark", 7))["status"] == "disjoint"
    assert check_overlap(record, metas("train", 8))["status"] == "disjoint"
    hit = check_overlap(record, metas("train", 7) + metas("benchmark", 7))
    assert hit["status"] == "overlap" and hit["overlapping_cases"] == 3
    assert "train/seed 7 (3 cases, the export's train data)" in hit["message"]
    val = check_overlap(record, metas("validation", 1000003))
    assert val["status"] == "overlap" and "validation data" in val["message"]
    legacy = check_overlap(record, metas(None, 0))
    assert legacy["status"] == "unknown" and "pre-namespace" in legacy["message"]
    unknown = check_overlap(None, metas(None, 0))
    assert unknown["status"] == "unknown" and unknown["message"].startswith("UNKNOWN PROVENANCE")
    assert "case i may be training item i" in unknown["message"]
    assert check_overlap(None, [{"category": "try_on"}])["status"] == "not_generated"


def test_shard_training_overlaps_any_train_namespace_seed() -> None:
    """Shards do not record their generator seed here: any train-namespace case may be in."""
    record = training_data_record(OmegaConf.merge(SYNTHETIC, {"source": "shards",
                                                              "shard_urls": "s-{0..3}.tar"}))
    assert record["train"]["seed"] is None
    assert check_overlap(record, metas("train", 123))["status"] == "overlap"
    assert check_overlap(record, metas("benchmark", 123))["status"] == "disjoint"


def _use(seed: int) -> dict:
    return {"source": "synthetic", "namespace": "train", "seed": seed, "length": 100}


def test_a_chain_of_warm_starts_lists_its_ancestors_parent_first(tmp_path: Path) -> None:
    inherited = None
    for seed in (1, 2, 3):
        folder = tmp_path / str(seed)
        folder.mkdir()
        write_training_data({**SYNTHETIC, "train_seed": seed}, folder, inherited)
        inherited = read_training_data(folder)
    assert inherited["train"]["seed"] == 3
    assert [a["train"]["seed"] for a in inherited["ancestors"]] == [2, 1]
    assert "ancestors" not in inherited["ancestors"][0]
    with pytest.raises(ValueError, match="ancestor 2 train"):
        check_unseen_training_data({**SYNTHETIC, "train_seed": 1}, inherited)


def test_records_of_the_nested_init_layout_read_as_ancestors(tmp_path: Path) -> None:
    legacy = {"train": _use(16), "validation": {"namespace": "validation", "seed": 9},
              "init_train": _use(15), "init_init_train": _use(12),
              "init_init_init_unknown": {"source": "unknown"}}
    (tmp_path / "training_data.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(legacy)))
    record = read_training_data(tmp_path)
    assert record == {"train": _use(16), "validation": {"namespace": "validation", "seed": 9},
                      "ancestors": [{"train": _use(15)}, {"train": _use(12)},
                                    {"unknown": {"source": "unknown"}}]}
    assert check_overlap(legacy, metas("train", 12))["status"] == "unknown"
    del legacy["init_init_init_unknown"]
    verdict = check_overlap(legacy, metas("train", 12))
    assert verdict["status"] == "overlap" and "ancestor 2 train" in verdict["message"]
    assert check_overlap(legacy, metas("train", 13))["status"] == "disjoint"
