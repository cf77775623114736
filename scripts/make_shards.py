"""Write webdataset shards of training pairs (procedural objects, or real images from a folder).

  python scripts/make_shards.py --out shards/synth --num 10000 --per-shard 1000 --seed 0
  python scripts/make_shards.py --out shards/real --images path/to/objects --per-shard 500
  python scripts/make_shards.py --out shards/mv --multiview path/to/objects --pairs-per-object 8

--multiview reads objects with RGB, depth and camera poses (docs/multiview_format.md).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tqdm import tqdm

from data.multiview import DEPTH_TOLERANCE, PairSelection, multiview_records
from data.shards import FITS, image_folder_records, synthetic_records, write_shards


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="output folder for shard-*.tar")
    p.add_argument("--num", type=int, default=1000, help="number of synthetic pairs")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64, help="training target size")
    p.add_argument("--reference-size", type=int, default=224, help="reference encoder size")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--images", type=Path, default=None,
                     help="folder of real object images (and *_ref/*_tgt/*_flow.npy pairs)")
    src.add_argument("--multiview", type=Path, default=None,
                     help="folder of objects with views, depth and cameras.json")
    p.add_argument("--fit", choices=FITS, default=None,
                   help="how non-square multi-view pairs become squares (aspect ratio kept by "
                        "pad / crop); default: pad for --multiview, squash for --images")
    mv = PairSelection()
    p.add_argument("--pairs-per-object", type=int, default=mv.pairs_per_object,
                   help="--multiview: view pairs kept per object")
    p.add_argument("--min-angle", type=float, default=mv.min_angle,
                   help="--multiview: smallest angle (degrees) between paired viewing directions")
    p.add_argument("--max-angle", type=float, default=mv.max_angle,
                   help="--multiview: largest angle (degrees) between paired viewing directions")
    p.add_argument("--min-overlap", type=float, default=mv.min_overlap,
                   help="--multiview: fraction of the target object seen in the reference")
    p.add_argument("--depth-tolerance", type=float, default=DEPTH_TOLERANCE,
                   help="--multiview: relative depth difference still counted as visible")
    p.add_argument("--prefix", default="shard", help="shard file name prefix")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.multiview is not None:
        selection = PairSelection(args.pairs_per_object, args.min_angle, args.max_angle,
                                  args.min_overlap)
        records = multiview_records(args.multiview, args.seed, args.image_size,
                                    args.reference_size, selection, args.fit or "pad",
                                    args.depth_tolerance)
        total = None
    elif args.images is not None:
        records = image_folder_records(args.images, args.seed, args.image_size,
                                       args.reference_size, args.fit or "squash")
        total = None
    else:
        records = synthetic_records(args.num, args.seed, args.image_size, args.reference_size)
        total = args.num
    paths = write_shards(tqdm(records, total=total, desc="pairs", unit="pair"), args.out,
                         args.per_shard, args.prefix)
    logging.getLogger("make_shards").info("wrote %d shard(s) to %s", len(paths), args.out)


if __name__ == "__main__":
    main()
