"""``edgeclf serve``: serve a bundle through a real Triton server (PyTriton), HTTP and gRPC, behind the guard."""

from __future__ import annotations

import argparse
import sys

from edgeclf import limits
from edgeclf.commands.common import (add_batching_arguments, add_model_arguments, add_trust_arguments, batching,
                                     pixels_help, trust_options)
from edgeclf.decoding import DECODINGS


def run(args: argparse.Namespace) -> int:
    from edgeclf.serve.server import ServeOptions, print_ready, serve

    options = ServeOptions(host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                           metrics_port=args.metrics_port, name=args.model_name, backend=args.backend,
                           precision=args.precision, threads=args.threads, batching=batching(args),
                           image_instances=args.image_instances, max_request_mb=args.max_request_mb,
                           max_image_pixels=args.max_image_pixels, decoding=args.decode,
                           max_connections=args.max_connections, guard_threads=args.guard_threads,
                           idle_timeout=args.idle_timeout, header_timeout=args.header_timeout,
                           **trust_options(args))
    serve(args.bundle, options, on_ready=print_ready)
    print("[edgeclf] server stopped", file=sys.stderr)
    return 0


def register(sub) -> None:
    from edgeclf.images import DEFAULT_MAX_IMAGE_PIXELS
    from edgeclf.serve.server import ServeOptions  # PyTriton loads only when serving

    defaults = ServeOptions()

    p = sub.add_parser("serve", help="serve a bundle through a real Triton server (PyTriton), HTTP and gRPC",
                       description="Models NAME (pixels uint8 [N,H,W,3]) and NAME_image (encoded image "
                                   "bytes [N,1]) answer label (the integer), confidence and logits, and with "
                                   "the bundle's trust file interval, familiar, p_value and embedding. Dynamic "
                                   "batching; SIGTERM or Ctrl+C stops after the requests in flight.")
    p.add_argument("bundle", help="bundle directory (or one artifact) to serve")
    p.add_argument("--host", default=defaults.host, help="address to listen on (default %(default)s; 0.0.0.0: all)")
    p.add_argument("--http-port", type=int, default=defaults.http_port)
    p.add_argument("--grpc-port", type=int, default=defaults.grpc_port)
    p.add_argument("--metrics-port", type=int, default=defaults.metrics_port,
                   help="Prometheus metrics (default %(default)s)")
    add_model_arguments(p)
    p.add_argument("--image-instances", type=limits.option("instances"), default=defaults.image_instances,
                   help="encoded-image requests decoded at once (default %(default)s)")
    p.add_argument("--max-image-pixels", type=limits.option("image_pixels"), default=DEFAULT_MAX_IMAGE_PIXELS,
                   metavar="PIXELS", help=pixels_help("an encoded image (NAME_image)"))
    p.add_argument("--decode", choices=DECODINGS, default="argmax",
                   help="how both models' label output is decoded from the logits: argmax (default) or median "
                        "(of the predicted distribution over the ordered labels: the least expected |error|)")
    add_trust_arguments(p)
    p.add_argument("--max-request-mb", type=limits.option("request_mb"), default=defaults.max_request_mb,
                   help="larger requests (body, or declared tensor size) are refused before they are read "
                        "(default %(default)g)")
    p.add_argument("--max-connections", type=limits.option("connections"), default=defaults.max_connections,
                   help="open connections per endpoint (default %(default)s, at most 65536). At the limit HTTP closes "
                        "the connection waiting longest for its request, or answers 503 when every one carries a "
                        "request; gRPC closes new connections")
    p.add_argument("--guard-threads", type=limits.option("threads"), default=defaults.guard_threads,
                   help="threads answering requests per endpoint; idle and slow clients take none "
                        "(default %(default)s, at most 1024)")
    p.add_argument("--idle-timeout", type=limits.option("serve_timeout"), default=defaults.idle_timeout,
                   help="seconds a kept-alive connection may wait for its next request (default %(default)g)")
    p.add_argument("--header-timeout", type=limits.option("serve_timeout"), default=defaults.header_timeout,
                   help="seconds a request's line and headers may take to arrive; a large body gets this "
                        "plus 1 s per 256 KiB (default %(default)g)")
    add_batching_arguments(p)
    p.set_defaults(func=run)
