"""The DALI graphs: the two-view augmentation (decode once, two views), the shard reader, the
single-file decode check. The only module that imports DALI.

Per image: encoded bytes -> decode once (``device="mixed"``: nvJPEG / the hardware JPEG decoder;
``"cpu"``: libjpeg-turbo & co.) -> two views, each RandomResizedCrop (bilinear, antialias), colour
jitter (p 0.8, random op order), grayscale (p 0.2), Gaussian blur (p 0.5), flip (p 0.5),
ImageNet normalisation -> fp32/fp16, CHW or HWC (= channels-last NCHW in torch). The draws come
from the host (`params.graph_inputs`) through ``fn.external_source``, so the graph is
deterministic. Conditionals let the jitter, grayscale and blur branches run only on the samples
that take them (DALI needs the pipeline function in a real ``.py`` file for that).

Deliberate differences from the torchvision/PIL reference (`transforms.py`), all small:
  * PIL clamps to [0, 255] and truncates after every jitter op; here only after each linear stage
    (rounding): ~1 grey level, more only where an intermediate value clipped;
  * hue: "exact" (default with a GPU) rotates the HSV hue in float arithmetic like torchvision's
    tensor path (PIL quantises H to 8 bits: ~1 grey level); "linear" (default on CPU) is DALI's
    ``fn.hue``, a rotation about the grey axis: ~10x cheaper on a CPU, up to ~20 grey levels off on
    saturated colours at the largest shift;
  * the resize reads source pixels just outside the crop window for its filter support (PIL
    crops first): only the outermost output pixels differ;
  * the blur runs on uint8 (the reference blurs floats): rounding, < 1 grey level;
  * RGBA/LA: DALI drops alpha, the reference composites on white; EXIF orientation is ignored by
    both (``adjust_orientation=False``, as PIL's ``Image.open``).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
import torch
from nvidia.dali import pipeline_def
from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

from ..transforms import IMAGENET_MEAN, IMAGENET_STD
from .params import GRAPH_FIELDS
from .shards import WDS_IMAGE_EXTS


def _luma(img):
    return fn.color_space_conversion(img, image_type=types.RGB, output_type=types.GRAY)   # HW1, BT.601


def _linear_stage(img, w):
    """a*x + g*luma(x) + m*round(mean luma(x)), clamped to uint8: contrast/saturation/brightness."""
    luma = _luma(img)
    mean = dmath.floor(fn.reductions.mean(luma, keep_dims=True) + 0.5)   # (1, 1, 1); PIL rounds it
    out = w[0] * img + (w[1] * luma + w[2] * mean)      # the luma terms on one channel first
    return fn.reshape(fn.cast(out, dtype=types.UINT8), layout="HWC")   # cast rounds and saturates


def _hue_exact(img, shift):
    """torchvision's adjust_hue: rotate the HSV hue by `shift` turns, keeping V and S (float math).

    Per pixel, with V = max, C = max - min and the hue h in sextants, the result is channel n =
    V - C * clamp(min(k, 4 - k), 0, 1), k = (n + h') mod 6 for n = 5 (R), 3 (G), 1 (B).
    """
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
    g = _luma(img)
    return fn.cat(g, g, g, axis=2)


def augment_view(img, p, *, image_size: int, out_dtype, layout: str, hue: str):
    """One view of decoded images `img` as the draws `p` (one view's `GRAPH_FIELDS`) say."""
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


@pipeline_def(enable_conditionals=True)
def _two_view_pipeline(source, *, read_files: bool, decoder: str, on_gpu: bool, image_size: int, out_dtype: str,
                       layout: str, decoder_options: Optional[dict], hue: str):
    n = len(GRAPH_FIELDS)
    inputs = fn.external_source(source=source, num_outputs=1 + 2 * n, batch=True, no_copy=False)
    encoded = fn.io.file.read(inputs[0]) if read_files else inputs[0]
    pq = {name: inputs[1 + i] for i, (name, _) in enumerate(GRAPH_FIELDS)}
    pk = {name: inputs[1 + n + i] for i, (name, _) in enumerate(GRAPH_FIELDS)}
    opts = dict(decoder_options or {}) if decoder == "mixed" else {}
    images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB, adjust_orientation=False, **opts)
    if on_gpu and decoder == "cpu":
        images = images.gpu()      # CPU decoding, GPU augmentation (GPUs without nvJPEG support)
    dtype = {"float32": types.FLOAT, "float16": types.FLOAT16}[out_dtype]
    kw = dict(image_size=image_size, out_dtype=dtype, layout=layout, hue=hue)
    return augment_view(images, pq, **kw), augment_view(images, pk, **kw)


def build_two_view_pipeline(source, *, batch_size: int, num_threads: int, device_id: Optional[int],
                            read_files: bool = True, image_size: int = 224, out_dtype: str = "float32",
                            layout: str = "CHW", decoder: Optional[str] = None,
                            decoder_options: Optional[dict] = None, hue: Optional[str] = None,
                            prefetch_queue_depth: int = 2):
    """Build (not yet run) the two-view pipeline.

    source:      a callable returning one batch as a tuple: (file names or encoded bytes, then the
                 `GRAPH_FIELDS` arrays of view q, then those of view k) -- see `params.graph_inputs`;
                 it raises StopIteration at the end of an epoch.
    read_files:  the first input holds file names (uint8 arrays of the name's bytes, read by
                 ``fn.io.file.read``); False: encoded images.
    device_id:   None = CPU-only graph (CPU decoder); an int = GPU graph.
    decoder:     "mixed" (nvJPEG + HW decoder, default with a GPU) or "cpu" (with a GPU: CPU decoding,
                 then the views are made on the GPU).
    out_dtype:   "float32" | "float16" (bf16 is a cast on the torch side: DALI has no bf16).
    layout:      "CHW" (NCHW batches) or "HWC" (NHWC memory = channels-last NCHW in torch).
    hue:         "exact" | "linear" (see the module docstring); default exact on GPU, linear on CPU.
    """
    if decoder is None:
        decoder = "cpu" if device_id is None else "mixed"
    if hue is None:
        hue = "linear" if device_id is None else "exact"
    if device_id is None and decoder != "cpu":
        raise ValueError("a CPU-only DALI pipeline (device_id=None) needs decoder='cpu'")
    if layout not in ("CHW", "HWC") or hue not in ("exact", "linear"):
        raise ValueError(f"layout={layout!r}, hue={hue!r}")
    return _two_view_pipeline(source, read_files=bool(read_files), decoder=decoder, on_gpu=device_id is not None,
                              image_size=int(image_size), out_dtype=out_dtype, layout=layout,
                              decoder_options=decoder_options, hue=hue,
                              batch_size=int(batch_size), num_threads=max(1, int(num_threads)), device_id=device_id,
                              prefetch_queue_depth=int(prefetch_queue_depth))


@pipeline_def(device_id=None, prefetch_queue_depth=2)
def _shard_reader(paths, index_paths, *, shard_id, num_shards, seed, shuffle_buffer):
    enc = fn.readers.webdataset(paths=paths, index_paths=index_paths, ext=[";".join(WDS_IMAGE_EXTS)],
                                case_sensitive_extensions=False, missing_component_behavior="skip",
                                random_shuffle=True, initial_fill=max(1, int(shuffle_buffer)), seed=seed,
                                shard_id=shard_id, num_shards=num_shards, stick_to_shard=True,
                                pad_last_batch=False, name="wds")
    return enc, fn.get_property(enc, key="source_info")


def build_shard_reader(paths, index_paths, *, batch_size, num_threads, shard_id, num_shards, seed, shuffle_buffer):
    """A built CPU pipeline yielding (encoded samples, their source info) of this rank's part of
    the shards: the host needs the bytes (image sizes) before the two-view graph gets them."""
    p = _shard_reader(paths, index_paths, shard_id=shard_id, num_shards=num_shards, seed=seed,
                      shuffle_buffer=shuffle_buffer, batch_size=batch_size, num_threads=num_threads)
    p.build()
    return p


@pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
def _check_pipeline():
    enc = fn.external_source(name="encoded", batch=True)
    return fn.decoders.image(enc, device="cpu", output_type=types.RGB, adjust_orientation=False)


def first_error_line(e: BaseException) -> str:
    """The informative line of a DALI error (what follows "encountered:"), else the first line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if ln.startswith("encountered:") and i + 1 < len(lines):
            return lines[i + 1][:200]
    for ln in lines:
        if "Critical error" not in ln:
            return ln[:200]
    return (lines[0] if lines else type(e).__name__)[:200]


class DecodeCheck:
    """Decodes one encoded image as the main graph would, to find which file of a failed batch is
    unreadable. `check(data)` -> None, or why it does not decode."""

    def __init__(self):
        self._pipe = None

    def __call__(self, data: bytes) -> Optional[str]:
        if not data:
            return "empty file"
        if self._pipe is None:
            self._pipe = _check_pipeline()
            self._pipe.build()
        try:
            self._pipe.run(encoded=[np.frombuffer(data, dtype=np.uint8)])
            return None
        except Exception as e:  # DALI raises RuntimeError subclasses with the decoder's message
            self._pipe = None   # "no longer valid" after an error: a fresh one next time
            return f"DALI cannot decode it: {first_error_line(e)}"


def gpu_output_to_torch(t, device: torch.device) -> torch.Tensor:
    """A dense DALI GPU output as a new torch tensor on `device`, copied on torch's current stream
    (so the training step that follows sees it without another sync)."""
    x = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=device)
    feed_ndarray(t, x, cuda_stream=torch.cuda.current_stream(device))
    return x
