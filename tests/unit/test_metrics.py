"""Pixel and topology metrics: hand-worked cases, empty-mask conventions, independent cross-checks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.draw import disk
from skimage.measure import euler_number, label
from skimage.morphology import skeletonize

from envs.metrics import (
    SEGMENTATION_METRICS,
    accuracy,
    betti_errors,
    betti_numbers,
    cldice,
    confusion,
    dice,
    iou,
    junction_count,
    precision,
    recall,
    reference_topology,
    segmentation_metrics,
    skeleton,
    skeleton_length,
    specificity,
    threshold_sweep,
)

pytestmark = pytest.mark.unit


# --------------------------------------------------------------------------------------------- shapes


def ring(size: int = 21, r_out: float = 8, r_in: float = 4) -> np.ndarray:
    m = np.zeros((size, size), dtype=bool)
    m[disk((size // 2, size // 2), r_out)] = True
    m[disk((size // 2, size // 2), r_in)] = False
    return m


def filled_disk(size: int = 21, r: float = 8) -> np.ndarray:
    m = np.zeros((size, size), dtype=bool)
    m[disk((size // 2, size // 2), r)] = True
    return m


def figure_eight() -> np.ndarray:
    # Two square loops stacked so that they share one bar: one component, two holes.
    m = np.zeros((15, 9), dtype=bool)
    m[1:14, 1:8] = True  # a 13x7 block
    m[2:7, 2:7] = False  # upper hole (rows 2-6)
    m[8:13, 2:7] = False  # lower hole (rows 8-12); row 7 is the shared bar
    return m


def t_shape(size: int = 30) -> np.ndarray:
    """A 1-px 'T': a horizontal bar and a vertical stem meeting at one branch point."""
    m = np.zeros((size, size), dtype=bool)
    m[5, 3:27] = True
    m[5:25, 15] = True
    return m


def random_masks(seed: int, n: int = 20, shape: tuple[int, int] = (48, 48)) -> list[np.ndarray]:
    """Blobby random masks (smoothed noise, thresholded) with a spread of densities."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        noise = ndi.gaussian_filter(rng.random(shape), sigma=1.0 + (i % 3))
        q = rng.uniform(0.4, 0.9)
        out.append(noise > np.quantile(noise, q))
    return out


# --------------------------------------------------------------------------------------- pixel metrics


def test_confusion_and_ratios_hand_worked() -> None:
    # 4x4 image. GT = rows 0-1 (8 px); prediction = rows 0 and 2 (8 px).
    # TP = row 0 (4), FP = row 2 (4), FN = row 1 (4), TN = row 3 (4).
    gt = np.zeros((4, 4), dtype=bool)
    gt[0:2] = True
    pred = np.zeros((4, 4), dtype=bool)
    pred[[0, 2]] = True
    assert confusion(pred, gt) == (4, 4, 4, 4)
    assert dice(pred, gt) == pytest.approx(2 * 4 / (2 * 4 + 4 + 4))  # 0.5
    assert iou(pred, gt) == pytest.approx(4 / 12)
    assert precision(pred, gt) == pytest.approx(0.5)  # 4 / (4 + 4)
    assert recall(pred, gt) == pytest.approx(0.5)  # 4 / (4 + 4)
    assert specificity(pred, gt) == pytest.approx(0.5)  # TN 4 / (TN 4 + FP 4)
    assert accuracy(pred, gt) == pytest.approx(0.5)  # (4 + 4) / 16


def test_identity_and_disjoint() -> None:
    m = random_masks(0, n=1)[0]
    for fn in (dice, iou, precision, recall, specificity, accuracy, cldice):
        assert fn(m, m) == pytest.approx(1.0), fn.__name__
    assert betti_errors(m, m) == (0, 0)
    a = np.zeros((8, 8), dtype=bool)
    a[:, :4] = True  # left half vs right half: no overlap at all
    for fn in (dice, iou, precision, recall, specificity, accuracy):
        assert fn(a, ~a) == 0.0, fn.__name__


