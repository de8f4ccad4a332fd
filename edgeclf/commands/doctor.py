"""``edgeclf doctor``: which backends and accelerators are usable here, and why not."""

from __future__ import annotations

import argparse
import json


def run(args: argparse.Namespace) -> int:
    from edgeclf.runtime.doctor import doctor, format_report

    report = doctor()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def register(sub) -> None:
    p = sub.add_parser("doctor", help="which backends and accelerators are usable here, and why not")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)
