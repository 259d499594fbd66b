"""DALI two-view loader, CPU-only (device_id=None): graph vs the torchvision reference, rates,
sharding, epochs, resume, webdataset shards, bad and odd files.

Probes are built so that a wrong graph fails: ramps (flip, crop extent), constant colours (grayscale,
jitter), stripes (blur), and pixel comparisons against `transforms.ViewTransform.apply` fed the
very parameters the DALI graph was fed.
"""
import io
import logging
import math
import os
import tarfile

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

pytest.importorskip("nvidia.dali")

from densecl_fast.config import DataConfig  # noqa: E402
from densecl_fast.data import DataError, build_loader  # noqa: E402
from densecl_fast.data import dali_pipeline as dp  # noqa: E402
from densecl_fast.data import transforms as tr  # noqa: E402
from densecl_fast.data.dali_loader import (DaliTwoViewLoader, expand_shards, loader_for_folder,  # noqa: E402
                                           write_wds_index)
from densecl_fast.data.plan import EpochPlan  # noqa: E402

pytestmark = pytest.mark.dali

MEAN = np.array(tr.IMAGENET_MEAN, np.float64).reshape(3, 1, 1)
STD = np.array(tr.IMAGENET_STD, np.float64).reshape(3, 1, 1)


# --- helpers -----------------------------------------------------------------------------------

def grey_levels(x):
    """Normalised CHW (numpy or torch) -> 0..255 values."""
    x = x.detach().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float64)
    return (x * STD + MEAN) * 255.0


def textured(seed, h, w, lo=50, hi=200):
    rs = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    base = np.stack([lo + (hi - lo) * xx / w, lo + (hi - lo) * yy / h,
                     (lo + hi) / 2 + (hi - lo) / 3 * np.sin(xx / 4.0 + yy / 7.0)], -1)
    return np.clip(base + rs.uniform(-15, 15, (h, w, 3)), lo, hi).astype(np.uint8)