def test_empty_mask_conventions() -> None:
    empty = np.zeros((6, 6), dtype=bool)
    some = empty.copy()
    some[2, 1:5] = True
    # Both empty: nothing to find, nothing wrongly found -> perfect.
    for fn in (dice, iou, precision, recall, specificity, accuracy, cldice):
        assert fn(empty, empty) == 1.0, fn.__name__
    # Empty prediction, non-empty GT: precision has no predicted positives and the GT is not empty -> 0.
    assert (dice(empty, some), iou(empty, some), precision(empty, some), recall(empty, some)) == (0, 0, 0, 0)
    # Non-empty prediction, empty GT: recall's GT is empty but the prediction is not -> 0.
    assert (dice(some, empty), iou(some, empty), precision(some, empty), recall(some, empty)) == (0, 0, 0, 0)
    assert cldice(empty, some) == 0.0 and cldice(some, empty) == 0.0
    # GT fills the image (no negatives): specificity 1 if the prediction has no negatives either, else 0.
    full = np.ones((6, 6), dtype=bool)
    assert specificity(full, full) == 1.0
    assert specificity(some, full) == 0.0
    # An empty FOV has nothing to get wrong.
    assert accuracy(some, empty, fov=empty) == 1.0
    assert dice(some, some, fov=empty) == 1.0  # both restricted masks are empty


def test_fov_changes_accuracy_but_not_recall() -> None:
    # 10x10; FOV = left 6 columns. GT: column 1 (10 px); prediction: column 1 rows 0-7 plus column 2.
    gt = np.zeros((10, 10), dtype=bool)
    gt[:, 1] = True
    pred = np.zeros((10, 10), dtype=bool)
    pred[:8, 1] = True
    pred[:, 2] = True
    fov = np.zeros((10, 10), dtype=bool)
    fov[:, :6] = True
    # TP 8, FN 2, FP 10 everywhere; TN = 100 - 20 = 80 without FOV, 60 - 20 = 40 inside it.
    assert accuracy(pred, gt) == pytest.approx((8 + 80) / 100)
    assert accuracy(pred, gt, fov=fov) == pytest.approx((8 + 40) / 60)
    assert recall(pred, gt) == recall(pred, gt, fov=fov) == pytest.approx(0.8)
    # A false positive outside the FOV is not counted.
    pred_out = pred.copy()
    pred_out[:, 8] = True
    assert precision(pred_out, gt, fov=fov) == precision(pred, gt, fov=fov) == pytest.approx(8 / 18)
    assert precision(pred_out, gt) < precision(pred, gt)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixel_metrics_match_independent_counts(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(10):
        p = rng.random((23, 31)) < rng.uniform(0.05, 0.6)
        g = rng.random((23, 31)) < rng.uniform(0.05, 0.6)
        f = rng.random((23, 31)) < 0.8
        # Independent counts on 0/1 integers (products and sums, not boolean masks).
        pi, gi, fi = p.astype(int), g.astype(int), f.astype(int)
        tp = int((pi * gi * fi).sum())
        fp = int((pi * (1 - gi) * fi).sum())
        fn = int(((1 - pi) * gi * fi).sum())
        tn = int(((1 - pi) * (1 - gi) * fi).sum())
        assert confusion(p, g, fov=f) == (tp, fp, fn, tn)
        assert dice(p, g, fov=f) == pytest.approx(2 * tp / (2 * tp + fp + fn))
        assert iou(p, g, fov=f) == pytest.approx(tp / (tp + fp + fn))
        assert precision(p, g, fov=f) == pytest.approx(tp / (tp + fp))
        assert recall(p, g, fov=f) == pytest.approx(tp / (tp + fn))
        assert specificity(p, g, fov=f) == pytest.approx(tn / (tn + fp))
        assert accuracy(p, g, fov=f) == pytest.approx((tp + tn) / fi.sum())
        # 0/1 integer input is accepted and scores the same as bool input.
        assert dice(pi, gi, fov=fi) == dice(p, g, fov=f)


def test_inputs_are_validated() -> None:
    m = np.zeros((4, 4), dtype=bool)
    with pytest.raises(ValueError, match="same shape"):
        dice(m, np.zeros((4, 5), dtype=bool))
    with pytest.raises(ValueError, match="threshold it first"):
        dice(np.full((4, 4), 0.3), m)
    with pytest.raises(ValueError, match="fov"):
        dice(m, m, fov=np.ones((3, 3), dtype=bool))


# -------------------------------------------------------------------------------------------- betti


@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        (filled_disk(), (1, 0)),  # one blob, no hole
        (ring(), (1, 1)),  # one component enclosing one hole
        (figure_eight(), (1, 2)),  # one component, two holes sharing a bar
        (np.zeros((9, 9), dtype=bool), (0, 0)),
        (np.ones((9, 9), dtype=bool), (1, 0)),  # touching the border is not a hole
    ],
    ids=["disk", "ring", "figure-eight", "empty", "full"],
)
def test_betti_numbers_of_known_shapes(mask: np.ndarray, expected: tuple[int, int]) -> None:
    assert betti_numbers(mask) == expected


