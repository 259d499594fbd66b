"""DALI two-view loader, CPU-only (device_id=None): graph vs the torchvision reference, rates,
sharding, epochs, resume, webdataset shards, bad and odd files.

Probes are built so that a wrong graph fails: ramps (flip, crop extent), constant colours (grayscale,
jitter), stripes (blur), and pixel comparisons against `transforms.ViewTransform.apply` fed the
very parameters the DALI graph was fed.
"""
import io
import logging
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from densecl_fast.config import ConfigError, DaliConfig, DataConfig  # noqa: E402
from densecl_fast.data import DataError, build_loader  # noqa: E402
from densecl_fast.data import transforms as tr  # noqa: E402
from densecl_fast.data.dali import params  # noqa: E402
from densecl_fast.data.dali.graph import build_two_view_pipeline  # noqa: E402
from densecl_fast.data.dali.loader import DaliTwoViewLoader  # noqa: E402
from densecl_fast.data.dali.shards import expand_shards, write_wds_index  # noqa: E402
from densecl_fast.data.headers import file_hw  # noqa: E402
from densecl_fast.data.torch_loader import TorchTwoViewLoader  # noqa: E402
from helpers import binomial_ok, draws, save, textured  # noqa: E402

pytestmark = pytest.mark.dali

MEAN = np.array(tr.IMAGENET_MEAN, np.float64).reshape(3, 1, 1)
STD = np.array(tr.IMAGENET_STD, np.float64).reshape(3, 1, 1)


# --- helpers -----------------------------------------------------------------------------------

def grey_levels(x):
    """Normalised CHW (numpy or torch) -> 0..255 values."""
    x = x.detach().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float64)
    return (x * STD + MEAN) * 255.0


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
    hw = np.array([file_hw(f) for f in files])
    feed = [[np.frombuffer(f.encode(), np.uint8) for f in files]]
    for d in (draws_q, draws_k if draws_k is not None else draws_q):
        feed += params.graph_inputs(d, hw[:, 0], hw[:, 1], 0.2, image_size)
    state = {"done": False}

    def source():
        if state["done"]:
            raise StopIteration
        state["done"] = True
        return tuple(feed)

    pipe = build_two_view_pipeline(source, batch_size=len(files), num_threads=2, device_id=None,
                                      image_size=image_size, hue=hue, layout=layout, out_dtype=out_dtype,
                                      prefetch_queue_depth=1)
    pipe.build()
    q, k = pipe.run()
    return np.array(q.as_tensor()), np.array(k.as_tensor()), hw


def view_params(d, i, hw):
    top, left, h, w = params.crop_windows_numpy(hw[i:i + 1, 0], hw[i:i + 1, 1], d["area_u"][i:i + 1],
                                            d["logr_u"][i:i + 1], d["off_u"][i:i + 1], 0.2)[0]
    jitter = None
    if d["jitter"][i]:
        b, c, s, h_ = (float(v) for v in d["factors"][i])
        jitter = (tuple(int(o) for o in d["order"][i]), b, c, s, h_)
    return tr.ViewParams(crop=(int(top), int(left), int(h), int(w)), jitter=jitter, grayscale=bool(d["gray"][i]),
                         blur_sigma=float(d["sigma"][i]) if d["blur"][i] else None, flip=bool(d["flip"][i]))


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


def test_loader_follows_the_augmentation_keys(probes, tmp_path):
    """data.jitter_prob / grayscale_prob reach the graph: with both 0 a flat colour comes out as it
    went in (crop, flip and blur leave it flat), with grayscale_prob=1 every view is grey."""
    def levels(**kw):
        loader = DaliTwoViewLoader(cfg(probes / "colour", tmp_path, image_size=24, **kw), batch_size=16)
        return np.concatenate([grey_levels(v) for q, k, _ in epoch_batches(loader, 0) for v in (q, k)])

    plain = levels(jitter_prob=0.0, grayscale_prob=0.0)
    assert len(plain) == 3 * 16 * 2
    assert np.abs(plain - np.array([190, 70, 40]).reshape(1, 3, 1, 1)).max() < 1.0
    grey = levels(grayscale_prob=1.0)
    assert (grey.max(axis=1) - grey.min(axis=1)).max() < 2.0


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
    windows = params.crop_windows_numpy(hw[:, 0], hw[:, 1], d["area_u"], d["logr_u"], d["off_u"], 0.2)
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


def test_deterministic_and_reshuffled_every_epoch(folder30, tmp_path):
    c = cfg(folder30, tmp_path)
    loader = DaliTwoViewLoader(c, batch_size=4, rank=1, world_size=2, seed=5)
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
    caplog.set_level(logging.WARNING, logger="densecl_fast.data.plan")
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
    # 24 files = 4 full batches: every epoch plans each bad file once, and every occurrence counts,
    # substitutes that are bad too included -- the torch loader's count on the same files.
    warned = [r for r in caplog.records if "skipping unreadable image" in r.getMessage()]
    assert len(warned) == 4 and any("truncated.jpg" in r.getMessage() for r in warned)
    reference = TorchTwoViewLoader(cfg(d, tmp_path, backend="torch", num_workers=0), batch_size=6, seed=0)
    for epoch in range(3):
        epoch_batches(reference, epoch)
    assert loader.skipped == reference.skipped >= 3 * 4


