"""Encode training samples once into latent shards, so the training step skips both VAE encodes.

The model config (Hydra overrides, as for train.py) names the autoencoder, the sizes, the mode
mix and the mask distribution; train with the same config plus ``data=latent_shards``.

  # pixel shards (from make_shards.py), three mask/mode draws per object, SD-1.5 VAE on a GPU
  python scripts/make_latent_shards.py --source 'shards/synth/shard-{000000..000009}.tar' \\
      --out shards/synth_sd15 --seeds 0 1 2 --device cuda -o experiment=sd15_24gb
  python train.py experiment=sd15_24gb data=latent_shards \\
      data.shard_urls='shards/synth_sd15/latent-{000000..000029}.tar'

  # procedural pairs for the tiny pixel-space model (latents = pixels)
  python scripts/make_latent_shards.py --synthetic 1000 --out shards/tiny_latents

  # 8 writers (one per GPU), each its share of the source into <out>/part-NNN
  for i in $(seq 0 7); do CUDA_VISIBLE_DEVICES=$i python scripts/make_latent_shards.py \
      --source '...' --out shards/lat --part $i --parts 8 -o experiment=sd15_24gb & done; wait
  python train.py ... data=latent_shards data.shard_urls='shards/lat/part-*/latent-*.tar'
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from hydra.utils import instantiate

from benchmarks.bench_common import compose
from data.latent_shards import (
    LATENT_DTYPES,
    shard_samples,
    synthetic_samples,
    write_latent_shards,
)

log = logging.getLogger("make_latent_shards")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--source", help="pixel shard urls (brace pattern) from make_shards.py")
    src.add_argument("--synthetic", type=int, metavar="N", help="N procedural pairs per seed")
    p.add_argument("--out", required=True, type=Path, help="output folder for latent-*.tar")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="one pass per seed: fresh masks and modes (and objects, if synthetic)")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    p.add_argument("--batch-size", type=int, default=16, help="encode batch")
    p.add_argument("--workers", type=int, default=0,
                   help="loader processes that generate/decode samples while the VAE encodes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(LATENT_DTYPES), default="float16",
                   help="storage dtype of the latents")
    p.add_argument("--bf16", action="store_true", help="encode under bf16 autocast")
    p.add_argument("--part", type=int, default=0,
                   help="with --parts N: this writer's share (0..N-1), e.g. one per GPU")
    p.add_argument("--parts", type=int, default=1,
                   help="split the source over N writers; each writes to <out>/part-NNN")
    p.add_argument("-o", "--override", action="append", default=[],
                   help="Hydra override of the train config (model, data sizes, masks)")
    args = p.parse_args(argv)
    if args.synthetic is not None and args.synthetic < 1:
        p.error("--synthetic needs N >= 1")
    if not 0 <= args.part < args.parts:
        p.error(f"--part must be in 0..{args.parts - 1}")
    return args


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = compose(args.override)
    datamodule = instantiate(cfg.data)  # its sizes, mode mix and mask distribution
    data = datamodule.hparams
    common = dict(seeds=args.seeds, image_size=data.image_size,
                  reference_size=data.reference_size, align_ratio=data.align_ratio,
                  mask_config=datamodule.mask_config, workers=args.workers, part=args.part,
                  parts=args.parts)
    out = args.out / f"part-{args.part:03d}" if args.parts > 1 else args.out
    if args.source:
        samples = shard_samples(args.source, **common)
        total, source = None, {"shards": args.source, "seeds": args.seeds}
    else:
        samples = synthetic_samples(args.synthetic, **common)
        mine = len(range(args.part, args.synthetic, args.parts))
        total, source = mine * len(args.seeds), {"synthetic": args.synthetic,
                                                 "seeds": args.seeds}
    source.update(align_ratio=data.align_ratio, part=args.part, parts=args.parts)
    autoencoder = instantiate(cfg.model.autoencoder)
    paths = write_latent_shards(
        samples, autoencoder, out, args.per_shard, data.image_size, data.reference_size,
        batch_size=args.batch_size, device=args.device, dtype=args.dtype,
        autocast_dtype=torch.bfloat16 if args.bf16 else None, total=total, source=source)
    pattern = f"{args.out}/part-*/latent-*.tar" if args.parts > 1 else f"{out}/latent-*.tar"
    log.info("wrote %d latent shard(s) to %s; train with data=latent_shards "
             "data.shard_urls='%s'", len(paths), out, pattern)
    return paths


if __name__ == "__main__":
    main()
