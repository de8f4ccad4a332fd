"""``bench``'s end-to-end rows: from a camera's picture to the integer, beside the model alone.

Per artifact, at batch 1, timed interleaved with its own backend call (so the ratio holds on a
busy machine): ``Predictor.predict`` from a 12 MP JPEG file, a PNG file of the same picture and a
1080p uint8 array; the JPEG's decode (at the reduced DCT scale) and resize on their own columns.
For the fastest artifact at batch 1: ``Predictor.predict`` over a folder's worth of camera
JPEGs as one list, as images/s beside its backend's throughput on ready frames at the same batch.

The pictures are made here, deterministic and photo-like (one of the photographs scikit-learn
and matplotlib ship, cropped by the seed, enlarged, with a seeded sensor grain; noise would
compress three times worse than a camera's picture; on a device without scikit-learn, pictures
drawn from the seed), unless the user gives camera JPEGs (``--images DIR``). The result says which.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edgeclf.benchmarks.timing import time_interleaved
from edgeclf.images import decode_image, resize_to
from edgeclf.photographs import sample_photographs
from edgeclf.progress import log

#: A 12 MP camera picture and a 1080p video frame, (width, height).
CAMERA, FRAME = (4000, 3000), (1920, 1080)
#: Distinct pictures made for the folder; its other files repeat them (decoding costs the same).
DISTINCT = 8


def camera_picture(size: tuple[int, int], seed: int) -> Image.Image:
    """A photo-like RGB picture of ``size`` (width, height): one of the photographs that ship in
    scikit-learn and matplotlib (:func:`edgeclf.photographs.sample_photographs`), cropped by the
    seed, enlarged bicubically, with Gaussian sensor grain (sigma 3 levels); where scikit-learn is
    not installed (a device), :func:`drawn_picture`."""
    try:
        photos = sample_photographs()
    except ImportError:
        return drawn_picture(size, seed)
    rng = np.random.default_rng(seed)
    photo = photos[seed % len(photos)]
    h, w = photo.shape[:2]
    ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    return _with_grain(Image.fromarray(photo[y:y + ch, x:x + cw]).resize(size, Image.Resampling.BICUBIC), rng)


def drawn_picture(size: tuple[int, int], seed: int) -> Image.Image:
    """A picture drawn from the seed alone (numpy and Pillow): a smooth colour field, shapes with
    edges at every scale, softened as a lens would, and the same sensor grain."""
    from PIL import ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    width, height = size
    field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    small = field.resize((max(1, width // 4), max(1, height // 4)))
    draw = ImageDraw.Draw(small)
    for _ in range(60):
        x0, y0 = rng.integers(0, small.width), rng.integers(0, small.height)
        x1, y1 = x0 + rng.integers(4, max(5, small.width // 4)), y0 + rng.integers(4, max(5, small.height // 4))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    shapes = small.resize(size, Image.Resampling.BILINEAR).filter(ImageFilter.GaussianBlur(1.5))
    return _with_grain(Image.blend(field, shapes, 0.7), rng)


def _with_grain(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(img, np.float32) + rng.normal(0.0, 3.0, (img.height, img.width, 3)).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def camera_folder(folder: Path, count: int) -> list[Path]:
    """``count`` 12 MP camera JPEGs (quality 92, as phones save them) written to ``folder``."""
    paths = []
    for i in range(count):
        path = folder / f"camera_{i:04d}.jpg"
        if i < DISTINCT:
            camera_picture(CAMERA, i).save(path, quality=92)
        else:
            shutil.copyfile(paths[i % DISTINCT], path)
        paths.append(path)
    return paths


def end_to_end(predictors: dict[str, Any], config, machine: str) -> dict[str, Any]:
    """{"rows": one per artifact, "folder": the fastest artifact over ``config.folder_images`` JPEGs}."""
    from edgeclf.runtime.files import image_paths

    with tempfile.TemporaryDirectory(prefix="edgeclf-camera-") as tmp:
        tmp_dir = Path(tmp)
        if config.images is not None:
            jpegs = [p for p, problem in image_paths([config.images]) if problem is None][:config.folder_images]
            if not jpegs:
                return {"rows": [], "folder": None, "error": f"no image files under {config.images}"}
        else:
            log(f"end to end: making {config.folder_images} camera pictures ({CAMERA[0]}x{CAMERA[1]} JPEG)")
            jpegs = camera_folder(tmp_dir, config.folder_images)
        png = tmp_dir / "camera.png"
        with Image.open(jpegs[0]) as picture:
            picture.convert("RGB").save(png, compress_level=1)
        frame = np.asarray(camera_picture(FRAME, 99))
        rows = [_artifact_rows(name, predictor, jpegs[0], png, frame, config, machine)
                for name, predictor in predictors.items()]
        fastest = min((r for r in rows if r["status"] == "ok"), key=lambda r: r["model_p50_ms"], default=None)
        folder = _folder(fastest["name"], predictors[fastest["name"]], jpegs, config) if fastest else None
    return {"rows": rows, "folder": folder, "pictures": "given (--images)" if config.images is not None else
            f"made here: {_PICTURES[_drawn()]}, enlarged with sensor grain, JPEG quality 92"}


_PICTURES = {False: "the photographs of scikit-learn and matplotlib", True: "drawn pictures (no scikit-learn here)"}


def _drawn() -> bool:
    """Whether :func:`camera_picture` drew its pictures (the photographs could not be read here)."""
    try:
        sample_photographs()
    except ImportError:
        return True
    return False


def _artifact_rows(name: str, predictor, jpeg: Path, png: Path, frame: np.ndarray, config,
                   machine: str) -> dict[str, Any]:
    size = predictor.image_size
    decoded = decode_image(jpeg, size)
    ready = np.asarray(resize_to(decoded, size))[None]
    fns = {"model": lambda: predictor.backend.infer(ready), "jpeg": lambda: predictor.predict(jpeg),
           "png": lambda: predictor.predict(png), "frame": lambda: predictor.predict(frame),
           "decode": lambda: decode_image(jpeg, size), "resize": lambda: resize_to(decoded, size)}
    log(f"end to end: {name}")
    errors: dict[str, str] = {}
    timings = time_interleaved(fns, config.warmup_s, config.duration_s / 2, config.min_runs, errors=errors)
    with Image.open(jpeg) as header:
        jpeg_size = list(header.size)
    row: dict[str, Any] = {"name": name, "artifact": predictor.choice.format, "machine": machine,
                           "jpeg_size": jpeg_size, "frame_size": [frame.shape[1], frame.shape[0]]}
    if errors:
        return {**row, "status": "failed", "error": "; ".join(f"{k}: {v}" for k, v in errors.items())}
    p50 = {k: t.stats()["p50_ms"] for k, t in timings.items()}
    return {**row, "status": "ok", "model_p50_ms": p50["model"],
            **{f"{k}_p50_ms": p50[k] for k in ("jpeg", "png", "frame", "decode", "resize")},
            **{f"{k}_x_model": p50[k] / p50["model"] for k in ("jpeg", "png", "frame")}}


def _folder(name: str, predictor, jpegs: list[Path], config) -> dict[str, Any]:
    """``Predictor.predict`` over every picture as one list against the backend on ready frames
    at the predictor's batch size (each timed twice, interleaved; the better of each kept)."""
    batch = predictor.batch_size
    size = predictor.image_size
    ready = np.asarray(resize_to(decode_image(jpegs[0], size), size))[None].repeat(batch, axis=0)
    log(f"end to end: {name} over {len(jpegs)} pictures, batch {batch}")
    timings = time_interleaved({"folder": lambda: predictor.predict(jpegs),
                                "model": lambda: predictor.backend.infer(ready)},
                               warmup_s=0.0, duration_s=0.0, min_runs=2)
    folder_ips = len(jpegs) / (timings["folder"].stats()["min_ms"] / 1e3)
    model_ips = batch / (timings["model"].stats()["min_ms"] / 1e3)
    return {"name": name, "images": len(jpegs), "batch": batch, "decode_threads": predictor.decode_threads,
            "images_per_s": folder_ips, "model_images_per_s": model_ips, "share_of_model": folder_ips / model_ips}