def save(path, img, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(path, **kw)
    return str(path)


def folder_of(tmp_path, name, n, size=(72, 88), ext="jpg", seed=0):
    d = tmp_path / name
    for i in range(n):
        h, w = size if i % 3 else size[::-1]
        save(str(d / f"c{i % 2}" / f"{i:03d}.{ext}"), textured(seed + i, h, w))
    return str(d)


def cfg(source, tmp_path, **kw):
    base = dict(source=str(source), backend="dali", image_size=32, min_scale=0.2, num_workers=2,
                cache_dir=str(tmp_path / "cache"))
    base.update(kw)
    return DataConfig(**base)


def epoch_batches(loader, epoch, start=0, sources=False):
    loader.set_epoch(epoch, start)
    out = []
    for q, k in loader:
        out.append((q.clone(), k.clone(), list(loader.last_sources) if sources else None))
    return out


def run_graph(files, draws_q, draws_k=None, image_size=40, hue="exact", layout="CHW", out_dtype="float32"):
    """Both views of `files` (one batch) through the raw DALI graph, fed the given draws."""
    hw = np.array([dp.file_hw(f) for f in files])
    feed = [[np.frombuffer(f.encode(), np.uint8) for f in files]]
    for d in (draws_q, draws_k if draws_k is not None else draws_q):
        feed += dp.graph_inputs(d, hw[:, 0], hw[:, 1], 0.2, image_size)
    state = {"done": False}

    def source():
        if state["done"]:
            raise StopIteration
        state["done"] = True
        return tuple(feed)

    pipe = dp.build_two_view_pipeline(source, batch_size=len(files), num_threads=2, device_id=None,
                                      image_size=image_size, hue=hue, layout=layout, out_dtype=out_dtype,
                                      prefetch_queue_depth=1)
    pipe.build()
    q, k = pipe.run()
    return np.array(q.as_tensor()), np.array(k.as_tensor()), hw


def draws(n, seed=0, epoch=0, view=0, **probs):
    return dp.draw_view_params(seed, epoch, np.arange(n), view, **probs)


def view_params(d, i, hw):
    top, left, h, w = dp.crop_windows_numpy(hw[i:i + 1, 0], hw[i:i + 1, 1], d["area_u"][i:i + 1],
                                            d["logr_u"][i:i + 1], d["off_u"][i:i + 1], 0.2)[0]
    jitter = None
    if d["jitter"][i]:
        b, c, s, h_ = (float(v) for v in d["factors"][i])
        jitter = (tuple(int(o) for o in d["order"][i]), b, c, s, h_)
    return tr.ViewParams(crop=(int(top), int(left), int(h), int(w)), jitter=jitter, grayscale=bool(d["gray"][i]),
                         blur_sigma=float(d["sigma"][i]) if d["blur"][i] else None, flip=bool(d["flip"][i]))


def binomial_ok(hits, n, p, z=4.5):
    return abs(hits / n - p) <= z * math.sqrt(p * (1 - p) / n) + 1e-9


# --- host-side draws -------------------------------------------------------------------------

def test_draws_rates_ranges_and_determinism():
    n = 20000
    d = draws(n, seed=3, epoch=5)
    for key, p in (("flip", tr.FLIP_PROB), ("jitter", tr.JITTER_PROB), ("gray", tr.GRAYSCALE_PROB),
                   ("blur", tr.BLUR_PROB)):
        assert binomial_ok(int(d[key].sum()), n, p), (key, d[key].mean())
    f = d["factors"]
    for j, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1)]):
        assert lo <= f[:, j].min() < lo + 0.01 and hi - 0.01 < f[:, j].max() <= hi
        assert abs(f[:, j].mean() - (lo + hi) / 2) < 0.01
    assert 0.1 <= d["sigma"].min() < 0.12 and 1.98 < d["sigma"].max() <= 2.0
    perms, counts = np.unique(d["order"], axis=0, return_counts=True)
    assert len(perms) == 24 and (np.sort(perms, axis=1) == np.arange(4)).all()
    assert counts.min() > n / 24 * 0.8 and counts.max() < n / 24 * 1.2
    # Pure function of (seed, epoch, key, view): any subset, any order, gives the same rows.
    keys = np.array([17, 3, 19999, 0])
    again = dp.draw_view_params(3, 5, keys, 0)
    for key in d:
        np.testing.assert_array_equal(again[key], d[key][keys])
    other = (dp.draw_view_params(3, 6, keys, 0), dp.draw_view_params(4, 5, keys, 0), dp.draw_view_params(3, 5, keys, 1))
    for o in other:
        assert not np.array_equal(o["area_u"], again["area_u"])