def test_torch_and_dali_loaders_read_the_same_files_in_the_same_order(tmp_path, caplog):
    """Both backends over one folder with planted bad files, two ranks, two epochs: the same files
    fill the same places (substitutes included), the same skip counts, the same files logged once.
    Observed from what each loader read (`last_sources`: the files decoded by PIL / fed to DALI)."""
    d = tmp_path / "planted"
    for i in range(20):
        save(str(d / f"c{i % 2}" / f"{i:02d}.jpg"), textured(40 + i, 40, 52))
    data = open(save(str(tmp_path / "src.jpg"), textured(99, 48, 64)), "rb").read()
    planted = {"c0/truncated.jpg": data[: len(data) // 2],     # DALI finds these two only by decoding
               "c1/header_only.jpg": data[:300],
               "c0/garbage.jpg": np.random.RandomState(5).bytes(2000),
               "c1/empty.png": b"",
               "c0/notes.png": b"a text file with an image extension\n"}
    for name, blob in planted.items():
        (d / name).write_bytes(blob)
    runs = {}
    planted_places = 0
    for backend in ("torch", "dali"):
        run = []
        for rank in (0, 1):
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="densecl_fast.data.plan"):
                loader = build_loader(cfg(d, tmp_path, backend=backend, num_workers=0 if backend == "torch" else 2),
                                      batch_size=3, rank=rank, world_size=2, seed=1)
                assert len(loader) == 25 // 6
                for epoch in (0, 1):
                    sources = [src for _, _, src in epoch_batches(loader, epoch, sources=True)]
                    run.append((rank, epoch, sources, loader.skipped))
                    if backend == "torch":   # the places the sampler planned for bad files
                        loader.set_epoch(epoch)
                        planned = [loader.dataset.paths[i] for _, i in loader.sampler]
                        planted_places += sum(os.path.relpath(p, d) in planted for p in planned)
            logged = [r.args[0] for r in caplog.records if "skipping unreadable image" in r.getMessage()]
            assert len(logged) == len(set(logged)) == len(loader.bad_files)      # each bad file once
            run.append((rank, sorted(loader.bad_files), sorted(logged)))
        runs[backend] = run
    assert runs["torch"] == runs["dali"]
    read = {os.path.relpath(p, d) for rec in runs["dali"] if len(rec) == 4 for batch in rec[2] for p in batch}
    assert not read & set(planted) and len(read) == 20
    logged = {os.path.relpath(p, d) for rec in runs["dali"] if len(rec) == 3 for p in rec[2]}
    assert logged == set(planted)                     # every kind of bad file was met ...
    skipped = sum(rec[3] for rec in runs["torch"] if len(rec) == 4 and rec[1] == 1)
    assert skipped > planted_places                   # ... and some substitute was bad too


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
    caplog.set_level(logging.WARNING, logger="densecl_fast.data.plan")
    loader = DaliTwoViewLoader(cfg(",".join(paths), tmp_path), batch_size=4, seed=0)
    for epoch in range(2):
        batches = epoch_batches(loader, epoch, sources=True)
        assert len(batches) == 4 and all(q.shape[0] == 4 for q, _, _ in batches)
        assert not any("sample00005" in s for _, _, src in batches for s in src)
    assert loader.skipped == 2 and len(loader.bad_files) == 1


def test_options_come_from_the_data_dali_section(folder30, tmp_path):
    exact = cfg(folder30, tmp_path, dali=DaliConfig(hue="exact", prefetch=1))
    loader = build_loader(exact, batch_size=5, device=torch.device("cpu"), channels_last=True)
    q, _, _ = epoch_batches(loader, 0)[0]
    assert q.shape == (5, 3, 32, 32) and q.is_contiguous(memory_format=torch.channels_last)
    linear = epoch_batches(build_loader(cfg(folder30, tmp_path), batch_size=5, channels_last=True), 0)[0][0]
    assert not torch.equal(q, linear)          # the CPU default is the linear hue: the section was read
    with pytest.raises(ConfigError, match="data.dali.decoder='gpu'"):
        DaliTwoViewLoader(cfg(folder30, tmp_path, dali=DaliConfig(decoder="gpu")), batch_size=5)
    with pytest.raises(ValueError, match="data.dali.decoder=mixed needs a CUDA device"):
        DaliTwoViewLoader(cfg(folder30, tmp_path, dali=DaliConfig(decoder="mixed")), batch_size=5)


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
