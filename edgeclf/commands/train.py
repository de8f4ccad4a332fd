"""``edgeclf train``: train a model and write a bundle directory (two-phase fine-tuning)."""

from __future__ import annotations

import argparse
import json

from edgeclf import limits
from edgeclf.commands.common import (parse_image_size, parse_labels, quiet_tensorflow, require_training_stack,
                                     tf_logs)
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


_TRAIN_DESTS = {"val_data": "val_dir"}


def train_settings(args: argparse.Namespace) -> dict:
    """TrainConfig fields from ``--config`` (if given), overridden by the flags given.

    Every train option defaults to None on the command line, so a flag the user did not
    give neither overrides the file nor hides the recipe's defaults (see TrainConfig).
    """
    from edgeclf.train.options import KEYS, read_config

    settings = read_config(args.config) if args.config else {}
    for key, (field, _) in KEYS.items():
        value = getattr(args, _TRAIN_DESTS.get(field, field), None)
        if value is not None:
            settings[field] = value
    if args.resume:
        settings["resume"] = True
    for field in ("data", "out"):
        if field not in settings:
            raise InvalidInputError(f"train needs {'DATA' if field == 'data' else '--out BUNDLE'}: "
                                    f"give it on the command line or as {field!r} in a --config file")
    return settings


def register(sub) -> None:
    from edgeclf.train.backbones import BACKBONES  # plain data, no TensorFlow
    from edgeclf.train.data import INPUT_MODES  # numpy and Pillow only
    from edgeclf.train.ordinal import DISTANCES, LOSSES  # numpy only at import
    from edgeclf.train.strategy import STRATEGIES  # imports TensorFlow only when called

    p = sub.add_parser("train", parents=[tf_logs()], help="train a model and write a bundle directory",
                       description="Two-phase fine-tuning: frozen backbone (head on cached features), "
                                   "then the top backbone blocks at a low learning rate.")
    p.add_argument("data", nargs="?",
                   help="directory with one subfolder per integer label, a CSV of path,label, or 'digits'")
    p.add_argument("--out", help="bundle directory to write")
    p.add_argument("--config", metavar="FILE",
                   help="TOML file of train options (keys named as the flags: epochs-frozen = 5); "
                        "flags given here override it")
    p.add_argument("--labels", type=parse_labels, default=None,
                   help="the integer labels, e.g. 3..7 or --labels=-2,3,10 (default: those in the data)")
    p.add_argument("--image-size", type=parse_image_size, help="N or HxW (default 299)")
    p.add_argument("--backbone", choices=sorted(BACKBONES), help="(default inception_v3)")
    p.add_argument("--weights",
                   help="'imagenet' (downloaded once by Keras), 'none', or a local weights file (default imagenet)")
    p.add_argument("--init-from", default=None, metavar="BUNDLE",
                   help="start from this bundle's weights (same backbone and labels, any image size): "
                        "train small and cheap first, then finish at full size")
    p.add_argument("--epochs-frozen", type=limits.option("epochs"), help="phase 1 epochs, backbone frozen (default 10)")
    p.add_argument("--epochs-finetune", type=limits.option("epochs"), help="phase 2 epochs, top unfrozen (default 5)")
    p.add_argument("--batch-size", type=limits.option("train_batch"), help="global batch size (default 32)")
    p.add_argument("--lr-frozen", type=limits.option("learning_rate"), help="phase 1 learning rate (default 1e-3)")
    p.add_argument("--lr-finetune", type=limits.option("learning_rate"), help="phase 2 learning rate (default 1e-5; 1e-3 with --weights none)")
    p.add_argument("--unfreeze-at", type=limits.option("layer_index"), default=None,
                   help="first backbone layer index trained in phase 2 (default: the backbone's, 249 for "
                        "InceptionV3; 0 with --weights none)")
    p.add_argument("--loss", choices=LOSSES,
                   help="crossentropy (default): one-hot targets; ordinal: soft ordinal labels (SORD), so a "
                        "prediction far from the true integer costs more than a near one")
    p.add_argument("--ordinal-alpha", type=limits.option("ordinal_alpha"), metavar="ALPHA",
                   help="ordinal: the target of true value t gives value v the weight exp(-ALPHA * phi(t, v)), "
                        "normalised (default 0.5)")
    p.add_argument("--ordinal-distance", choices=sorted(DISTANCES),
                   help="ordinal: phi, the distance between the integers: abs |t - v| or squared (t - v)^2 "
                        "(default)")
    p.add_argument("--val-split", type=limits.option("val_split"), help="stratified validation fraction (default 0.2)")
    p.add_argument("--val-dir", default=None, help="explicit validation data instead of a split")
    p.add_argument("--seed", type=limits.option("seed"), help="(default 0)")
    p.add_argument("--strategy", choices=STRATEGIES,
                   help="tf.distribute strategy: mirrored = all GPUs of this host; multiworker = hosts in "
                        "TF_CONFIG (default: one device)")
    p.add_argument("--peer-timeout", type=limits.option("peer_timeout"), metavar="SECONDS",
                   help="multiworker: seconds to wait for every TF_CONFIG peer to listen before failing with "
                        "the unreachable addresses (default 300)")
    p.add_argument("--class-weights", choices=["balanced"], help="weight classes inversely to their size")
    p.add_argument("--augment", action="store_true", help="random rotation, zoom and shift (no flips)")
    p.add_argument("--augment-flip", action="store_true", help="with --augment, also flip horizontally")
    p.add_argument("--train-batchnorm", action=argparse.BooleanOptionalAction,
                   help="phase 2 trains BatchNormalization on batch statistics, re-estimated each epoch "
                        "(default: with --weights none only, where the whole network trains from scratch)")
    p.add_argument("--no-feature-cache", dest="cache_features", action="store_false",
                   help="run the frozen backbone every phase-1 epoch instead of caching its features")
    p.add_argument("--feature-cache-dir", metavar="DIR",
                   help="where phase 1's features are kept for later runs with the same backbone, weights, "
                        "size and images (default: $EDGECLF_CACHE_DIR, else ~/.cache/edgeclf)")
    p.add_argument("--input", choices=INPUT_MODES,
                   help="memory: decode every image before training; stream: decode batch by batch from the "
                        "files, so memory does not grow with their number; auto (default): stream when the "
                        "decoded images would take over 1 GiB")
    p.add_argument("--patience", type=limits.option("patience"), help="early-stopping patience in epochs (default 3)")
    p.add_argument("--strict", action="store_true", help="fail on an unreadable image instead of skipping it")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty output directory (and an interrupted run's checkpoint)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run writing --out from its last finished epoch (its "
                        "checkpoint is OUT.checkpoint); it ends with the bundle the run would have written")
    p.add_argument("--tensorboard", metavar="DIR",
                   help="write TensorBoard logs of both phases to DIR/frozen and DIR/finetune")
    # Every default is None, the switches' too: TrainConfig's (named in the help) apply, and an
    # option not given here neither overrides --config nor hides the recipe's defaults.
    p.set_defaults(augment=None, augment_flip=None, cache_features=None, strict=None, overwrite=None, resume=None)
    p.set_defaults(func=run)
