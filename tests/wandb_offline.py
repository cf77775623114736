"""Read back an offline wandb run folder: the records of its ``run-<id>.wandb`` file.

wandb 0.31 ships no Python reader for that file (its own is in the Go core), so this reads
the framing (LevelDB-log style blocks, the ``:W&B`` header) and parses each record with
wandb's own protobuf schema (``wandb.proto.wandb_internal_pb2.Record``).
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

BLOCK, CHUNK_HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[pb.Record]:
    """Every record of a ``.wandb`` file, in order."""
    data = Path(path).read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path}: not a wandb transaction log")
    pos, chunks = 7, []
    while pos + CHUNK_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + CHUNK_HEADER])
        if left < CHUNK_HEADER or (kind == 0 and length == 0):  # block padding
            pos += left
            continue
        chunks.append(data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length])
        pos += CHUNK_HEADER + length
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def _put(target: dict[str, Any], item: Any) -> None:
    keys = [item.key] if item.key else list(item.nested_key)
    for key in keys[:-1]:
        target = target.setdefault(key, {})
    target[keys[-1]] = json.loads(item.value_json)


@dataclass
class OfflineRun:
    """What an offline run folder holds: identity, config, summary, history rows, files."""

    folder: Path
    run_id: str = ""
    project: str = ""
    job_type: str = ""
    exit_code: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def files(self) -> list[str]:
        root = self.folder / "files"
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    def history_keys(self) -> set[str]:
        return {k for row in self.history for k in row}


def read_offline_run(folder: Path) -> OfflineRun:
    """Replay ``folder``'s ``.wandb`` file into an :class:`OfflineRun`."""
    (log_file,) = Path(folder).glob("run-*.wandb")
    run = OfflineRun(Path(folder))
    for record in records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.project = record.run.run_id, record.run.project
            run.job_type = record.run.job_type
            for item in record.run.config.update:
                _put(run.config, item)
        elif kind == "config":
            for item in record.config.update:
                _put(run.config, item)
        elif kind == "summary":
            for item in record.summary.update:
                _put(run.summary, item)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _put(row, item)
            run.history.append(row)
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def read_finished_run(folder: Path, timeout: float = 30.0) -> OfflineRun:
    """:func:`read_offline_run` once the exit record is on disk: wandb's service writes the
    file's tail shortly after ``run.finish()`` returns (measured: under 0.5 s)."""
    deadline = time.monotonic() + timeout
    while True:
        run = read_offline_run(folder)
        if run.exit_code is not None or time.monotonic() > deadline:
            return run
        time.sleep(0.2)


def offline_runs(root: Path) -> list[Path]:
    """The offline run folders wandb wrote under ``root`` (``root/wandb/offline-run-*``)."""
    return sorted(Path(root).glob("wandb/offline-run-*"))
