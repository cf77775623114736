"""Which generated data trained an export, and whether a benchmark could share items with it.

train.py writes ``<export>/training_data.yaml`` (:func:`write_training_data`): the data source
and, per use (train, validation), the seed namespace and seed of data/synthetic.py's item
generator, and under ``ancestors`` the same of every export or checkpoint a chain of warm starts
began from. Benchmark cases written by data/benchmark.py carry ``namespace``, ``seed`` and
``index`` in meta.json. :func:`check_overlap` compares the two:

- ``overlap``: a benchmark case comes from a generator (namespace, seed) that made the
  export's training or validation data (model selection saw the latter): eval.py refuses
  (or, with ``train_overlap=warn``, says so loudly in the report);
- ``disjoint``: every generated case is in another namespace or seed than the training data;
- ``unknown``: the export has no record (trained before seed namespaces existed, or not by
  train.py), or cases come from the pre-namespace generator: nothing can be guaranteed;
- ``not_generated``: no case says how it was generated (hand-made benchmark): not checked.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

TRAINING_DATA = "training_data.yaml"
UNKNOWN = "unknown"  # source of a warm start's inherited use when that export had no record
LEGACY = "legacy"  # cases written before namespaces: SeedSequence([seed, index])
ANCESTORS = "ancestors"
LEGACY_PREFIX = "init_"  # an ancestor's uses in records written before ``ancestors``


def training_data_record(data_cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The provenance of a PairDataModule config (configs/data/*): what train.py records.

    Shards carry no generator seed we can trust here; synthetic shards are always drawn from
    the "train" namespace, so their seed is recorded as null (= any seed).
    """
    source = str(data_cfg.get("source", "synthetic"))
    train: dict[str, Any] = {"source": source, "namespace": "train",
                             "seed": int(data_cfg["train_seed"]) if source == "synthetic"
                             else None}
    if source != "synthetic":
        urls = data_cfg.get("shard_urls")
        train["shard_urls"] = OmegaConf.to_container(urls) if isinstance(urls, ListConfig) else urls
    else:
        train["length"] = int(data_cfg.get("train_length", 0))
    return {"train": train,
            "validation": {"source": "synthetic", "namespace": "validation",
                           "seed": int(data_cfg["val_seed"]),
                           "length": int(data_cfg.get("val_length", 0))}}


def normalized(record: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``record`` in the current layout. Records written before it nested each ancestor under
    one more ``init_`` prefix (``init_train``, ``init_init_train``, ...); those become
    ``ancestors`` entries, the parent first."""
    if record is None:
        return None
    levels: dict[int, dict[str, Any]] = {}
    for name, use in record.items():
        if name == ANCESTORS:
            continue
        depth = 0
        while name.startswith(LEGACY_PREFIX):
            name, depth = name[len(LEGACY_PREFIX):], depth + 1
        levels.setdefault(depth, {})[name] = dict(use)
    ancestors = [levels[d] for d in sorted(levels) if d > 0]
    ancestors += [{k: dict(u) for k, u in a.items()} for a in record.get(ANCESTORS) or []]
    return {**levels.get(0, {}), **({ANCESTORS: ancestors} if ancestors else {})}


def lineage_record(data_cfg: DictConfig | Mapping[str, Any],
                   inherited: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """This run's record with ``inherited`` (the record of the export or checkpoint a warm
    start began from) and its own ancestors listed under ``ancestors``, the parent first, so
    every ancestor in a chain of warm starts stays recorded and its data refused too."""
    record = training_data_record(data_cfg)
    parent = normalized(inherited)
    if parent:
        earlier = parent.pop(ANCESTORS, [])
        record[ANCESTORS] = [parent, *earlier]
    return record


def lineage_uses(record: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(name, use) of every data use in a record of the current layout (as
    :func:`read_training_data` returns it), the ancestors' named ``ancestor N train`` (N = 1
    for the parent)."""
    for name, use in record.items():
        if name != ANCESTORS and isinstance(use, Mapping):
            yield name, use
    for n, ancestor in enumerate(record.get(ANCESTORS, []), 1):
        for name, use in ancestor.items():
            if isinstance(use, Mapping):
                yield f"ancestor {n} {name}", use


def check_unseen_training_data(data_cfg: DictConfig | Mapping[str, Any],
                               inherited: Mapping[str, Any] | None) -> None:
    """Refuse a warm start that would train again on generated items its lineage has seen.

    The generator is deterministic per (namespace, seed), so a seed the ancestors trained on
    repeats their items instead of adding new ones.
    """
    own = training_data_record(data_cfg)["train"]
    if own["seed"] is None:
        return
    used = {name: use for name, use in lineage_uses(normalized(inherited) or {})
            if name.endswith("train") and use.get("namespace") == "train"
            and use.get("seed") is not None}
    repeated = sorted(name for name, use in used.items() if int(use["seed"]) == own["seed"])
    if repeated:
        seen = sorted({int(use["seed"]) for use in used.values()})
        raise ValueError(f"seed={own['seed']}: the warm start's lineage trained on train seed "
                         f"{own['seed']} already ({repeated[0]} in its training-data record), "
                         f"so this run would repeat those items; pick a seed not in {seen}")


