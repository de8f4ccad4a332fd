"""``edgeclf loadtest``: a bounded load run against ``edgeclf serve``, malformed requests interleaved."""

from __future__ import annotations

import argparse
import json
import sys

from edgeclf import limits
from edgeclf.commands.common import add_trust_arguments, trust_options
from edgeclf.decoding import DECODINGS
from edgeclf.errors import InvalidInputError


def run(args: argparse.Namespace) -> int:
    from edgeclf.runtime import Predictor
    from edgeclf.runtime.files import image_paths
    from edgeclf.serve.load import probe_samples, run_load, samples_from_files

    paths = [path for path, problem in image_paths(args.images) if problem is None][: args.max_images]
    if not paths:
        raise InvalidInputError(f"no image files found in {args.images}")
    with Predictor.load(args.bundle, args.backend, decoding=args.decode, **trust_options(args)) as predictor:
        # The probe's frames too: where the bundle scores familiarity, the server must flag them as the Predictor does.
        samples = samples_from_files(paths, predictor) + probe_samples(predictor)
        checked = list(samples[0].answer())
    report = run_load(samples, http_url=args.http_url, grpc_url=args.grpc_url, name=args.model_name,
                      clients=args.clients, requests=args.requests, malformed_every=args.malformed_every,
                      timeout_s=args.timeout)
    summary = report.summary() | {"checked": checked, "images": len(samples), "probe_images": len(samples) - len(paths)}
    if args.json:
        print(json.dumps(summary))
    else:
        lat = summary["latency_ms"]
        print(f"{summary['requests']} requests from {summary['clients']} clients in {summary['seconds']:.1f} s: "
              f"{summary['answered']} answered ({summary['throughput_rps']} req/s), {summary['wrong']} wrong, "
              f"{summary['unexpected_errors']} unexpected errors; malformed: {summary['malformed_sent']} sent, "
              f"{summary['malformed_rejected']} rejected")
        print(f"checked: {', '.join(checked)} of {summary['images']} images "
              f"({summary['probe_images']} of them the foreign probe)")
        print(f"latency ms: p50 {lat['p50']}  p90 {lat['p90']}  p99 {lat['p99']}  max {lat['max']}")
    for problem in (report.wrong + report.unexpected_errors + report.malformed_answered)[:10]:
        print(f"error: {problem}", file=sys.stderr)
    return 0 if report.ok else 1


def register(sub) -> None:
    p = sub.add_parser("loadtest", help="bounded load run against 'edgeclf serve', malformed requests interleaved",
                       description="CLIENTS concurrent clients (half HTTP, half gRPC) send REQUESTS requests each; "
                                   "every answer is checked against the Predictor's integer for the image (and its "
                                   "interval and familiarity where the bundle has a trust file; noise and constant "
                                   "frames are added), and "
                                   "every malformed request must get an error. Exit status 1 otherwise.")
    p.add_argument("bundle", help="the served bundle: the Predictor's answers are the expected ones")
    p.add_argument("images", nargs="+", help="image files or directories")
    p.add_argument("--http-url", default="127.0.0.1:8000")
    p.add_argument("--grpc-url", default="127.0.0.1:8001")
    p.add_argument("--model-name", default="edgeclf")
    p.add_argument("--backend", default="auto", help="backend of the local Predictor giving expected answers")
    p.add_argument("--clients", type=limits.option("clients"), default=16)
    p.add_argument("--requests", type=limits.option("requests"), default=50, help="requests per client (default 50)")
    p.add_argument("--malformed-every", type=limits.option("every"), default=5,
                   help="every n-th request of a client is malformed (default 5; 0: none)")
    p.add_argument("--max-images", type=limits.option("images"), default=200, help="images used (default 200)")
    p.add_argument("--timeout", type=limits.option("timeout"), default=60.0, help="seconds before a request counts as failed")
    p.add_argument("--decode", choices=DECODINGS, default="argmax",
                   help="the decoding the server was started with (serve --decode): the expected answers follow it")
    add_trust_arguments(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)
