"""train's options, declared once (:data:`OPTIONS`), and read from a TOML file (``train --config
FILE``) key by key. The command line's flags, the config file's keys and TrainConfig's defaults
are all made from the declaration.

The file holds any option of ``edgeclf train``, named as the flag without its dashes
(``epochs-frozen = 5`` or ``epochs_frozen = 5``), plus ``data`` and ``out``. Flags
given on the command line override it. Plain data only: importing this module does not
load TensorFlow.

Example::

    data = "photos/train"
    out = "runs/meters"
    image-size = 299
    labels = "3..7"
    epochs-finetune = 8
    lr-finetune = 3e-5
"""

from __future__ import annotations

import argparse
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edgeclf import limits
from edgeclf.compat import tomllib
from edgeclf.errors import InvalidInputError


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("a string")
    return value


def _integer(kind: str) -> Callable[[Any], int]:
    """An integer within limits.RANGES[kind]."""
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError("an integer")
        limits.check(kind, value, "the value")
        return value
    return convert


def _number(kind: str) -> Callable[[Any], float]:
    """A finite number within limits.RANGES[kind] (TOML's nan and inf are refused)."""
    def convert(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError("a number")
        limits.check(kind, float(value), "the value")
        return float(value)
    return convert


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError("true or false")
    return value


def _labels(value: Any) -> list[int]:
    from edgeclf.commands.common import parse_labels

    if isinstance(value, list) and all(limits.is_int(v) for v in value):
        limits.check_label_count(len(value), f"a list of {len(value)} labels")
        return value
    if isinstance(value, str):
        return parse_labels(value)
    raise TypeError('a list of integers or a string such as "3..7"')


def _image_size(value: Any) -> tuple[int, int]:
    from edgeclf.commands.common import parse_image_size

    if limits.is_int(value):
        value = [value, value]
    if isinstance(value, list) and len(value) == 2 and all(limits.is_int(v) for v in value):
        return (limits.check("image_side", value[0], "the height"), limits.check("image_side", value[1], "the width"))
    if isinstance(value, str):
        return parse_image_size(value)
    raise TypeError('an integer, [height, width] or a string such as "224x320"')


def _limited(kind: str) -> Callable[[Any], Any]:
    """A config file's converter for a value within limits.RANGES[kind]."""
    return _integer(kind) if limits.RANGES[kind].integer else _number(kind)


def _show(value: Any) -> str:
    """A default as the help spells it: 10, 0.2, 1e-3, 300, inception_v3."""
    if isinstance(value, float):
        if value.is_integer():
            return str(int(value))
        if abs(value) < 0.01:
            mantissa, exponent = f"{value:.0e}".split("e")
            return f"{mantissa}e{int(exponent)}"
    return str(value)


#: What each recipe sets where the user leaves an option unset (None): pretrained weights are
#: fine-tuned from the backbone's top blocks; without them (--weights none) the whole network
#: trains from scratch.
RECIPES: dict[str, dict[str, Any]] = {
    "fine-tuning": {"unfreeze_at": None, "train_batchnorm": False, "lr_finetune": 1e-5},
    "from scratch": {"unfreeze_at": 0, "train_batchnorm": True, "lr_finetune": 1e-3},
}


@dataclass(frozen=True)
class Option:
    """One train option, declared once: its TrainConfig field and default, its flag and help,
    its config-file key and how a file's value is checked. The CLI, the config reader and
    TrainConfig are all made from :data:`OPTIONS`."""

    field: str
    default: Any = None  # None: unset, the recipe's or the data's (the help says which)
    #: A limits.RANGES kind: the flag's type and the config file's check both come from it.
    kind: str | None = None
    convert: Callable[[Any], Any] = _text  # a config file's value, where no kind says it
    #: "{default}" is the default as shown; "{fine_tuning}"/"{from_scratch}" the recipes' value of this field.
    help: str = ""
    flag: str = ""  # default: --field, with dashes; "" for the positional data
    key: str | None = ""  # the config file's key; default: the flag's name; None: the command line only
    #: Choices described one by one: the help lists them, the default marked "(default)".
    described: tuple[tuple[str, str], ...] = ()
    cli: tuple[tuple[str, Any], ...] = ()  # further argparse settings (choices, action, metavar, dest...)

    @property
    def name(self) -> str:
        return self.flag or "--" + self.field.replace("_", "-")

    @property
    def config_key(self) -> str | None:
        return None if self.key is None else self.key or self.name.lstrip("-").replace("-", "_")

    def help_text(self) -> str:
        recipes = {f"{name.replace(' ', '_').replace('-', '_')}": _show(values.get(self.field))
                   for name, values in RECIPES.items()}
        described = "; ".join(f"{choice}{' (default)' if choice == self.default else ''}: {text}"
                              for choice, text in self.described)
        return self.help.format(default=_show(self.default), described=described, **recipes)

    def argparse_settings(self) -> dict[str, Any]:
        settings: dict[str, Any] = {"help": self.help_text(), **dict(self.cli)}
        if self.kind is not None:
            settings["type"] = limits.option(self.kind)
        if self.flag != "data" and "action" not in settings:
            settings["default"] = None  # a flag not given overrides no config file (see train_settings)
        return settings


def _choices(name: str) -> tuple[str, ...]:
    """The values an option takes, from the module that defines them (plain data, no TensorFlow)."""
    from edgeclf.train.backbones import BACKBONES
    from edgeclf.train.data import INPUT_MODES
    from edgeclf.train.ordinal import DISTANCES, LOSSES
    from edgeclf.train.strategy import STRATEGIES  # imports TensorFlow only when called

    return {"backbone": tuple(sorted(BACKBONES)), "input": tuple(INPUT_MODES), "loss": tuple(LOSSES),
            "ordinal_distance": tuple(sorted(DISTANCES)), "strategy": tuple(STRATEGIES)}[name]


#: Every train option, in the order ``edgeclf train --help`` lists them.
OPTIONS: tuple[Option, ...] = (
    Option("data", flag="data", help="directory with one subfolder per integer label, a CSV of path,label, or 'digits'",
           cli=(("nargs", "?"),)),
    Option("out", help="bundle directory to write"),
    Option("labels", convert=_labels, help="the integer labels, e.g. 3..7 or --labels=-2,3,10 (default: those in "
                                           "the data)", cli=(("type", "labels"),)),
    Option("image_size", 299, convert=_image_size, help="N or HxW (default {default})", cli=(("type", "image_size"),)),
    Option("backbone", "inception_v3", help="(default {default})", cli=(("choices", "backbone"),)),
    Option("weights", "imagenet", help="'imagenet' (downloaded once by Keras), 'none', or a local weights file "
                                       "(default {default})"),
    Option("init_from", help="start from this bundle's weights (same backbone and labels, any image size): "
                             "train small and cheap first, then finish at full size", cli=(("metavar", "BUNDLE"),)),
    Option("epochs_frozen", 10, "epochs", help="phase 1 epochs, backbone frozen (default {default})"),
    Option("epochs_finetune", 5, "epochs", help="phase 2 epochs, top unfrozen (default {default})"),
    Option("batch_size", 32, "train_batch", help="global batch size (default {default})"),
    Option("lr_frozen", 1e-3, "learning_rate", help="phase 1 learning rate (default {default})"),
    Option("lr_finetune", None, "learning_rate",
           help="phase 2 learning rate (default {fine_tuning}; {from_scratch} with --weights none)"),
    Option("unfreeze_at", None, "layer_index", help="first backbone layer index trained in phase 2 (default: the "
                                                    "backbone's, 249 for InceptionV3; {from_scratch} with --weights none)"),
    Option("loss", "crossentropy", help="{described}", cli=(("choices", "loss"),), described=(
        ("crossentropy", "one-hot targets"),
        ("ordinal", "soft ordinal labels (SORD), so a prediction far from the true integer costs more than a near "
                    "one"))),
    # Chosen on validation images (benchmarks/ordinal_study.py): squared distance at alpha 0.5 had the lowest
    # MAE of abs 0.5/1/2 and squared 0.5/1 on the gauges; README's table reports it on test images.
    Option("ordinal_alpha", 0.5, "ordinal_alpha", cli=(("metavar", "ALPHA"),),
           help="ordinal: the target of true value t gives value v the weight exp(-ALPHA * phi(t, v)), normalised "
                "(default {default})"),
    Option("ordinal_distance", "squared", cli=(("choices", "ordinal_distance"),),
           help="ordinal: phi, the distance between the integers: abs |t - v| or squared (t - v)^2 (default "
                "{default})"),
    Option("val_split", 0.2, "val_split", help="stratified validation fraction (default {default})"),
    Option("val_data", flag="--val-dir", help="explicit validation data instead of a split"),
    Option("seed", 0, "seed", help="(default {default})"),
    Option("strategy", "default", cli=(("choices", "strategy"),),
           help="tf.distribute strategy: mirrored = all GPUs of this host; multiworker = hosts in TF_CONFIG "
                "(default: one device)"),
    Option("peer_timeout", 300.0, "peer_timeout", cli=(("metavar", "SECONDS"),),
           help="multiworker: seconds to wait for every TF_CONFIG peer to listen before failing with the "
                "unreachable addresses (default {default})"),
    Option("class_weights", help="weight classes inversely to their size", cli=(("choices", ("balanced",)),)),
    Option("augment", False, convert=_flag, help="random rotation, zoom and shift (no flips)",
           cli=(("action", "store_true"),)),
    Option("augment_flip", False, convert=_flag, help="with --augment, also flip horizontally",
           cli=(("action", "store_true"),)),
    Option("train_batchnorm", None, convert=_flag, cli=(("action", argparse.BooleanOptionalAction),),
           help="phase 2 trains BatchNormalization on batch statistics, re-estimated each epoch (default: with "
                "--weights none only, where the whole network trains from scratch)"),
    Option("cache_features", True, convert=_flag, flag="--no-feature-cache", key="feature_cache",
           cli=(("action", "store_false"),),
           help="run the frozen backbone every phase-1 epoch instead of caching its features"),
    Option("feature_cache_dir", cli=(("metavar", "DIR"),),
           help="where phase 1's features are kept for later runs with the same backbone, weights, size and "
                "images (default: $EDGECLF_CACHE_DIR, else ~/.cache/edgeclf)"),
    Option("input", "auto", cli=(("choices", "input"),), help="{described}", described=(
        ("memory", "decode every image before training"),
        ("stream", "decode batch by batch from the files, so memory does not grow with their number"),
        ("auto", "stream when the decoded images would take over 1 GiB"))),
    Option("patience", 3, "patience", help="early-stopping patience in epochs (default {default})"),
    Option("strict", False, convert=_flag, help="fail on an unreadable image instead of skipping it",
           cli=(("action", "store_true"),)),
    Option("overwrite", False, convert=_flag, cli=(("action", "store_true"),),
           help="replace a non-empty output directory (and an interrupted run's checkpoint)"),
    Option("resume", False, key=None, cli=(("action", "store_true"),),
           help="continue the interrupted run writing --out from its last finished epoch (its checkpoint is "
                "OUT.checkpoint); it ends with the bundle the run would have written"),
    Option("tensorboard", cli=(("metavar", "DIR"),),
           help="write TensorBoard logs of both phases to DIR/frozen and DIR/finetune"),
)

#: Option by TrainConfig field.
BY_FIELD: dict[str, Option] = {option.field: option for option in OPTIONS}
#: Config key -> (TrainConfig field, converter); the keys are the train flags' names.
KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    option.config_key: (option.field, _limited(option.kind) if option.kind else option.convert)
    for option in OPTIONS if option.config_key is not None}


