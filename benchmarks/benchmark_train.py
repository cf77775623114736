"""Training-step throughput at real scale: the project's own step against the raw UNet anchor.

Builds ``model=sd15_dinov2_random`` from the configs and runs ``RefineByAlignModule``'s own
``training_step`` in a manual loop (data already on the device): two VAE encodes, DINOv2 + MLP,
UNet forward + backward, gradient clipping, optimizer, LR scheduler and EMA, under bf16
autocast. In the same process, the anchor (``measure_anchor``): a plain
diffusers UNet of the same layout, bf16 autocast, fused AdamW, MSE. The ratio ours/anchor
says what the project's extras cost; the per-part breakdown (parts timed in isolation) says
where. ``--precomputed-latents`` feeds the step what ``data=latent_shards`` gives it (both
latents, no target pixels), so the module's step runs no VAE encode. ``--loader-workers N``
goes further: every step takes its batch from the real ``data=latent_shards`` DataLoader
(N workers, pinned memory, non-blocking copies) over shards written here from procedural
pairs with random latents of the VAE's shape (reading costs the same whatever the values),
so data loading is inside the timed step. The anchor is measured first and the JSON is
rewritten after each part, so a run cut short by a timeout keeps what it measured.

    PYTHONPATH=. python benchmarks/benchmark_train.py --batch-size 32 --out runs/bench/train.json
    PYTHONPATH=. python benchmarks/benchmark_train.py --batch-size 32 --precomputed-latents \
        --loader-workers 8 --fused-adamw --compile --anchor eager --out runs/bench/c.json
    PYTHONPATH=. python benchmarks/benchmark_train.py --smoke     # CPU, tiny, < 60 s
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.bench_common import (
    FULL_MODEL_OVERRIDES,
    SMOKE_MODEL_OVERRIDES,
    autocast,
    build_on,
    compose,
    environment,
    format_table,
    peak_memory_gib,
    pick_device,
    reset_peak_memory,
    setup_backends,
    sync,
    time_it,
    write_json,
)
from models.denoiser import COMPILE_SCOPES, compile_denoiser
from models.ema import EMA

log = logging.getLogger(__name__)


def make_batch(batch_size: int, image_size: int, reference_size: int,
               device: torch.device) -> dict[str, torch.Tensor]:
    """A batch in the data contract (see data.modes), rectangle masks, both modes."""
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(batch_size, 1, image_size, image_size)
    lo, hi = image_size // 4, image_size // 2
    mask[:, :, lo:hi + lo // 2, lo:hi] = 1
    ref_mask = torch.zeros(batch_size, 1, reference_size, reference_size)
    r = reference_size // 4
    ref_mask[:, :, r:3 * r, r:2 * r] = 1
    batch = {
        "target": torch.rand(batch_size, 3, image_size, image_size, generator=g) * 2 - 1,
        "mask": mask,
        "reference": torch.rand(batch_size, 3, reference_size, reference_size, generator=g),
        "reference_mask": ref_mask,
        "mode": torch.arange(batch_size) % 2,
    }
    return {k: v.to(device) for k, v in batch.items()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (in place)")
    p.add_argument("--then-compile", action="store_true",
                   help="after the eager step, compile the UNet in place and time it again "
                        "(same process, same anchor, same data)")
    p.add_argument("--compile-scope", choices=COMPILE_SCOPES, default="full",
                   help="full UNet, or regional: its repeated transformer blocks only (starts "
                        "in a fraction of the compile time)")
    p.add_argument("--fused-adamw", action="store_true", help="model.optimizer.fused=true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--grad-ckpt", action="store_true", help="UNet gradient checkpointing")
    p.add_argument("--precomputed-latents", action="store_true", help="skip the VAE encodes")
    p.add_argument("--loader-workers", type=int, default=0,
                   help="batches from a latent-shard DataLoader with N workers (0: one fixed "
                        "batch on the device); implies --precomputed-latents")
    p.add_argument("--anchor", choices=["same", "eager", "none"], default="same",
                   help="anchor in the same mode (compile/channels-last/ckpt), eager, or none")
    p.add_argument("--no-breakdown", action="store_true")
    p.add_argument("--override", action="append", default=[], help="extra Hydra override")
    p.add_argument("--device", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU, a few steps")
    p.add_argument("--out", default=None, help="JSON output path")
    args = p.parse_args(argv)
    args.precomputed_latents |= args.loader_workers > 0
    if args.smoke:
        args.batch_size, args.steps, args.warmup = min(args.batch_size, 2), 2, 1
    return args


def variant_name(args: argparse.Namespace) -> str:
    flags = [f for f in ("compile", "fused_adamw", "channels_last", "grad_ckpt",
                         "precomputed_latents") if getattr(args, f)]
    if args.loader_workers:
        flags.append(f"loader{args.loader_workers}")
    if args.compile or args.then_compile:
        flags.append(f"scope_{args.compile_scope}")
    return "+".join(flags) or "eager"


def optimizer_and_scheduler(module: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    conf = module.configure_optimizers()
    if isinstance(conf, torch.optim.Optimizer):
        return conf, None
    return conf["optimizer"], conf["lr_scheduler"]["scheduler"]


class ShapeOnlyEncoder(nn.Module):
    """Random latents in ``like``'s shape and scale: stands in for the VAE when writing
    shards whose reading, not whose values, is being timed."""

    def __init__(self, like: nn.Module) -> None:
        super().__init__()
        self.latent_channels, self.downsample = like.latent_channels, like.downsample
        self.scaling_factor = getattr(like, "scaling_factor", 1.0)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        return torch.randn(b, self.latent_channels, h // self.downsample, w // self.downsample)

    def fingerprint(self) -> dict[str, Any]:
        """What the latent-shard manifest records of its autoencoder."""
        return {"kind": type(self).__name__, "latent_channels": self.latent_channels,
                "downsample": self.downsample, "scaling_factor": float(self.scaling_factor),
                "name_or_path": ""}


def latent_batches(cfg: Any, args: argparse.Namespace, device: torch.device,
                   autoencoder: nn.Module, folder: str) -> Iterator[dict[str, torch.Tensor]]:
    """Endless device batches from the ``data=latent_shards`` DataModule's train loader."""
    from data.datamodule import PairDataModule
    from data.latent_shards import synthetic_samples, write_latent_shards

    size, ref, workers = cfg.data.image_size, cfg.data.reference_size, args.loader_workers
    num = 4 * args.batch_size
    urls = write_latent_shards(
        synthetic_samples(num, [0], size, ref, workers=workers), ShapeOnlyEncoder(autoencoder),
        folder, per_shard=max(1, num // (2 * workers)), image_size=size, reference_size=ref,
        batch_size=args.batch_size)
    data = PairDataModule(source="latent_shards", shard_urls=[str(u) for u in urls],
                          batch_size=args.batch_size, num_workers=workers, image_size=size,
                          reference_size=ref, pin_memory=device.type == "cuda",
                          train_length=10**9, shuffle_buffer=num)
    data.setup("fit")
    for batch in data.train_dataloader():  # resampled: endless
        yield {k: v.to(device, non_blocking=True) for k, v in batch.items()
               if isinstance(v, torch.Tensor)}


def measure_ours(cfg: Any, args: argparse.Namespace, device: torch.device, tmp: str,
                 report: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """The module's own training step, timed; plus FLOPs, peak memory and a part breakdown."""
    module = build_on(device, lambda: instantiate(cfg.model)).to(device)
    module.train()
    source = (latent_batches(cfg, args, device, module.autoencoder, tmp)
              if args.loader_workers else None)
    if source is not None:
        batch = next(source)
    else:
        batch = make_batch(args.batch_size, cfg.data.image_size, cfg.data.reference_size,
                           device)
    if args.precomputed_latents and source is None:  # what data=latent_shards hands the step
        with torch.no_grad(), autocast(device):
            batch["latents"], batch["masked_latents"] = module.encode_inputs(batch)
        del batch["target"]
    if args.channels_last:
        module.denoiser.to(memory_format=torch.channels_last)
    optimizer, scheduler = optimizer_and_scheduler(module)
    params = module.trainable_parameters()
    clip = cfg.trainer.get("gradient_clip_val")
    counter = {"i": 0}

    def step() -> None:
        data = next(source) if source is not None else batch
        with autocast(device):
            loss = module.training_step(data, counter["i"])
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        module.on_train_batch_end(loss, data, counter["i"])
        counter["i"] += 1

    with FlopCounterMode(display=False) as flops:  # eager, before any compile
        with autocast(device):
            loss = module.training_step(batch, 0)
        loss.backward()
    optimizer.zero_grad(set_to_none=True)
    flops_per_sample = flops.get_total_flops() / args.batch_size
    if args.compile:
        compile_denoiser(module.denoiser, args.compile_scope)
    timing = timed_steps(step, args, device)
    seconds = timing["step_ms"] / 1e3
    result = {
        **timing,
        "data": (f"latent-shard DataLoader, {args.loader_workers} workers, pin_memory="
                 f"{device.type == 'cuda'}" if source
                 else "one fixed batch on the device"),
        "train_tflop_per_sample": round(flops_per_sample / 1e12, 4),
        "achieved_tflop_per_s": round(flops_per_sample * args.batch_size / seconds / 1e12, 2),
        "parameters_m": {name: round(sum(p.numel() for p in part.parameters()) / 1e6, 1)
                         for name, part in (("denoiser", module.denoiser),
                                            ("reference_encoder", module.reference_encoder),
                                            ("autoencoder", module.autoencoder))},
        "trainable_parameters_m": round(sum(p.numel() for p in params) / 1e6, 1),
    }
    if not args.no_breakdown:
        result["breakdown_ms"] = breakdown(module, batch, optimizer, clip, args, device)
        if source is not None:
            result["breakdown_ms"]["data_next_and_copy"] = round(
                time_it(lambda: next(source), device, max(1, args.steps // 2), 1) * 1e3, 2)
    if args.then_compile and not args.compile:
        report(result)  # the eager numbers are safe before compiling starts
        log.info("compiling the UNet in place and timing the same step again")
        compile_denoiser(module.denoiser, args.compile_scope)
        result["compiled"] = timed_steps(step, args, device)
        if not args.no_breakdown:
            result["compiled"]["breakdown_ms"] = breakdown(module, batch, optimizer, clip, args,
                                                           device, vae=False)
    return result


def timed_steps(step: Callable[[], None], args: argparse.Namespace, device: torch.device
                ) -> dict[str, Any]:
    """samples/s of ``step`` after one first call (timed apart: it compiles, when compiling)."""
    reset_peak_memory(device)
    t0 = time.perf_counter()
    step()
    sync(device)
    first_step_s = time.perf_counter() - t0
    seconds = time_it(step, device, args.steps, max(0, args.warmup - 1))
    return {"samples_per_s": round(args.batch_size / seconds, 2),
            "step_ms": round(seconds * 1e3, 2), "first_step_s": round(first_step_s, 2),
            "peak_memory_gib": peak_memory_gib(device)}


def breakdown(module: nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
              clip: float | None, args: argparse.Namespace, device: torch.device,
              vae: bool = True) -> dict[str, float]:
    """Each part of the step timed alone (same inputs, same precision), in ms per step."""
    from models.losses import diffusion_loss
    from models.refinement import denoiser_input, latent_mask

    iters, warm = max(1, args.steps // 2), 1
    enc, unet = module.reference_encoder, module.denoiser
    drop = torch.zeros(len(batch["mode"]), dtype=torch.bool, device=device)

    def encode() -> None:
        with autocast(device):
            module.encode_inputs(batch)

    def reference() -> None:
        with autocast(device):
            enc(batch["reference"], drop)

    with torch.no_grad(), autocast(device):
        latents, masked = module.encode_inputs(batch)
        context = enc(batch["reference"], drop)
    mask_lat = latent_mask(batch["mask"], latents.shape[-2:])
    noise = torch.randn_like(latents)
    t = torch.randint(0, 1000, (len(latents),), device=device)
    x = denoiser_input(module.noise_scheduler.add_noise(latents, noise, t), masked, mask_lat)

    def unet_step() -> None:
        with autocast(device):
            pred = unet(x, t, encoder_hidden_states=context).sample
        diffusion_loss(pred, noise, mask_lat, module.hparams.masked_region_weight).mean().backward()

    params = module.trainable_parameters()
    out = ({"vae_encode_x2": time_it(encode, device, iters, warm)}
           if vae and "latents" not in batch else {})
    out["dinov2_mlp_forward"] = time_it(reference, device, iters, warm)
    out["unet_fwd_bwd"] = time_it(unet_step, device, iters, warm)

    decay = module.hparams.ema_decay
    ema = EMA(decay).track(module) if decay else None  # what the EMA callback steps

    def opt_ema() -> None:  # gradients of the last unet_step stay in place
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        if ema is not None:
            ema.step(params)

    out["optimizer_clip_ema"] = time_it(opt_ema, device, iters, warm)
    optimizer.zero_grad(set_to_none=True)
    return {k: round(v * 1e3, 2) for k, v in out.items()}


def measure_anchor(cfg: Any, args: argparse.Namespace, device: torch.device,
                   tokens: int) -> dict[str, Any]:
    """The anchor's raw step: plain UNet, bf16 autocast, fused AdamW, MSE on epsilon."""
    from diffusers import UNet2DConditionModel

    unet_cfg = dict(cfg.model.denoiser.config)
    unet = build_on(device, lambda: UNet2DConditionModel(**unet_cfg)).to(device)
    same = args.anchor == "same"
    if same and args.channels_last:
        unet.to(memory_format=torch.channels_last)
    if same and args.grad_ckpt:
        unet.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=device.type == "cuda")
    bs, lat = args.batch_size, int(unet_cfg["sample_size"])
    x = torch.randn(bs, unet_cfg["in_channels"], lat, lat, device=device)
    t = torch.randint(0, 1000, (bs,), device=device)
    c = torch.randn(bs, tokens, unet_cfg["cross_attention_dim"], device=device)
    y = torch.randn(bs, unet_cfg["out_channels"], lat, lat, device=device)
    if same and args.compile:
        compile_denoiser(unet, args.compile_scope)

    def step() -> None:
        with autocast(device):
            out = unet(x, t, encoder_hidden_states=c).sample
        F.mse_loss(out.float(), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    reset_peak_memory(device)
    seconds = time_it(step, device, args.steps, args.warmup)
    result = {"samples_per_s": round(bs / seconds, 2), "step_ms": round(seconds * 1e3, 2),
              "peak_memory_gib": peak_memory_gib(device), "mode": args.anchor,
              "reference_tokens": tokens}
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore", message=".*self.log.*")
    args = parse_args(argv)
    device = pick_device(args.device, args.smoke)
    setup_backends(device)
    overrides = list(SMOKE_MODEL_OVERRIDES if args.smoke else FULL_MODEL_OVERRIDES)
    if args.fused_adamw:
        overrides.append("++model.optimizer.fused=true")
    if args.grad_ckpt:
        overrides.append("model.denoiser.gradient_checkpointing=true")
    cfg = compose(overrides + ["trainer=cpu" if device.type == "cpu" else "trainer=gpu",
                               *args.override])
    torch.manual_seed(0)
    result: dict[str, Any] = {
        **environment(device), "benchmark": "train", "variant": variant_name(args),
        "smoke": args.smoke, "batch_size": args.batch_size, "image_size": cfg.data.image_size,
        "steps": args.steps, "warmup": args.warmup, "overrides": overrides + args.override,
    }
    tokens = ((cfg.data.reference_size // 14) ** 2) + 1  # DINOv2 sequence as in the anchor
    result["anchor_published_h100"] = {"eager_bf16_bs32": 87.5, "compiled_bf16_bs32": 120.7}
    if args.anchor != "none":  # first: a run cut short by a timeout still has its anchor
        log.info("measuring the raw UNet anchor (%s)", args.anchor)
        result["anchor"] = measure_anchor(cfg, args, device, tokens)
        write_json(result, args.out)
        gc.collect()
        reset_peak_memory(device)
    else:
        result["anchor"] = {"samples_per_s": None}
    log.info("measuring the module's training step (%s, batch %d, %d px) on %s",
             result["variant"], args.batch_size, cfg.data.image_size, result["device"])
    anchor = result["anchor"]["samples_per_s"]

    def report(ours: dict[str, Any]) -> None:
        result["full_step"] = ours
        result["ratio"] = round(ours["samples_per_s"] / anchor, 3) if anchor else None
        if "compiled" in ours and anchor:
            result["ratio_compiled"] = round(ours["compiled"]["samples_per_s"] / anchor, 3)
        write_json(result, args.out)

    with tempfile.TemporaryDirectory(prefix="rba-bench-latents-") as tmp:
        ours = measure_ours(cfg, args, device, tmp, report)
    report(ours)

    rows: list[tuple[str, Any]] = [
        ("device", result["device"]), ("variant", result["variant"]),
        ("batch x px", f"{args.batch_size} x {cfg.data.image_size}"),
        ("ours: samples/s", ours["samples_per_s"]), ("ours: step ms", ours["step_ms"]),
        ("ours: data", ours["data"]), ("ours: first step s (compile)", ours["first_step_s"]),
        ("ours: TFLOP/sample (fwd+bwd)", ours["train_tflop_per_sample"]),
        ("ours: achieved TFLOP/s", ours["achieved_tflop_per_s"]),
        ("ours: peak GiB", ours["peak_memory_gib"]),
    ]
    for part, ms in ours.get("breakdown_ms", {}).items():
        rows.append((f"  part (isolated) {part} ms/step", ms))
    if "compiled" in ours:
        rows += [("compiled: samples/s", ours["compiled"]["samples_per_s"]),
                 ("compiled: first step s", ours["compiled"]["first_step_s"]),
                 ("compiled: peak GiB", ours["compiled"]["peak_memory_gib"])]
        for part, ms in ours["compiled"].get("breakdown_ms", {}).items():
            rows.append((f"  compiled part {part} ms/step", ms))
    if anchor:
        rows += [(f"anchor ({args.anchor}): samples/s", anchor),
                 ("anchor: peak GiB", result["anchor"]["peak_memory_gib"]),
                 ("ratio ours/anchor", result["ratio"])]
        if "ratio_compiled" in result:
            rows.append(("ratio compiled ours / eager anchor", result["ratio_compiled"]))
    if not math.isnan(ours["samples_per_s"]):
        rows.append(("anchor H100 published eager/compiled", "87.5 / 120.7 samples/s"))
    print(format_table(rows, "benchmark_train"))
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
