"""Installed versions of distributions, for the records artifacts and benchmarks keep."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterable


def installed_versions(distributions: Iterable[str]) -> dict[str, str]:
    """{distribution: version} for those of ``distributions`` that are installed."""
    versions = {}
    for name in distributions:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions
