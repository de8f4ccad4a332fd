"""The integer classifier: a ``keras.applications`` backbone and a logits head.

Structure (InceptionV3 by default)::

    pixels (float32 0..255, NHWC RGB) -> preprocessing -> backbone(training=False)
      -> GlobalAveragePooling2D -> Dense(1024, relu) -> Dropout(0.5) -> Dense(K) logits

The backbone is one nested layer. Its BatchNormalization layers stay in inference mode
in both phases (fine-tuning with batch statistics of small batches would wreck the
pretrained features): they are never made trainable, which in Keras 3 is what
freezes their statistics (``training=False`` on the nested call alone is not honoured
by ``fit`` in Keras 3.15: checked, the moving mean still moved). The head is
linear: the loss is ``SparseCategoricalCrossentropy(from_logits=True)`` and class
index ``i`` means the integer ``labels[i]``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import keras
import numpy as np

from edgeclf.errors import InvalidInputError, WeightsError, WeightsUnavailableError
from edgeclf.train.backbones import BackboneSpec, get_backbone

def resolve_weights(weights: str | Path | None) -> str | None:
    """Normalise the ``weights`` option: ``None``/"none", "imagenet", or a file path.

    Raises:
        WeightsError: a path was given and no file is there.
    """
    if weights is None or str(weights).lower() == "none":
        return None
    if str(weights).lower() == "imagenet":
        return "imagenet"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"weights file not found. Received: {weights}. Expected 'imagenet', 'none' or "
            "the path of an existing .h5 / .weights.h5 file for the chosen backbone."
        )
    return str(path)


def check_image_size(image_size: tuple[int, int], spec: BackboneSpec) -> None:
    """Raise :class:`InvalidInputError` if ``image_size`` is below the backbone's minimum."""
    height, width = image_size
    if min(height, width) < spec.min_size:
        raise InvalidInputError(
            f"image size {height}x{width} is too small for {spec.name}; "
            f"expected at least {spec.min_size}x{spec.min_size}. Received: {image_size}"
        )


def build_backbone(
    spec: BackboneSpec, image_size: tuple[int, int], weights: str | Path | None
) -> keras.Model:
    """Build the headless backbone and load its weights.

    Raises:
        WeightsUnavailableError: ``weights="imagenet"`` and the download failed.
        WeightsError: a weights file is unreadable or for another architecture.
    """
    resolved = resolve_weights(weights)
    constructor = getattr(keras.applications, spec.constructor)
    shape = (int(image_size[0]), int(image_size[1]), 3)
    try:
        with warnings.catch_warnings():
            # A mismatched file makes Keras warn once per layer before it raises.
            warnings.simplefilter("ignore", UserWarning)
            return constructor(include_top=False, weights=resolved, input_shape=shape)
    except Exception as exc:  # Keras raises bare Exception on a failed download
        if resolved == "imagenet":
            raise WeightsUnavailableError(
                f"could not download the ImageNet weights for {spec.name} ({exc}). "
                f"On a machine without internet access, copy {spec.imagenet_file} from "
                f"a machine that has it (Keras caches it in ~/.keras/models/) and pass "
                f"--weights /path/to/{spec.imagenet_file}, or train with --weights none."
            ) from None
        if resolved is None:
            raise
        raise WeightsError(
            f"could not load weights file {resolved} into {spec.name} "
            f"(include_top=False): {str(exc).splitlines()[0]}. Expected a weights file "
            f"saved from {spec.constructor} without its top, e.g. {spec.imagenet_file}."
        ) from None


