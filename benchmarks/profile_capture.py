"""Cost of attention capture at SD-1.5 scale, batch 1: plain vs one block vs all 16 blocks.

Times the three forwards in alternation (median of 6 x 10 calls), the capture's own set-up
(entering and leaving the context, no forward: Python only, so the same on CPU and GPU hosts)
and prints a torch.profiler table for the plain and one-block forwards. Random weights; on CPU
a narrow UNet stands in (same modules, narrower).
    python benchmarks/profile_capture.py [--block 9] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch.profiler import ProfilerActivity, profile

from models.attention_capture import capture_cross_attention


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block", type=int, default=9)
    parser.add_argument("--out", default=None, help="also write the timings as JSON here")
    args = parser.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    full = dev == "cuda"
    unet = UNet2DConditionModel(
        block_out_channels=(320, 640, 1280, 1280) if full else (32, 64, 64, 64),
        cross_attention_dim=768, in_channels=9, attention_head_dim=8,
        norm_num_groups=32 if full else 16,
    ).to(dev).eval()
    side = 64 if full else 16
    x = torch.randn(1, 9, side, side, device=dev)
    context = torch.randn(1, 257, 768, device=dev)
    t = torch.full((1,), 500, device=dev)
    mask = torch.zeros(1, 1, side * 8, side * 8, device=dev)
    mask[..., side: 2 * side, side: 3 * side] = 1

    def sync() -> None:
        if dev == "cuda":
            torch.cuda.synchronize()

    def plain() -> None:
        unet(x, t, encoder_hidden_states=context)

    def one() -> None:
        with capture_cross_attention(unet, mask, [args.block]):
            unet(x, t, encoder_hidden_states=context)

    def every() -> None:
        with capture_cross_attention(unet, mask, None):
            unet(x, t, encoder_hidden_states=context)

    fns = {"plain": plain, "one": one, "all": every}
    samples: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=full):
        for fn in fns.values():
            for _ in range(3):
                fn()
        for _ in range(6):
            for name, fn in fns.items():
                sync()
                start = time.perf_counter()
                for _ in range(10):
                    fn()
                sync()
                samples[name].append((time.perf_counter() - start) / 10 * 1e3)
        out = {k: round(statistics.median(v), 2) for k, v in samples.items()}
        out["ratio_one"] = round(out["one"] / out["plain"], 3)
        out["ratio_all"] = round(out["all"] / out["plain"], 3)
        start = time.perf_counter()
        for _ in range(200):
            with capture_cross_attention(unet, mask, [args.block]):
                pass
        out["enter_exit_one_block_ms"] = round((time.perf_counter() - start) / 200 * 1e3, 3)
        out["device"] = dev
        print(json.dumps(out))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if full else [])
        for name in ("plain", "one"):
            with profile(activities=activities) as prof:
                for _ in range(5):
                    fns[name]()
                sync()
            print("=====", name)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
    return out


if __name__ == "__main__":
    main()
