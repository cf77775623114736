"""Resumable evaluation: per-case results kept in the run folder as they finish.

Layout of ``RUN_DIR/cache/``::

    fingerprint.json      what every cached result depends on (see :func:`fingerprint`)
    <stage>/<key>.npz     one file per finished batch of cases: the case ids, a JSON record
                          per case and its arrays; written under a temporary name, flushed,
                          fsynced, then renamed, so a file is either whole or absent

Files are only ever added. Rerunning the same command on the same run folder reuses every
case whose batch file exists and computes the rest, so a killed run (even ``kill -9``) loses
at most the batches in flight. A cache made under another setup (any setting that changes a
result, other export weights, other benchmark contents) is refused with what changed named,
never mixed in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

log = logging.getLogger(__name__)

CACHE_DIR = "cache"
FINGERPRINT = "fingerprint.json"
CACHE_FORMAT = 1
TMP_PREFIX = ".tmp-"
# config keys that select or present results without changing any cached one: the paths of
# the export and benchmark (their contents are fingerprinted instead), which methods and
# read-outs run (each is cached on its own), logging, threads, figures, external systems, the
# denoising gain (not cached)
UNFINGERPRINTED = (
    "bench_dir", "ckpt_path", "run_dir", "task_name", "paths", "logger", "progress",
    "num_threads", "qualitative", "write_alignment_to_export", "train_overlap",
    "run_refinement", "cache", "external_methods", "refinement.methods",
    "sweep.compare_readouts", "denoising_gain",
    "baselines.paint_by_example",  # its stages carry its digest
)


class CacheMismatch(RuntimeError):
    """The run folder's cache was made under another setup; the message names what changed."""


# ----------------------------------------------------------------------------- fingerprint
def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def tree_digest(root: Path, skip: Iterable[str] = ()) -> str:
    """sha256 over the relative paths and contents of every file under ``root``."""
    skipped = set(skip)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if path.name in skipped or rel.split("/")[0] in skipped:
            continue
        digest.update(f"{rel}\0{file_digest(path)}\0".encode())
    return digest.hexdigest()


def export_digests(export_dir: Path) -> dict[str, str]:
    """sha256 of every file of the pipeline folder's components (weights and configs); not
    its ``model_index.json``, whose read-out eval.py may write and does not use (it calibrates
    its own)."""
    from models.export import COMPONENTS

    files = sorted(p for part in COMPONENTS if (export_dir / part).is_dir()
                   for p in (export_dir / part).rglob("*") if p.is_file())
    return {p.relative_to(export_dir).as_posix(): file_digest(p) for p in files}


def benchmark_listing(bench_dir: Path) -> dict[str, str]:
    """{case folder: sha256 of its files' names and contents}, malformed cases included."""
    return {d.name: tree_digest(d) for d in sorted(bench_dir.iterdir())
            if d.is_dir() and not d.name.startswith(".")}


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out |= _flatten(value, f"{prefix}{key}.")
        return out
    return {prefix[:-1]: node}


def result_settings(cfg: DictConfig) -> dict[str, Any]:
    """The resolved settings a cached result depends on, flat (``sweep.num_timesteps``); only
    those are resolved (a run folder's ``${hydra:...}`` path need not be)."""
    out = {}
    for key in _flatten(OmegaConf.to_container(cfg, resolve=False)):
        if any(key == u or key.startswith(f"{u}.") for u in UNFINGERPRINTED):
            continue
        value = OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
        out[key] = (OmegaConf.to_container(value, resolve=True)
                    if isinstance(value, DictConfig | ListConfig) else value)
    return out


def fingerprint(cfg: DictConfig, export_dir: Path, bench_dir: Path, device: str
                ) -> dict[str, Any]:
    """Everything a cached result depends on: settings, device, export weights, benchmark."""
    return {"format": CACHE_FORMAT, "device": str(device),
            "settings": result_settings(cfg), "export": export_digests(export_dir),
            "benchmark": benchmark_listing(bench_dir)}


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:12] + "..."


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What changed between two fingerprints, one line per setting / file / case."""
    lines = []
    for part in ("format", "device"):
        if old.get(part) != new.get(part):
            lines.append(f"{part}: {_short(old.get(part))} -> {_short(new.get(part))}")
    for part, what in (("settings", "setting"), ("export", "export file")):
        a, b = old.get(part, {}), new.get(part, {})
        for key in sorted(set(a) | set(b)):
            if key not in a:
                lines.append(f"{what} {key}: new ({_short(b[key])})")
            elif key not in b:
                lines.append(f"{what} {key}: gone (was {_short(a[key])})")
            elif a[key] != b[key]:
                lines.append(f"{what} {key}: {_short(a[key])} -> {_short(b[key])}")
    a, b = old.get("benchmark", {}), new.get("benchmark", {})
    for label, ids in (("added", sorted(set(b) - set(a))), ("removed", sorted(set(a) - set(b))),
                       ("changed", sorted(i for i in set(a) & set(b) if a[i] != b[i]))):
        if ids:
            listed = ", ".join(ids[:10]) + (" ..." if len(ids) > 10 else "")
            lines.append(f"benchmark cases {label}: {listed}")
    return lines


# ----------------------------------------------------------------------------- files
def atomic_write(path: Path, write: Any) -> None:
    """``write(file)`` into a temporary file beside ``path``, fsync, rename over ``path``."""
    tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{path.name}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class CaseRecord:
    """One case's cached result: JSON-able ``values`` and named arrays."""

    values: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


