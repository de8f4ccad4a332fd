"""``edgeclf unpack``: write a packed archive out as a package folder, every member checked."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from edgeclf.pack import unpack

    out = unpack(args.archive, args.out, overwrite=args.overwrite)
    print(f"unpacked {args.archive} to {out}; check it here with: edgeclf verify {out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("unpack", help="write a package archive (.tar.gz, .zip) out as a folder, checked",
                       description="Only what 'edgeclf pack' writes is accepted: regular files with plain names "
                                   "(no folder, '..', absolute path or link), each of the size and sha256 the "
                                   "package record lists. Anything else is refused before the folder appears.")
    p.add_argument("archive", help="a .tar.gz, .tgz or .zip file written by 'edgeclf pack'")
    p.add_argument("out", help="folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    p.set_defaults(func=run)
