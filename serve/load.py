"""A bounded load run against ``edgeclf serve``: many clients, right answers, bad requests.

Each client sends its requests one after another, half over HTTP and half over gRPC
(alternating by client), alternating the pixel model and the encoded-image model.
Every ``malformed_every``-th request is malformed on purpose (float pixels, a wrong
shape, bytes that are not an image, a truncated file): each must get an error, and
every other request must still get the integer the Predictor gives for its image, and
where the served bundle has a trust file the same interval and familiarity decision
(:func:`probe_samples` adds frames that must come back unfamiliar).
The run stops by itself after ``clients x requests`` requests.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeclf.errors import InvalidInputError

MALFORMED_KINDS = ("float32 pixels", "wrong shape", "not an image", "truncated file")


@dataclass(frozen=True)
class Sample:
    """One image as both request forms, and what the Predictor answers for it."""

    encoded: bytes
    pixels: np.ndarray  # uint8 [H, W, 3] at the model's size
    expected: int
    familiar: bool | None = None  # None: the Predictor does not score familiarity
    interval: tuple[int, int] | None = None

    def answer(self) -> dict[str, Any]:
        """The outputs the server must give for this image, by name."""
        out: dict[str, Any] = {"label": self.expected}
        if self.familiar is not None:
            out["familiar"] = self.familiar
        if self.interval is not None:
            out["interval"] = self.interval
        return out


@dataclass
class LoadReport:
    """What a load run sent and got back."""

    clients: int
    requests_per_client: int
    seconds: float = 0.0
    answered: int = 0
    wrong: list[str] = field(default_factory=list)
    unexpected_errors: list[str] = field(default_factory=list)
    malformed_sent: int = 0
    malformed_rejected: int = 0
    malformed_answered: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.wrong or self.unexpected_errors or self.malformed_answered)

    def summary(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies_ms or [np.nan])
        return {
            "clients": self.clients, "requests_per_client": self.requests_per_client,
            "requests": self.clients * self.requests_per_client, "seconds": round(self.seconds, 3),
            "answered": self.answered, "wrong": len(self.wrong),
            "unexpected_errors": len(self.unexpected_errors),
            "malformed_sent": self.malformed_sent, "malformed_rejected": self.malformed_rejected,
            "malformed_answered": len(self.malformed_answered),
            "throughput_rps": round(self.answered / self.seconds, 2) if self.seconds else None,
            "latency_ms": {q: round(float(np.percentile(lat, int(q[1:]))), 2) for q in ("p50", "p90", "p99")}
            | {"max": round(float(lat.max()), 2)},
            "ok": self.ok,
        }


class _Client:
    """One protocol's tritonclient, with the calls the load run makes."""

    def __init__(self, protocol: str, url: str, timeout_s: float) -> None:
        if protocol == "http":
            import tritonclient.http as module

            self.client = module.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
        else:
            import tritonclient.grpc as module

            self.client = module.InferenceServerClient(url)
        self.module, self.protocol, self.timeout_s = module, protocol, timeout_s

    def infer(self, model: str, name: str, data: np.ndarray, datatype: str,
              outputs: tuple[str, ...] = ("label",)) -> dict[str, Any]:
        """The first image's ``outputs``, by name, as the Sample holds them."""
        tensor = self.module.InferInput(name, list(data.shape), datatype)
        tensor.set_data_from_numpy(data)
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        result = self.client.infer(model, [tensor], outputs=[self.module.InferRequestedOutput(n) for n in outputs],
                                   **kwargs)
        first = {n: result.as_numpy(n)[0] for n in outputs}
        return {n: (tuple(int(v) for v in value) if n == "interval" else
                    bool(value[0]) if n == "familiar" else int(value[0])) for n, value in first.items()}

    def close(self) -> None:
        self.client.close()