def test_crop_windows_follow_torchvision_rule():
    n, H, W = 6000, 75, 100
    d = draws(n, seed=1)
    top, left, h, w = dp.crop_windows_numpy(np.full(n, H), np.full(n, W), d["area_u"], d["logr_u"], d["off_u"], 0.2).T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= H).all() and (left + w <= W).all()
    area = h * w / (H * W)
    torch.manual_seed(0)
    img = Image.new("RGB", (W, H))
    ref = np.array([T.RandomResizedCrop.get_params(img, [0.2, 1.0], list(tr.CROP_RATIO)) for _ in range(n)])
    ref_area = ref[:, 2] * ref[:, 3] / (H * W)
    # Two-sample Kolmogorov-Smirnov on the area fraction and on the aspect ratio.
    for a, b in ((area, ref_area), (w / h, ref[:, 3] / ref[:, 2])):
        grid = np.quantile(np.concatenate([a, b]), np.linspace(0, 1, 201))
        ks = np.abs((a[:, None] <= grid).mean(0) - (b[:, None] <= grid).mean(0)).max()
        assert ks < 1.95 * math.sqrt(2 / n), ks
    # The fallback (no attempt fits): the whole image, aspect clamped, centred -- as torchvision.
    for (H2, W2) in ((4, 200), (200, 4), (50, 50)):
        big = np.ones((1, 10), np.float32)           # all attempts want the whole area ...
        lr = np.zeros((1, 10), np.float32) if H2 != W2 else np.ones((1, 10), np.float32)
        got = dp.crop_windows_numpy([H2], [W2], big, lr, np.zeros((1, 2)), 0.2)[0]
        in_ratio = W2 / H2
        if in_ratio < 3 / 4:
            want_w, want_h = W2, int(round(W2 / (3 / 4)))
        elif in_ratio > 4 / 3:
            want_h, want_w = H2, int(round(H2 * 4 / 3))
        else:
            want_w, want_h = W2, H2
        if H2 == W2:   # ratio 4/3 at full area does not fit a square: fallback is the whole square
            assert tuple(got) == (0, 0, H2, W2)
        else:
            assert tuple(got) == ((H2 - want_h) // 2, (W2 - want_w) // 2, want_h, want_w)


def test_jitter_stages_equal_any_op_order():
    """The commuting argument: stage(pre) -> hue -> stage(post) == the 4 ops in the drawn order
    (float math, no clamping: values kept mid-range)."""
    import torchvision.transforms.functional as F

    rs = np.random.RandomState(0)
    x = torch.from_numpy(0.45 + 0.1 * rs.rand(3, 9, 11)).float()
    d = draws(48, seed=2)
    pre, post = dp.jitter_stages(d["factors"], d["order"])

    def stage(img, w):
        luma = 0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]
        return w[0] * img + w[1] * luma + w[2] * luma.mean()

    for i in range(48):
        b, c, s, h = (float(v) for v in d["factors"][i])
        ops = [lambda y: F.adjust_brightness(y, b), lambda y: F.adjust_contrast(y, c),
               lambda y: F.adjust_saturation(y, s), lambda y: F.adjust_hue(y, h)]
        want = x
        for o in d["order"][i]:
            want = ops[int(o)](want)
        got = stage(F.adjust_hue(stage(x, pre[i]), h), post[i])
        assert torch.allclose(got, want, atol=2e-3), i


def test_header_sizes(tmp_path):
    a = textured(0, 37, 53)
    for ext, kw in (("jpg", {}), ("png", {}), ("webp", {}), ("bmp", {}), ("tif", {})):
        assert dp.file_hw(save(str(tmp_path / f"x.{ext}"), a, **kw)) == (37, 53)
    p = save(str(tmp_path / "prog.jpg"), a, progressive=True)
    assert dp.file_hw(p) == (37, 53)
    assert dp.image_hw(b"") is None and dp.image_hw(b"garbage bytes") is None
    data = open(p, "rb").read()
    assert dp.image_hw(data[:100]) is None   # ends before the frame header


# --- the graph against the reference -----------------------------------------------------------

@pytest.fixture(scope="module")
def png_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("png")
    sizes = [(60, 80), (80, 60), (70, 70), (44, 96), (96, 44), (64, 72)]
    return [save(str(d / f"{i}.png"), textured(10 + i, *sizes[i % len(sizes)])) for i in range(12)]


@pytest.mark.parametrize("case", ["plain", "flip", "gray", "blur", "jitter", "all"])
def test_graph_matches_reference_apply(png_files, case):
    """Same parameters -> same pixels as `ViewTransform.apply` (PNG in: no decoder differences)."""
    n, S = len(png_files), 40
    d = draws(n, seed=7)
    if case != "all":
        for key in ("flip", "gray", "blur", "jitter"):
            d[key][:] = key == case
    q, k, hw = run_graph(png_files, d, image_size=S)
    np.testing.assert_array_equal(q, k)           # same draws -> same view
    vt = tr.ViewTransform(S, 0.2)
    errs = []
    for i, f in enumerate(png_files):
        ref = vt.apply(Image.open(f).convert("RGB"), view_params(d, i, hw)).numpy()
        diff = np.abs(grey_levels(ref) - grey_levels(q[i]))[:, 1:-1, 1:-1]   # outer ring: filter support
        errs.append(diff.mean())
    # Rounding/truncation per op (PIL truncates, DALI rounds) and clamping only after each stage.
    tol = {"plain": 0.6, "flip": 0.6, "gray": 0.8, "blur": 0.8, "jitter": 3.0, "all": 3.0}[case]
    assert max(errs) < tol, errs


