"""Write a synthetic benchmark in the shared folder format (artifact inside mask + ground truth).

  python scripts/make_benchmark.py --out bench/synthetic --num 200 --seed 0

Cases come from the "benchmark" seed namespace (data/synthetic.py): whatever --seed, no case
is a training or validation item of train.py.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tqdm import tqdm

from data.artifacts import ARTIFACTS
from data.benchmark import write_synthetic_benchmark


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="benchmark folder to create")
    p.add_argument("--num", type=int, default=200, help="number of cases")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--reference-size", type=int, default=224)
    p.add_argument("--artifacts", nargs="+", choices=sorted(ARTIFACTS), default=None,
                   help="artifact kinds to cycle through (default: all)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with tqdm(total=args.num, desc="cases", unit="case") as bar:
        ids = write_synthetic_benchmark(args.out, args.num, args.seed, args.image_size,
                                        args.reference_size, args.artifacts, progress=bar.update)
    logging.getLogger("make_benchmark").info("wrote %d cases to %s", len(ids), args.out)


if __name__ == "__main__":
    main()
