"""``edgeclf dataset``: write a bundled dataset (digits, gauges) as image files."""

from __future__ import annotations

import argparse

from edgeclf import limits


def run(args: argparse.Namespace) -> int:
    if args.name == "gauges":
        from edgeclf.train.gauges import write_gauges_folder

        write_gauges_folder(args.out, per_class=args.per_class, holdout=args.holdout, seed=args.seed,
                            size=args.size or 64, overwrite=args.overwrite)
        return 0
    from edgeclf.train.data import write_digits_folder

    write_digits_folder(args.out, holdout=args.holdout, seed=args.seed, size=args.size or 32,
                        overwrite=args.overwrite)
    return 0


def register(sub) -> None:
    p = sub.add_parser("dataset", help="write a bundled dataset as image files",
                       description="Write PNG files in OUT/train/<label>/ and OUT/test/<label>/: digits, "
                                   "scikit-learn's handwritten digits 0..9 (1,797 scans); gauges, analogue "
                                   "gauges whose needle reads 0..10, drawn deterministically (an ordinal "
                                   "dataset: neighbouring readings look alike).")
    p.add_argument("name", choices=["digits", "gauges"])
    p.add_argument("out", help="directory to write")
    p.add_argument("--holdout", type=limits.option("val_split"), default=0.2, help="fraction written to test/ (default 0.2)")
    p.add_argument("--size", type=limits.option("image_side"), default=None,
                   help="side of the written PNGs in pixels (default 32 for digits, 64 for gauges)")
    p.add_argument("--per-class", type=limits.option("per_class"), default=200,
                   help="gauges: images per reading (default 200)")
    p.add_argument("--seed", type=limits.option("seed"), default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run)