def test_linear_hue_is_close_and_exact_hue_is_closer(png_files):
    n, S = len(png_files), 32
    d = draws(n, seed=8)
    for key in ("flip", "gray", "blur"):
        d[key][:] = False
    d["jitter"][:] = True
    d["factors"][:, :3] = 1.0
    d["factors"][:, 3] = np.where(np.arange(n) % 2, 0.1, -0.1)     # the largest shifts
    qe, _, hw = run_graph(png_files, d, image_size=S, hue="exact")
    ql, _, _ = run_graph(png_files, d, image_size=S, hue="linear")
    vt = tr.ViewTransform(S, 0.2)
    ee, el = [], []
    for i, f in enumerate(png_files):
        ref = grey_levels(vt.apply(Image.open(f).convert("RGB"), view_params(d, i, hw)).numpy())
        ee.append(np.abs(ref - grey_levels(qe[i])).mean())
        el.append(np.abs(ref - grey_levels(ql[i])).mean())
    assert max(ee) < 2.0 and max(el) < 25.0 and np.mean(ee) < np.mean(el), (ee, el)


def test_normalisation_layouts_and_dtypes(tmp_path):
    rgb = (200, 120, 40)
    f = save(str(tmp_path / "const.png"), np.full((50, 60, 3), rgb, np.uint8))
    d = draws(2, seed=0, jitter_p=0.0, gray_p=0.0, blur_p=0.0)
    want = (np.array(rgb, np.float64).reshape(3, 1, 1) / 255.0 - MEAN) / STD
    q, k, _ = run_graph([f, f], d, image_size=24)
    assert q.shape == (2, 3, 24, 24) and q.dtype == np.float32
    np.testing.assert_allclose(q[0], np.broadcast_to(want, (3, 24, 24)), atol=1e-5)
    qh, _, _ = run_graph([f, f], d, image_size=24, layout="HWC", out_dtype="float16")
    assert qh.shape == (2, 24, 24, 3) and qh.dtype == np.float16
    np.testing.assert_allclose(qh[0].transpose(2, 0, 1).astype(np.float64), want.repeat(24, 1).repeat(24, 2), atol=3e-3)


# --- rates measured from pixels on probes, through the loader --------------------------------------

@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    d = tmp_path_factory.mktemp("probes")
    n = 48
    xx = np.tile(np.linspace(40, 215, 96), (72, 1))
    ramp = np.repeat(xx[..., None], 3, axis=2).astype(np.uint8)             # grey, left dark -> right bright
    colour = np.full((72, 96, 3), (190, 70, 40), np.uint8)
    for i in range(n):
        save(str(d / "ramp" / f"{i:03d}.png"), ramp)
        save(str(d / "colour" / f"{i:03d}.png"), colour)
    return d


