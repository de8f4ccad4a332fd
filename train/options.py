"""Train options from a TOML file (``train --config FILE``), checked key by key.

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
from edgeclf.compat import tomllib
from pathlib import Path
from typing import Any, Callable

from edgeclf import limits
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


#: Config key -> (TrainConfig field, converter); the keys are the train flags' names.
KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "data": ("data", _text), "out": ("out", _text), "labels": ("labels", _labels),
    "image_size": ("image_size", _image_size), "backbone": ("backbone", _text),
    "weights": ("weights", _text), "init_from": ("init_from", _text),
    "epochs_frozen": ("epochs_frozen", _integer("epochs")), "epochs_finetune": ("epochs_finetune", _integer("epochs")),
    "batch_size": ("batch_size", _integer("train_batch")), "lr_frozen": ("lr_frozen", _number("learning_rate")),
    "lr_finetune": ("lr_finetune", _number("learning_rate")), "unfreeze_at": ("unfreeze_at", _integer("layer_index")),
    "val_split": ("val_split", _number("val_split")), "val_dir": ("val_data", _text), "seed": ("seed", _integer("seed")),
    "strategy": ("strategy", _text), "class_weights": ("class_weights", _text),
    "augment": ("augment", _flag), "augment_flip": ("augment_flip", _flag),
    "train_batchnorm": ("train_batchnorm", _flag), "feature_cache": ("cache_features", _flag),
    "feature_cache_dir": ("feature_cache_dir", _text),
    "input": ("input", _text), "patience": ("patience", _integer("patience")), "strict": ("strict", _flag),
    "overwrite": ("overwrite", _flag), "tensorboard": ("tensorboard", _text),
    "peer_timeout": ("peer_timeout", _number("peer_timeout")),
    "loss": ("loss", _text), "ordinal_alpha": ("ordinal_alpha", _number("ordinal_alpha")),
    "ordinal_distance": ("ordinal_distance", _text),
}

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
