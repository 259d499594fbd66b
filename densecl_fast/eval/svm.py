"""VOC07 linear-SVM classification, full and low-shot: the FAIR self-supervision benchmark's
protocol as OpenSelfSup / DenseCL run it (benchmarks/svm_tools).

Targets per image and class: 1 present, 0 absent, -1 ignore (VOC "difficult").
Features: L2-normalised per image, x / (||x|| + 1e-5) (svm_helper.normalize_features).
Per class, a LinearSVC(C, class_weight {1: 2, -1: 1}, squared hinge, L2, dual, tol 1e-4,
max_iter 2000, intercept_scaling 1), its solver's shuffling seeded (SOLVER_SEED; the benchmark leaves it to
NumPy's global RNG).
Full: costs = COSTS (eval_svm_full.sh: 1, 10, 100) + 0.5**4 .. 0.5**19 (svm_helper.parse_cost_list);
  each cost scored by 3-fold cross-validation on trainval (sklearn cross_val_score, scoring
  "average_precision"); training targets 0 *and* -1 become -1 (train_svm_kfold.py: difficult
  images are negatives in training); the best-CV cost is refit on all of trainval; test AP with
  difficult images left out; mAP = mean over classes.
AP: svm_helper.calculate_ap - area under the precision/recall curve with precision made
  monotone (VOC2010+ "all points"), not the 11-point VOC07 variant.
Low-shot: per sample and k, for each class k positives and (C-1)*k negatives drawn from
  trainval, every other image ignored (create_voc_low_shot_challenge_samples.py); one SVM per
  class and cost on the drawn images (no cross-validation); test mAP per cost; the benchmark
  then takes, per k, the cost with the best mean mAP over the samples (aggregate_low_shot_svm_stats.py:
  this selects on the test set, as published) and reports mean and std (numpy, ddof 0) over samples.
"""
from __future__ import annotations

import sys
import warnings
from typing import Dict, List, Sequence

import numpy as np

COSTS = (1.0, 10.0, 100.0)
EXTRA_COSTS = tuple(0.5 ** n for n in range(4, 20))
CV_FOLDS = 3
CLASS_WEIGHT = {1: 2, -1: 1}
LOWSHOT_K = (1, 2, 4, 8, 16, 32, 64, 96)
LOWSHOT_SAMPLES = 5
# liblinear's dual solver visits samples in a shuffled order; with sklearn's default random_state=None
# the order comes from NumPy's global RNG, so a score depended on whatever ran before it (the same
# low-shot call twice in one process gave different mAPs). A fixed seed makes every score a function of
# its inputs; the benchmark's own scripts leave it unset, so their figures carry that extra noise.
SOLVER_SEED = 0


def cost_list(costs: Sequence[float] = COSTS, extra: bool = True) -> List[float]:
    return [float(c) for c in costs] + (list(EXTRA_COSTS) if extra else [])