def default(field: str) -> Any:
    """TrainConfig's default of ``field``: the one its Option declares."""
    return BY_FIELD[field].default


def add_train_arguments(parser: argparse.ArgumentParser, options: tuple[Option, ...]) -> None:
    """``options``' flags on ``parser``, every one defaulting to None (a switch too: an option not
    given neither overrides a config file nor hides TrainConfig's default)."""
    from edgeclf.commands.common import parse_image_size, parse_labels

    named_types = {"labels": parse_labels, "image_size": parse_image_size}
    for option in options:
        settings = option.argparse_settings()
        if isinstance(settings.get("type"), str):
            settings["type"] = named_types[settings["type"]]
        if isinstance(settings.get("choices"), str):
            settings["choices"] = _choices(settings["choices"])
        if option.flag != "data":
            settings.setdefault("dest", option.field)
            as_named = option.name.lstrip("-").replace("-", "_")
            if "action" not in settings and "metavar" not in settings and as_named != option.field:
                settings["metavar"] = as_named.upper()  # what argparse would show for the flag
        parser.add_argument(option.name, **settings)
        if "action" in settings:
            parser.set_defaults(**{option.field: None})


#: A train config is a few lines; anything larger is not one.
MAX_CONFIG_BYTES = 1 << 20


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def read_config(path: str | Path) -> dict[str, Any]:
    """The TrainConfig fields set in the TOML file ``path``.

    Raises:
        InvalidInputError: the file cannot be read or parsed, a key is unknown (named, with
            the known ones), or a value has the wrong type (named, with what is expected).
    """
    path = Path(path)
    try:
        info = path.stat()
    except OSError as exc:
        raise InvalidInputError(f"cannot read the config file ({exc.strerror}). Received: {path}") from None
    # A FIFO or a device would block or never end; only a regular file of sane size is read.
    if not stat.S_ISREG(info.st_mode):
        raise InvalidInputError(f"the config file must be a regular file (TOML). Received: {path}, "
                                f"which is {_file_kind(info.st_mode)}")
    if info.st_size > MAX_CONFIG_BYTES:
        raise InvalidInputError(f"the config file must be at most {MAX_CONFIG_BYTES} bytes. Received: {path} "
                                f"of {info.st_size} bytes")
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"cannot read the config file ({exc}). Received: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInputError(f"the config file {path} is not valid TOML: {exc}") from None
    except RecursionError:  # arrays or tables nested thousands deep
        raise InvalidInputError(f"the config file {path} is not a train config: its values are nested too "
                                f"deeply") from None
    spelled: dict[str, str] = {}
    for key in table:
        name = key.replace("-", "_")
        if name in spelled:  # epochs-frozen and epochs_frozen: which one is meant is a guess
            raise InvalidInputError(f"the config file {path} sets one option twice, as {spelled[name]!r} and "
                                    f"{key!r}; keep one")
        spelled[name] = key
    fields: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in KEYS:
            known = ", ".join(k.replace("_", "-") for k in KEYS)
            raise InvalidInputError(f"unknown key {key!r} in the config file {path}; the keys are train's "
                                    f"options: {known}")
        field, convert = KEYS[name]
        try:
            fields[field] = convert(value)
        except TypeError as exc:
            raise InvalidInputError(f"{key!r} in the config file {path} must be {exc}. Received: {value!r}") from None
        except (ValueError, argparse.ArgumentTypeError) as exc:  # InvalidInputError is a ValueError
            raise InvalidInputError(f"{key!r} in the config file {path}: {exc}") from None
    return fields
