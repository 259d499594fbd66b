"""The DenseCL two-view augmentation as a DALI graph (decode once, two independent views).

Per image:  encoded bytes -> decode once (``device="mixed"``: nvJPEG / the hardware JPEG decoder;
``"cpu"``: libjpeg-turbo & co. when there is no GPU) -> two views, each

    RandomResizedCrop(image_size, scale=(min_scale, 1), ratio=(3/4, 4/3)), bilinear + antialias
    ColorJitter(0.4, 0.4, 0.4, 0.1) in a random order            with p = 0.8
    RandomGrayscale                                              with p = 0.2
    GaussianBlur(sigma ~ U[0.1, 2.0], kernel blur_kernel_size)   with p = 0.5
    RandomHorizontalFlip                                         with p = 0.5
    Normalize(ImageNet mean/std) -> fp32/fp16, CHW or HWC (= channels-last NCHW in torch)

Every random number is drawn on the host (`draw_view_params`, vectorised numpy, counter-based) as a
pure function of (seed, epoch, key, view) -- key = the sample's file index -- and fed through
``fn.external_source``: the graph itself is deterministic, a resumed run sees the very same
pixels, and tests can read the draws back and check that the graph did what they say. The crop
window is torchvision's ``RandomResizedCrop.get_params`` rule (10 attempts, centre fallback),
computed on the host from the image size that the loader parses from the file header
(`crop_windows_numpy`, `image_hw`); the graph gets a relative ROI, with the flip folded in as a
mirrored window (a free horizontal flip inside the resize).

Colour jitter in few ops. Brightness (a scale), contrast (blend with the mean luma) and saturation
(blend with the per-pixel luma) are linear and commute with each other, and brightness commutes
with an HSV hue rotation; so any of torchvision's 24 op orders equals "linear stage, hue, linear
stage", where the stages hold the contrast/saturation ops that come before/after the hue op:

    stage(x) = a * x + g * luma(x) + m * round(mean(luma(x)))        (`graph_inputs` sets a, g, m)

One stage + hue + one stage per view, instead of 4 positions x 4 candidate ops in conditionals
(~1000 DALI ops per batch -> ~150; DALI does not fuse arithmetic, each op costs a launch).

Deliberate differences from the torchvision/PIL reference (`transforms.py`), all small:
  * PIL clamps to [0, 255] and truncates after every jitter op; here only after each stage
    (rounding): differs by ~1 grey level, more only where an intermediate value clipped;
  * hue: "exact" (default with a GPU) rotates the HSV hue in float arithmetic like torchvision's
    tensor path (PIL quantises H to 8 bits: ~1 grey level apart); "linear" (default on CPU) uses
    DALI's ``fn.hue``, a rotation about the grey axis: ~10x cheaper on a CPU, but up to ~20 grey
    levels off on saturated colours at the largest shift;
  * the resize reads the source pixels just outside the crop window for its filter support
    (PIL crops first and clamps at the window edge): differs only in the outermost output pixels;
  * the blur runs on uint8 (the reference blurs floats): rounding, < 1 grey level;
  * RGBA/LA images: DALI drops alpha, the reference composites on white; EXIF orientation is
    ignored by both (``adjust_orientation=False``, as PIL's ``Image.open``).

Conditionals (``enable_conditionals=True``) let the jitter, grayscale and blur branches run only on
the samples that take them; DALI needs the pipeline function in a real ``.py`` file for that.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .transforms import (BLUR_PROB, BLUR_SIGMA, CROP_RATIO, FLIP_PROB, GRAYSCALE_PROB, IMAGENET_MEAN,
                         IMAGENET_STD, JITTER_BRIGHTNESS, JITTER_CONTRAST, JITTER_HUE, JITTER_PROB,
                         JITTER_SATURATION, blur_kernel_size)

CROP_ATTEMPTS = 10           # torchvision's RandomResizedCrop.get_params
# Layout of the per-view uniform draws (columns of `_uniforms`).
_U_AREA = slice(0, 10)
_U_LOGR = slice(10, 20)
_U_OFF = slice(20, 22)
_U_FLIP, _U_JIT_ON = 22, 23
_U_ORDER = slice(24, 28)
_U_B, _U_C, _U_S, _U_H = 28, 29, 30, 31
_U_GRAY, _U_BLUR_ON, _U_SIGMA = 32, 33, 34
N_UNIFORMS = 35

# The per-view arrays fed to the graph, in feeding order, with their numpy dtypes.
GRAPH_FIELDS: Tuple[Tuple[str, type], ...] = (
    ("roi_start", np.float32),  # (B, 2)  crop window (y, x) start, relative; x start > end = flipped
    ("roi_end", np.float32),    # (B, 2)
    ("jitter", np.bool_),       # (B,)    colour jitter applied
    ("pre", np.float32),        # (B, 3)  jitter stage before the hue op: a, g, m weights (see below)
    ("hue", np.float32),        # (B,)    hue shift in turns, [-0.1, 0.1]
    ("post", np.float32),       # (B, 3)  jitter stage after the hue op
    ("gray", np.bool_),         # (B,)
    ("blur", np.bool_),         # (B,)
    ("sigma", np.float32),      # (B,)
    ("blur_window", np.int32),  # (B,)    odd kernel side: the reference's, cut to +-4 sigma
)


# --------------------------------------------------------------------------------------------
# Host side: the random draws
# --------------------------------------------------------------------------------------------

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
                     jitter_p: float = JITTER_PROB, gray_p: float = GRAYSCALE_PROB,
                     blur_p: float = BLUR_PROB, flip_p: float = FLIP_PROB) -> Dict[str, np.ndarray]:
    """The random parameters of view `view` (0 = query, 1 = key) of the samples at `slots`.

    Same distributions as `transforms.ViewTransform.sample_params` (torchvision's get_params):
    jitter factors ~ U[1-0.4, 1+0.4], hue ~ U[-0.1, 0.1], a uniformly random op order, sigma ~
    U[0.1, 2.0]; the crop uniforms become a window once the image size is known
    (`crop_windows_numpy`), and `graph_inputs` turns everything into what the graph takes.
    The probabilities are arguments only so that tests can switch single ops off.
    """
    u = _uniforms(seed, epoch, np.asarray(slots, dtype=np.int64), view)
    b = 1.0 + JITTER_BRIGHTNESS * (2.0 * u[:, _U_B] - 1.0)
    c = 1.0 + JITTER_CONTRAST * (2.0 * u[:, _U_C] - 1.0)
    s = 1.0 + JITTER_SATURATION * (2.0 * u[:, _U_S] - 1.0)
    h = JITTER_HUE * (2.0 * u[:, _U_H] - 1.0)
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


# --------------------------------------------------------------------------------------------
# Host side: image sizes from the header (for the crop window), a cheap validity screen
# --------------------------------------------------------------------------------------------

_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_hw(data: bytes) -> Optional[Tuple[int, int]]:
    """(height, width) from a JPEG's SOF marker; None when `data` ends before it or is not a JPEG."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:                       # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:
            i += 2
            continue
        if marker in _SOF:
            if i + 9 > n:
                return None
            h, w = (data[i + 5] << 8) | data[i + 6], (data[i + 7] << 8) | data[i + 8]
            return (h, w) if h > 0 and w > 0 else None
        if marker in (0xD9, 0xDA):               # end of image / start of scan before any frame
            return None
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return None


def image_hw(data: bytes) -> Optional[Tuple[int, int]]:
    """(height, width) of an encoded image from its header (JPEG and PNG parsed directly, other
    formats through PIL's lazy open); None when it is not a readable image header."""
    if data[:2] == b"\xff\xd8":
        return jpeg_hw(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        return (h, w) if h > 0 and w > 0 else None
    try:
        import io

        from PIL import Image
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
        return (h, w) if h > 0 and w > 0 else None
    except Exception:  # PIL raises many types for non-images; all mean "unreadable header"
        return None


def file_hw(path: str, head: int = 1 << 16) -> Optional[Tuple[int, int]]:
    """`image_hw` of a file, reading only its head unless the header is longer."""
    with open(path, "rb") as f:
        data = f.read(head)
        hw = image_hw(data)
        if hw is None and len(data) == head:
            hw = image_hw(data + f.read())
    return hw


# --------------------------------------------------------------------------------------------
# The graph
# --------------------------------------------------------------------------------------------

def _luma(img):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    return fn.color_space_conversion(img, image_type=types.RGB, output_type=types.GRAY)   # HW1, BT.601


def _linear_stage(img, w):
    """a*x + g*luma(x) + m*round(mean luma(x)), clamped to uint8: contrast/saturation/brightness."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types

    luma = _luma(img)
    mean = dmath.floor(fn.reductions.mean(luma, keep_dims=True) + 0.5)   # (1, 1, 1); PIL rounds it
    out = w[0] * img + (w[1] * luma + w[2] * mean)      # the luma terms on one channel first
    return fn.reshape(fn.cast(out, dtype=types.UINT8), layout="HWC")   # cast rounds and saturates


def _hue_exact(img, shift):
    """torchvision's adjust_hue: rotate the HSV hue by `shift` turns, keeping V and S (float math).

    Per pixel, with V = max, C = max - min and the hue h in sextants, the result is channel n =
    V - C * clamp(min(k, 4 - k), 0, 1), k = (n + h') mod 6 for n = 5 (R), 3 (G), 1 (B).
    """
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types

    x = fn.cast(img, dtype=types.FLOAT)
    r, g, b = x[:, :, 0], x[:, :, 1], x[:, :, 2]
    v = dmath.max(r, dmath.max(g, b))
    c = v - dmath.min(r, dmath.min(g, b))
    cs = dmath.max(c, 1e-6)
    is_r = v == r
    is_g = (v == g) & (v != r)
    is_b = (v != r) & (v != g)
    h = is_r * ((g - b) / cs) + is_g * ((b - r) / cs + 2.0) + is_b * ((r - g) / cs + 4.0) + 6.0 * shift

    def channel(n: float):
        k = h + n
        k = k - 6.0 * dmath.floor(k / 6.0)
        return v - c * dmath.clamp(dmath.min(k, 4.0 - k), 0.0, 1.0)

    out = fn.stack(channel(5.0), channel(3.0), channel(1.0), axis=2)
    # Branches of a conditional must agree on the layout: stack leaves it empty.
    return fn.reshape(fn.cast(out + 0.5, dtype=types.UINT8), layout="HWC")


def _grayscale(img):
    import nvidia.dali.fn as fn

    g = _luma(img)
    return fn.cat(g, g, g, axis=2)


def _view(img, p, *, image_size: int, out_dtype, layout: str, hue: str):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    img = fn.resize(img, size=[image_size, image_size], roi_start=p["roi_start"], roi_end=p["roi_end"],
                    roi_relative=True, interp_type=types.INTERP_LINEAR, antialias=True)
    if p["jitter"]:
        img = _linear_stage(img, p["pre"])
        if hue == "exact":
            img = _hue_exact(img, p["hue"])
        else:
            img = fn.hue(img, hue=p["hue"] * 360.0)
        img = _linear_stage(img, p["post"])
    if p["gray"]:
        img = _grayscale(img)
    if p["blur"]:
        img = fn.gaussian_blur(img, window_size=p["blur_window"], sigma=p["sigma"])
    return fn.crop_mirror_normalize(img, dtype=out_dtype, output_layout=layout,
                                    mean=[255.0 * m for m in IMAGENET_MEAN],
                                    std=[255.0 * s for s in IMAGENET_STD])


def _two_view_graph(source, *, input_kind: str, decoder: str, on_gpu: bool, image_size: int, out_dtype: str,
                    layout: str, decoder_options: Optional[dict], hue: str):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    n = len(GRAPH_FIELDS)
    inputs = fn.external_source(source=source, num_outputs=1 + 2 * n, batch=True, no_copy=False)
    encoded = fn.io.file.read(inputs[0]) if input_kind == "names" else inputs[0]
    pq = {name: inputs[1 + i] for i, (name, _) in enumerate(GRAPH_FIELDS)}
    pk = {name: inputs[1 + n + i] for i, (name, _) in enumerate(GRAPH_FIELDS)}
    opts = dict(decoder_options or {}) if decoder == "mixed" else {}
    images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB, adjust_orientation=False, **opts)
    if on_gpu and decoder == "cpu":
        images = images.gpu()      # CPU decoding, GPU augmentation (GPUs without nvJPEG support)
    dtype = {"float32": types.FLOAT, "float16": types.FLOAT16}[out_dtype]
    kw = dict(image_size=image_size, out_dtype=dtype, layout=layout, hue=hue)
    return _view(images, pq, **kw), _view(images, pk, **kw)


def build_two_view_pipeline(source, *, batch_size: int, num_threads: int, device_id: Optional[int],
                            input_kind: str = "names", image_size: int = 224, out_dtype: str = "float32",
                            layout: str = "CHW", decoder: Optional[str] = None,
                            decoder_options: Optional[dict] = None, hue: Optional[str] = None,
                            prefetch_queue_depth: int = 2):
    """Build (not yet run) the two-view pipeline.

    source:      a callable returning one batch as a tuple: (file names or encoded bytes, then the
                 `GRAPH_FIELDS` arrays of view q, then those of view k) -- see `graph_inputs`;
                 it raises StopIteration at the end of an epoch.
    input_kind:  "names" (uint8 arrays of utf-8 paths, read by ``fn.io.file.read``) or "encoded".
    device_id:   None = CPU-only graph (CPU decoder); an int = GPU graph.
    decoder:     "mixed" (nvJPEG + HW decoder, default with a GPU) or "cpu" (with a GPU: CPU decoding,
                 then the views are made on the GPU).
    out_dtype:   "float32" | "float16" (bf16 is a cast on the torch side: DALI has no bf16).
    layout:      "CHW" (NCHW batches) or "HWC" (NHWC memory = channels-last NCHW in torch).
    hue:         "exact" | "linear" (see the module docstring); default exact on GPU, linear on CPU.
    """
    from nvidia.dali import pipeline_def

    if decoder is None:
        decoder = "cpu" if device_id is None else "mixed"
    if hue is None:
        hue = "linear" if device_id is None else "exact"
    if device_id is None and decoder != "cpu":
        raise ValueError("a CPU-only DALI pipeline (device_id=None) needs decoder='cpu'")
    if input_kind not in ("names", "encoded") or layout not in ("CHW", "HWC") or hue not in ("exact", "linear"):
        raise ValueError(f"input_kind={input_kind!r}, layout={layout!r}, hue={hue!r}")
    graph = pipeline_def(_two_view_graph, enable_conditionals=True)
    return graph(source, input_kind=input_kind, decoder=decoder, on_gpu=device_id is not None,
                 image_size=int(image_size), out_dtype=out_dtype,
                 layout=layout, decoder_options=decoder_options, hue=hue,
                 batch_size=int(batch_size), num_threads=max(1, int(num_threads)), device_id=device_id,
                 prefetch_queue_depth=int(prefetch_queue_depth))


def build_check_pipeline():
    """A batch-of-one CPU pipeline that decodes like the main graph: finds which file of a failed
    batch is unreadable. Run it with ``encoded=[uint8 array]``."""
    from nvidia.dali import pipeline_def
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def check():
        enc = fn.external_source(name="encoded", batch=True)
        return fn.decoders.image(enc, device="cpu", output_type=types.RGB, adjust_orientation=False)

    p = check()
    p.build()
    return p
