"""edgeclf: from a Keras integer image classifier to a fast, verified model on the edge.

The package is split at the device line: ``edgeclf.train`` and ``edgeclf.export`` need
TensorFlow; ``edgeclf.runtime`` needs only numpy, Pillow and one inference backend.
Importing ``edgeclf`` itself imports nothing heavy.
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

# In a checkout this folder holds only the core: train/, runtime/, ... beside it are
# edgeclf.train, edgeclf.runtime, ... (package-dir in pyproject.toml). Python started from the
# checkout's root imports this folder before any installed edgeclf, so its subpackages are
# looked for beside it too; an installed edgeclf (no pyproject.toml above it) is left as it is.
_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "runtime" / "__init__.py").is_file():
    __path__.append(str(_checkout))  # noqa: F821 (a package's __path__)
