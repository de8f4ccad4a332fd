"""What differs between the Python versions edgeclf runs on (3.10 and later).

Jetson's JetPack 6 ships Python 3.10, with TensorRT's bindings for that Python only, so the
package keeps to 3.10 (``tests/test_packaging.py`` checks it with vermin); where 3.11 added
something edgeclf uses, the 3.10 stand-in is chosen here, once.
"""

from __future__ import annotations

try:
    import tomllib  # novermin: Python 3.11+; 3.10 takes the branch below
except ModuleNotFoundError:  # Python 3.10: the same parser, published as tomli
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = ["tomllib"]
