"""Which familiarity score to ship: measured on a bundle's held-out and foreign images, never its test images.

    python -m edgeclf.benchmarks.familiarity_study runs/demo/bundle --out runs/demo/familiarity_study.json
    python -m edgeclf.benchmarks.familiarity_study runs/demo/bundle --report runs/demo/data/test
    python -m edgeclf.benchmarks.familiarity_study runs/gauges/bundle --report runs/gauges/data/test \
        --no-gauges --foreign runs/demo/data/test

The second form reports what the shipped check does on the device: each exported artifact run by
the Predictor with the bundle's trust file, on the test images (never used to fit or choose
anything), gauges drawn with seed 2, crops of real photographs and the probe frames. For a
model of gauges, ``--no-gauges`` leaves the drawn gauges out and ``--foreign DIR`` adds the
image files under DIR (e.g. the digits' test images) as a foreign set.

The first form weighs candidates beyond those export chooses among (export/familiarity_choice.py):
the shared-covariance Mahalanobis score on the pooled features at several ranks, the relative
score of Ren et al. 2021, the pooled features of every inception block and sums of two blocks'
scores. For each it reports the AUROC of "foreign" against the bundle's held-out images and the
share of foreign images flagged at the held-out images' 95th and 99th percentiles. Foreign here:
gauges drawn with seed 1 (the report uses another seed; ``--no-gauges`` drops them), the folders
of ``--foreign``, photo crops (seed 1), uniform noise and constant frames. The training images
fit every candidate; the held-out images only judge them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from edgeclf.bundle import Bundle
from edgeclf.export.familiarity_choice import photo_crops
from edgeclf.probe import foreign_probe

#: Inception blocks whose pooled outputs are tried; the last is the head's input.
BLOCKS = tuple(f"mixed{i}" for i in range(11))


def gauges(count: int, size: tuple[int, int], seed: int) -> np.ndarray:
    """``count`` gauge images (readings cycling 0..10) at the model's size, as the runtime resizes them."""
    from edgeclf.runtime.inputs import to_batch
    from edgeclf.train.gauges import READINGS, gauge_image

    rng = np.random.default_rng(seed)
    return to_batch([gauge_image(READINGS[i % len(READINGS)], rng) for i in range(count)], size)


def block_features(model, images: np.ndarray, blocks=BLOCKS, batch: int = 64) -> dict[str, np.ndarray]:
    """Global-average-pooled outputs of the backbone's ``blocks`` for uint8 ``images``."""
    from edgeclf.export.trust_fit import keras_outputs
    from edgeclf.train.model import tapped_model

    return dict(zip(blocks, keras_outputs(tapped_model(model, blocks), images, batch)[1:], strict=True))


def relative_scores(train: np.ndarray, index: np.ndarray, classes: int, rank: int):
    """Ren et al. 2021: the class-conditional score minus that of one Gaussian over all training images."""
    from edgeclf.export.trust_fit import fit_familiarity

    conditional = fit_familiarity(train, index, classes, rank)
    background = fit_familiarity(train, np.zeros(len(train), dtype=np.int64), 1, rank)
    return lambda x: conditional.scores(x) - background.scores(x)


