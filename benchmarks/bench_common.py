"""Shared plumbing of the benchmark scripts: device, timing, model composition, JSON, tables.

The benchmarks build the project's own components from the Hydra configs (never a copy of
them), so a number measured here is the number of the code that trains and infers.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from models.config import compose_config

log = logging.getLogger(__name__)

# SD-1.5 / DINOv2-L layouts shrunk to CPU size, same structure (4 UNet levels with
# cross-attention, VAE /8, patch-14 DINOv2): what every --smoke run builds.
SMOKE_MODEL_OVERRIDES = [
    "model=sd15_dinov2_random",
    "data.image_size=64",
    "data.reference_size=56",
    "model.denoiser.config.sample_size=8",
    "model.denoiser.config.block_out_channels=[16,16,32,32]",
    "model.denoiser.config.layers_per_block=1",
    "model.val_block=3",
    "model.denoiser.config.norm_num_groups=8",
    "model.denoiser.config.attention_head_dim=2",
    "model.denoiser.config.cross_attention_dim=32",
    "model.denoiser.cross_attention_dim=32",
    "model.reference_encoder.context_dim=32",
    "model.reference_encoder.mlp_hidden_dim=64",
    "model.reference_encoder.backbone.config.hidden_size=32",
    "model.reference_encoder.backbone.config.num_hidden_layers=1",
    "model.reference_encoder.backbone.config.num_attention_heads=2",
    "model.reference_encoder.backbone.config.mlp_ratio=2",
    "model.autoencoder.config.block_out_channels=[8,8,16,16]",
    "model.autoencoder.config.norm_num_groups=4",
    "model.autoencoder.config.layers_per_block=1",
]
FULL_MODEL_OVERRIDES = ["model=sd15_dinov2_random", "data.image_size=512"]


def pick_device(requested: str | None, smoke: bool) -> torch.device:
    """CUDA when present (and not a smoke run), else CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")


def setup_backends(device: torch.device) -> None:
    """TF32 on, as in train.py and the anchor: the fp32 parts of bf16-mixed use it."""
    torch.set_float32_matmul_precision("high")
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def autocast(device: torch.device) -> AbstractContextManager:
    """bf16 autocast on GPU (what Lightning's bf16-mixed does); fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def compose(overrides: list[str]) -> Any:
    """The train config with ``overrides``."""
    return compose_config(overrides)


def build_on(device: torch.device, factory: Callable[[], Any]) -> Any:
    """Run ``factory`` with ``device`` as default device: random init of 1.2 B parameters
    takes about a minute on CPU, about a second on the GPU."""
    with torch.device(device):
        return factory()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn: Callable[[], Any], device: torch.device, iters: int, warmup: int = 1) -> float:
    """Mean seconds per call of ``fn`` after ``warmup`` calls (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def interleaved_times(
    fns: dict[str, Callable[[], Any]], device: torch.device, iters: int, repeats: int = 6,
    warmup: int = 3,
) -> dict[str, float]:
    """Median seconds per call of each ``fn``, timed in alternation so that clock and cache
    drift hits every variant alike (timing one variant after another biased small ratios)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(time_it(fn, device, iters, 0))
    return {name: statistics.median(v) for name, v in samples.items()}


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def environment(device: torch.device) -> dict[str, Any]:
    """Device, library versions and date: what a number needs to be compared later."""
    import diffusers
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {
        "device": name or device.type,
        "device_type": device.type,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__},
        "cpu_count": os.cpu_count(),
    }


def write_json(result: dict[str, Any], out: str | None) -> None:
    if not out:
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))
    log.info("wrote %s", path)


def format_table(rows: list[tuple[str, Any]], title: str) -> str:
    """Two-column text table; floats at 3 significant decimals."""
    width = max(len(k) for k, _ in rows)
    lines = [title, "-" * (width + 16)]
    for key, value in rows:
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{width}}  {text}")
    return "\n".join(lines)
