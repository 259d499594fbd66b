"""What the DALI graph is fed besides the images: every random number of both views, drawn on the host.

Every draw is a pure function of (seed, epoch, key, view) -- key = the sample's planned file index
(its epoch position for shards) -- vectorised numpy, counter-based: the graph itself is
deterministic, a resumed run sees the very same pixels, and tests can check the graph against the
draws. Pure numpy, so all of it is testable without DALI.

The crop window is torchvision's ``RandomResizedCrop.get_params`` rule (10 attempts, centre
fallback) computed from the image size in the file header (`crop_windows_numpy`); the graph gets a
relative ROI, the flip folded in as a mirrored window (a free flip inside the resize).

Colour jitter in few ops. Brightness (a scale), contrast (blend with the mean luma) and saturation
(blend with the per-pixel luma) are linear and commute with each other, and brightness commutes
with an HSV hue rotation; so any of torchvision's 24 op orders equals "linear stage, hue, linear
stage", where the stages hold the contrast/saturation ops that come before/after the hue op:

    stage(x) = a * x + g * luma(x) + m * round(mean(luma(x)))        (`graph_inputs` sets a, g, m)

One stage + hue + one stage per view instead of 4 positions x 4 candidate ops in conditionals
(~1000 DALI ops per batch -> ~150; DALI does not fuse arithmetic, each op costs a launch).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..transforms import BLUR_SIGMA, CROP_RATIO, FLIP_PROB, Augmentation, blur_kernel_size

CROP_ATTEMPTS = 10           # torchvision's RandomResizedCrop.get_params
# Layout of the per-view uniform draws (columns of `_uniforms`): an area and an aspect draw per
# crop attempt, then the draws of the other augmentations.
_U_AREA = slice(0, CROP_ATTEMPTS)
_U_LOGR = slice(CROP_ATTEMPTS, 2 * CROP_ATTEMPTS)
_REST = 2 * CROP_ATTEMPTS
_U_OFF = slice(_REST, _REST + 2)
_U_FLIP, _U_JIT_ON = _REST + 2, _REST + 3
_U_ORDER = slice(_REST + 4, _REST + 8)
_U_B, _U_C, _U_S, _U_H = _REST + 8, _REST + 9, _REST + 10, _REST + 11
_U_GRAY, _U_BLUR_ON, _U_SIGMA = _REST + 12, _REST + 13, _REST + 14
N_UNIFORMS = _REST + 15

# The per-view arrays fed to the graph, in feeding order, with their numpy dtypes.
GRAPH_FIELDS: Tuple[Tuple[str, type], ...] = (
    ("roi_start", np.float32),  # (B, 2)  crop window (y, x) start, relative; x start > end = flipped
    ("roi_end", np.float32),    # (B, 2)
    ("jitter", np.bool_),       # (B,)    colour jitter applied
    ("pre", np.float32),        # (B, 3)  jitter stage before the hue op: a, g, m weights (see below)
    ("hue", np.float32),        # (B,)    hue shift in turns, [-0.1, 0.1] x data.jitter_strength
    ("post", np.float32),       # (B, 3)  jitter stage after the hue op
    ("gray", np.bool_),         # (B,)
    ("blur", np.bool_),         # (B,)
    ("sigma", np.float32),      # (B,)
    ("blur_window", np.int32),  # (B,)    odd kernel side: the reference's, cut to +-4 sigma
)


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (a bijection of uint64 with good avalanche), vectorised."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _uniforms(seed: int, epoch: int, slots: np.ndarray, view: int, n: int = N_UNIFORMS) -> np.ndarray:
    """float64 uniforms in [0, 1), shape (len(slots), n): a pure function of its arguments
    (counter-based, like Philox: no generator state to carry, any sample computable alone)."""
    golden = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        key = _mix64(np.array([(int(seed) & 0xFFFFFFFFFFFFFFFF)], dtype=np.uint64) * golden + np.uint64(0x5EED))
        key = _mix64(key ^ (np.array([int(epoch) & 0xFFFFFFFF], dtype=np.uint64) * golden))
        key = _mix64(key ^ np.uint64(0xD1CE + int(view)))
        ctr = np.asarray(slots, dtype=np.int64).astype(np.uint64)[:, None] * np.uint64(n) \
            + np.arange(n, dtype=np.uint64)[None, :]
        bits = _mix64(_mix64(ctr * golden + key) ^ key)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def draw_view_params(seed: int, epoch: int, slots: Sequence[int], view: int, *,
                     augmentation: Augmentation = Augmentation(), jitter_p: Optional[float] = None,
                     gray_p: Optional[float] = None, blur_p: Optional[float] = None,
                     flip_p: float = FLIP_PROB) -> Dict[str, np.ndarray]:
    """The random parameters of view `view` (0 = query, 1 = key) of the samples at `slots`.

    Same distributions as `transforms.ViewTransform.sample_params` (torchvision's get_params):
    jitter factors ~ U[1-0.4k, 1+0.4k], hue ~ U[-0.1k, 0.1k] (k = the augmentation's jitter
    strength, 1 in the recipe), a uniformly random op order, sigma ~ U[0.1, 2.0]; the crop
    uniforms become a window once the image size is known (`crop_windows_numpy`), and
    `graph_inputs` turns everything into what the graph takes. The probabilities are the
    augmentation's (data.jitter_prob, ...); `jitter_p`, `gray_p`, `blur_p` and `flip_p` override
    them so that tests can switch single ops off. Every uniform is drawn whatever the
    probabilities, so changing one leaves the other ops' draws as they were.
    """
    a = augmentation
    jitter_p = a.jitter_prob if jitter_p is None else jitter_p
    gray_p = a.grayscale_prob if gray_p is None else gray_p
    blur_p = a.blur_prob if blur_p is None else blur_p
    kb, kc, ks, kh = a.jitter_ranges()
    u = _uniforms(seed, epoch, np.asarray(slots, dtype=np.int64), view)
    b = 1.0 + kb * (2.0 * u[:, _U_B] - 1.0)
    c = 1.0 + kc * (2.0 * u[:, _U_C] - 1.0)
    s = 1.0 + ks * (2.0 * u[:, _U_S] - 1.0)
    h = kh * (2.0 * u[:, _U_H] - 1.0)
    lo_s, hi_s = BLUR_SIGMA
    return {
        "area_u": u[:, _U_AREA].astype(np.float32),
        "logr_u": u[:, _U_LOGR].astype(np.float32),
        "off_u": u[:, _U_OFF].astype(np.float32),
        "flip": u[:, _U_FLIP] < flip_p,
        "jitter": u[:, _U_JIT_ON] < jitter_p,
        "order": np.argsort(u[:, _U_ORDER], axis=1, kind="stable").astype(np.int32),
        "factors": np.stack([b, c, s, h], axis=1).astype(np.float32),
        "gray": u[:, _U_GRAY] < gray_p,
        "blur": u[:, _U_BLUR_ON] < blur_p,
        "sigma": (lo_s + (hi_s - lo_s) * u[:, _U_SIGMA]).astype(np.float32),
    }


def crop_windows_numpy(height, width, area_u, logr_u, off_u, min_scale: float) -> np.ndarray:
    """(top, left, h, w) per sample: torchvision's RandomResizedCrop.get_params driven by the given
    uniforms (10 attempts of area and log-ratio, the first that fits, else the whole image with its
    aspect clamped into the range, centred), vectorised."""
    H = np.asarray(height, np.float64)[:, None]
    W = np.asarray(width, np.float64)[:, None]
    lo, hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    target = H * W * (min_scale + (1.0 - min_scale) * np.asarray(area_u, np.float64))
    ar = np.exp(lo + (hi - lo) * np.asarray(logr_u, np.float64))
    w = np.floor(np.sqrt(target * ar) + 0.5)
    h = np.floor(np.sqrt(target / ar) + 0.5)
    ok = (w >= 1) & (w <= W) & (h >= 1) & (h <= H)
    found = ok.any(axis=1)
    k = np.argmax(ok, axis=1)
    rows = np.arange(len(k))
    H, W = H[:, 0], W[:, 0]
    w, h = w[rows, k], h[rows, k]
    off_u = np.asarray(off_u, np.float64)
    top = np.floor(off_u[:, 0] * (H - h + 1))
    left = np.floor(off_u[:, 1] * (W - w + 1))
    in_ratio = W / H
    fw = np.where(in_ratio > CROP_RATIO[1], np.floor(H * CROP_RATIO[1] + 0.5), W)
    fh = np.where(in_ratio < CROP_RATIO[0], np.floor(W / CROP_RATIO[0] + 0.5), H)
    h, w = np.where(found, h, fh), np.where(found, w, fw)
    top = np.where(found, top, np.floor((H - h) / 2))
    left = np.where(found, left, np.floor((W - w) / 2))
    return np.stack([top, left, h, w], axis=1).astype(np.int64)


def jitter_stages(factors: np.ndarray, order: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(pre, post) stage weights (a, g, m) per sample for `order` (op ids 0 brightness, 1 contrast,
    2 saturation, 3 hue, in application order) and factors (b, c, s, hue).

    Contrast c then saturation s (either order) is  c*s*x + c*(1-s)*luma(x) + (1-c)*mean;
    brightness b scales the whole first stage."""
    f = np.asarray(factors, np.float64)
    b, c, s = f[:, 0], f[:, 1], f[:, 2]
    pos = np.argsort(np.asarray(order), axis=1)          # pos[:, op] = position of op
    c_pre = pos[:, 1] < pos[:, 3]
    s_pre = pos[:, 2] < pos[:, 3]
    c1, s1 = np.where(c_pre, c, 1.0), np.where(s_pre, s, 1.0)
    c2, s2 = np.where(c_pre, 1.0, c), np.where(s_pre, 1.0, s)
    pre = np.stack([b * c1 * s1, b * c1 * (1.0 - s1), b * (1.0 - c1)], axis=1)
    post = np.stack([c2 * s2, c2 * (1.0 - s2), 1.0 - c2], axis=1)
    return pre.astype(np.float32), post.astype(np.float32)


def blur_windows(sigma, image_size: int) -> np.ndarray:
    """The reference's kernel side (`blur_kernel_size`), cut to 2*ceil(4 sigma)+1 taps: the weights
    beyond 4 sigma sum to < 1e-4, so the result is the same to rounding, at a fraction of the cost
    for small sigmas (on CPUs the blur is the dearest op)."""
    full = blur_kernel_size(image_size)
    return np.minimum(full, 2 * np.ceil(4.0 * np.asarray(sigma, np.float64)).astype(np.int64) + 1).astype(np.int32)


def graph_inputs(draws: Dict[str, np.ndarray], heights, widths, min_scale: float, image_size: int) -> List[np.ndarray]:
    """One view's `GRAPH_FIELDS` arrays for a batch, from its draws and image sizes (pixels)."""
    H = np.asarray(heights, np.float64)
    W = np.asarray(widths, np.float64)
    top, left, h, w = crop_windows_numpy(H, W, draws["area_u"], draws["logr_u"], draws["off_u"], min_scale).T
    flip = draws["flip"]
    x0 = np.where(flip, left + w, left)
    x1 = np.where(flip, left, left + w)
    pre, post = jitter_stages(draws["factors"], draws["order"])
    values = {
        "roi_start": np.stack([top / H, x0 / W], axis=1),
        "roi_end": np.stack([(top + h) / H, x1 / W], axis=1),
        "jitter": draws["jitter"],
        "pre": pre,
        "hue": draws["factors"][:, 3],
        "post": post,
        "gray": draws["gray"],
        "blur": draws["blur"],
        "sigma": draws["sigma"],
        "blur_window": blur_windows(draws["sigma"], image_size),
    }
    return [np.ascontiguousarray(values[name], dtype=t) for name, t in GRAPH_FIELDS]