def build_model(
    num_classes: int,
    image_size: tuple[int, int] = (299, 299),
    backbone: str = "inception_v3",
    weights: str | Path | None = "imagenet",
    dense_units: int = 1024,
    dropout: float = 0.5,
) -> keras.Model:
    """Build the integer classifier with a frozen backbone and an untrained head.

    Args:
        num_classes: K, the number of integer labels (outputs of the logits layer).
        image_size: (height, width) of the input.
        backbone: a name from ``edgeclf.train.backbones.BACKBONES``.
        weights: "imagenet" (downloaded and cached by Keras), a local weights file,
            or ``None``/"none" for random initialisation.

    Returns:
        An uncompiled ``keras.Model`` taking float32 RGB pixels in 0..255 and
        returning K logits.

    Example:
        >>> model = build_model(5, (75, 75), weights=None)
        >>> model.output_shape
        (None, 5)
    """
    spec = get_backbone(backbone)
    if num_classes < 2:
        raise InvalidInputError(f"need at least 2 classes. Received: num_classes={num_classes}")
    check_image_size(image_size, spec)
    base = build_backbone(spec, image_size, weights)
    base.trainable = False

    inputs = keras.Input(shape=(image_size[0], image_size[1], 3), name="pixels", dtype="float32")
    x = inputs
    if spec.preprocessing == "scale_-1_1":
        x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="preprocess")(x)
    x = base(x, training=False)  # inference-mode intent; see unfreeze_top
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = keras.layers.Dense(dense_units, activation="relu", name="head_dense")(x)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation=None, name="logits")(x)
    return keras.Model(inputs, outputs, name=f"edgeclf_{spec.name}")


def backbone_of(model: keras.Model) -> keras.Model:
    """Return the nested backbone model of a model made by :func:`build_model`."""
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if len(nested) != 1:
        raise InvalidInputError(
            f"expected a model from edgeclf's build_model with one nested backbone; "
            f"found {len(nested)} nested models in {model.name!r}."
        )
    return nested[0]


def feature_extractor(model: keras.Model) -> keras.Model:
    """pixels -> pooled backbone features (the input of the head)."""
    return keras.Model(model.input, model.get_layer("avg_pool").output, name="features")


#: The head's input (build_model names it): the pooled last block, always a familiarity candidate.
HEAD_INPUT = "avg_pool"


def tapped_model(model, blocks) -> keras.Model:
    """pixels (float32 0..255) -> [logits, pooled output of each of ``blocks``], sharing ``model``'s
    layers and weights. A block is a backbone layer's name (its output pooled by a global average)
    or HEAD_INPUT; the graph is rebuilt from ``model``'s own layers so that the nested backbone
    also gives the inner blocks' outputs."""
    inner = [b for b in blocks if b != HEAD_INPUT]
    if not inner:
        return keras.Model(model.input, [model.output, *(model.get_layer(HEAD_INPUT).output for _ in blocks)],
                           name="tapped")
    base = backbone_of(model)
    missing = [b for b in inner if b not in {layer.name for layer in base.layers}]
    if missing:
        raise InvalidInputError(f"the backbone {base.name!r} has no layers named {missing}. Received: blocks={list(blocks)}")
    taps = keras.Model(base.input, [*(base.get_layer(b).output for b in inner), base.output], name=f"{base.name}_tapped")
    pixels = keras.Input(shape=model.input.shape[1:], dtype="float32", name="pixels")
    x = model.get_layer("preprocess")(pixels) if any(layer.name == "preprocess" for layer in model.layers) else pixels
    *middles, top = taps(x, training=False)
    pooled_top = model.get_layer(HEAD_INPUT)(top)
    x = pooled_top
    for name in ("head_dense", "head_dropout", "logits"):
        x = model.get_layer(name)(x)
    pooled = {b: keras.layers.GlobalAveragePooling2D(name=f"{b}_pool")(m) for b, m in zip(inner, middles, strict=True)}
    return keras.Model(pixels, [x, *(pooled_top if b == HEAD_INPUT else pooled[b] for b in blocks)], name="tapped")


def embedding_model(model, block: str | None) -> keras.Model:
    """pixels (float32 0..255) -> [logits, embedding]: the pooled output of ``block`` (None: the head's
    input), what every exported graph gives as its ``embedding``."""
    return tapped_model(model, (block or HEAD_INPUT,))


def head_model(model: keras.Model) -> keras.Model:
    """pooled features -> logits, sharing the head layers (and weights) of ``model``."""
    features = keras.Input(shape=model.get_layer("avg_pool").output.shape[1:], name="features")
    x = model.get_layer("head_dense")(features)
    x = model.get_layer("head_dropout")(x)
    return keras.Model(features, model.get_layer("logits")(x), name="head")


