"""What several commands share: option parsers, the model and batching options, TensorFlow's quiet start."""

from __future__ import annotations

import argparse
import os
import re
import sys

from edgeclf import limits
from edgeclf.errors import BackendUnavailableError, InvalidInputError

_RANGE = re.compile(r"^\s*([+-]?\d+)\s*\.\.\s*([+-]?\d+)\s*$")


def parse_labels(text: str) -> list[int]:
    """"3,4,5", "3..7" or "-2,3,10" -> a list of integers (at most limits.MAX_CLASSES of them).

    A range's size is checked before it is expanded: "0..99999999" is refused, not built.
    """
    parts: list[tuple[int, int]] = []
    for part in text.split(","):
        match = _RANGE.match(part)
        try:
            lo, hi = (int(match.group(1)), int(match.group(2))) if match else (int(part), int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"labels must be integers separated by commas, or a range like 3..7. Received: {text!r}"
            ) from None
        if max(abs(lo), abs(hi)) > limits.MAX_LABEL:
            raise argparse.ArgumentTypeError(f"labels must lie within +-2**53. Received: {text!r}")
        parts.append((lo, hi))
    try:
        limits.check_label_count(sum(max(0, hi - lo + 1) for lo, hi in parts), text)
    except InvalidInputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return [label for lo, hi in parts for label in range(lo, hi + 1)]


def parse_image_size(text: str) -> tuple[int, int]:
    """"299" or "224x320" (height x width), each side within limits.RANGES["image_side"]."""
    try:
        parts = [limits.RANGES["image_side"].parse(p, "each side") for p in text.lower().split("x")]
    except InvalidInputError as exc:
        raise argparse.ArgumentTypeError(f"image size must be N or HxW, {exc}") from None
    if len(parts) == 1:
        return parts[0], parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise argparse.ArgumentTypeError(f"image size must be N or HxW. Received: {text!r}")


def quiet_tensorflow(args: argparse.Namespace, load: bool = True) -> None:
    """Import TensorFlow (where installed and ``load``) without its start-up chatter, unless ``--verbose``.

    The chatter (absl's "All log messages before absl::InitializeLog()", the CUDA stub's and
    cuInit's lines on a machine without a GPU) hides the progress a user is looking for. C++
    writes it straight to file descriptor 2, past TF_CPP_MIN_LOG_LEVEL since TensorFlow moved to
    absl logging, so the import and the first device query run with descriptor 2 on /dev/null.
    Python's exceptions are raised after it is restored, so a broken install still says why.
    """
    if getattr(args, "verbose", False):
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import importlib.util

    if not load or "tensorflow" in sys.modules or importlib.util.find_spec("tensorflow") is None:
        return  # already loaded, or a device install without it (bench, verify)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            import tensorflow as tf

            tf.config.list_physical_devices()  # the CUDA platform's lines come here, not at import
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def require_training_stack(command: str, extra: str = "train") -> None:
    """Raise BackendUnavailableError, one line, where TensorFlow or Keras is not installed (a device
    install of edgeclf[cpu]): ``command`` needs the workstation's extra, not a traceback."""
    import importlib.util

    missing = [name for name in ("tensorflow", "keras") if importlib.util.find_spec(name) is None]
    if missing:
        raise BackendUnavailableError(f"edgeclf {command} needs TensorFlow and Keras, which are not installed here "
                                      f"({', '.join(missing)} missing): pip install 'edgeclf[{extra}]'")