def test_flip_grayscale_and_jitter_rates_from_pixels(probes, tmp_path):
    """Flip: sign of the horizontal slope on a grey ramp. Grayscale: a colourful flat image loses
    its chroma (jitter never does: saturation >= 0.6, and a hue turn keeps it). Jitter: among the
    views that are not grey, the colour changed."""
    flips = gray = jit = not_gray = total = 0
    ramp = DaliTwoViewLoader(cfg(probes / "ramp", tmp_path, image_size=24), batch_size=16)
    col = DaliTwoViewLoader(cfg(probes / "colour", tmp_path, image_size=24), batch_size=16)
    for epoch in range(4):
        for (q, k, _), (cq, ck, _) in zip(epoch_batches(ramp, epoch), epoch_batches(col, epoch)):
            for v in (q, k):
                slope = (v[:, 0, :, 1:] - v[:, 0, :, :-1]).mean(dim=(1, 2))
                flips += int((slope < 0).sum())
                total += v.shape[0]
            for v in (cq, ck):
                g = grey_levels(v)
                spread = (g.max(axis=1) - g.min(axis=1)).mean(axis=(1, 2))
                is_gray = spread < 2.0
                gray += int(is_gray.sum())
                changed = np.abs(g - np.array([190, 70, 40]).reshape(1, 3, 1, 1)).mean(axis=(1, 2, 3)) > 1.5
                not_gray += int((~is_gray).sum())
                jit += int((changed & ~is_gray).sum())
    assert total == 4 * 3 * 16 * 2
    assert binomial_ok(flips, total, tr.FLIP_PROB), flips / total
    assert binomial_ok(gray, total, tr.GRAYSCALE_PROB), gray / total
    assert binomial_ok(jit, not_gray, tr.JITTER_PROB), jit / not_gray


def test_crop_extent_and_blur_from_pixels(tmp_path):
    """Crop: on an image whose R channel is x and G is y (PNG), the view's corner values give the
    window; its area follows the windows torchvision's rule gives. Blur: on stripes, the views the
    draws say are blurred (sigma > 1) have soft edges, the others sharp ones."""
    H, W, S = 90, 120, 32
    yy, xx = np.mgrid[0:H, 0:W]
    coords = np.stack([xx * 255.0 / (W - 1), yy * 255.0 / (H - 1), np.full((H, W), 128.0)], -1).round().astype(np.uint8)
    n = 96
    f = save(str(tmp_path / "coords.png"), coords)
    d = draws(n, seed=11, jitter_p=0.0, gray_p=0.0, blur_p=0.0)
    q, _, hw = run_graph([f] * n, d, image_size=S)
    g = grey_levels(q)
    windows = dp.crop_windows_numpy(hw[:, 0], hw[:, 1], d["area_u"], d["logr_u"], d["off_u"], 0.2)
    # Pixel centres of the view sample the window at (j + 0.5) / S of its extent.
    x_l, x_r = g[:, 0, :, 0].mean(1) * (W - 1) / 255, g[:, 0, :, -1].mean(1) * (W - 1) / 255
    y_t, y_b = g[:, 1, 0, :].mean(1) * (H - 1) / 255, g[:, 1, -1, :].mean(1) * (H - 1) / 255
    w_meas = np.abs(x_r - x_l) * S / (S - 1)
    h_meas = (y_b - y_t) * S / (S - 1)
    np.testing.assert_allclose(w_meas, windows[:, 3], atol=1.5)
    np.testing.assert_allclose(h_meas, windows[:, 2], atol=1.5)
    assert ((x_r < x_l) == d["flip"]).all()
    area = w_meas * h_meas / (H * W)
    assert 0.15 < area.min() and area.max() <= 1.05 and 0.45 < area.mean() < 0.7

    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, (np.arange(64) // 8) % 2 == 1] = 220
    s = save(str(tmp_path / "stripes.png"), stripes)
    d = draws(n, seed=12, jitter_p=0.0, gray_p=0.0, flip_p=0.0)
    d["area_u"][:] = 1.0
    d["logr_u"][:] = 0.5                                   # whole image, 1:1 -> no resampling blur
    q, _, _ = run_graph([s] * n, d, image_size=64)
    step = np.abs(np.diff(grey_levels(q)[:, 0], axis=2)).max(axis=(1, 2)) / 220.0
    sharp, soft = step[~d["blur"]], step[d["blur"] & (d["sigma"] > 1.0)]
    assert len(soft) > 5 and sharp.min() > 0.95 and soft.max() < 0.6, (sharp.min(), soft.max())
    assert binomial_ok(int(d["blur"].sum()), n, tr.BLUR_PROB)


# --- the loader: protocol, sharding, epochs, resume ------------------------------------------------

@pytest.fixture(scope="module")
def folder30(tmp_path_factory):
    return folder_of(tmp_path_factory.mktemp("f30"), "imgs", 30)


def test_loader_shapes_dtypes_layout_and_views_differ(folder30, tmp_path):
    loader = build_loader(cfg(folder30, tmp_path), batch_size=8, device=torch.device("cpu"), channels_last=True)
    assert isinstance(loader, DaliTwoViewLoader) and len(loader) == 30 // 8
    batches = epoch_batches(loader, 0)
    assert len(batches) == 3
    for q, k, _ in batches:
        assert q.shape == k.shape == (8, 3, 32, 32) and q.dtype == torch.float32 and q.device.type == "cpu"
        assert q.is_contiguous(memory_format=torch.channels_last) and torch.isfinite(q).all()
        assert all(not torch.equal(q[i], k[i]) for i in range(8))       # two independent views
    nchw = DaliTwoViewLoader(cfg(folder30, tmp_path), batch_size=8, channels_last=False, dtype=torch.bfloat16)
    q, k, _ = epoch_batches(nchw, 0)[0]
    assert q.dtype == torch.bfloat16 and q.is_contiguous()
    # Same pixels in either layout (bf16 rounding aside): the layout is only memory order.
    torch.testing.assert_close(q.float(), batches[0][0].contiguous(), atol=0.05, rtol=0.02)


def test_same_order_as_torch_loader_and_deterministic(folder30, tmp_path):
    c = cfg(folder30, tmp_path)
    loader = DaliTwoViewLoader(c, batch_size=4, rank=1, world_size=2, seed=5)
    plan = EpochPlan(30, 4, 1, 2, 5)
    for epoch in (0, 3):
        np.testing.assert_array_equal(loader.epoch_indices(epoch), plan.rank_indices(epoch))
    a = epoch_batches(loader, 3, sources=True)
    b = epoch_batches(DaliTwoViewLoader(c, batch_size=4, rank=1, world_size=2, seed=5), 3, sources=True)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and x[2] == y[2] for x, y in zip(a, b))
    other = epoch_batches(loader, 4, sources=True)
    assert [x[2] for x in other] != [x[2] for x in a]                  # reshuffled every epoch


