"""Training at scale: peak memory and phase-2 throughput, streamed versus in memory.

    python -m edgeclf.benchmarks.train_scale [--sizes 2000,8000] [--inputs stream,memory]
        [--backbone inception_v3] [--image-size 299] [--work DIR] [--out results.json]
        [--train-args "--unfreeze-at 249 --no-train-batchnorm --lr-finetune 1e-5"]

Writes N real-looking JPEG images per size (scikit-learn's digits, upscaled to the image
size with a random rotation, shift, contrast, tint and noise each, so that no two files
are alike and JPEG decoding costs what it costs on photos), then for every size and input
mode runs ``edgeclf train`` in its own process for one frozen and one fine-tune epoch,
and reads from the OS (``wait4``) the process's peak resident memory, and from the
bundle the phase-2 images per second. The targets of issue 15: streamed, peak memory
grows by at most 15% from 2,000 to 8,000 images; at 2,000 images, streamed phase 2 runs
within 10% of the in-memory images/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgeclf.progress import log


def write_images(out: Path, count: int, size: int, seed: int = 0) -> Path:
    """``count`` JPEG files in ``out/<digit>/``, each a digit scan made photo-like; reused if complete."""
    from PIL import Image, ImageFilter
    from sklearn.datasets import load_digits

    done = out / f".complete-{count}-{size}-{seed}"
    if done.exists():
        return out
    digits = load_digits()
    rng = np.random.default_rng(seed)
    for i in range(count):
        k = int(rng.integers(len(digits.target)))
        gray = (digits.images[k] * (255 / 16)).astype(np.uint8)
        image = Image.fromarray(gray).resize((size, size), Image.Resampling.BICUBIC)
        image = image.rotate(float(rng.uniform(-12, 12)), resample=Image.Resampling.BILINEAR,
                             translate=tuple(rng.integers(-size // 12, size // 12 + 1, 2).tolist()))
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 1.5))))
        pixels = np.asarray(image, dtype=np.float32)[..., None] * rng.uniform(0.6, 1.0)
        tint = rng.uniform(0, 90, 3)  # a coloured background, as paper under a lamp
        pixels = pixels + tint * (1 - pixels / 255) + rng.normal(0, 6, (size, size, 3))
        folder = out / str(int(digits.target[k]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"img_{i:06d}.jpg", quality=90)
    done.touch()
    return out


def run_training(data: Path, out: Path, input_mode: str, backbone: str, image_size: int,
                 extra: list[str]) -> dict[str, Any]:
    """One ``edgeclf train`` process; its peak RSS, wall time and phase figures."""
    cmd = [sys.executable, "-m", "edgeclf", "train", str(data), "--out", str(out), "--overwrite",
           "--backbone", backbone, "--image-size", str(image_size), "--weights", "none",
           "--epochs-frozen", "1", "--epochs-finetune", "1", "--input", input_mode,
           "--feature-cache-dir", str(out.parent / f"cache-{out.name}"), *extra]
    started = time.perf_counter()
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"training failed ({' '.join(cmd)}):\n{stderr[-3000:]}")
    meta = json.loads((out / "bundle.json").read_text())
    frozen, finetune = meta["training"]["phases"]
    images = meta["training"]["data"]["train_images"]
    return {
        "command": " ".join(cmd[1:]), "input": input_mode, "images": images + meta["training"]["data"]["val_images"],
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux: kibibytes
        "wall_seconds": round(time.perf_counter() - started, 1),
        "phase1_seconds": frozen["seconds"], "phase2_seconds": finetune["seconds"],
        "phase2_images_per_s": round(images * finetune["epochs_run"] / finetune["seconds"], 2),
        "val_accuracy": meta["metrics"]["validation"]["accuracy"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="2000,8000", help="image counts (default 2000,8000)")
    parser.add_argument("--inputs", default="stream,memory", help="input modes (default stream,memory)")
    parser.add_argument("--backbone", default="inception_v3")
    parser.add_argument("--image-size", type=int, default=299)
    parser.add_argument("--work", default="runs/train_scale", help="images and bundles (default runs/train_scale)")
    parser.add_argument("--out", default=None, help="results JSON (default WORK/results.json)")
    parser.add_argument("--train-args", default="",
                        help='more train options, e.g. "--unfreeze-at 249 --no-train-batchnorm --lr-finetune 1e-5" '
                             "(the fine-tuning recipe: phase 2 trains the top blocks only, so decoding weighs more)")
    args = parser.parse_args(argv)
    work = Path(args.work)
    results = []
    for count in (int(n) for n in args.sizes.split(",")):
        log(f"writing {count} JPEG images at {args.image_size}x{args.image_size}")
        data = write_images(work / f"images-{count}", count, args.image_size)
        for mode in args.inputs.split(","):
            log(f"training on {count} images, input {mode}")
            result = run_training(data, work / f"bundle-{count}-{mode}", mode, args.backbone, args.image_size,
                                  args.train_args.split())
            results.append(result)
            log(f"  peak RSS {result['peak_rss_mb']:.0f} MB, phase 2 {result['phase2_images_per_s']:.1f} images/s, "
                f"wall {result['wall_seconds']:.0f} s")
    from edgeclf.benchmarks.environment import environment  # the CPU and its flags: every figure depends on them

    report = {"backbone": args.backbone, "image_size": args.image_size, "train_args": args.train_args,
              "environment": environment(),
              "runs": results}
    out = Path(args.out) if args.out else work / "results.json"
    out.write_text(json.dumps(report, indent=1))
    print("| images | input | peak RSS (MB) | phase 2 images/s | phase 1 s | phase 2 s | wall s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['images']} | {r['input']} | {r['peak_rss_mb']:.0f} | {r['phase2_images_per_s']:.1f} | "
              f"{r['phase1_seconds']:.0f} | {r['phase2_seconds']:.0f} | {r['wall_seconds']:.0f} |")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
