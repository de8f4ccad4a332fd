"""Progress lines for long work, on stderr so that stdout stays machine-readable."""

from __future__ import annotations

import sys


def log(message: str) -> None:
    """Print ``[edgeclf] message`` to stderr at once."""
    print(f"[edgeclf] {message}", file=sys.stderr, flush=True)
