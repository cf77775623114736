"""Inference cost at real scale: alignment forward, calibration sweep, guided refinement.

The pipeline is built from ``model=sd15_dinov2_random`` (random weights, the SD-1.5 /
DINOv2-L layouts), run under bf16 autocast on the GPU. Measured:
  * alignment: one UNet forward capturing only block l* (the rest keep SDPA) against a plain
    forward of the same UNet and inputs (target <= 1.05x), and the pipeline's ``align_tensors``
    end to end (DINOv2, two VAE encodes, forward, map -> region -> box -> crop);
  * the calibration sweep: all L blocks at T timesteps = T forwards per batch of cases;
  * refinement: the pipeline with given references (``align=False``), 50 DDIM steps with CFG
    at 512 px, VAE encode and decode and blending included (target <= 1.0 s), in up to three
    variants: fp32 weights
    under bf16 autocast (what the pipeline does), all components cast to bf16 (fewer cast
    kernels: a batch-2 forward is launch-bound), and bf16 plus ``torch.compile`` of the UNet
    with CUDA graphs (``mode="reduce-overhead"``; compiling takes about a minute).
``--parts`` picks which of align, sweep, refine run; the JSON is rewritten after each part.

    PYTHONPATH=. python benchmarks/benchmark_infer.py --out runs/bench/infer.json
    PYTHONPATH=. python benchmarks/benchmark_infer.py --smoke
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

import torch
from hydra.utils import instantiate

from benchmarks.bench_common import (
    FULL_MODEL_OVERRIDES,
    SMOKE_MODEL_OVERRIDES,
    autocast,
    build_on,
    compose,
    environment,
    format_table,
    interleaved_times,
    peak_memory_gib,
    pick_device,
    reset_peak_memory,
    setup_backends,
    sync,
    time_it,
    write_json,
)
from models.alignment import attention_vectors
from models.attention_capture import capture_cross_attention, cross_attention_blocks
from models.denoiser import COMPILE_SCOPES, compile_denoiser
from models.image_processor import to_uint8
from models.pipeline import AlignmentConfig, RefineByAlignPipeline, RefinementConfig
from models.refinement import denoiser_input, latent_mask

log = logging.getLogger(__name__)
PARTS = ("denoiser", "reference_encoder", "autoencoder", "noise_scheduler")
ALIGN_TARGET, REFINE_TARGET_S = 1.05, 1.0
REFINE_VARIANTS = ("autocast", "bf16_weights", "bf16_weights_compiled")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--forward-batch", type=int, default=1, help="cases per alignment forward")
    p.add_argument("--sweep-cases", type=int, default=8, help="cases batched in the sweep")
    p.add_argument("--sweep-timesteps", type=int, default=50, help="T of the T x L sweep")
    p.add_argument("--steps", type=int, default=50, help="refinement sampling steps")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--iters", type=int, default=10, help="timed forwards")
    p.add_argument("--parts", default="align,sweep,refine", help="comma-separated subset")
    p.add_argument("--refine-variants", default="autocast,bf16_weights",
                   help=f"comma-separated subset of {','.join(REFINE_VARIANTS)}, in that order")
    p.add_argument("--compile-scope", choices=COMPILE_SCOPES, default="full",
                   help="bf16_weights_compiled: the full UNet or its transformer blocks only")
    p.add_argument("--override", action="append", default=[], help="extra Hydra override")
    p.add_argument("--device", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU, few steps")
    p.add_argument("--out", default=None, help="JSON output path")
    args = p.parse_args(argv)
    args.parts = [x for x in args.parts.split(",") if x]
    args.refine_variants = [v for v in REFINE_VARIANTS if v in args.refine_variants.split(",")]
    if set(args.parts) - {"align", "sweep", "refine"}:
        p.error(f"--parts: unknown part in {args.parts}")
    if args.smoke:
        args.sweep_cases, args.sweep_timesteps, args.steps, args.iters = 2, 2, 2, 2
    return args


def inputs(batch: int, size: int, reference_size: int, device: torch.device
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image in [-1,1], a rectangle mask, a reference in [0,1]."""
    g = torch.Generator().manual_seed(0)
    image = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    mask = torch.zeros(batch, 1, size, size)
    mask[:, :, size // 4: size // 2, size // 3: 2 * size // 3] = 1
    reference = torch.rand(batch, 3, reference_size, reference_size, generator=g)
    return image.to(device), mask.to(device), reference.to(device)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    device = pick_device(args.device, args.smoke)
    setup_backends(device)
    overrides = list(SMOKE_MODEL_OVERRIDES if args.smoke else FULL_MODEL_OVERRIDES)
    cfg = compose(overrides + args.override)
    torch.manual_seed(0)
    size, block, timestep = cfg.data.image_size, int(cfg.model.val_block), 500
    pipe = build_on(device, lambda: RefineByAlignPipeline.from_modules(
        **{name: instantiate(cfg.model[name]) for name in PARTS},
        alignment=AlignmentConfig(timestep=timestep, block=block))).to(device)
    for part in (pipe.unet, pipe.reference_encoder, pipe.vae):
        if part is not None:
            part.eval().requires_grad_(False)
    n_blocks = len(cross_attention_blocks(pipe.unet))
    result: dict[str, Any] = {**environment(device), "benchmark": "infer", "smoke": args.smoke,
                              "image_size": size, "block": block, "n_blocks": n_blocks,
                              "overrides": overrides + args.override}
    log.info("inference benchmark at %d px on %s: %s", size, result["device"], args.parts)
    if "align" in args.parts:
        result["alignment"] = measure_alignment(pipe, args, size, block, timestep, device)
        write_json(result, args.out)
    if "sweep" in args.parts:
        result["sweep"] = measure_sweep(pipe, args, size, device)
        write_json(result, args.out)
    if "refine" in args.parts:
        result["refinement"] = {}
        for variant in args.refine_variants:
            log.info("refinement, %s", variant)
            result["refinement"][variant] = measure_refinement(pipe, args, size, variant,
                                                               device)
            write_json(result, args.out)

    ok = {True: "ok", False: "MISSED"}
    rows: list[tuple[str, Any]] = [
        ("device", result["device"]), ("image px / block l*", f"{size} / {block} of {n_blocks}"),
    ]
    if "alignment" in result:
        a = result["alignment"]
        rows += [
            (f"plain forward ms (batch {a['batch']})", a["plain_forward_ms"]),
            ("capture l* forward ms", a["capture_block_forward_ms"]),
            ("ratio capture/plain (target <= 1.05)", f"{a['ratio']:.3f} {ok[a['meets_target']]}"),
            ("capture all L blocks ratio", a["capture_all_ratio"]),
            ("align() end to end ms", a["align_end_to_end_ms"]),
        ]
    if "sweep" in result:
        sw = result["sweep"]
        rows += [(f"sweep T={sw['timesteps']} x L={n_blocks}, {sw['cases']} cases: s/batch",
                  sw["seconds_per_batch"]), ("sweep s/case", sw["seconds_per_case"])]
    for variant, r in result.get("refinement", {}).items():
        rows.append((f"refine {args.steps} steps CFG, {variant}: s (target <= "
                     f"{REFINE_TARGET_S})", f"{r['seconds']:.3f} {ok[r['meets_target']]}"))
    print(format_table(rows, "benchmark_infer" + (" (smoke: targets meaningless)"
                                                  if args.smoke else "")))
    write_json(result, args.out)
    return result


def measure_alignment(pipe: RefineByAlignPipeline, args: argparse.Namespace, size: int,
                      block: int, timestep: int, device: torch.device) -> dict[str, Any]:
    """One forward capturing block l* (and all blocks) against a plain one, in alternation."""
    unet, encoder, ae = pipe.unet, pipe.reference_encoder, pipe.autoencoder
    image, mask, reference = inputs(args.forward_batch, size, encoder.image_size, device)
    with torch.no_grad(), autocast(device):
        context = encoder(reference)
        latents = ae.encode(image)
        x = denoiser_input(latents, ae.encode(image * (1 - mask)),
                           latent_mask(mask, latents.shape[-2:]))
        t = torch.full((len(image),), timestep, device=device)

        def plain() -> None:
            unet(x, t, encoder_hidden_states=context)

        def captured() -> None:
            with capture_cross_attention(unet, mask, [block]):
                unet(x, t, encoder_hidden_states=context)

        def captured_all() -> None:
            with capture_cross_attention(unet, mask, None):
                unet(x, t, encoder_hidden_states=context)

        times = interleaved_times({"plain": plain, "one": captured, "all": captured_all},
                                  device, args.iters)
        plain_s, capture_s, capture_all_s = times["plain"], times["one"], times["all"]
    with autocast(device):
        align_s = time_it(lambda: pipe.align_tensors(image[:1], mask[:1], reference[:1]),
                          device, args.iters // 2, 1)
    return {
        "batch": args.forward_batch, "timing": "interleaved, median of 6 x iters",
        "plain_forward_ms": round(plain_s * 1e3, 2),
        "capture_block_forward_ms": round(capture_s * 1e3, 2),
        "ratio": round(capture_s / plain_s, 3), "target_ratio": ALIGN_TARGET,
        "meets_target": capture_s / plain_s <= ALIGN_TARGET,
        "capture_all_blocks_forward_ms": round(capture_all_s * 1e3, 2),
        "capture_all_ratio": round(capture_all_s / plain_s, 3),
        "align_end_to_end_ms": round(align_s * 1e3, 2),
    }


def measure_sweep(pipe: RefineByAlignPipeline, args: argparse.Namespace, size: int,
                  device: torch.device) -> dict[str, Any]:
    """The calibration sweep: T timesteps x all L blocks = T forwards per batch of cases."""
    cases, steps = args.sweep_cases, args.sweep_timesteps
    image, mask, reference = inputs(cases, size, pipe.reference_encoder.image_size, device)
    timesteps = torch.linspace(999, 0, steps).round().long().tolist()
    reset_peak_memory(device)
    gen = torch.Generator()
    with torch.no_grad(), autocast(device):
        context = pipe.reference_encoder(reference)
        sweep_s = time_it(lambda: attention_vectors(pipe.unet, pipe.autoencoder, pipe.scheduler,
                                                    image, mask, context, timesteps, None,
                                                    gen.manual_seed(0)), device, 1, 1)
    return {
        "cases": cases, "timesteps": steps, "blocks": len(cross_attention_blocks(pipe.unet)),
        "forwards_per_batch": steps, "seconds_per_batch": round(sweep_s, 3),
        "seconds_per_case": round(sweep_s / cases, 4), "peak_memory_gib": peak_memory_gib(device),
    }


def measure_refinement(pipe: RefineByAlignPipeline, args: argparse.Namespace, size: int,
                       variant: str, device: torch.device) -> dict[str, Any]:
    """The refinement stage end to end (the pipeline with ``align=False``). The bf16 variants
    cast the pipeline in place (and the compiled one compiles its UNet in place), so they run
    after the autocast variant."""
    amp = autocast(device)
    if variant != "autocast":
        pipe.to(torch.bfloat16)
        amp = torch.autocast(device.type, dtype=torch.bfloat16)  # casts the fp32 inputs
    first_s = None
    if variant == "bf16_weights_compiled":
        compile_denoiser(pipe.unet, args.compile_scope,
                         mode="reduce-overhead" if device.type == "cuda" else "default")
    refinement = RefinementConfig(num_steps=args.steps, guidance_scale=args.guidance)
    image, mask, reference = inputs(1, size, pipe.reference_encoder.image_size, device)
    # what a user hands the pipeline: uint8 arrays (it converts, samples, pastes back)
    case = (to_uint8(image[0]), mask[0, 0].bool().cpu().numpy(),
            (reference[0] * 255).round().byte().permute(1, 2, 0).cpu().numpy())

    def refine() -> None:
        pipe(*case, refinement, align=False)

    reset_peak_memory(device)
    with torch.no_grad(), amp:
        if variant == "bf16_weights_compiled":
            t0 = time.perf_counter()
            refine()  # compiles
            sync(device)
            first_s = round(time.perf_counter() - t0, 2)
        refine_s = time_it(refine, device, 1 if args.smoke else 3, 1)
    return {
        "steps": args.steps, "guidance_scale": args.guidance, "seconds": round(refine_s, 3),
        "target_seconds": REFINE_TARGET_S, "meets_target": refine_s <= REFINE_TARGET_S,
        "per_step_ms": round(refine_s / args.steps * 1e3, 2),
        "first_call_s_compile": first_s, "peak_memory_gib": peak_memory_gib(device),
    }


if __name__ == "__main__":
    main()