def test_betti_two_lines_and_diagonal() -> None:
    two = np.zeros((10, 10), dtype=bool)
    two[2, 1:9] = True
    two[6, 1:9] = True  # two parallel lines, 3 rows apart: 2 components
    assert betti_numbers(two) == (2, 0)
    # A 1-px diagonal: pixels touch only at corners. 8-connected foreground: ONE component;
    # 4-connectivity would split it into 10 (the test would catch a wrong structuring element).
    diag = np.eye(10, dtype=bool)
    assert betti_numbers(diag) == (1, 0)
    assert label(diag, connectivity=1).max() == 10
    # The 4-connected background of a closed diagonal diamond has one hole; an 8-connected background
    # would leak through the corners and report none.
    diamond = np.zeros((9, 9), dtype=bool)
    for i in range(4):
        diamond[i, 4 + i] = diamond[i, 4 - i] = diamond[8 - i, 4 + i] = diamond[8 - i, 4 - i] = True
    diamond[4, 0] = diamond[4, 8] = True
    assert betti_numbers(diamond) == (1, 1)


@pytest.mark.parametrize("seed", [0, 1])
def test_betti_matches_skimage_euler_number(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = random_masks(seed) + [rng.random((30, 30)) < 0.5 for _ in range(10)]
    for m in masks:
        b0, b1 = betti_numbers(m)
        assert b0 == label(m, connectivity=2).max()
        # Euler characteristic with 8-connected foreground: chi = b0 - b1.
        assert b1 == b0 - euler_number(m, connectivity=2)


def test_betti_errors() -> None:
    # Ring vs filled disk: same component count, one hole too many.
    assert betti_errors(ring(), filled_disk()) == (0, 1)
    assert betti_errors(filled_disk(), ring()) == (0, 1)
    two = np.zeros((21, 21), dtype=bool)
    two[3, :] = two[12, :] = True
    assert betti_errors(two, filled_disk()) == (1, 0)  # b0: 2 vs 1; b1: 0 vs 0


# ---------------------------------------------------------------------------------- skeleton, clDice


def test_skeleton_of_thin_line_is_itself() -> None:
    line = np.zeros((5, 30), dtype=bool)
    line[2, 3:27] = True
    assert np.array_equal(skeleton(line), line)
    assert skeleton_length(line) == 24
    thick = ndi.binary_dilation(line, iterations=1)  # a 3-px wide bar
    assert skeleton(thick).sum() < thick.sum()
    assert np.all(skeleton(thick).sum(axis=0) <= 1)  # one pixel per column: 1-px wide


def test_junction_count_merges_clusters() -> None:
    t = t_shape()
    # In a 1-px T, the branch point and its three arm neighbours each have >= 3 skeleton neighbours:
    # centre (5,15): (5,14), (5,16), (6,15); (5,14): (5,13), (5,15), (6,15); (6,15): (5,14), (5,15), (5,16),
    # (7,15). Four junction pixels, one 8-connected cluster -> one junction.
    assert junction_count(t, is_skeleton=True, merge=False) == 4
    assert junction_count(t, is_skeleton=True) == 1
    plus = np.zeros((11, 11), dtype=bool)
    plus[5, :] = plus[:, 5] = True  # "+": centre plus its four arm neighbours -> 5 pixels, 1 junction
    assert junction_count(plus, is_skeleton=True, merge=False) == 5
    assert junction_count(plus, is_skeleton=True) == 1
    line = np.zeros((5, 20), dtype=bool)
    line[2, 2:18] = True
    assert junction_count(line) == 0
    two_ts = np.concatenate([t, t], axis=1)
    assert junction_count(two_ts) == 2
    # A thickened T still has exactly one branching in its skeleton.
    assert junction_count(ndi.binary_dilation(t, iterations=2)) == 1


def test_cldice_thin_line_and_thickening() -> None:
    line = np.zeros((7, 40), dtype=bool)
    line[3, 2:38] = True
    assert cldice(line, line) == 1.0
    # Thickening a correct 1-px tree by 2 px: the prediction contains the GT, so every GT centreline pixel
    # is covered (Tsens = 1), and the thick mask's skeleton mostly runs along the GT line (Tprec close to
    # 1, lower only near the ends and the branch point). clDice stays high while Dice collapses (GT 43 px,
    # prediction about 5x as many pixels).
    t = t_shape()
    thick = ndi.binary_dilation(t, iterations=2)
    assert cldice(thick, t) > 0.9
    assert dice(thick, t) < 0.4
    # Tsens = |S_G & P| / |S_G| = 1 exactly for a prediction containing the GT.
    sp = skeletonize(thick)
    assert cldice(thick, t) == pytest.approx(2 * (sp & t).sum() / sp.sum() / ((sp & t).sum() / sp.sum() + 1))


def test_cutting_a_vessel_drops_cldice_and_adds_a_component() -> None:
    # GT: a 1-px line of 20 px. Prediction: the same line with a 2-px gap -> 18 px in two pieces.
    # Tprec = |S_P & G| / |S_P| = 18 / 18 = 1; Tsens = |S_G & P| / |S_G| = 18 / 20 = 0.9;
    # clDice = 2 * 1 * 0.9 / 1.9 = 0.947368...; b0 goes from 1 to 2.
    gt = np.zeros((5, 30), dtype=bool)
    gt[2, 5:25] = True
    pred = gt.copy()
    pred[2, 14:16] = False
    assert cldice(pred, gt) == pytest.approx(2 * 0.9 / 1.9)
    assert betti_numbers(pred)[0] == betti_numbers(gt)[0] + 1
    assert betti_errors(pred, gt) == (1, 0)
    # The same cut in a thick vessel also drops clDice below 1 and raises b0 by one.
    tg = ndi.binary_dilation(gt, iterations=2)
    tp = tg.copy()
    tp[:, 14:16] = False
    assert cldice(tp, tg) < 0.97
    assert betti_errors(tp, tg) == (1, 0)


def _cldice_reference(p: np.ndarray, g: np.ndarray) -> float:
    """The paper's formula written out directly (masks assumed to have non-empty skeletons)."""
    sp, sg = skeletonize(p), skeletonize(g)
    tprec = np.sum(sp * g) / np.sum(sp)
    tsens = np.sum(sg * p) / np.sum(sg)
    return float(2 * tprec * tsens / (tprec + tsens)) if tprec + tsens > 0 else 0.0


@pytest.mark.parametrize("seed", [0, 1])
def test_cldice_matches_direct_formula(seed: int) -> None:
    masks = random_masks(seed + 10)
    for p, g in zip(masks[::2], masks[1::2], strict=True):
        assert cldice(p, g) == pytest.approx(_cldice_reference(p, g))
        assert cldice(p, g) == pytest.approx(cldice(g, p))  # harmonic mean: symmetric


def test_cldice_fov_restricts_before_skeletonising() -> None:
    gt = np.zeros((5, 30), dtype=bool)
    gt[2, 2:28] = True
    pred = gt.copy()
    pred[2, 20:] = False  # the prediction misses the right part ...
    fov = np.zeros_like(gt)
    fov[:, :20] = True  # ... which lies outside the FOV
    assert cldice(pred, gt) < 1.0
    assert cldice(pred, gt, fov=fov) == 1.0


# ------------------------------------------------------------------------------------ sweep, summary


@pytest.mark.parametrize("sorted_search", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_threshold_sweep_matches_loop(dtype: type, sorted_search: bool, monkeypatch) -> None:
    if sorted_search:  # the path many thresholds take
        monkeypatch.setattr("envs.metrics._COUNT_PER_THRESHOLD", 0)
    rng = np.random.default_rng(3)
    gt = rng.random((40, 40)) < 0.2
    prob = np.clip(gt * 0.4 + rng.random((40, 40)) * 0.6, 0, 1).astype(dtype)
    prob[0, :5] = 0.5  # ties exactly at a threshold: ">=" includes them
    fov = rng.random((40, 40)) < 0.9
    thresholds = np.array([0.0, 0.1, 0.25, 0.5, 0.75, 0.99, 1.5])  # 1.5: empty prediction
    out = threshold_sweep(prob, gt, thresholds, fov=fov)
    p64 = prob.astype(np.float64)
    for i, t in enumerate(thresholds):
        pred = p64 >= t
        assert out["dice"][i] == pytest.approx(dice(pred, gt, fov=fov))
        assert out["precision"][i] == pytest.approx(precision(pred, gt, fov=fov))
        assert out["recall"][i] == pytest.approx(recall(pred, gt, fov=fov))
        assert out["iou"][i] == pytest.approx(iou(pred, gt, fov=fov))
    assert out["precision"][-1] == 0.0  # nothing predicted but the GT is not empty
    assert out["recall"][0] == 1.0
    assert set(out) >= {"thresholds", "dice", "precision", "recall"}
    assert all(v.shape == thresholds.shape for v in out.values())


def test_segmentation_metrics_agree_with_individual_functions() -> None:
    masks = random_masks(5, n=2)
    p, g = masks
    fov = np.zeros_like(p)
    fov[4:-4, 4:-4] = True
    out = segmentation_metrics(p, g, fov=fov)
    assert tuple(out) == SEGMENTATION_METRICS  # the names evaluation averages and validation logs
    for name, fn in [
        ("dice", dice),
        ("iou", iou),
        ("precision", precision),
        ("recall", recall),
        ("specificity", specificity),
        ("accuracy", accuracy),
        ("cldice", cldice),
    ]:
        assert out[name] == pytest.approx(fn(p, g, fov=fov)), name
    e0, e1 = betti_errors(p, g, fov=fov)
    assert (out["betti0_err"], out["betti1_err"]) == (e0, e1)
    assert all(isinstance(v, float) and np.isfinite(v) for v in out.values())


def test_a_precomputed_reference_gives_the_same_metrics_and_must_match_the_masks() -> None:
    p, g = random_masks(7, n=2)
    fov = np.zeros_like(p)
    fov[3:-3, 2:-2] = True
    ref = reference_topology(g, fov)
    for pred in (p, ~p, np.zeros_like(p), g):
        assert segmentation_metrics(pred, g, fov, reference=ref) == segmentation_metrics(pred, g, fov)
    with pytest.raises(ValueError, match="reference topology"):
        segmentation_metrics(p[:-1], g[:-1], fov[:-1], reference=ref)


def test_both_sweep_paths_count_nan_as_above_every_threshold(monkeypatch) -> None:
    gt = np.array([[True, True, False, False]])
    prob = np.array([[np.nan, 0.2, np.nan, 0.7]])
    t = np.array([0.1, 0.5, 0.9])
    direct = threshold_sweep(prob, gt, t)
    monkeypatch.setattr("envs.metrics._COUNT_PER_THRESHOLD", 0)
    searched = threshold_sweep(prob, gt, t)
    for k in direct:
        np.testing.assert_array_equal(direct[k], searched[k])
    assert direct["tp"].tolist() == [2, 1, 1] and direct["fp"].tolist() == [2, 2, 1]


def test_eval_flags_a_best_threshold_at_the_end_of_the_sweep(tmp_path, caplog) -> None:
    from envs.synthetic import SyntheticFundus
    from raysys.config_io import load_config
    from raysys.evaluate import _score, at_grid_end

    assert at_grid_end(0.8, (0.2, 0.5, 0.8)) and at_grid_end(0.2, (0.8, 0.2, 0.5))
    assert not at_grid_end(0.5, (0.2, 0.5, 0.8)) and not at_grid_end(0.95, (0.05, 0.5, 0.95))
    assert not at_grid_end(0.5, (0.5,))
    samples = list(SyntheticFundus("val", n=2, size=64, seed=0))
    rng = np.random.default_rng(0)
    # Vessels at 0.97, background spread over 0..0.85: every higher threshold keeps less background.
    probs = [np.where(s.mask, 0.97, rng.uniform(0, 0.85, s.mask.shape)).astype(np.float32) for s in samples]
    cfg = load_config(None, ["eval.thresholds=[0.2,0.5,0.8]"])
    with caplog.at_level("WARNING"):
        summary = _score(cfg, probs, samples, tmp_path / "a", checkpoint=None, split="val", threshold=0.5)
    assert summary["best_threshold_on_this_split"] == 0.8 and summary["best_threshold_at_grid_end"]
    assert "widen eval.thresholds" in caplog.text
    wide = load_config(None, ["eval.thresholds=[0.2,0.5,0.8,0.9,0.95]"])
    summary = _score(wide, probs, samples, tmp_path / "b", checkpoint=None, split="val", threshold=0.5)
    assert summary["best_threshold_on_this_split"] == 0.9 and not summary["best_threshold_at_grid_end"]