def normalize_features(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / (np.linalg.norm(x, axis=1) + 1e-5)[:, None]


def calculate_ap(rec: np.ndarray, prec: np.ndarray) -> float:
    """Area under the PR curve with precision made monotone decreasing (svm_helper.calculate_ap)."""
    mrec = np.concatenate([[0.0], rec, [1.0]])
    mpre = np.concatenate([[0.0], prec, [0.0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    idx = np.where(mrec[1:] != mrec[:-1])[0] + 1
    return float(np.sum((mrec[idx] - mrec[idx - 1]) * mpre[idx]))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """AP of scores for binary labels (> 0 = positive), ranked by descending score
    (svm_helper.get_precision_recall; ties in numpy's argsort order, reversed)."""
    pos = (np.asarray(labels) > 0).astype(np.float64)
    order = np.argsort(scores)[::-1]
    tp = np.cumsum(pos[order])
    fp = np.cumsum(1.0 - pos[order])
    n = pos.sum()
    if n == 0:
        return float("nan")
    return calculate_ap(tp / n, tp / (tp + fp))


def _svc(cost: float):
    from sklearn.svm import LinearSVC
    return LinearSVC(C=cost, class_weight=CLASS_WEIGHT, intercept_scaling=1.0, penalty="l2", loss="squared_hinge",
                     tol=1e-4, dual=True, max_iter=2000, random_state=SOLVER_SEED)


def _fit(cost, x, y):
    from sklearn.exceptions import ConvergenceWarning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return _svc(cost).fit(x, y)


def cv_score(cost: float, x: np.ndarray, y: np.ndarray, folds: int = CV_FOLDS) -> float:
    """Mean 3-fold CV average precision (sklearn's definition, as cross_val_score in the benchmark)."""
    from sklearn.model_selection import cross_val_score
    if min((y == 1).sum(), (y == -1).sum()) < folds:
        return float("nan")  # too few of a label for stratified folds
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = cross_val_score(_svc(cost), x, y, cv=folds, scoring="average_precision")
    return float(np.nanmean(s)) if np.isfinite(s).any() else float("nan")


def svm_full(train_x, train_t, test_x, test_t, classes: Sequence[str], costs: Sequence[float],
             progress: bool = True) -> dict:
    """-> {"mAP": %, "per_class": {cls: {"ap", "cost", "cv_ap"}}}."""
    from tqdm import tqdm
    tx, vx = normalize_features(train_x), normalize_features(test_x)
    per = {}
    for c in tqdm(range(len(classes)), desc="svm classes", disable=not progress, file=sys.stderr):
        y = train_t[:, c].astype(np.int32).copy()
        y[y == 0] = -1                                   # absent and difficult: negatives
        if (y == 1).sum() == 0:
            per[classes[c]] = {"ap": float("nan"), "cost": None, "cv_ap": None, "note": "no training positives"}
            continue
        cv = [cv_score(cost, tx, y) for cost in costs]
        best = int(np.nanargmax(cv)) if np.isfinite(cv).any() else 0
        clf = _fit(costs[best], tx, y)
        keep = test_t[:, c] != -1
        ap = average_precision(test_t[keep, c], clf.decision_function(vx[keep]))
        per[classes[c]] = {"ap": 100.0 * ap, "cost": costs[best], "cv_ap": None if not np.isfinite(cv[best]) else 100.0 * cv[best]}
    aps = [v["ap"] for v in per.values() if np.isfinite(v["ap"])]
    return {"mAP": float(np.mean(aps)) if aps else float("nan"), "classes_scored": len(aps), "per_class": per}


def lowshot_targets(targets: np.ndarray, k: int, sample: int, seed: int) -> np.ndarray:
    """One low-shot draw: per class k positives (target 1) and (C-1)*k negatives (target 0) marked,
    every other entry -1. Deterministic in (seed, sample, k). Raises ValueError when a class has
    too few positives or negatives."""
    n, C = targets.shape
    rng = np.random.default_rng([int(seed), int(sample), int(k)])
    out = -np.ones_like(targets, dtype=np.int32)
    for symbol, num in ((1, k), (0, (C - 1) * k)):
        for c in range(C):
            pool = np.flatnonzero(targets[:, c] == symbol)
            if len(pool) < num:
                raise ValueError(f"class {c} has {len(pool)} images with target {symbol}, k={k} needs {num}")
            out[rng.choice(pool, num, replace=False), c] = symbol
    return out


def svm_lowshot(train_x, train_t, test_x, test_t, classes, costs, ks=LOWSHOT_K, samples=LOWSHOT_SAMPLES,
                seed: int = 0, progress: bool = True) -> dict:
    from tqdm import tqdm
    tx, vx = normalize_features(train_x), normalize_features(test_x)
    results: Dict[str, dict] = {}
    skipped = {}
    jobs = [(k, s) for k in ks for s in range(samples)]
    bar = tqdm(total=len(jobs), desc="low-shot svm", disable=not progress, file=sys.stderr)
    for k in ks:
        table = np.full((samples, len(costs)), np.nan)    # mAP per sample and cost
        try:
            draws = [lowshot_targets(train_t, k, s, seed) for s in range(samples)]
        except ValueError as e:
            skipped[str(k)] = str(e)
            bar.update(samples)
            continue
        for s, t in enumerate(draws):
            for j, cost in enumerate(costs):
                aps = []
                for c in range(len(classes)):
                    use = t[:, c] != -1
                    y = np.where(t[use, c] == 1, 1, -1)
                    clf = _fit(cost, tx[use], y)
                    keep = test_t[:, c] != -1
                    aps.append(average_precision(test_t[keep, c], clf.decision_function(vx[keep])))
                table[s, j] = 100.0 * np.nanmean(aps)
            bar.update(1)
        mean = table.mean(0)
        best = int(np.nanargmax(mean))
        results[str(k)] = {"mean": float(mean[best]), "std": float(table[:, best].std()),
                           "min": float(table[:, best].min()), "max": float(table[:, best].max()),
                           "cost": costs[best], "per_sample": table[:, best].tolist()}
    bar.close()
    return {"k": results, "skipped": skipped, "samples": samples, "seed": seed}
