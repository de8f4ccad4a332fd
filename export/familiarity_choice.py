"""Which backbone block the familiarity check reads: chosen at export, per model, by measurement.

Each candidate (the backbone's ``familiarity_candidates``, then the head's input) gets the same
class-conditional Gaussian, fitted on the training images' pooled outputs of that block, with
p-values counted against the held-out images. It is judged on frames no model was fitted on:
the probe's noise and constant frames (another seed than verify's) and crops of real
photographs. The winner flags the largest share of its worst-flagged foreign kind at the default
alpha; ties go to the larger mean AUROC, then to the earlier (narrower, cheaper) block.

Why not one block for all: on the main job's digits model every InceptionV3 block from mixed0
to mixed7 flags drawn gauges, noise and photos alike, but on a gauge reader trained from scratch
(``edgeclf dataset gauges``) the blocks from mixed6 on flag 0-6% of noise, where mixed0-mixed2
flag all of it (benchmarks/familiarity_study.py). A model's late blocks keep only what its
labels need; which early block still tells its images from others depends on the model.
"""

from __future__ import annotations

import numpy as np

from edgeclf.trust import DEFAULT_ALPHA, Familiarity

#: Crops of real photographs each choice is judged on (the probe adds its frames of each kind).
PHOTO_CROPS = 128
#: The probe's seed here: verify checks the artifacts on seed 0, the study reports on seed 2.
CHOICE_SEED = 1


def photo_crops(count: int, size: tuple[int, int], seed: int) -> np.ndarray:
    """``count`` square crops (10-60% of the short side, anywhere) of the real photographs that ship
    in scikit-learn and matplotlib (:func:`edgeclf.photographs.sample_photographs`), at the model's size."""
    from edgeclf.photographs import sample_photographs
    from edgeclf.runtime.inputs import to_batch

    photos = sample_photographs()
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        side = int(rng.uniform(0.1, 0.6) * min(h, w))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crops.append(np.ascontiguousarray(photo[y:y + side, x:x + side]))
    return to_batch(crops, size)


def foreign_frames(size: tuple[int, int], probe_frames: int) -> dict[str, np.ndarray]:
    """The foreign images a choice is judged on, by kind: the probe's (seed CHOICE_SEED) and photo crops."""
    from edgeclf.probe import foreign_probe

    return {**foreign_probe(*size, probe_frames, seed=CHOICE_SEED),
            "photo crops": photo_crops(PHOTO_CROPS, size, CHOICE_SEED)}


def judge(model: Familiarity, foreign: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per foreign kind (embeddings, one array per kind): the share flagged at DEFAULT_ALPHA and the
    AUROC of the score against the held-out images' scores, which ``model`` is calibrated on."""
    from sklearn.metrics import roc_auc_score

    base = model.calibration
    judged = {}
    for kind, embedding in foreign.items():
        scores = model.scores(embedding)
        auroc = roc_auc_score(np.r_[np.zeros(len(base)), np.ones(len(scores))], np.r_[base, scores])
        judged[kind] = {"flagged": round(float(np.mean(model.p_values_of_scores(scores) <= DEFAULT_ALPHA)), 4),
                        "auroc": round(float(auroc), 4)}
    return judged


def choose_block(blocks: tuple[str, ...], training: dict[str, np.ndarray], train_index: np.ndarray, classes: int,
                 heldout: dict[str, np.ndarray], foreign: dict[str, dict[str, np.ndarray]]
                 ) -> tuple[str, Familiarity, dict[str, dict]]:
    """The block to ship, its familiarity model (calibrated on the held-out images) and every
    candidate's figures. ``training`` and ``heldout`` map a block to embeddings [N, D]; ``foreign``
    maps a kind to such a mapping."""
    from edgeclf.export.trust_fit import fit_familiarity, with_calibration
    from edgeclf.progress import log

    models, table = {}, {}
    for block in blocks:
        models[block] = with_calibration(fit_familiarity(training[block], train_index, classes), heldout[block])
        judged = judge(models[block], {kind: x[block] for kind, x in foreign.items()})
        table[block] = {"dimension": models[block].dimension, "foreign": judged}
        log(f"familiarity candidate {block} ({models[block].dimension} wide): flagged at p <= {DEFAULT_ALPHA} "
            + ", ".join(f"{kind} {j['flagged']:.0%}" for kind, j in judged.items()))

    def merit(block: str) -> tuple[float, float]:
        judged = table[block]["foreign"].values()
        return min(j["flagged"] for j in judged), float(np.mean([j["auroc"] for j in judged]))

    chosen = max(blocks, key=merit)  # the first of equals: the earlier block
    return chosen, models[chosen], table
