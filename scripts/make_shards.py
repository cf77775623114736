"""Write webdataset shards of training pairs (procedural objects, or real images from a folder).

  python scripts/make_shards.py --out shards/synth --num 10000 --per-shard 1000 --seed 0
  python scripts/make_shards.py --out shards/real --images path/to/objects --per-shard 500
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tqdm import tqdm

from data.shards import image_folder_records, synthetic_records, write_shards


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="output folder for shard-*.tar")
    p.add_argument("--num", type=int, default=1000, help="number of synthetic pairs")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64, help="training target size")
    p.add_argument("--reference-size", type=int, default=224, help="reference encoder size")
    p.add_argument("--images", type=Path, default=None,
                   help="folder of real object images (and *_ref/*_tgt/*_flow.npy pairs)")
    p.add_argument("--prefix", default="shard", help="shard file name prefix")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.images is not None:
        records = image_folder_records(args.images, args.seed, args.image_size,
                                       args.reference_size)
        total = None
    else:
        records = synthetic_records(args.num, args.seed, args.image_size, args.reference_size)
        total = args.num
    paths = write_shards(tqdm(records, total=total, desc="pairs", unit="pair"), args.out,
                         args.per_shard, args.prefix)
    logging.getLogger("make_shards").info("wrote %d shard(s) to %s", len(paths), args.out)


if __name__ == "__main__":
    main()
