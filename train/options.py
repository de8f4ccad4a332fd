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
import tomllib
from pathlib import Path
from typing import Any, Callable

from edgeclf.errors import InvalidInputError


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("a string")
    return value


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("an integer")
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("a number")
    return float(value)


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError("true or false")
    return value


def _labels(value: Any) -> list[int]:
    from edgeclf.cli import parse_labels

    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return value
    if isinstance(value, str):
        return parse_labels(value)
    raise TypeError('a list of integers or a string such as "3..7"')


def _image_size(value: Any) -> tuple[int, int]:
    from edgeclf.cli import parse_image_size

    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (value[0], value[1])
    if isinstance(value, str):
        return parse_image_size(value)
    raise TypeError('an integer, [height, width] or a string such as "224x320"')


#: Config key -> (TrainConfig field, converter); the keys are the train flags' names.
KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "data": ("data", _text), "out": ("out", _text), "labels": ("labels", _labels),
    "image_size": ("image_size", _image_size), "backbone": ("backbone", _text),
    "weights": ("weights", _text), "init_from": ("init_from", _text),
    "epochs_frozen": ("epochs_frozen", _integer), "epochs_finetune": ("epochs_finetune", _integer),
    "batch_size": ("batch_size", _integer), "lr_frozen": ("lr_frozen", _number),
    "lr_finetune": ("lr_finetune", _number), "unfreeze_at": ("unfreeze_at", _integer),
    "val_split": ("val_split", _number), "val_dir": ("val_data", _text), "seed": ("seed", _integer),
    "strategy": ("strategy", _text), "class_weights": ("class_weights", _text),
    "augment": ("augment", _flag), "augment_flip": ("augment_flip", _flag),
    "train_batchnorm": ("train_batchnorm", _flag), "feature_cache": ("cache_features", _flag),
    "feature_cache_dir": ("feature_cache_dir", _text),
    "input": ("input", _text), "patience": ("patience", _integer), "strict": ("strict", _flag),
    "overwrite": ("overwrite", _flag), "tensorboard": ("tensorboard", _text),
}


def read_config(path: str | Path) -> dict[str, Any]:
    """The TrainConfig fields set in the TOML file ``path``.

    Raises:
        InvalidInputError: the file cannot be read or parsed, a key is unknown (named, with
            the known ones), or a value has the wrong type (named, with what is expected).
    """
    path = Path(path)
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"cannot read the config file ({exc}). Received: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInputError(f"the config file {path} is not valid TOML: {exc}") from None
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
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise InvalidInputError(f"{key!r} in the config file {path}: {exc}") from None
    return fields