def judge(score, heldout: np.ndarray, foreign: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    base = score(heldout)
    return {name: _judge_arrays(base, score(x)) for name, x in foreign.items()}


def study(bundle_path: Path, foreign_count: int = 200, drawn_gauges: bool = True,
          folders: tuple[Path, ...] = ()) -> dict:
    from edgeclf.export.reference import reference_sets
    from edgeclf.export.trust_fit import fit_familiarity
    from edgeclf.train.data import LabelMap
    from edgeclf.train.evaluate import load_keras_model

    bundle = Bundle.load(bundle_path)
    model = load_keras_model(bundle)
    train, heldout = reference_sets(bundle)
    labels = LabelMap(tuple(bundle.labels))
    index, classes = labels.encode(train.values), len(bundle.labels)
    size = bundle.image_size
    probe = foreign_probe(*size, count=foreign_count // 4)
    foreign_images = {**({"gauges (seed 1)": gauges(foreign_count, size, seed=1)} if drawn_gauges else {}),
                      **_folder_sets(folders, size, foreign_count),
                      "photo crops (seed 1)": photo_crops(foreign_count, size, seed=1), **probe}
    feats = {name: block_features(model, images) for name, images in
             [("train", train.images), ("heldout", heldout.images), *foreign_images.items()]}
    candidates = {}
    for rank in (32, 128, 256, 512, 2048):
        candidates[f"mixed10 shared rank {rank}"] = ("mixed10", fit_familiarity(feats["train"]["mixed10"], index,
                                                                                 classes, rank).scores)
    candidates["mixed10 relative rank 256"] = ("mixed10", relative_scores(feats["train"]["mixed10"], index, classes, 256))
    for block in BLOCKS[:-1]:
        candidates[f"{block} shared rank 256"] = (block, fit_familiarity(feats["train"][block], index, classes, 256).scores)
    results = {}
    for name, (block, score) in candidates.items():
        results[name] = judge(score, feats["heldout"][block], {k: feats[k][block] for k in foreign_images})
        print(name, {k: round(v["auroc"], 4) for k, v in results[name].items()},
              {k: round(v["flagged_at_95"], 3) for k, v in results[name].items()}, flush=True)
    # Earlier and last blocks together: the sum of the two scores, each divided by its held-out median.
    for block in BLOCKS[:-1]:
        parts = [(b, fit_familiarity(feats["train"][b], index, classes, 256)) for b in (block, "mixed10")]
        medians = [np.median(m.scores(feats["heldout"][b])) for b, m in parts]
        name = f"{block}+mixed10 summed rank 256"
        results[name] = {}
        base = sum(m.scores(feats["heldout"][b]) / d for (b, m), d in zip(parts, medians, strict=True))
        for k in foreign_images:
            s = sum(m.scores(feats[k][b]) / d for (b, m), d in zip(parts, medians, strict=True))
            results[name][k] = _judge_arrays(base, s)
        print(name, {k: round(v["auroc"], 4) for k, v in results[name].items()},
              {k: round(v["flagged_at_95"], 3) for k, v in results[name].items()}, flush=True)
    return {"bundle": str(bundle_path), "train_images": len(train), "heldout_images": len(heldout),
            "foreign_images": {k: len(v) for k, v in foreign_images.items()}, "candidates": results}


def _folder_sets(folders, size: tuple[int, int], count: int) -> dict[str, np.ndarray]:
    """Each folder's image files (at most ``count``, in sorted order) as one foreign set."""
    from edgeclf.runtime.files import image_paths
    from edgeclf.runtime.inputs import to_batch

    return {str(folder): to_batch([p for p, problem in image_paths([folder]) if problem is None][:count], size)
            for folder in folders}


def _judge_arrays(base: np.ndarray, s: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    return {"auroc": float(roc_auc_score(np.r_[np.zeros(len(base)), np.ones(len(s))], np.r_[base, s])),
            "flagged_at_95": float(np.mean(s > np.quantile(base, 0.95))),
            "flagged_at_99": float(np.mean(s > np.quantile(base, 0.99)))}


def report(bundle_path: Path, test: Path, foreign_count: int = 440, formats: list[str] | None = None,
           drawn_gauges: bool = True, folders: tuple[Path, ...] = ()) -> dict:
    """The shipped familiarity check per artifact: AUROC of the score (test images against each foreign
    set), the share flagged and the test images' false-alarm rate at alpha 0.05 and 0.01.
    ``drawn_gauges``: gauges drawn with seed 2 are a foreign set; ``folders``: each a foreign set of
    its image files (at most ``foreign_count``, in sorted order)."""
    from sklearn.metrics import roc_auc_score

    from edgeclf.runtime import Predictor
    from edgeclf.train.data import load_dataset

    bundle = Bundle.load(bundle_path)
    size = bundle.image_size
    own = load_dataset(test, size).images  # the test images: what must not be flagged
    foreign = {**({"gauges (seed 2)": gauges(foreign_count, size, seed=2)} if drawn_gauges else {}),
               **_folder_sets(folders, size, foreign_count),
               "photo crops (seed 2)": photo_crops(foreign_count, size, seed=2),
               **foreign_probe(*size, count=64, seed=2)}
    out = {"bundle": str(bundle_path), "test_images": len(own), "foreign_images": {k: len(v) for k, v in
                                                                                      foreign.items()}, "artifacts": {}}
    validated = [f for f, r in bundle.meta.get("artifacts", {}).items() if r.get("status") == "validated"]
    for fmt in formats or validated:
        try:
            predictor = Predictor.load(bundle_path, fmt)
        except Exception as exc:  # a backend this machine cannot run (the TensorRT engine)
            print(f"{fmt}: not run here ({type(exc).__name__})", flush=True)
            continue
        with predictor:
            familiarity = predictor.trust.familiarity

            def scores(images, familiarity=familiarity, predictor=predictor):
                return familiarity.scores(predictor.infer_outputs(images)[1])

            base = scores(own)
            row = {"false_alarms": {f"{a:g}": float(np.mean(familiarity.p_values_of_scores(base) <= a))
                                    for a in (0.05, 0.01)}}
            for name, images in foreign.items():
                s = scores(images)
                flagged = familiarity.p_values_of_scores(s)
                row[name] = {"auroc": float(roc_auc_score(np.r_[np.zeros(len(base)), np.ones(len(s))], np.r_[base, s])),
                             **{f"flagged_at_{a:g}": float(np.mean(flagged <= a)) for a in (0.05, 0.01)}}
        out["artifacts"][fmt] = row
        print(fmt, json.dumps(row), flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--report", type=Path, metavar="TEST_DATA", help="report the shipped check on these images")
    parser.add_argument("--formats", help="comma-separated artifacts to report (default: every validated one)")
    parser.add_argument("--no-gauges", action="store_true", help="report: no drawn gauges (a model of gauges)")
    parser.add_argument("--foreign", type=Path, action="append", default=[], metavar="DIR",
                        help="report: the image files under DIR are a foreign set (repeatable)")
    args = parser.parse_args(argv)
    formats = args.formats.split(",") if args.formats else None
    result = (report(args.bundle, args.report, formats=formats, drawn_gauges=not args.no_gauges,
                     folders=tuple(args.foreign)) if args.report
              else study(args.bundle, drawn_gauges=not args.no_gauges, folders=tuple(args.foreign)))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
