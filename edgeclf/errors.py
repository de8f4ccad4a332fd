"""The project's typed errors.

Every error a user can cause derives from :class:`EdgeclfError` and also from the
matching built-in, so ``except ValueError`` keeps working for callers that do not know
edgeclf. The CLI prints ``error: <message>`` for these and exits non-zero; any other
exception is a bug and keeps its traceback.

Messages say what was wrong, what was received and what would work.
"""

from __future__ import annotations


class EdgeclfError(Exception):
    """Base class of every error edgeclf raises on purpose."""


class InvalidInputError(EdgeclfError, ValueError):
    """An argument or input value is not acceptable."""


class DataError(InvalidInputError):
    """A dataset (directory, CSV, arrays) cannot be used for training or evaluation."""


class ImageDecodeError(InvalidInputError):
    """An image file or buffer could not be decoded."""


class WeightsError(EdgeclfError, ValueError):
    """Backbone weights are missing, unreadable or for another architecture."""


class WeightsUnavailableError(EdgeclfError, OSError):
    """Pretrained weights could not be downloaded."""


class OutputExistsError(EdgeclfError, FileExistsError):
    """An output directory exists and is not empty, and overwriting was not asked for."""


class BundleError(EdgeclfError, ValueError):
    """A bundle directory is missing, corrupt or of an unsupported format version."""


class BackendUnavailableError(EdgeclfError, ImportError):
    """An optional library needed for the requested work is not installed."""


class ConversionError(EdgeclfError, RuntimeError):
    """A converter (tf2onnx, onnxconverter-common, a quantizer, a builder) failed."""


class ValidationError(EdgeclfError):
    """An exported artifact disagrees with the reference model beyond tolerance.

    ``records``: the export's artifact records, the failed ones included (for reports).
    """

    def __init__(self, message: str, records: list | None = None):
        super().__init__(message)
        self.records = records or []


class IncompatibleArtifactError(EdgeclfError, ValueError):
    """An artifact was built for another device, library version or bundle."""


class StorageError(EdgeclfError, OSError):
    """A file could not be written: no space left, a quota, a read-only or forbidden path."""


class PortInUseError(EdgeclfError, OSError):
    """A server port is already taken on the address it should listen on."""


class ServerError(EdgeclfError, RuntimeError):
    """A server process edgeclf started failed while serving."""


class CheckpointError(EdgeclfError, ValueError):
    """A training checkpoint is unreadable, or belongs to another configuration or data."""


class TrainingDivergedError(EdgeclfError, ArithmeticError):
    """Training produced a loss that is not finite (NaN or inf): it stops rather than go on."""