def test_rank_sharding_covers_the_data_once(tmp_path):
    folder = folder_of(tmp_path, "imgs", 24, size=(40, 48))
    W, B = 3, 4                                    # 24 = 2 steps x 3 ranks x 4: the whole set
    seen, lens = [], set()
    for rank in range(W):
        loader = DaliTwoViewLoader(cfg(folder, tmp_path, image_size=32), batch_size=B, rank=rank, world_size=W, seed=1)
        lens.add(len(loader))
        for _, _, src in epoch_batches(loader, 2, sources=True):
            seen += src
    assert lens == {2}
    assert sorted(seen) == sorted(os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs)


def test_every_epoch_has_the_same_steps_and_drop_is_defined(folder30, tmp_path):
    for W in (1, 2, 4):
        steps = []
        for rank in range(W):
            loader = DaliTwoViewLoader(cfg(folder30, tmp_path, image_size=32), batch_size=3, rank=rank, world_size=W)
            assert len(loader) == 30 // (3 * W)
            if W == 2:
                steps += [len(epoch_batches(loader, e)) for e in range(3)]
        if steps:
            assert set(steps) == {30 // 6}
    with pytest.raises(DataError):
        DaliTwoViewLoader(cfg(folder30, tmp_path), batch_size=16, world_size=2)


def test_start_step_resume_and_abandoned_epochs(folder30, tmp_path):
    loader = DaliTwoViewLoader(cfg(folder30, tmp_path), batch_size=4, seed=2)
    full = epoch_batches(loader, 1)
    assert len(full) == 7
    # Stop mid-epoch (a max_steps exit, a crash): the next epoch is still complete and exact.
    loader.set_epoch(0)
    for i, _ in enumerate(loader):
        if i == 1:
            break
    fresh = DaliTwoViewLoader(cfg(folder30, tmp_path), batch_size=4, seed=2)
    for ld in (loader, fresh):
        resumed = epoch_batches(ld, 1, start=4)
        assert len(resumed) == 3
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(resumed, full[4:]))
    assert epoch_batches(loader, 1, start=7) == []
    with pytest.raises(ValueError):
        loader.set_epoch(1, start_step=8)