def _malformed(kind: str, sample: Sample) -> tuple[str, np.ndarray, str]:
    """(input name, data, datatype) of one malformed request; the model follows from the input."""
    if kind == "float32 pixels":
        return "pixels", sample.pixels[None].astype(np.float32), "FP32"
    if kind == "wrong shape":
        return "pixels", np.ascontiguousarray(sample.pixels[None, 1:]), "UINT8"
    if kind == "not an image":
        return "image", np.array([[b"these bytes are not an image file"]], dtype=np.object_), "BYTES"
    return "image", np.array([[sample.encoded[: len(sample.encoded) // 2]]], dtype=np.object_), "BYTES"


def run_load(samples: list[Sample], *, http_url: str, grpc_url: str, name: str = "edgeclf",
             clients: int = 16, requests: int = 50, malformed_every: int = 5,
             timeout_s: float = 60.0) -> LoadReport:
    """Run ``clients`` concurrent clients of ``requests`` requests each and check every answer.

    Args:
        samples: images with the Predictor's answer; clients take them in turn.
        malformed_every: every n-th request of a client is malformed (0: none).
        timeout_s: a request unanswered after this long counts as an unexpected error.
    """
    if not samples:
        raise InvalidInputError("a load run needs at least one image")
    if clients < 1 or requests < 1 or malformed_every < 0:
        raise InvalidInputError(f"clients and requests must be >= 1 and malformed_every >= 0. "
                                f"Received: {clients}, {requests}, {malformed_every}")
    run = _LoadRun(samples, {"http": http_url, "grpc": grpc_url}, name, requests, malformed_every, timeout_s,
                   LoadReport(clients, requests))
    start = threading.Barrier(clients + 1)

    def client_loop(k: int) -> None:
        start.wait()  # all clients begin together
        run.client(k)

    threads = [threading.Thread(target=client_loop, args=(k,), daemon=True) for k in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    run.report.seconds = time.perf_counter() - began
    return run.report


class _LoadRun:
    """What the clients of one load run share: the images, where to send them, and the report they fill."""

    def __init__(self, samples: list[Sample], urls: dict[str, str], name: str, requests: int,
                 malformed_every: int, timeout_s: float, report: LoadReport) -> None:
        self.samples, self.urls, self.requests = samples, urls, requests
        self.malformed_every, self.timeout_s, self.report = malformed_every, timeout_s, report
        self.models = {"pixels": name, "image": f"{name}_image"}
        self.lock = threading.Lock()

    def client(self, k: int) -> None:
        """Client ``k`` (even: HTTP, odd: gRPC) sends its requests one after another."""
        protocol = "http" if k % 2 == 0 else "grpc"
        try:
            client = _Client(protocol, self.urls[protocol], self.timeout_s)
        except Exception as exc:
            with self.lock:
                self.report.unexpected_errors.append(f"client {k} ({protocol}) could not connect: {exc}")
            return
        try:
            for j in range(self.requests):
                sample = self.samples[(k * self.requests + j) % len(self.samples)]
                every = self.malformed_every
                if every and j % every == every - 1:
                    self._malformed(client, sample, MALFORMED_KINDS[(k + j // every) % len(MALFORMED_KINDS)])
                else:
                    self._valid(client, sample, "pixels" if j % 2 == 0 else "image")
        finally:
            client.close()

    def _malformed(self, client: _Client, sample: Sample, kind: str) -> None:
        """A malformed request of ``kind``: it must get an error, never an answer."""
        input_name, data, datatype = _malformed(kind, sample)
        try:
            label = client.infer(self.models[input_name], input_name, data, datatype)["label"]
        except Exception:  # an error response is what a malformed request must get
            answered = None
        else:
            answered = f"{client.protocol} {kind}: answered {label}"
        with self.lock:
            self.report.malformed_sent += 1
            if answered is None:
                self.report.malformed_rejected += 1
            else:
                self.report.malformed_answered.append(answered)

    def _valid(self, client: _Client, sample: Sample, input_name: str) -> None:
        """A valid request, as pixels or as the encoded file: timed, and checked against the Predictor's answer."""
        data, datatype = ((sample.pixels[None], "UINT8") if input_name == "pixels"
                          else (np.array([[sample.encoded]], dtype=np.object_), "BYTES"))
        expected = sample.answer()
        started = time.perf_counter()
        try:
            got = client.infer(self.models[input_name], input_name, data, datatype, tuple(expected))
        except Exception as exc:
            with self.lock:
                self.report.unexpected_errors.append(f"{client.protocol} {input_name}: {str(exc)[-300:]}")
            return
        elapsed_ms = (time.perf_counter() - started) * 1e3
        with self.lock:
            self.report.answered += 1
            self.report.latencies_ms.append(elapsed_ms)
            if got != expected:
                self.report.wrong.append(f"{client.protocol} {input_name}: got {got}, expected {expected}")


def samples_from_files(paths: list, predictor) -> list[Sample]:
    """Each file's bytes, its decoded pixels and the Predictor's answer for it."""
    from edgeclf.images import load_image

    encoded = [Path(p).read_bytes() for p in paths]
    return _samples(encoded, np.stack([load_image(data, predictor.image_size) for data in encoded]), predictor)


def probe_samples(predictor, count: int = 2) -> list[Sample]:
    """``count`` frames of each kind of the built-in probe (noise, constant frames) as PNG files at the
    model's size, with the Predictor's answer: where it scores familiarity, unfamiliar is what verify checked."""
    import io

    from PIL import Image

    from edgeclf.probe import foreign_probe

    frames = np.concatenate(list(foreign_probe(*predictor.image_size, count=count).values()))
    encoded = []
    for frame in frames:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return _samples(encoded, frames, predictor)


def _samples(encoded: list[bytes], pixels: np.ndarray, predictor) -> list[Sample]:
    return [Sample(e, px, int(p.label), p.familiar, p.interval)
            for e, px, p in zip(encoded, pixels, predictor.predict_batch(pixels), strict=True)]