class Store:
    """The batch files of one stage; :meth:`get` answers from them, :meth:`put` adds one."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        for tmp in root.glob(f"{TMP_PREFIX}*"):  # a write cut short by a kill
            tmp.unlink()
        self.records: dict[str, CaseRecord] = {}
        for path in sorted(root.glob("*.npz")):
            self.records |= self._read(path)
        self.loaded = len(self.records)
        self.reused: set[str] = set()
        self.computed = 0

    @staticmethod
    def _read(path: Path) -> dict[str, CaseRecord]:
        try:
            with np.load(path, allow_pickle=False) as data:
                head = json.loads(str(data["__record__"]))
                return {case_id: CaseRecord(head["values"][k], {
                    name: data[f"{k}.{name}"] for name in head["arrays"][k]})
                    for k, case_id in enumerate(head["ids"])}
        except Exception as err:
            raise CacheMismatch(f"unreadable cache file {path} ({err.__class__.__name__}: "
                                f"{err}); delete it to recompute its cases") from err

    def get(self, ids: Sequence[str]) -> list[CaseRecord] | None:
        """The records of every one of ``ids``, or None if any is missing."""
        if not all(i in self.records for i in ids):
            return None
        self.reused.update(ids)
        return [self.records[i] for i in ids]

    def put(self, key: str, records: Mapping[str, CaseRecord], compress: bool = False) -> None:
        """Write one batch file ``<key>.npz`` (atomically) and remember its records."""
        ids = list(records)
        head = {"ids": ids, "values": [records[i].values for i in ids],
                "arrays": [sorted(records[i].arrays) for i in ids]}
        payload = {"__record__": np.array(json.dumps(head))}
        for k, case_id in enumerate(ids):
            for name, array in records[case_id].arrays.items():
                payload[f"{k}.{name}"] = np.asarray(array)
        save = np.savez_compressed if compress else np.savez
        atomic_write(self.root / f"{key}.npz", lambda f: save(f, **payload))
        self.records.update(records)
        self.computed += len(ids)


class RunCache:
    """The cache of one run folder: the fingerprint check and one :class:`Store` per stage."""

    def __init__(self, run_dir: Path, fingerprint: Mapping[str, Any]) -> None:
        self.root = Path(run_dir) / CACHE_DIR
        self.stores: dict[str, Store] = {}
        path = self.root / FINGERPRINT
        self.resumed = path.is_file()
        fingerprint = json.loads(json.dumps(fingerprint))  # compared as it is stored
        if self.resumed:
            changed = differences(json.loads(path.read_text()), fingerprint)
            if changed:
                raise CacheMismatch(
                    f"{self.root} holds results of another setup and is not mixed with this "
                    "one; changed: " + "; ".join(changed) + ". Evaluate into another run "
                    f"folder (run_dir=...), or delete {self.root} to start this one over.")
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda f: f.write(json.dumps(fingerprint, indent=1).encode()))

    def stage(self, name: str) -> Store:
        """The store of stage ``name`` (a relative folder name, e.g. ``refinement/telea``)."""
        if name not in self.stores:
            self.stores[name] = Store(self.root / name)
        return self.stores[name]

    def summary(self) -> dict[str, Any]:
        """For the report: was this a resumed run, and how many case results each stage
        reused from the cache and computed."""
        return {"dir": str(self.root), "resumed": self.resumed,
                "reused": {n: len(s.reused) for n, s in self.stores.items()},
                "computed": {n: s.computed for n, s in self.stores.items()}}


def open_cache(cfg: DictConfig, run_dir: Path, export_dir: Path, bench_dir: Path,
               device: str) -> RunCache | None:
    """The run folder's cache (``cache=false``: None, nothing kept); logs a resumption."""
    if not cfg.get("cache", True):
        return None
    cache = RunCache(run_dir, fingerprint(cfg, export_dir, bench_dir, device))
    if cache.resumed:
        log.info("resuming from %s: finished cases are reused, the rest computed", cache.root)
    return cache


def stage(cache: RunCache | None, name: str) -> Store | None:
    """``cache.stage(name)``, or None without a cache."""
    return cache.stage(name) if cache is not None else None


def cache_summary(cache: RunCache | None) -> dict[str, Any] | None:
    """``cache.summary()`` for the report (None without a cache), logged in one line."""
    if cache is None:
        return None
    summary = cache.summary()
    reused, computed = sum(summary["reused"].values()), sum(summary["computed"].values())
    stages = ", ".join(f"{name} {n}" for name, n in summary["reused"].items() if n)
    if summary["resumed"]:
        log.info("resumed run: %d case result(s) reused from %s (%s), %d computed", reused,
                 cache.root, stages or "none", computed)
    return summary