def write_training_data(data_cfg: DictConfig | Mapping[str, Any], export_dir: str | Path,
                        inherited: Mapping[str, Any] | None = None) -> Path:
    """Write ``training_data.yaml`` (:func:`lineage_record`) next to an export's weights."""
    return save_training_data(lineage_record(data_cfg, inherited), export_dir)


def save_training_data(record: Mapping[str, Any], export_dir: str | Path) -> Path:
    """Write a record as ``<export_dir>/training_data.yaml``."""
    path = Path(export_dir) / TRAINING_DATA
    plain = OmegaConf.to_container(OmegaConf.create(dict(record)), resolve=True)
    body = yaml.safe_dump(plain, sort_keys=False, default_flow_style=None, width=100)
    path.write_text("# written by train.py: the generated data this export saw; eval.py "
                    "refuses benchmarks drawn from it\n" + body)
    return path


def read_training_data(export_dir: str | Path) -> dict[str, Any] | None:
    """The export's record, or None when it has none (unknown provenance)."""
    path = Path(export_dir) / TRAINING_DATA
    if not path.is_file():
        return None
    return normalized(OmegaConf.to_container(OmegaConf.load(path), resolve=True))


def case_generator(meta: Mapping[str, Any]) -> tuple[str, int] | None:
    """(namespace, seed) of a generated case from its meta.json; None if not generated here."""
    if "seed" not in meta or "index" not in meta:
        return None
    return str(meta.get("namespace", LEGACY)), int(meta["seed"])


def check_overlap(training: Mapping[str, Any] | None, metas: Iterable[Mapping[str, Any]]
                  ) -> dict[str, Any]:
    """Compare a benchmark's case generators with an export's training data (module docstring).

    Returns {status, message, training, benchmark: {generators: [{namespace, seed, cases}],
    not_generated}, overlapping_cases}.
    """
    counts: Counter[tuple[str, int] | None] = Counter(case_generator(m) for m in metas)
    not_generated = counts.pop(None, 0)
    generators = [{"namespace": ns, "seed": seed, "cases": n}
                  for (ns, seed), n in sorted(counts.items())]
    bench = {"generators": generators, "not_generated": not_generated}
    training = normalized(training)
    result: dict[str, Any] = {"training": training,
                              "benchmark": bench, "overlapping_cases": 0}
    legacy = sum(g["cases"] for g in generators if g["namespace"] == LEGACY)
    if not generators:
        return {**result, "status": "not_generated",
                "message": "no case records a generator seed (hand-made benchmark): "
                           "overlap with the training data not checked"}
    if training is None:
        message = ("UNKNOWN PROVENANCE: the export has no training_data.yaml (trained before "
                   "seed namespaces, or not by train.py), so nothing guarantees that the "
                   "benchmark is disjoint from its training data")
        if legacy:
            message += (f"; {legacy} case(s) come from the pre-namespace generator, the one "
                        "such exports trained with: benchmark case i may be training item i")
        return {**result, "status": "unknown", "message": message}
    if any(u.get("source") == UNKNOWN for _, u in lineage_uses(training)):
        return {**result, "status": "unknown",
                "message": "UNKNOWN PROVENANCE: the export was warm-started from an export "
                           "without a training-data record"}
    uses = {name: u for name, u in lineage_uses(training) if u.get("namespace")}
    hits = [{**g, "use": name} for g in generators for name, u in uses.items()
            if g["namespace"] == u["namespace"] and u.get("seed") in (None, g["seed"])]
    result["overlapping_cases"] = sum(g["cases"] for g in hits)
    if hits:
        which = ", ".join(f"{g['namespace']}/seed {g['seed']} ({g['cases']} cases, the "
                          f"export's {g['use']} data)" for g in hits)
        return {**result, "status": "overlap",
                "message": f"OVERLAP: benchmark cases come from a generator that made the "
                           f"export's training or validation data: {which}"}
    if legacy:
        return {**result, "status": "unknown",
                "message": f"{legacy} case(s) come from the pre-namespace generator "
                           "(SeedSequence([seed, index])): not guaranteed disjoint from "
                           "namespaced training data; regenerate the benchmark"}
    return {**result, "status": "disjoint",
            "message": "every generated case comes from another seed namespace or seed than "
                       "the export's training data"}
