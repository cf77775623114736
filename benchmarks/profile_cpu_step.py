"""Where the CPU main job's training step goes, and what the machine allows.

Builds the default ``python train.py`` model and data from the configs (or the ``--override``s)
and runs the module's own ``training_step`` + AdamW + EMA on pre-drawn batches. Reports:

- the step's FLOPs by operator (attention counted through the math SDPA backend, since the
  CPU flash kernel has no FLOP formula), and the data generator's seconds per batch;
- this machine's dense fp32 matmul rate per thread, measured in the same process: the FLOPs
  divided by it give the step's compute floor, and ``max_steps`` x that floor the run's;
- step time at 1 and 2 torch threads, in fp32 and under bf16 autocast (what
  ``trainer.precision=bf16-mixed`` runs), interleaved so load from other processes hits all;
- the top operators of a ``torch.profiler`` trace of two steps (self CPU time).

``OMP_WAIT_POLICY`` is read when torch loads, so compare policies across processes, e.g.
``OMP_WAIT_POLICY=PASSIVE python ...`` against ``env -u OMP_WAIT_POLICY python ...``, alternated.

    PYTHONPATH=. python benchmarks/profile_cpu_step.py --out benchmarks/cpu-<date>/step.json
    PYTHONPATH=. python benchmarks/profile_cpu_step.py --smoke        # seconds, for the tests

``--precision-only`` times just fp32 against bf16 autocast at one thread; under
``ONEDNN_MAX_CPU_ISA=AVX2`` (or ``AVX512_CORE``) it shows a CPU without bf16 instructions.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from hydra.utils import instantiate
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import default_collate
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.bench_common import compose, environment, interleaved_times, write_json
from models.ema import EMA

log = logging.getLogger(__name__)
SMOKE_OVERRIDES = ["data.batch_size=2", "data.reference_size=56",
                   "model.reference_encoder.backbone.config.num_hidden_layers=1"]


def matmul_gflops(threads: int, size: int = 1024, iters: int = 10,
                  dtype: torch.dtype = torch.float32) -> float:
    """Dense matmul GFLOP/s at ``threads`` torch threads: the machine's practical peak."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    return 2 * size**3 * iters / (time.perf_counter() - start) / 1e9


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--override", action="append", default=[], help="extra train.py override")
    p.add_argument("--repeats", type=int, default=4, help="interleaved timing rounds")
    p.add_argument("--smoke", action="store_true", help="batch 2, small encoder: seconds")
    p.add_argument("--precision-only", action="store_true",
                   help="only fp32 against bf16 autocast at 1 thread (no FLOPs, no trace)")
    p.add_argument("--out", default=None, help="JSON output path")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = ["trainer=cpu", *(SMOKE_OVERRIDES if args.smoke else []), *args.override]
    cfg = compose(overrides)
    torch.manual_seed(0)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    module = instantiate(cfg.model)
    module.log = lambda *a, **k: None  # no trainer attached: logging is not what we time
    pairs, size = datamodule.train_set, int(cfg.data.batch_size)
    start = time.perf_counter()
    batches = [default_collate([pairs[b * size + i] for i in range(size)]) for b in range(4)]
    data_s = (time.perf_counter() - start) / len(batches)
    params = module.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    decay = module.hparams.ema_decay
    ema = EMA(decay).track(module) if decay else None  # what the EMA callback steps
    cursor = iter(range(10**9))

    def step(bf16: bool = False) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = module.training_step(batches[next(cursor) % len(batches)], 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(params)

    if args.precision_only:
        return precision_only(step, overrides, args)

    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        step()
    by_op = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    gflop = counter.get_total_flops() / 1e9

    peak = {f"{n}_thread": round(matmul_gflops(n), 1) for n in (1, 2)}
    peak_bf16 = {f"{n}_thread": round(matmul_gflops(n, dtype=torch.bfloat16), 1) for n in (1, 2)}

    def at(threads: int, bf16: bool = False):
        def run() -> None:
            torch.set_num_threads(threads)
            step(bf16)
        return run

    times = interleaved_times({"1_thread": at(1), "2_threads": at(2),
                               "1_thread_bf16": at(1, True), "2_threads_bf16": at(2, True)},
                              torch.device("cpu"), iters=1, repeats=args.repeats, warmup=1)
    torch.set_num_threads(1)
    with profile(activities=[ProfilerActivity.CPU]) as trace:
        step()
        step()
    self_ms: dict[str, float] = defaultdict(float)
    for event in trace.key_averages():
        self_ms[event.key] += event.self_cpu_time_total / 1e3 / 2
    total_ms = sum(self_ms.values())
    top = sorted(self_ms.items(), key=lambda kv: -kv[1])[:12]

    steps = int(cfg.trainer.max_steps)
    floor_1 = gflop / peak["1_thread"]
    result = {
        "what": "CPU main job training step (module.training_step + AdamW + EMA), "
                "batches drawn beforehand",
        "overrides": overrides,
        "environment": environment(torch.device("cpu")),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset (the OpenMP default)"),
        "batch_size": int(cfg.data.batch_size),
        "gflop_per_step": round(gflop, 2),
        "gflop_by_op": {k: round(v / 1e9, 2) for k, v in sorted(by_op.items(),
                                                                key=lambda kv: -kv[1])},
        "data_seconds_per_batch": round(data_s, 3),
        "matmul_gflops": peak,
        "matmul_gflops_bf16": peak_bf16,
        "step_seconds": {k: round(v, 3) for k, v in times.items()},
        "ratio_2_threads_over_1": round(times["2_threads"] / times["1_thread"], 3),
        "speedup_bf16_autocast": {n: round(times[n] / times[f"{n}_bf16"], 3)
                                  for n in ("1_thread", "2_threads")},
        "efficiency_1_thread": round(floor_1 / times["1_thread"], 3),
        "compute_floor_seconds": {
            "step_1_thread": round(floor_1, 3),
            "step_2_threads": round(gflop / peak["2_thread"], 3),
            f"{steps}_steps_2_threads_minutes": round(steps * gflop / peak["2_thread"] / 60, 1),
        },
        "profile_top_self_ms_per_step": {k: round(v, 1) for k, v in top},
        "profile_total_self_ms_per_step": round(total_ms, 1),
    }
    write_json(result, args.out)
    print(f"{gflop:.1f} GFLOP/step; matmul {peak['1_thread']} / {peak['2_thread']} GFLOP/s at "
          f"1 / 2 threads; step {times['1_thread']:.2f} s (1 thread), "
          f"{times['2_threads']:.2f} s (2 threads), ratio {result['ratio_2_threads_over_1']}; "
          f"bf16 autocast {result['speedup_bf16_autocast']['1_thread']}x / "
          f"{result['speedup_bf16_autocast']['2_threads']}x faster; "
          f"1-thread efficiency {result['efficiency_1_thread']:.0%}; floor for {steps} steps at "
          f"2 threads {result['compute_floor_seconds'][f'{steps}_steps_2_threads_minutes']} min")
    return result


def precision_only(step: Callable[[bool], None], overrides: list[str],
                   args: argparse.Namespace) -> dict[str, Any]:
    """fp32 against bf16 autocast, one thread, interleaved; with oneDNN's instruction-set cap."""
    torch.set_num_threads(1)
    times = interleaved_times({"fp32": lambda: step(False), "bf16": lambda: step(True)},
                              torch.device("cpu"), iters=1, repeats=args.repeats, warmup=1)
    result = {
        "what": "CPU training step at 1 thread: fp32 against bf16 autocast, interleaved",
        "overrides": overrides,
        "environment": environment(torch.device("cpu")),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "unset (all of the CPU's)"),
        "mkldnn_bf16_supported": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "step_seconds": {k: round(v, 3) for k, v in times.items()},
        "speedup_bf16_autocast": round(times["fp32"] / times["bf16"], 3),
    }
    write_json(result, args.out)
    print(f"step {times['fp32']:.2f} s fp32, {times['bf16']:.2f} s bf16 autocast "
          f"({result['speedup_bf16_autocast']}x), ONEDNN_MAX_CPU_ISA "
          f"{result['onednn_max_cpu_isa']}")
    return result


if __name__ == "__main__":
    main()