def tf_logs() -> argparse.ArgumentParser:
    """The parent parser of commands that load TensorFlow: its start-up log lines are hidden unless asked for."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--verbose", action="store_true", help="keep TensorFlow's start-up log lines (hidden by default)")
    return parent


def pixels_help(what: str = "an image") -> str:
    from edgeclf.images import DEFAULT_MAX_IMAGE_PIXELS, PILLOW_LIMIT

    return (f"refuse {what} declaring more pixels (width x height) before decoding it (default "
            f"{DEFAULT_MAX_IMAGE_PIXELS:,}; at most {PILLOW_LIMIT:,}, Pillow's own limit)")


def int_triple(text: str, option: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise InvalidInputError(f"{option} expects three integers MIN,OPT,MAX such as 1,8,32. Received: {text!r}")
    for value in values:
        limits.check("batch", value, option)
    return values  # type: ignore[return-value]


def int_list(text: str | None, option: str) -> tuple[int, ...]:
    """"8,32" -> (8, 32), each a batch size within limits.RANGES["batch"]; None -> ()."""
    if text is None:
        return ()
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise InvalidInputError(f"{option} expects comma-separated integers such as 8,32. Received: {text!r}") from None
    for value in values:
        limits.check("batch", value, option)
    return values


def add_model_arguments(p) -> None:
    """Which artifact runs, as in ``Predictor.load``."""
    p.add_argument("--backend", default="auto",
                   help="auto (default), onnxruntime, openvino, tflite, tensorrt, or an artifact name such as onnx-int8")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16", "int8"], default=None,
                   help="pick the artifact of this precision (bf16: the FP32 OpenVINO IR run in BF16)")
    p.add_argument("--threads", type=limits.option("threads"), default=None, help="CPU threads per inference (default: all)")


def add_batching_arguments(group) -> None:
    from edgeclf.serve.triton_config import Batching  # a dataclass; tritonclient loads only when writing

    defaults = Batching()
    group.add_argument("--model-name", default="edgeclf", help="Triton model name (prefix) (default edgeclf)")
    group.add_argument("--max-batch", type=limits.option("batch"), default=defaults.max_batch,
                       help="Triton max_batch_size (default %(default)s)")
    group.add_argument("--preferred-batch", default=None, metavar="N[,N...]",
                       help="dynamic batching preferred sizes (default 8 and the max batch)")
    group.add_argument("--queue-delay-us", type=limits.option("queue_delay_us"), default=defaults.queue_delay_us,
                       help="longest wait to fill a batch, microseconds (default %(default)s)")
    group.add_argument("--instances", type=limits.option("instances"), default=defaults.instances,
                       help="model instances (default %(default)s)")


def batching(args: argparse.Namespace):
    from edgeclf.serve.triton_config import Batching

    return Batching(max_batch=args.max_batch, preferred=int_list(args.preferred_batch, "--preferred-batch"),
                    queue_delay_us=args.queue_delay_us, instances=args.instances)


def _coverage(text: str) -> float:
    """--coverage: 0 for no interval, else in the coverage range."""
    return 0.0 if text.strip() in ("0", "0.0") else limits.option("coverage")(text)


def add_trust_arguments(p) -> None:
    """--alpha and --coverage: when a reading is unfamiliar, and how often its interval holds the true label."""
    from edgeclf.trust import DEFAULT_ALPHA, DEFAULT_COVERAGE

    p.add_argument("--alpha", type=limits.option("alpha"), default=DEFAULT_ALPHA,
                   help="an image is unfamiliar when at most this share of held-out images look as strange "
                        f"(default {DEFAULT_ALPHA}: the false-alarm rate on images like the training data)")
    p.add_argument("--coverage", type=_coverage, default=DEFAULT_COVERAGE,
                   help=f"how often the interval holds the true label (default {DEFAULT_COVERAGE}); 0: none")


def trust_options(args: argparse.Namespace) -> dict:
    """Predictor.load's alpha and coverage from add_trust_arguments' options."""
    return {"alpha": args.alpha, "coverage": None if args.coverage == 0 else args.coverage}


def add_engine_arguments(group) -> None:
    """The TensorRT builder's options, for export and for ``edgeclf engine`` on the device."""
    from edgeclf.export.tensorrt_engine import EngineOptions

    defaults = EngineOptions()
    group.add_argument("--batch-profile", default=",".join(map(str, defaults.batch_profile)), metavar="MIN,OPT,MAX",
                       help="batch sizes of the optimisation profile (default %(default)s)")
    group.add_argument("--workspace-mib", type=limits.option("workspace_mib"), default=defaults.workspace_mib,
                       help="builder workspace limit (default %(default)s)")
    group.add_argument("--trt-compute-capability", default=None, metavar="CC[,CC...]",
                       help="GPUs to build for, e.g. 8.6,8.9 (TensorRT-RTX; default: this GPU, or without one "
                            "every capability TensorRT-RTX supports)")
    group.add_argument("--timing-cache", default=None,
                       help="tensorrt timing cache file, reused across builds "
                            "(default ~/.cache/edgeclf/tensorrt-VERSION.timing-cache)")


def engine_options(args: argparse.Namespace):
    """EngineOptions from add_engine_arguments' options."""
    from pathlib import Path

    from edgeclf.export.tensorrt_engine import EngineOptions

    return EngineOptions(batch_profile=int_triple(args.batch_profile, "--batch-profile"),
                         workspace_mib=args.workspace_mib,
                         compute_capabilities=tuple(args.trt_compute_capability.split(","))
                         if args.trt_compute_capability else None,
                         timing_cache=Path(args.timing_cache) if args.timing_cache else None)
