"""Does the ordinal loss pay? Cross-entropy against soft ordinal labels, argmax against median.

    python -m edgeclf.benchmarks.ordinal_study [--datasets gauges,digits] [--seeds 0,1,2]
        [--candidates abs:0.5,abs:1,abs:2,squared:0.5,squared:1] [--work runs/ordinal]

1. Selection, on validation images only: on the first dataset (the ordinal one) with the
   first seed, one ordinal model per candidate (distance:alpha) is trained; the candidate
   whose validation MAE (the better of argmax and median) is lowest is kept. The validation
   images are the split ``train`` holds out (``--val-split``, reproduced here by seed).
2. The table, on test images no training or selection saw: for every dataset and seed, a
   cross-entropy model and an ordinal model with the kept candidate, each decoded by argmax
   and by median, all with one recipe (backbone, image size, epochs, learning rates).

Every training is ``edgeclf train`` in its own process; a finished run (its ``study.json``)
is reused, so an interrupted study goes on where it stopped. Prints the Markdown table and
writes every figure to ``WORK/results.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from edgeclf.progress import log

#: The main job's recipe (Makefile DEMO_TRAIN_ARGS), so the study measures what users get from it.
RECIPE = ("--image-size 75 --weights none --epochs-frozen 10 --epochs-finetune 4 --unfreeze-at 0 "
          "--train-batchnorm --lr-finetune 1e-3 --val-split 0.3")
#: Test fraction per dataset: digits as in the main job (180 test images); gauges 440 of 2,200.
HOLDOUT = {"digits": 0.1, "gauges": 0.2}
FIGURES = ("accuracy", "mae", "rmse", "off_by_2_or_more")


def write_dataset(name: str, work: Path) -> Path:
    root = work / name
    if not (root / "test").is_dir():
        _edgeclf("dataset", name, str(root), "--overwrite", "--holdout", str(HOLDOUT[name]))
    return root


def _edgeclf(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "edgeclf", *args], check=True)


def _val_split(recipe: str) -> float:
    """The validation fraction ``train`` holds out under ``recipe`` (its flags and any --config), as train reads it."""
    from edgeclf.cli import build_parser
    from edgeclf.commands.train import train_settings

    settings = train_settings(build_parser().parse_args(["train", "data", "--out", "out", *shlex.split(recipe)]))
    from edgeclf.train.trainer import TrainConfig

    return float(settings.get("val_split", TrainConfig.val_split))


def run(data: Path, out: Path, seed: int, recipe: str, loss: tuple[str, float] | None) -> dict[str, Any]:
    """Train one model (``loss`` None: cross-entropy; else (distance, alpha) of the ordinal loss)
    and measure it on the validation split and the test images; reused when already done."""
    done = out / "study.json"
    if done.is_file() and json.loads(done.read_text()).get("recipe", recipe) == recipe:
        return json.loads(done.read_text())
    options = ["--loss", "crossentropy"] if loss is None else [
        "--loss", "ordinal", "--ordinal-distance", loss[0], "--ordinal-alpha", str(loss[1])]
    log(f"ordinal study: training {out.name}")
    _edgeclf("train", str(data / "train"), "--out", str(out / "bundle"), "--overwrite", "--seed", str(seed),
             *shlex.split(recipe), *options)
    result = {"seed": seed, "recipe": recipe,
              "loss": "crossentropy" if loss is None else f"ordinal {loss[0]} alpha={loss[1]}",
              **measure(out / "bundle", data, seed, _val_split(recipe))}
    done.write_text(json.dumps(result, indent=1))
    return result


def measure(bundle_path: Path, data: Path, seed: int, val_split: float) -> dict[str, Any]:
    """Metrics by argmax and by median on the validation split training held out and on the test images."""
    from edgeclf.bundle import Bundle
    from edgeclf.decoding import decode_indices, probabilities_of
    from edgeclf.train.data import LabelMap, load_dataset, split_stratified
    from edgeclf.train.evaluate import load_keras_model, predict_logits
    from edgeclf.train.metrics import classification_metrics

    bundle = Bundle.load(bundle_path)
    model = load_keras_model(bundle)
    labels = LabelMap(tuple(bundle.labels))
    _, val = split_stratified(load_dataset(data / "train", bundle.image_size), val_split, seed)
    sets = {"val": val, "test": load_dataset(data / "test", bundle.image_size)}
    result: dict[str, Any] = {}
    for name, images in sets.items():
        probabilities = probabilities_of(predict_logits(model, images))
        for decoding in ("argmax", "median"):
            metrics = classification_metrics(images.values, labels.decode(decode_indices(probabilities, decoding)),
                                             labels.labels)
            result[f"{name}_{decoding}"] = {k: metrics[k] for k in ("n", *FIGURES)}
    return result


def select(data: Path, work: Path, seed: int, recipe: str, candidates: list[tuple[str, float]]) -> dict[str, Any]:
    """Train one ordinal model per candidate; keep the one with the lowest validation MAE."""
    runs = {f"{d}:{a:g}": run(data, work / f"ordinal-{d}-{a:g}-seed{seed}", seed, recipe, (d, a))
            for d, a in candidates}
    val_mae = {name: min(r["val_argmax"]["mae"], r["val_median"]["mae"]) for name, r in runs.items()}
    best = min(val_mae, key=val_mae.get)
    return {"seed": seed, "val_mae": val_mae, "kept": best, "runs": runs}


def table(results: dict[str, Any]) -> str:
    """Markdown: mean ± sd over seeds of the test figures, one row per dataset, loss and decoding."""
    lines = ["| dataset (test images) | loss + decoding | accuracy | MAE | RMSE | share with \\|error\\| ≥ 2 |",
             "|---|---|---|---|---|---|"]
    for dataset, rows in results["table"].items():
        for row in rows:
            cells = []
            for figure in FIGURES:
                values = np.array([r[figure] for r in row["test"]])
                scale = 100 if figure in ("accuracy", "off_by_2_or_more") else 1
                unit = " %" if scale == 100 else ""
                cells.append(f"{values.mean() * scale:.{1 if scale == 100 else 2}f} ± "
                             f"{values.std(ddof=1) * scale if len(values) > 1 else 0:.{1 if scale == 100 else 2}f}{unit}")
            lines.append(f"| {dataset} ({row['test'][0]['n']}) | {row['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def study(datasets: list[str], seeds: list[int], candidates: list[tuple[str, float]], work: Path,
          recipe: str) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    data = {name: write_dataset(name, work) for name in datasets}
    selection = select(data[datasets[0]], work / datasets[0], seeds[0], recipe, candidates)
    distance, alpha = selection["kept"].split(":")
    kept = (distance, float(alpha))
    results: dict[str, Any] = {"recipe": recipe, "seeds": seeds, "selection": selection, "table": {}}
    for name in datasets:
        ce = [run(data[name], work / name / f"crossentropy-seed{s}", s, recipe, None) for s in seeds]
        ordinal = [run(data[name], work / name / f"ordinal-{distance}-{kept[1]:g}-seed{s}", s, recipe, kept)
                   for s in seeds]
        results["table"][name] = [
            {"name": name_, "test": [r[f"test_{decoding}"] for r in runs_]}
            for name_, runs_, decoding in (
                ("crossentropy + argmax", ce, "argmax"), ("crossentropy + median", ce, "median"),
                (f"ordinal ({distance}, α={kept[1]:g}) + argmax", ordinal, "argmax"),
                (f"ordinal ({distance}, α={kept[1]:g}) + median", ordinal, "median"))]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="gauges,digits", help="first one: where alpha and phi are chosen")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--candidates", default="abs:0.5,abs:1,abs:2,squared:0.5,squared:1",
                        help="ordinal options tried on validation images: distance:alpha,...")
    parser.add_argument("--work", type=Path, default=Path("runs/ordinal"))
    parser.add_argument("--recipe", default=RECIPE, help="edgeclf train options shared by every run")
    args = parser.parse_args(argv)
    candidates = [(c.split(":")[0], float(c.split(":")[1])) for c in args.candidates.split(",")]
    results = study(args.datasets.split(","), [int(s) for s in args.seeds.split(",")], candidates, args.work,
                    args.recipe)
    (args.work / "results.json").write_text(json.dumps(results, indent=1))
    print(f"chosen on validation ({args.datasets.split(',')[0]}, seed {results['seeds'][0]}): "
          f"{results['selection']['kept']}; validation MAE {results['selection']['val_mae']}")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
