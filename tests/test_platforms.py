"""The README's platform table is what the package index offers each platform now."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tools import platforms

README = Path(__file__).resolve().parent.parent / "README.md"


def test_platform_tags_cover_every_glibc_up_to_the_devices():
    pi = next(p for p in platforms.PLATFORMS if p.name.startswith("Raspberry Pi 4 and 5"))
    tags = pi.tags()
    assert tags[0] == "manylinux_2_36_aarch64" and "manylinux_2_17_aarch64" in tags
    assert "manylinux2014_aarch64" in tags and tags[-1] == "linux_aarch64"
    assert "onnxruntime>=1.17" in platforms.extra_requirements("cpu")
    assert "nncf>=2.14" in platforms.extra_requirements("openvino-int8")  # edgeclf[openvino] expanded too
    assert "openvino>=2024.0" in platforms.extra_requirements("openvino-int8")


@pytest.mark.slow
def test_the_readme_table_is_what_the_index_resolves():
    why = platforms.index_reachable()
    if why:
        pytest.skip(why)
    found = platforms.table(platforms.check())
    written = re.search(r"<!-- platforms:begin -->\n(.*?)\n<!-- platforms:end -->", README.read_text(), re.S)
    assert written, "README.md lost its platform table markers"
    assert written.group(1) == found, "the index changed: run python tools/platforms.py and update README.md"
