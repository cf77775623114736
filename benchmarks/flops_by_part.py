"""Where a training sample's FLOPs sit, per architecture variant: the cheap side of the
architecture lever (what a change saves), before any training says what it costs in quality.

Each ``--variant NAME=OVERRIDE[,OVERRIDE...]`` composes train.py's config with those
overrides, builds the LightningModule and runs its own ``training_step`` on one synthetic
sample under ``FlopCounterMode`` (attention through the math SDPA backend, which has a FLOP
formula): forward + backward for the total, the forward alone for the split by part (the
counter's module attribution is only reliable in the forward), grouped as the reference
encoder and, per UNet block with its resolution, resnets, self-attention, cross-attention,
feed-forward and the rest. Deterministic: no timing, so it can run beside other jobs.

    python benchmarks/flops_by_part.py --out benchmarks/cpu-<date>/flops_by_part.json \
        --variant "cross_only_32px=+model.denoiser.config.only_cross_attention=[false,true,false]" \
        --variant "wider=model.denoiser.config.block_out_channels=[64,128,256]"
"""

from __future__ import annotations

import argparse
import logging
import re
from collections import defaultdict
from typing import Any

import torch
from hydra.utils import instantiate
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import default_collate
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.bench_common import compose, write_json

log = logging.getLogger(__name__)
UNET = "UNet2DConditionModel"
BLOCK = re.compile(rf"^{UNET}\.(?P<block>down_blocks\.\d+|mid_block|up_blocks\.\d+)$")
PARTS = (  # (part, pattern of the module below a block), first match wins
    ("self_attention", re.compile(r"\.transformer_blocks\.\d+\.attn1$")),
    ("cross_attention", re.compile(r"\.transformer_blocks\.\d+\.attn2$")),
    ("feed_forward", re.compile(r"\.transformer_blocks\.\d+\.ff$")),
    ("resnets", re.compile(r"\.resnets\.\d+$")),
    ("resampling", re.compile(r"\.(down|up)samplers\.\d+$")),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variant", action="append", default=[],
                   help="NAME=OVERRIDE[,OVERRIDE...] (the preset itself is always measured)")
    p.add_argument("--override", action="append", default=[], help="applied to every variant")
    p.add_argument("--out", default=None, help="JSON output path")
    return p.parse_args(argv)


def block_resolutions(cfg: Any) -> dict[str, int]:
    """{block name: its feature-map side in pixels or latents} of the UNet config."""
    unet = cfg.model.denoiser.config
    levels, size = len(unet.block_out_channels), int(unet.sample_size)
    sides = {f"down_blocks.{i}": size >> i for i in range(levels)}
    sides.update({f"up_blocks.{i}": size >> (levels - 1 - i) for i in range(levels)})
    sides["mid_block"] = size >> (levels - 1)
    return sides


def flops_by_part(counts: dict[str, dict[Any, int]], sides: dict[str, int]
                  ) -> dict[str, float]:
    """GFLOP per ``<part>`` and ``<block>@<side>px/<part>`` from FlopCounterMode's counts."""
    total = {name: sum(ops.values()) for name, ops in counts.items()}
    out: dict[str, float] = defaultdict(float)
    for name, flops in total.items():
        match = BLOCK.match(name)
        if not match:
            continue
        block, classified = match["block"], 0
        for sub, sub_flops in total.items():
            if not sub.startswith(name + "."):
                continue
            for part, pattern in PARTS:
                if pattern.search(sub[len(name):]):
                    out[f"{block}@{sides[block]}/{part}"] += sub_flops / 1e9
                    classified += sub_flops
                    break
        if flops - classified:
            out[f"{block}@{sides[block]}/other"] += (flops - classified) / 1e9
    in_blocks = sum(total[n] for n in total if BLOCK.match(n))
    out["reference_encoder"] = total.get("ReferenceEncoder", 0) / 1e9
    out["unet_outside_blocks"] = (total.get(UNET, 0) - in_blocks) / 1e9
    out["loss_and_rest"] = (total["Global"] - total.get(UNET, 0)
                            - total.get("ReferenceEncoder", 0)) / 1e9
    return dict(out)


def measure(overrides: list[str]) -> dict[str, Any]:
    """GFLOP of one sample's training step (forward + backward), its forward by part, and
    parameter counts."""
    cfg = compose(["trainer=cpu", "data.batch_size=1", *overrides])
    torch.manual_seed(0)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    module = instantiate(cfg.model)
    module.log = lambda *a, **k: None  # no trainer attached
    batch = default_collate([datamodule.train_set[0]])
    with sdpa_kernel([SDPBackend.MATH]):
        with FlopCounterMode(display=False) as forward:
            loss = module.training_step(batch, 0)
        with FlopCounterMode(display=False) as backward:
            loss.backward()
    parts = flops_by_part(forward.get_flop_counts(), block_resolutions(cfg))
    by_kind: dict[str, float] = defaultdict(float)
    for key, gflop in parts.items():
        by_kind[key.rsplit("/", 1)[-1]] += gflop
    return {"overrides": overrides,
            "gflop_per_sample": (forward.get_total_flops() + backward.get_total_flops()) / 1e9,
            "forward_gflop": forward.get_total_flops() / 1e9,
            "forward_gflop_by_kind": dict(by_kind), "forward_gflop_by_part": parts,
            "parameters_millions": {
                "denoiser": sum(p.numel() for p in module.denoiser.parameters()) / 1e6,
                "reference_encoder": sum(p.numel() for p in
                                         module.reference_encoder.parameters()) / 1e6}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    variants = {"preset": []}
    for spec in args.variant:
        name, sep, overrides = spec.partition("=")
        if not sep or not name or not overrides:
            raise SystemExit(f"--variant {spec!r}: expected NAME=OVERRIDE[,OVERRIDE...]")
        variants[name] = re.split(r",(?=[\w.+~]+=)", overrides)
    results = {name: measure([*args.override, *ov]) for name, ov in variants.items()}
    base = results["preset"]["gflop_per_sample"]
    for r in results.values():
        r["ratio_to_preset"] = r["gflop_per_sample"] / base
    kinds = sorted({k for r in results.values() for k in r["forward_gflop_by_kind"]},
                   key=lambda k: -results["preset"]["forward_gflop_by_kind"].get(k, 0))
    print("GFLOP per training sample: forward + backward, ratio to the preset, and the forward "
          "by kind:")
    print("| variant | train step | ratio | forward | " + " | ".join(kinds) + " |")
    print("|---|---|---|---|" + "---|" * len(kinds))
    for name, r in results.items():
        cells = " | ".join(f"{r['forward_gflop_by_kind'].get(k, 0):.3f}" for k in kinds)
        print(f"| {name} | {r['gflop_per_sample']:.2f} | {r['ratio_to_preset']:.2f}x | "
              f"{r['forward_gflop']:.2f} | {cells} |")
    result = {"what": "FLOPs of one sample's training_step + backward (FlopCounterMode, math "
                      "SDPA); the forward's by part", "variants": results}
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
