"""Data throughput per CPU worker: the on-the-fly generator, the shard and latent-shard readers.

Per worker = one process producing samples alone (what one DataLoader worker gives); the
workers needed to feed a GPU at ``--gpu-rate`` samples/s follow from it. Shards are written to
a temporary directory first (from the same generator, ``data.shards.synthetic_records``), so
the reader decodes PNG + float16 flow and draws masks and modes as in training. Latent shards
are then written from those shards in the SD-1.5 VAE's latent shape (4 x size/8 x size/8,
float16) by a shape-only stand-in encoder: reading costs the same whatever the latent values,
and the real encode is a one-off GPU job (``benchmark_train.py`` times it).
``--loader-workers N`` also measures a real DataLoader with N workers, to check the scaling.

``--baseline DIR`` instead compares the training data paths of this checkout ("after")
with those of another checkout ("before", e.g. ``git worktree add --detach DIR main``),
each probed in a fresh process importing its own ``data`` package, alternated
before/after/before/after ``--repeats`` times (medians: the machine may be shared): the
synthetic generator's (a) dataset ``__getitem__`` on one core and (b) ``PairDataModule``'s
training loader with one worker into this process, through the device copy and the
DataModule's ``on_after_batch_transfer`` (where compact batches become float32); the same
for pixel shards written by that checkout's writer, (c) read on one core and (d) through
the shard loader; and for latent shards written for the pixel-space (tiny) model, (e) read
on one core and (f) through their loader (where the baseline cannot write those, only "after"
has them). Rates are samples/s of wall time and per CPU-second of worker + training
process; each path of "after" is also divided by the baseline's generator.

    PYTHONPATH=. python benchmarks/benchmark_data.py --image-size 512 --gpu-rate 70
    PYTHONPATH=. python benchmarks/benchmark_data.py --smoke
    PYTHONPATH=. python benchmarks/benchmark_data.py --baseline /tmp/rba-main --image-size 64 \
        --batch-size 128 --out benchmarks/cpu-2026-12-03/data_path_ab.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from benchmarks.bench_common import environment, format_table, write_json
from data.latent_shards import latent_shard_dataset, shard_samples, write_latent_shards
from data.shards import shard_dataset, synthetic_records, write_shards
from data.synthetic import SyntheticPairs

log = logging.getLogger(__name__)


class LatentShapeEncoder(torch.nn.Module):
    """Random float16-sized latents in the SD-1.5 VAE's shape: for timing the reader only."""

    latent_channels, downsample, scaling_factor = 4, 8, 0.18215

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        return torch.randn(b, self.latent_channels, h // self.downsample, w // self.downsample)

    def fingerprint(self) -> dict[str, Any]:
        """What the latent-shard manifest records of its autoencoder."""
        return {"kind": type(self).__name__, "latent_channels": self.latent_channels,
                "downsample": self.downsample, "scaling_factor": self.scaling_factor,
                "name_or_path": ""}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--reference-size", type=int, default=224)
    p.add_argument("--samples", type=int, default=48, help="samples timed per source")
    p.add_argument("--per-shard", type=int, default=8)
    p.add_argument("--gpu-rate", type=float, default=70.0, help="samples/s the GPU consumes")
    p.add_argument("--loader-workers", type=int, default=0, help="also time a DataLoader")
    p.add_argument("--batch-size", type=int, default=8, help="DataLoader batch size")
    p.add_argument("--smoke", action="store_true", help="64 px, a few samples")
    p.add_argument("--out", default=None, help="JSON output path")
    p.add_argument("--baseline", default=None,
                   help="checkout of the code to compare with: run the before/after probe")
    p.add_argument("--repeats", type=int, default=3, help="before/after alternations")
    p.add_argument("--items", type=int, default=200, help="(a): items timed per probe")
    p.add_argument("--batches", type=int, default=4, help="(b): batches timed per probe")
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # one side's child
    args = p.parse_args(argv)
    if args.smoke:
        args.image_size, args.samples, args.per_shard = 64, 8, 4
        args.loader_workers = min(args.loader_workers, 2)
        args.repeats, args.items, args.batches = 1, 4, 2
        args.batch_size = min(args.batch_size, 4)
    return args


def rate(samples: Iterable[Any], count: int) -> float:
    """Samples per second over the first ``count`` items (one warm-up item not counted)."""
    it = iter(samples)
    next(it)
    t0 = time.perf_counter()
    n = 0
    for _ in range(count):
        try:
            next(it)
        except StopIteration:
            break
        n += 1
    return n / (time.perf_counter() - t0)


def loader_rate(dataset: Any, workers: int, batch_size: int, samples: int) -> float:
    """Samples/s of a DataLoader with ``workers`` processes, after its first batch."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                        persistent_workers=False, prefetch_factor=4 if workers else None)
    it = iter(loader)
    next(it)
    t0, n = time.perf_counter(), 0
    while n < samples:
        try:
            n += len(next(it)["mode"])
        except StopIteration:
            break
    return n / (time.perf_counter() - t0)


def _cpu_seconds(processes: list[Any]) -> float:
    total = 0.0
    for proc in processes:
        times = proc.cpu_times()
        total += times.user + times.system
    return total


def _loader_rates(dm: Any, batches: int) -> dict[str, Any]:
    """One-worker training loader of a set-up ``PairDataModule`` into this process: every
    batch copied to the device (pinned when CUDA is there) and passed through the DataModule's
    ``on_after_batch_transfer``, as a Trainer does."""
    import psutil

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    loader = dm.train_dataloader()

    def receive(batch: dict[str, Any]) -> dict[str, Any]:
        moved = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                 for k, v in batch.items()}
        return dm.on_after_batch_transfer(moved, 0)

    it = iter(loader)
    first = next(it)
    batch_size = len(first["mode"])
    wire = sum(v.nbytes for v in first.values() if isinstance(v, torch.Tensor))
    model_inputs = {k: f"{v.dtype}".removeprefix("torch.") for k, v in receive(first).items()
                    if isinstance(v, torch.Tensor)}
    workers = psutil.Process().children()
    w0, t0, c0 = _cpu_seconds(workers), time.perf_counter(), time.process_time()
    n = 0
    for _ in range(batches):
        n += len(receive(next(it))["mode"])
    if cuda:
        torch.cuda.synchronize()
    wall, main_cpu = time.perf_counter() - t0, time.process_time() - c0
    worker_cpu = _cpu_seconds(workers) - w0
    del it
    return {"samples_per_s": n / wall, "samples_per_cpu_s": n / (worker_cpu + main_cpu),
            "worker_cpu_ms_per_sample": 1e3 * worker_cpu / n,
            "main_cpu_ms_per_sample": 1e3 * main_cpu / n,
            "kib_per_sample_through_ipc": wire / batch_size / 1024,
            "model_input_dtypes": model_inputs}


def _one_core_rate(samples: Iterable[Any], items: int) -> dict[str, float]:
    """Samples/s of wall and of CPU time over ``items`` samples after one warm-up sample,
    OpenCV on one thread (as in a loader worker)."""
    import cv2

    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    it = iter(samples)
    next(it)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(items):
        next(it)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    cv2.setNumThreads(threads)  # the workers start from the process's own setting
    return {"samples_per_s": items / wall, "samples_per_cpu_s": items / cpu}


def training_path_rates(size: int, ref: int, items: int, batch_size: int, batches: int
                        ) -> dict[str, Any]:
    """Rates of the training data paths of the ``data`` package on ``sys.path``.

    Synthetic: (a) ``getitem``, the training loader's dataset indexed in this process; (b)
    ``loader``, ``PairDataModule.train_dataloader()`` with one worker. Pixel shards, written
    by this package's own writer from the same generator (not timed): (c) ``shards_read``,
    the shard dataset read and decoded in this process; (d) ``shards_loader``, the DataModule's
    shard loader with one worker; (e), (f) latent shards (`_latent_shard_rates`). Only code
    that the compared checkouts share is called, so old and new code run the same probe.
    """
    from data.datamodule import PairDataModule
    from data.shards import shard_dataset, synthetic_records, write_shards

    cuda = torch.cuda.is_available()
    dm = PairDataModule(batch_size=batch_size, num_workers=1, image_size=size,
                        reference_size=ref, train_length=10**6, pin_memory=cuda)
    dm.setup("fit")
    dataset = dm.train_dataloader().dataset
    rates: dict[str, Any] = {
        "getitem": _one_core_rate((dataset[i] for i in range(items + 1)), items),
        "loader": _loader_rates(dm, batches),
    }
    count = max(items, batch_size * batches) + batch_size + 1
    with tempfile.TemporaryDirectory(prefix="rba-bench-path-") as tmp:
        urls = [str(p) for p in write_shards(
            synthetic_records(count, seed=0, image_size=size, reference_size=ref), tmp, 64)]
        rates["shards_read"] = _one_core_rate(
            shard_dataset(urls, seed=0, image_size=size, reference_size=ref), items)
        dm = PairDataModule(source="shards", shard_urls=urls, batch_size=batch_size,
                            num_workers=1, image_size=size, reference_size=ref,
                            train_length=10**6, pin_memory=cuda, shuffle_buffer=0)
        dm.setup("fit")
        rates["shards_loader"] = _loader_rates(dm, batches)
    rates.update(_latent_shard_rates(size, ref, items, batch_size, batches, count))
    rates["device"] = "cuda" if cuda else "cpu"
    return rates


def _latent_shard_rates(size: int, ref: int, items: int, batch_size: int, batches: int,
                        count: int) -> dict[str, Any]:
    """(e) ``latent_shards_read`` and (f) ``latent_shards_loader``: latent shards of the
    generator's items for the pixel-space (tiny) model, written by this checkout (not timed),
    read as (c) and (d) read pixel shards; None where the checkout cannot write them."""
    from data.datamodule import PairDataModule
    from data.latent_shards import latent_shard_dataset, synthetic_samples, write_latent_shards
    from models.autoencoder import PixelSpace

    if not hasattr(PixelSpace, "fingerprint"):
        return {"latent_shards_read": None, "latent_shards_loader": None}
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="rba-bench-latent-") as tmp:
        urls = [str(p) for p in write_latent_shards(
            synthetic_samples(count, [0], size, ref), PixelSpace(), tmp, 64, size, ref)]
        rates = {"latent_shards_read": _one_core_rate(latent_shard_dataset(urls), items)}
        dm = PairDataModule(source="latent_shards", shard_urls=urls, batch_size=batch_size,
                            num_workers=1, image_size=size, reference_size=ref,
                            train_length=10**6, pin_memory=cuda, shuffle_buffer=0)
        dm.setup("fit")
        rates["latent_shards_loader"] = _loader_rates(dm, batches)
    return rates


# each probed path, and the baseline generator path it is measured against
PATHS = {"getitem": "getitem", "loader": "loader", "shards_read": "getitem",
         "shards_loader": "loader", "latent_shards_read": "getitem",
         "latent_shards_loader": "loader"}


def _revision(root: Path) -> str | None:
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "-uno"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev + ("+uncommitted" if dirty else "")


def _probe_in(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One probe of the checkout at ``root``, in a fresh process that imports its code."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--probe",
           "--image-size", str(args.image_size), "--reference-size", str(args.reference_size),
           "--items", str(args.items), "--batches", str(args.batches),
           "--batch-size", str(args.batch_size)]
    env = {**os.environ, "PYTHONPATH": str(root)}
    load = os.getloadavg()[0]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"probe of {root} failed:\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "load_before": load}


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Before/after rates of the synthetic path, alternated, medians and after/before ratios."""
    roots = {"before": Path(args.baseline).resolve(), "after": Path(__file__).resolve().parents[1]}
    if not (roots["before"] / "data" / "synthetic.py").is_file():
        raise FileNotFoundError(f"--baseline {roots['before']} is not a checkout of this project")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in roots}
    for r in range(args.repeats):
        for name, root in roots.items():
            runs[name].append(_probe_in(root, args))
            log.info("repeat %d %s: %s", r + 1, name, json.dumps(runs[name][-1]))
    metrics = [(part, m) for part in PATHS for m in ("samples_per_s", "samples_per_cpu_s")]
    medians = {name: {f"{part}.{m}": statistics.median(r[part][m] for r in rs)
                      for part, m in metrics if all(r.get(part) for r in rs)}
               for name, rs in runs.items()}
    ratios = {key: medians["after"][key] / medians["before"][key]
              for key in medians["after"] if key in medians["before"]}
    # what a core feeds now against what the baseline's generator fed
    versus_generator = {
        f"{part}.samples_per_cpu_s": medians["after"][f"{part}.samples_per_cpu_s"]
        / medians["before"][f"{base}.samples_per_cpu_s"]
        for part, base in PATHS.items() if f"{part}.samples_per_cpu_s" in medians["after"]}
    result: dict[str, Any] = {
        **environment(torch.device("cpu")), "benchmark": "data_path_ab", "smoke": args.smoke,
        "image_size": args.image_size, "reference_size": args.reference_size,
        "batch_size": args.batch_size, "items": args.items, "batches": args.batches,
        "repeats": args.repeats, "command": " ".join(sys.argv),
        "trees": {name: {"path": str(root), "revision": _revision(root)}
                  for name, root in roots.items()},
        "medians": {name: {k: round(v, 2) for k, v in m.items()} for name, m in medians.items()},
        "ratios_after_over_before": {k: round(v, 2) for k, v in ratios.items()},
        "ratios_after_over_baseline_generator": {k: round(v, 2)
                                                 for k, v in versus_generator.items()},
        "runs": runs,
    }
    rows: list[tuple[str, Any]] = [("cpu cores", result["cpu_count"]),
                                   ("image / reference px", f"{args.image_size} / "
                                                            f"{args.reference_size}")]
    for key, after in medians["after"].items():
        if key in ratios:
            rows.append((f"{key} before", round(medians["before"][key], 1)))
        rows.append((f"{key} after", round(after, 1)))
        if key in ratios:
            rows.append((f"{key} ratio", round(ratios[key], 2)))
    for key, value in versus_generator.items():
        rows.append((f"{key} after / generator before", round(value, 2)))
    print(format_table(rows, "benchmark_data before/after (medians)"))
    write_json(result, args.out)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    torch.set_num_threads(1)  # one worker = one core, as in a DataLoader worker
    if args.probe:
        rates = training_path_rates(args.image_size, args.reference_size, args.items,
                                    args.batch_size, args.batches)
        print(json.dumps(rates))
        return rates
    if args.baseline:
        return compare(args)
    size, ref = args.image_size, args.reference_size
    n = args.samples
    result: dict[str, Any] = {**environment(torch.device("cpu")), "benchmark": "data",
                              "smoke": args.smoke, "image_size": size, "reference_size": ref,
                              "samples": n, "gpu_rate": args.gpu_rate}
    log.info("data benchmark at %d px, %d samples per source", size, n)
    synthetic = SyntheticPairs(length=10 * n + 1, seed=0, image_size=size, reference_size=ref)
    syn_rate = rate((synthetic[i] for i in range(len(synthetic))), n)

    with tempfile.TemporaryDirectory(prefix="rba-bench-shards-") as tmp:
        t0 = time.perf_counter()
        shards = write_shards(synthetic_records(n + 1, seed=0, image_size=size,
                                                reference_size=ref), tmp, args.per_shard)
        write_rate = (n + 1) / (time.perf_counter() - t0)
        urls = [str(s) for s in shards]
        bytes_per_sample = sum(s.stat().st_size for s in shards) / (n + 1)
        shard_rate = rate(shard_dataset(urls, seed=0, image_size=size, reference_size=ref), n)
        latent_dir = Path(tmp) / "latent"
        latent_urls = [str(p) for p in write_latent_shards(
            shard_samples(urls, [0], size, ref), LatentShapeEncoder(), latent_dir,
            args.per_shard, size, ref, batch_size=args.batch_size)]
        latent_bytes = sum(Path(u).stat().st_size for u in latent_urls) / (n + 1)
        latent_rate = rate(latent_shard_dataset(latent_urls), n)
        loaders = {}
        if args.loader_workers:
            w = args.loader_workers
            loaders["synthetic"] = loader_rate(synthetic, w, args.batch_size, n)
            loaders["shards"] = loader_rate(
                shard_dataset(urls, seed=0, image_size=size, reference_size=ref), w,
                args.batch_size, n)
            loaders["latent_shards"] = loader_rate(latent_shard_dataset(latent_urls), w,
                                                   args.batch_size, n)

    def need(per_worker: float) -> int:
        return math.ceil(args.gpu_rate / per_worker) if per_worker > 0 else -1

    result["synthetic"] = {"samples_per_s_per_worker": round(syn_rate, 2),
                           "workers_needed": need(syn_rate)}
    result["shards"] = {"samples_per_s_per_worker": round(shard_rate, 2),
                        "workers_needed": need(shard_rate),
                        "write_samples_per_s": round(write_rate, 2), "num_shards": len(shards),
                        "kib_per_sample": round(bytes_per_sample / 1024, 1)}
    result["latent_shards"] = {"samples_per_s_per_worker": round(latent_rate, 2),
                               "workers_needed": need(latent_rate),
                               "kib_per_sample": round(latent_bytes / 1024, 1),
                               "latent_values": "random (reader timing only)"}
    if loaders:
        result["dataloader"] = {"workers": args.loader_workers,
                                **{f"{k}_samples_per_s": round(v, 2) for k, v in loaders.items()}}
    rows: list[tuple[str, Any]] = [
        ("cpu cores", result["cpu_count"]), ("image / reference px", f"{size} / {ref}"),
        ("synthetic: samples/s per worker", result["synthetic"]["samples_per_s_per_worker"]),
        (f"synthetic: workers for {args.gpu_rate:g}/s", result["synthetic"]["workers_needed"]),
        ("shards: samples/s per worker", result["shards"]["samples_per_s_per_worker"]),
        (f"shards: workers for {args.gpu_rate:g}/s", result["shards"]["workers_needed"]),
        ("shards: write samples/s (1 process)", result["shards"]["write_samples_per_s"]),
        ("shards: KiB per sample", result["shards"]["kib_per_sample"]),
        ("ratio shards/synthetic per worker", round(shard_rate / syn_rate, 3)),
        ("latent shards: samples/s per worker", round(latent_rate, 2)),
        (f"latent shards: workers for {args.gpu_rate:g}/s", need(latent_rate)),
        ("latent shards: KiB per sample", result["latent_shards"]["kib_per_sample"]),
    ]
    for k, v in loaders.items():
        rows.append((f"DataLoader {args.loader_workers} workers {k} samples/s", round(v, 2)))
    print(format_table(rows, "benchmark_data"))
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
