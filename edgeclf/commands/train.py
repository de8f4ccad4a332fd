"""``edgeclf train``: train a model and write a bundle directory (two-phase fine-tuning)."""

from __future__ import annotations

import argparse
import json

from edgeclf.commands.common import quiet_tensorflow, require_training_stack, tf_logs
from edgeclf.errors import InvalidInputError


def run(args: argparse.Namespace) -> int:
    settings = train_settings(args)  # a bad config file fails before TensorFlow loads
    require_training_stack("train")
    quiet_tensorflow(args)
    from edgeclf.train import TrainConfig, train

    bundle = train(TrainConfig(**settings))
    if bundle is None:  # a multi-worker run's other workers: the chief writes the bundle
        print(json.dumps({"bundle": None, "chief": False}))
        return 0
    m = bundle.meta["metrics"]["validation"]
    print(json.dumps({"bundle": str(bundle.path), "accuracy": m["accuracy"], "f1": m["f1"],
                      "mae": m["mae"], "rmse": m["rmse"],
                      "wall_seconds": bundle.meta["training"]["wall_seconds"]}))
    return 0


def train_settings(args: argparse.Namespace) -> dict:
    """TrainConfig fields from ``--config`` (if given), overridden by the flags given.

    Every train option defaults to None on the command line, so a flag the user did not
    give neither overrides the file nor hides the recipe's defaults (see TrainConfig).
    """
    from edgeclf.train.options import OPTIONS, read_config

    settings = read_config(args.config) if args.config else {}
    for option in OPTIONS:
        value = getattr(args, option.field, None)
        if value is not None:
            settings[option.field] = value
    for field in ("data", "out"):
        if field not in settings:
            raise InvalidInputError(f"train needs {'DATA' if field == 'data' else '--out BUNDLE'}: "
                                    f"give it on the command line or as {field!r} in a --config file")
    return settings


def register(sub) -> None:
    from edgeclf.train.options import OPTIONS, add_train_arguments  # plain data, no TensorFlow

    p = sub.add_parser("train", parents=[tf_logs()], help="train a model and write a bundle directory",
                       description="Two-phase fine-tuning: frozen backbone (head on cached features), "
                                   "then the top backbone blocks at a low learning rate.")
    add_train_arguments(p, OPTIONS[:2])  # data and --out, then the file that may hold every option
    p.add_argument("--config", metavar="FILE",
                   help="TOML file of train options (keys named as the flags: epochs-frozen = 5); "
                        "flags given here override it")
    add_train_arguments(p, OPTIONS[2:])
    p.set_defaults(func=run)
