"""Backbones the model builder knows, as plain data (no TensorFlow import here).

Each backbone names its ``keras.applications`` constructor, what it expects of raw
0..255 RGB pixels, the smallest input it accepts and where fine-tuning starts. The
preprocessing is built into the saved model, so every exported graph takes raw pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeclf.errors import InvalidInputError


@dataclass(frozen=True)
class BackboneSpec:
    """How to build and fine-tune one ``keras.applications`` backbone."""

    name: str
    constructor: str  # attribute of keras.applications
    #: "scale_-1_1": x / 127.5 - 1 (Inception, MobileNetV2);
    #: "builtin": the Keras model rescales 0..255 pixels itself.
    preprocessing: str
    min_size: int
    #: Last layer (by its fixed name) that stays frozen in phase 2; every layer after it
    #: is fine-tuned. Auto-generated names ("conv2d_80") change between builds, so the
    #: anchor is a named block end.
    unfreeze_after: str
    #: Filename Keras caches ImageNet "notop" weights under, to help air-gapped users.
    imagenet_file: str
    #: Blocks whose pooled outputs export tries as the familiarity check's embedding, earliest
    #: first; the head's input (the pooled last block) is always tried after them. Export keeps
    #: the one that best tells foreign frames from held-out images (export/familiarity_choice.py).
    familiarity_candidates: tuple[str, ...] = ()


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        # Layer 249 is the first one after mixed8: phase 2 trains the top two inception
        # blocks, mixed9 and mixed10, as the Keras fine-tuning guide does.
        BackboneSpec(
            "inception_v3", "InceptionV3", "scale_-1_1", 75, "mixed8",
            "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
            familiarity_candidates=tuple(f"mixed{i}" for i in range(10)),
        ),
        BackboneSpec(
            "mobilenet_v2", "MobileNetV2", "scale_-1_1", 32, "block_12_add",
            "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
            familiarity_candidates=("block_2_add", "block_5_add", "block_9_add", "block_12_add", "block_15_add"),
        ),
        BackboneSpec(
            "mobilenet_v3_small", "MobileNetV3Small", "builtin", 32,
            "expanded_conv_8_project_bn", "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
            familiarity_candidates=("expanded_conv_2_add", "expanded_conv_5_add", "expanded_conv_7_add",
                                    "expanded_conv_10_add"),
        ),
        BackboneSpec(
            "efficientnet_b0", "EfficientNetB0", "builtin", 32, "block5c_add",
            "efficientnetb0_notop.h5",
            familiarity_candidates=("block2b_add", "block3b_add", "block4c_add", "block5c_add", "block6d_add"),
        ),
    )
}

PREPROCESSING_DESCRIPTIONS = {
    "scale_-1_1": "float32(pixels) / 127.5 - 1",
    "builtin": "float32(pixels); the backbone rescales internally",
}


def get_backbone(name: str) -> BackboneSpec:
    """Look up a backbone by name.

    Raises:
        InvalidInputError: ``name`` is not registered; the message lists the valid names.
    """
    try:
        return BACKBONES[name]
    except KeyError:
        raise InvalidInputError(
            f"unknown backbone {name!r}; expected one of {sorted(BACKBONES)}."
        ) from None