def resolve_unfreeze_index(base: keras.Model, spec: BackboneSpec, unfreeze_at: int | None) -> int:
    """Index of the first backbone layer trained in phase 2.

    ``None`` means the backbone's default (249 for InceptionV3: mixed9 and mixed10).
    """
    n_layers = len(base.layers)
    if unfreeze_at is None:
        names = [layer.name for layer in base.layers]
        if spec.unfreeze_after not in names:  # a Keras release renamed the layer
            raise InvalidInputError(
                f"{spec.name} has no layer named {spec.unfreeze_after!r} in this Keras version; "
                f"pass the unfreeze point as a layer index. Received: unfreeze_at=None"
            )
        return names.index(spec.unfreeze_after) + 1
    if not 0 <= unfreeze_at <= n_layers:
        raise InvalidInputError(
            f"unfreeze point must be a layer index between 0 and {n_layers} for "
            f"{spec.name}. Received: {unfreeze_at}"
        )
    return int(unfreeze_at)


def freeze_backbone(model: keras.Model) -> None:
    """Phase 1: only the head trains."""
    backbone_of(model).trainable = False


def unfreeze_top(model: keras.Model, unfreeze_index: int, train_batchnorm: bool = False) -> None:
    """Phase 2: backbone layers from ``unfreeze_index`` on train; the rest stay frozen.

    BatchNormalization layers stay non-trainable, hence in inference mode: their
    moving statistics never change. ``train_batchnorm=True`` (training from scratch,
    where there are no pretrained statistics to protect) lets those in the unfrozen
    range train with batch statistics; pair it with :func:`calibrate_batchnorm`.
    """
    base = backbone_of(model)
    base.trainable = True
    for i, layer in enumerate(base.layers):
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = i >= unfreeze_index and (train_batchnorm or not is_bn)


def calibrate_batchnorm(model: keras.Model, images: np.ndarray, batch_size: int = 64) -> None:
    """Re-estimate the backbone's BatchNormalization statistics from ``images``.

    Used where the stored statistics do not describe the network's activations: a
    random backbone (``weights=None``) carries moving mean 0 and variance 1, under which
    its frozen features collapse towards a constant; and after training BatchNormalization
    with batch statistics, the moving averages lag the weights. Forward passes in
    training mode, with the momentum of chunk ``k`` set to ``k / (k + 1)``, leave each
    layer with the average of the chunks' batch statistics. Weights are not touched.

    Args:
        images: uint8 (or float 0..255) RGB images at the model's input size.
    """
    base = backbone_of(model)
    batchnorms = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    saved = [(layer.momentum, layer.trainable) for layer in batchnorms]
    preprocess = [layer for layer in model.layers if layer.name == "preprocess"]
    try:
        for layer in batchnorms:
            layer.trainable = True  # a frozen BatchNormalization ignores training=True
        for k, start in enumerate(range(0, len(images), batch_size)):
            for layer in batchnorms:
                layer.momentum = k / (k + 1)
            x = keras.ops.convert_to_tensor(images[start:start + batch_size], dtype="float32")
            if preprocess:
                x = preprocess[0](x)
            base(x, training=True)
    finally:
        for layer, (momentum, trainable) in zip(batchnorms, saved, strict=True):
            layer.momentum = momentum
            layer.trainable = trainable


def inference_copy(model: keras.Model) -> keras.Model:
    """An uncompiled copy of ``model`` with the same weights, for saving.

    A compiled model would carry its optimizer into ``model.keras``, and Keras then
    warns on every load that the optimizer's variables do not match.
    """
    copy = keras.Model.from_config(model.get_config())
    copy.set_weights(model.get_weights())
    return copy


def compile_model(model: keras.Model, learning_rate: float, loss: keras.losses.Loss | None = None) -> None:
    """Compile with Adam and a from-logits loss on sparse class indices (default: cross-entropy;
    :func:`edgeclf.train.ordinal.ordinal_loss` for soft ordinal labels)."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss=loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