# --- webdataset shards --------------------------------------------------------------------------

def make_shards(folder, n_shards, per_shard, corrupt=(), seed=0):
    os.makedirs(folder, exist_ok=True)
    k, paths = 0, []
    for s in range(n_shards):
        path = os.path.join(folder, f"train-{s:04d}.tar")
        with tarfile.open(path, "w") as tf:
            def add(name, data):
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
            for _ in range(per_shard):
                b = io.BytesIO()
                Image.fromarray(textured(seed + k, 40, 52)).save(b, "JPEG", quality=90)
                data = b.getvalue()
                if k in corrupt:
                    data = data[: len(data) // 2]
                add(f"sample{k:05d}.cls", b"1")          # components in any order
                add(f"sample{k:05d}.JPG", data)
                k += 1
            add("meta-only.json", b"{}")                 # a sample without an image: not counted
        paths.append(path)
    return paths


def test_webdataset_shards(tmp_path):
    paths = make_shards(str(tmp_path / "wds"), 3, 9)
    assert expand_shards(str(tmp_path / "wds" / "train-{0000..0002}.tar")) == paths
    assert expand_shards(str(tmp_path / "wds" / "train-*.tar")) == paths
    assert write_wds_index(paths[0], str(tmp_path / "x.idx")) == 9
    source = str(tmp_path / "wds" / "train-*.tar")
    W, B = 2, 4
    covered = []
    for rank in range(W):
        loader = DaliTwoViewLoader(cfg(source, tmp_path), batch_size=B, rank=rank, world_size=W, seed=3)
        assert loader.num_samples == 27 and len(loader) == 27 // (B * W)
        for epoch in range(2):
            batches = epoch_batches(loader, epoch, sources=True)
            assert len(batches) == 3 and all(q.shape == (B, 3, 32, 32) for q, _, _ in batches)
            names = [s for _, _, src in batches for s in src]
            assert len(set(names)) == len(names)      # no repeats within an epoch (drop, not wrap)
            if epoch == 0:
                covered.append(set(names))
        full = epoch_batches(loader, 1, sources=True)
        resumed = epoch_batches(loader, 1, start=1, sources=True)
        assert all(torch.equal(a[0], b[0]) and a[2] == b[2] for a, b in zip(resumed, full[1:]))
    assert not covered[0] & covered[1]              # ranks read disjoint samples


# --- corrupt and odd files ----------------------------------------------------------------------

def test_bad_and_odd_files_never_stop_the_run(tmp_path, caplog):
    d = tmp_path / "mixed"
    a = textured(1, 48, 64)
    odd = [save(str(d / "gray.jpg"), a[..., 0]), save(str(d / "cmyk.jpg"), Image.fromarray(a).convert("CMYK")),
           save(str(d / "rgba.png"), np.dstack([a, np.full(a.shape[:2], 200, np.uint8)])),
           save(str(d / "l16.png"), (a[..., 0].astype(np.uint16) * 257)),
           save(str(d / "p.png"), Image.fromarray(a).convert("P")),
           save(str(d / "x.webp"), a), save(str(d / "x.bmp"), a), save(str(d / "prog.jpg"), a, progressive=True)]
    for i in range(12):
        save(str(d / f"ok{i:02d}.jpg"), textured(20 + i, 40, 56))
    good = textured(5, 48, 64)
    buf = io.BytesIO()
    Image.fromarray(good).save(buf, "JPEG")
    data = buf.getvalue()
    bad = {"truncated.jpg": data[: len(data) // 2],      # header fine: fails inside the decoder
           "garbage.jpg": np.random.RandomState(3).bytes(3000),
           "empty.png": b"", "header_only.jpg": data[:300]}
    for name, blob in bad.items():
        (d / name).write_bytes(blob)
    caplog.set_level(logging.WARNING, logger="densecl_fast.data.dali_loader")
    loader = DaliTwoViewLoader(cfg(d, tmp_path), batch_size=6, seed=0)
    assert len(loader) == 24 // 6
    used = []
    for epoch in range(3):
        batches = epoch_batches(loader, epoch, sources=True)
        assert len(batches) == 4
        for q, k, src in batches:
            assert q.shape == (6, 3, 32, 32) and torch.isfinite(q).all() and torch.isfinite(k).all()
            used += src
    assert {os.path.basename(p) for p in loader.bad_files} == set(bad)
    assert not any(os.path.basename(p) in bad for p in used)
    assert set(odd) <= set(used)                   # odd but valid files are decoded, not dropped
    # 24 files = 4 full batches: every epoch meets each bad file once, and every occurrence counts.
    assert loader.skipped == 3 * 4
    warned = [r for r in caplog.records if "skipping unreadable image" in r.getMessage()]
    assert len(warned) == 4 and any("truncated.jpg" in r.getMessage() for r in warned)


def test_a_data_set_of_only_bad_files_is_an_error_not_a_hang(tmp_path):
    d = tmp_path / "junk"
    d.mkdir()
    for i in range(8):
        (d / f"{i}.jpg").write_bytes(np.random.RandomState(i).bytes(500))
    loader = DaliTwoViewLoader(cfg(d, tmp_path), batch_size=4)
    loader.set_epoch(0)
    with pytest.raises(DataError, match="could not be read"):
        next(iter(loader))


def test_bad_sample_in_a_shard(tmp_path, caplog):
    paths = make_shards(str(tmp_path / "wds"), 2, 8, corrupt={5})
    caplog.set_level(logging.WARNING, logger="densecl_fast.data.dali_loader")
    loader = DaliTwoViewLoader(cfg(",".join(paths), tmp_path), batch_size=4, seed=0)
    for epoch in range(2):
        batches = epoch_batches(loader, epoch, sources=True)
        assert len(batches) == 4 and all(q.shape[0] == 4 for q, _, _ in batches)
        assert not any("sample00005" in s for _, _, src in batches for s in src)
    assert loader.skipped == 2 and len(loader.bad_files) == 1


def test_loader_for_folder_helper(folder30, tmp_path):
    loader = loader_for_folder(folder30, batch_size=5, device="cpu", image_size=32, num_threads=2,
                               cache_dir=str(tmp_path / "c"), hue="linear")
    loader.set_epoch(0)
    q, k = next(iter(loader))
    assert q.shape == (5, 3, 32, 32) and q.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_graph(folder30, tmp_path):
    loader = DaliTwoViewLoader(cfg(folder30, tmp_path), batch_size=8, device=torch.device("cuda"),
                               channels_last=True, dtype=torch.bfloat16)
    cpu = DaliTwoViewLoader(cfg(folder30, tmp_path), batch_size=8)
    for (q, k, _), (cq, _, _) in zip(epoch_batches(loader, 0), epoch_batches(cpu, 0)):
        assert q.device.type == "cuda" and q.dtype == torch.bfloat16
        assert q.is_contiguous(memory_format=torch.channels_last)
        # nvJPEG vs libjpeg-turbo and exact vs linear hue: close, not equal.
        assert (q.float().cpu() - cq).abs().mean() < 0.15
