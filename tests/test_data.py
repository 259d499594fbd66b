"""Data pipeline: augmentation recipe, sources, the built-in set, the torch two-view loader."""
import hashlib
import io
import logging
import math
import multiprocessing
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from densecl_fast.config import DataConfig
from densecl_fast.data import DataError
from densecl_fast.data import transforms as tr
from densecl_fast.data.sources import list_images, list_samples, load_rgb, scan_images
from densecl_fast.data.synthetic import CLASSES, ensure_synthetic, read_labels, render_scene
from densecl_fast.data.torch_loader import TorchTwoViewLoader, TwoViewDataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- helpers -----------------------------------------------------------------------------------

def rgb_array(seed, h=40, w=48):
    """Colourful, textured: smooth gradients plus noise, no two channels alike."""
    rs = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w) + 64], -1)
    return np.clip(base + rs.uniform(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)


def write_images(folder, n, seed=0, sub=None, ext="jpg"):
    d = os.path.join(folder, sub) if sub else folder
    os.makedirs(d, exist_ok=True)
    paths = []
    for i in range(n):
        p = os.path.join(d, f"img{i:03d}.{ext}")
        Image.fromarray(rgb_array(seed * 1000 + i)).save(p)
        paths.append(p)
    return paths


def jpeg_bytes(seed=0):
    b = io.BytesIO()
    Image.fromarray(rgb_array(seed, 64, 64)).save(b, "JPEG", quality=95)
    return b.getvalue()


def write_truncated(path):
    data = jpeg_bytes(7)
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def write_garbage(path):
    with open(path, "wb") as f:
        f.write(np.random.RandomState(3).bytes(2000))


def cfg(source, tmp_path, **kw):
    base = dict(source=str(source), image_size=32, min_scale=0.2, num_workers=0,
                cache_dir=str(tmp_path / "cache"), synthetic_images=24, synthetic_resolution=48)
    base.update(kw)
    return DataConfig(**base)


def collect(loader):
    return [(q.clone(), k.clone()) for q, k in loader]


def same_batches(a, b):
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def binomial_tol(p, n, z=4.5):
    return z * math.sqrt(p * (1 - p) / n)


# --- transforms --------------------------------------------------------------------------------

def test_param_rates_and_ranges_match_recipe():
    t = tr.ViewTransform(64, min_scale=0.2)
    img = Image.new("RGB", (100, 100))
    torch.manual_seed(0)
    n = 4000
    ps = [t.sample_params(img) for _ in range(n)]

    for name, p_expect, got in [
        ("flip", tr.FLIP_PROB, np.mean([p.flip for p in ps])),
        ("grayscale", tr.GRAYSCALE_PROB, np.mean([p.grayscale for p in ps])),
        ("blur", tr.BLUR_PROB, np.mean([p.blur_sigma is not None for p in ps])),
        ("jitter", tr.JITTER_PROB, np.mean([p.jitter is not None for p in ps])),
    ]:
        assert abs(got - p_expect) < binomial_tol(p_expect, n), (name, got)
    # The constants themselves are the recipe's (a wrong constant would pass the check above).
    assert (tr.FLIP_PROB, tr.GRAYSCALE_PROB, tr.BLUR_PROB, tr.JITTER_PROB) == (0.5, 0.2, 0.5, 0.8)
    assert tr.BLUR_SIGMA == (0.1, 2.0)

    area = np.array([p.crop[2] * p.crop[3] / 100.0 ** 2 for p in ps])
    ratio = np.array([p.crop[3] / p.crop[2] for p in ps])
    assert area.min() >= 0.2 * 0.97 and area.max() <= 1.0          # rounding of w, h: a few %
    assert ratio.min() >= 0.75 * 0.95 and ratio.max() <= 4 / 3 * 1.05
    assert abs(np.mean(np.log(ratio))) < 0.02                        # log-uniform, centred on 1
    # Uniform area in [0.2, 1], except that big crops at extreme ratios do not fit the square and
    # are redrawn: the top quarter is thinner.
    hist = np.histogram(area, bins=4, range=(0.2, 1.0))[0] / n
    assert all(0.24 < h < 0.35 for h in hist[:3]) and 0.06 < hist[3] < 0.2, hist
    assert 0.5 < area.mean() < 0.59

    sig = np.array([p.blur_sigma for p in ps if p.blur_sigma is not None])
    assert sig.min() >= 0.1 and sig.max() <= 2.0 and abs(sig.mean() - 1.05) < 0.05
    jit = np.array([p.jitter[1:] for p in ps if p.jitter is not None])
    for col, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1)]):
        assert jit[:, col].min() >= lo and jit[:, col].max() <= hi
        assert abs(jit[:, col].mean() - (lo + hi) / 2) < 0.02
    orders = {p.jitter[0] for p in ps if p.jitter is not None}
    assert len(orders) == 24 and all(sorted(o) == [0, 1, 2, 3] for o in orders)  # random op order


def test_min_scale_is_honoured():
    t = tr.ViewTransform(32, min_scale=0.6)
    img = Image.new("RGB", (90, 120))
    torch.manual_seed(1)
    area = [p.crop[2] * p.crop[3] / (90 * 120) for p in (t.sample_params(img) for _ in range(500))]
    assert min(area) >= 0.6 * 0.97 and max(area) <= 1.0


def test_augmentation_probabilities_and_strength_are_honoured():
    """Each probability switches its op alone: the other draws (crop, order, factors, sigma, flip)
    stay those of the recipe, so one knob changes one thing. Strength k scales the jitter ranges."""
    img = Image.new("RGB", (100, 100))
    n = 3000

    def params(aug):
        t = tr.ViewTransform(64, 0.2, aug)
        torch.manual_seed(3)
        return [t.sample_params(img) for _ in range(n)]

    recipe = params(tr.Augmentation())
    off = params(tr.Augmentation(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0))
    assert not any(p.jitter is not None or p.grayscale or p.blur_sigma is not None for p in off)
    assert [(p.crop, p.flip) for p in off] == [(p.crop, p.flip) for p in recipe]
    on = params(tr.Augmentation(jitter_prob=1.0, grayscale_prob=1.0, blur_prob=1.0))
    assert all(p.jitter is not None and p.grayscale and p.blur_sigma is not None for p in on)
    # Where the recipe fired an op, the always-on variant drew the very same parameters.
    assert all(r.jitter in (None, o.jitter) and r.blur_sigma in (None, o.blur_sigma) for r, o in zip(recipe, on))
    mixed = params(tr.Augmentation(jitter_prob=0.3, grayscale_prob=0.6, blur_prob=0.1))
    for name, p_expect, got in [("jitter", 0.3, sum(p.jitter is not None for p in mixed)),
                                ("grayscale", 0.6, sum(p.grayscale for p in mixed)),
                                ("blur", 0.1, sum(p.blur_sigma is not None for p in mixed))]:
        assert abs(got / n - p_expect) < binomial_tol(p_expect, n), (name, got / n)

    weak = params(tr.Augmentation(jitter_prob=1.0, jitter_strength=0.5))
    jit = np.array([p.jitter[1:] for p in weak])
    for col, half in enumerate([0.2, 0.2, 0.2, 0.05]):
        centre = 0.0 if col == 3 else 1.0
        assert centre - half <= jit[:, col].min() < centre - 0.95 * half
        assert centre + 0.95 * half < jit[:, col].max() <= centre + half
    assert [p.crop for p in weak] == [p.crop for p in recipe]


def test_augmentation_keys_default_to_the_recipe_and_are_checked(tmp_path):
    from densecl_fast.config import ConfigError, load_config
    d = load_config("smoke").data
    assert tr.Augmentation.of(d) == tr.Augmentation() == tr.Augmentation(
        tr.JITTER_PROB, tr.GRAYSCALE_PROB, tr.BLUR_PROB, 1.0)
    d = load_config("smoke", ["data.jitter_prob=0", "data.grayscale_prob=1", "data.blur_prob=0.25",
                              "data.jitter_strength=2.5"]).data
    assert tr.Augmentation.of(d) == tr.Augmentation(0.0, 1.0, 0.25, 2.5)
    for override, msg in [("data.jitter_prob=1.2", r"^data\.jitter_prob=1\.2 must be in \[0, 1\]$"),
                          ("data.grayscale_prob=-0.1", r"^data\.grayscale_prob=-0\.1 must be in \[0, 1\]$"),
                          ("data.blur_prob=nan", r"^data\.blur_prob=nan must be in \[0, 1\]$"),
                          ("data.jitter_strength=0", r"^data\.jitter_strength=0\.0 must be in \[1e-06, 2\.5\]"),
                          ("data.jitter_strength=3", r"^data\.jitter_strength=3\.0 must be in \[1e-06, 2\.5\]")]:
        with pytest.raises(ConfigError, match=msg):
            load_config("smoke", [override])
    # A config built in code reaches the loader unvalidated: the loader checks the keys itself.
    (tmp_path / "img").mkdir()
    write_images(str(tmp_path / "img"), 4)
    with pytest.raises(ConfigError, match=r"data\.blur_prob=2\.0 must be in \[0, 1\]"):
        TorchTwoViewLoader(cfg(tmp_path / "img", tmp_path, blur_prob=2.0), batch_size=2)


def test_a_jitter_strength_torchvision_rounds_away_is_refused():
    """At a strength <= 2^-54 / 0.4 torchvision's ColorJitter turns 1 +- 0.4 k into
    (1, 1), drops brightness, contrast and saturation and their three draws, and every later draw of
    the view (grayscale, blur, flip, the next view's crop) moved; the DALI draws would not. Strengths
    below data.jitter_strength's floor are refused, on every path (config, a DataConfig built in code,
    an Augmentation made directly)."""
    import torchvision.transforms as T
    from densecl_fast.config import JITTER_STRENGTH_MIN, ConfigError, load_config
    collapsing = 2.0 ** -54 / 0.4
    assert T.ColorJitter(*tr.Augmentation().jitter_ranges()[:3]).brightness is not None
    assert T.ColorJitter(0.4 * collapsing).brightness is None       # the premise, in torchvision
    assert T.ColorJitter(0.4 * JITTER_STRENGTH_MIN).brightness is not None
    for k in (collapsing, 3e-16, 1e-7):
        with pytest.raises(ConfigError, match=rf"^data\.jitter_strength={k} must be in \[1e-06, 2\.5\]"):
            load_config("smoke", [f"data.jitter_strength={k}"])
        with pytest.raises(ConfigError, match="data.jitter_strength"):
            tr.Augmentation(jitter_strength=k)
    # at the floor, the jitter still draws its factors: every other draw is the recipe's
    img = Image.new("RGB", (100, 100))

    def params(aug):
        t = tr.ViewTransform(64, 0.2, aug)
        torch.manual_seed(5)
        return [t.sample_params(img) for _ in range(200)]
    recipe, floor = params(tr.Augmentation()), params(tr.Augmentation(jitter_strength=JITTER_STRENGTH_MIN))
    assert [(p.crop, p.grayscale, p.blur_sigma, p.flip) for p in floor] == \
        [(p.crop, p.grayscale, p.blur_sigma, p.flip) for p in recipe]
    assert all(abs(f - 1.0) < 1e-6 for p in floor if p.jitter for f in p.jitter[1:4])  # drawn in float32


def test_torch_loader_follows_the_augmentation_keys(tmp_path):
    """End to end: a flat-coloured image comes out unchanged (only normalised) in every view when
    jitter and grayscale are off (crop, flip and blur leave a flat image as it is), grey in every
    view with grayscale_prob=1; the recipe changes some views."""
    colour = (190, 70, 40)
    d = tmp_path / "flat"
    d.mkdir()
    for i in range(8):
        Image.new("RGB", (40, 48), colour).save(d / f"{i}.png")
    want = ((torch.tensor(colour) / 255.0 - torch.tensor(tr.IMAGENET_MEAN)) / torch.tensor(tr.IMAGENET_STD))

    def views(**kw):
        batches = collect(TorchTwoViewLoader(cfg(d, tmp_path, **kw), batch_size=4, seed=1))
        return torch.cat([torch.cat([q, k]) for q, k in batches])     # 16 views, N x 3 x 32 x 32

    plain = views(jitter_prob=0.0, grayscale_prob=0.0)
    assert torch.allclose(plain, want.view(1, 3, 1, 1).expand_as(plain), atol=1e-5)
    grey = tr.denormalize(views(grayscale_prob=1.0))
    assert (grey[:, 0] - grey[:, 1]).abs().max() < 1e-5 and (grey[:, 1] - grey[:, 2]).abs().max() < 1e-5
    recipe = views()
    changed = (recipe - want.view(1, 3, 1, 1)).abs().amax(dim=(1, 2, 3)) > 0.02
    assert 0 < int(changed.sum()) <= len(recipe)


def identity(**kw):
    base = dict(crop=(0, 0, 40, 48), jitter=None, grayscale=False, blur_sigma=None, flip=False)
    base.update(kw)
    return tr.ViewParams(**base)


def test_apply_does_what_the_params_say():
    img = Image.fromarray(rgb_array(5))                 # 48 x 40
    t = tr.ViewTransform(32)
    base = t.apply(img, identity())
    assert base.shape == (3, 32, 32) and base.dtype == torch.float32

    assert torch.equal(t.apply(img, identity(flip=True)), base.flip(-1))

    gray = tr.denormalize(t.apply(img, identity(grayscale=True)))
    assert (gray[0] - gray[1]).abs().max() < 1e-5 and (gray[1] - gray[2]).abs().max() < 1e-5
    assert (tr.denormalize(base)[0] - tr.denormalize(base)[1]).abs().max() > 0.2

    def roughness(x):
        return (x[..., 1:] - x[..., :-1]).abs().mean()
    blurred = t.apply(img, identity(blur_sigma=2.0))
    assert roughness(blurred) < 0.5 * roughness(base)
    assert torch.allclose(tr.denormalize(blurred),
                          tr.gaussian_blur(tr.denormalize(base), t.blur_kernel, 2.0), atol=1e-5)

    brighter = t.apply(img, identity(jitter=((0, 1, 2, 3), 1.3, 1.0, 1.0, 0.0)))
    ratio = tr.denormalize(brighter).mean() / tr.denormalize(base).mean()
    assert 1.2 < ratio < 1.35

    # A crop box is a crop of the source: same as transforming the cropped image whole.
    box = identity(crop=(4, 10, 20, 24))                # top, left, h, w
    whole = identity(crop=(0, 0, 20, 24))
    assert torch.equal(t.apply(img, box), t.apply(img.crop((10, 4, 34, 24)), whole))


def test_call_draws_params_then_applies_them():
    img = Image.fromarray(rgb_array(6))
    t = tr.ViewTransform(32)
    for s in range(5):
        torch.manual_seed(s)
        expect = t.apply(img, t.sample_params(img))
        torch.manual_seed(s)
        assert torch.equal(t(img), expect)
    # End to end on the outputs: about 20% of views come out gray.
    torch.manual_seed(0)
    n = 600
    gray = 0
    for _ in range(n):
        x = tr.denormalize(t(img))
        gray += bool((x[0] - x[1]).abs().max() < 1e-5)
    assert abs(gray / n - tr.GRAYSCALE_PROB) < binomial_tol(tr.GRAYSCALE_PROB, n)


@pytest.mark.parametrize("k,sigma", [(13, 0.1), (13, 2.0), (7, 1.0), (23, 1.7)])
def test_gaussian_blur_equals_torchvision(k, sigma):
    x = torch.rand(3, 40, 56, generator=torch.Generator().manual_seed(k))
    ref = TF.gaussian_blur(x, [k, k], [sigma, sigma])
    assert torch.allclose(tr.gaussian_blur(x, k, sigma), ref, atol=2e-6)


def test_blur_kernel_size():
    assert tr.blur_kernel_size(224) == 23          # SimCLR's 10%, odd
    assert tr.blur_kernel_size(160) == 17
    assert tr.blur_kernel_size(96) == 13           # floored at +-3 sigma_max
    assert all(tr.blur_kernel_size(s) % 2 == 1 for s in range(32, 600))


def test_normalisation_and_two_views():
    t = tr.ViewTransform(32)
    mean_rgb = tuple(round(m * 255) for m in tr.IMAGENET_MEAN)
    assert t.apply(Image.new("RGB", (48, 40), mean_rgb), identity()).abs().max() < 0.02
    white = t.apply(Image.new("RGB", (48, 40), (255, 255, 255)), identity())
    expect = torch.tensor([(1 - m) / s for m, s in zip(tr.IMAGENET_MEAN, tr.IMAGENET_STD)])
    assert torch.allclose(white.mean((1, 2)), expect, atol=1e-5)

    q, k = tr.TwoViewTransform(32)(Image.fromarray(rgb_array(9)))
    assert q.shape == k.shape == (3, 32, 32) and q.dtype == k.dtype == torch.float32
    assert not torch.equal(q, k)


# --- sources -----------------------------------------------------------------------------------

def test_list_folder_recursive_sorted_any_case(tmp_path):
    (tmp_path / "b" / "deep").mkdir(parents=True)
    (tmp_path / "a").mkdir()
    (tmp_path / ".hidden").mkdir()
    for rel in ["b/deep/y.PNG", "a/x.JPG", "a/w.jpeg", "z.webp", "b/t.Tif", "b/q.bmp", ".hidden/h.jpg"]:
        Image.new("RGB", (8, 8)).save(tmp_path / rel, format=Image.registered_extensions()[os.path.splitext(rel)[1].lower()])
    (tmp_path / "a" / "notes.txt").write_text("x")
    samples = list_samples(cfg(tmp_path, tmp_path))
    rel = [os.path.relpath(s.path, tmp_path) for s in samples]
    assert rel == ["a/w.jpeg", "a/x.JPG", "b/deep/y.PNG", "b/q.bmp", "b/t.Tif", "z.webp"]
    assert [s.label for s in samples] == ["a", "a", "b", "b", "b", None]
    assert all(os.path.isabs(p) for p in list_images(cfg(tmp_path, tmp_path)))


def test_file_list_parsing(tmp_path):
    imgs = write_images(str(tmp_path / "data"), 3)
    spaced = tmp_path / "data" / "with space.jpg"
    Image.new("RGB", (8, 8)).save(spaced)
    lst = tmp_path / "lists" / "train.txt"
    lst.parent.mkdir()
    lst.write_text(f"# comment\n\n../data/img000.jpg 7\n  {imgs[1]}  \n../data/img002.jpg\tdog\n../data/with space.jpg\n")
    samples = list_samples(cfg(lst, tmp_path))
    assert [s.path for s in samples] == [imgs[0], imgs[1], imgs[2], str(spaced)]
    assert [s.label for s in samples] == ["7", None, "dog", None]
    # data.root overrides the list's folder for relative paths.
    rooted = tmp_path / "rooted.txt"
    rooted.write_text("img001.jpg\nimg002.jpg 3\n")
    assert list_images(cfg(rooted, tmp_path, root=str(tmp_path / "data"))) == imgs[1:]


def test_dali_keys_are_one_section_and_old_flat_keys_say_where_they_went(tmp_path):
    from densecl_fast.config import ConfigError, config_from_dict, config_to_dict, load_config
    cfg = load_config("smoke", ["data.dali.decoder=cpu", "data.dali.prefetch=3"])
    assert (cfg.data.dali.decoder, cfg.data.dali.prefetch, cfg.data.dali.hue) == ("cpu", 3, "auto")
    with pytest.raises(ConfigError, match=r"data\.dali\.hue='hsv': use auto, exact or linear"):
        load_config("smoke", ["data.dali.hue=hsv"])
    with pytest.raises(ConfigError, match=r"^data\.dali_decoder was replaced by data\.dali\.decoder "):
        load_config("smoke", ["data.dali_decoder=cpu"])
    old_yaml = tmp_path / "old.yaml"
    old_yaml.write_text("data:\n  dali_shuffle_buffer: 64\n")
    with pytest.raises(ConfigError, match=r"data\.dali_shuffle_buffer was replaced by data\.dali\.shuffle_buffer"):
        load_config(str(old_yaml))
    # A checkpoint's saved config with a flat key: refused the same way (nothing to migrate from before 1.0).
    d = config_to_dict(load_config("smoke"))
    d["data"].update(dali_hw_decoder_load=0.5)
    with pytest.raises(ConfigError, match=r"^data\.dali_hw_decoder_load was replaced by data\.dali\.hw_decoder_load "):
        config_from_dict(d)


def test_data_errors_are_helpful(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list_images(cfg(tmp_path / "nope", tmp_path))
    with pytest.raises(DataError, match="empty"):
        list_images(cfg("", tmp_path))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.md").write_text("x")
    with pytest.raises(DataError, match="no images"):
        list_images(cfg(tmp_path / "empty", tmp_path))

    write_images(str(tmp_path / "d"), 2)
    lst = tmp_path / "list.txt"
    lst.write_text("d/img000.jpg\nd/gone1.jpg\nd/img001.jpg\nd/gone2.jpg 4\nd/gone3.jpg\n")
    with pytest.raises(DataError) as e:
        list_images(cfg(lst, tmp_path))
    msg = str(e.value)
    assert "3 of 5" in msg and "gone1.jpg" in msg and "scan_data" in msg

    (tmp_path / "blank.txt").write_text("# nothing\n\n")
    with pytest.raises(DataError, match="no images"):
        list_images(cfg(tmp_path / "blank.txt", tmp_path))
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(DataError, match="not a .txt"):
        list_images(cfg(tmp_path / "x.csv", tmp_path))
    with pytest.raises(DataError, match="shard"):
        list_images(cfg(str(tmp_path / "shards-*.tar"), tmp_path))
    with pytest.raises(DataError, match="fewer than one global batch"):
        TorchTwoViewLoader(cfg(tmp_path / "d", tmp_path), batch_size=2, world_size=2)


def write_odd_modes(folder):
    """One file per awkward mode -> {name: path}; plus the pixel that tells compositing apart."""
    os.makedirs(folder, exist_ok=True)
    rgb = rgb_array(11)
    out = {}

    def save(name, img, **kw):
        out[name] = os.path.join(folder, name)
        img.save(out[name], **kw)
    save("gray.jpg", Image.fromarray(rgb).convert("L"))
    save("cmyk.jpg", Image.fromarray(rgb).convert("CMYK"))
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[:, :8, 3] = 0                                   # left strip fully transparent
    save("rgba.png", Image.fromarray(rgba, "RGBA"))
    save("la.png", Image.fromarray(rgba, "RGBA").convert("LA"))
    save("alpha.webp", Image.fromarray(rgba, "RGBA"), lossless=True)
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal_arr = np.array(pal)
    pal_arr[:, :8] = 15
    pal = Image.fromarray(pal_arr, "P")
    pal.putpalette(Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).getpalette())
    save("palette.png", pal, transparency=15)
    save("palette_opaque.png", Image.fromarray(rgb).convert("P"))
    i16 = np.zeros(rgb.shape[:2], np.uint16)
    i16[:, :16], i16[:, 16:32] = 65535, 32768
    save("deep16.png", Image.fromarray(i16))
    save("plain.bmp", Image.fromarray(rgb))
    save("plain.tif", Image.fromarray(rgb))
    return out


def test_any_mode_becomes_rgb(tmp_path):
    files = write_odd_modes(str(tmp_path))
    assert Image.open(files["deep16.png"]).mode == "I;16" and Image.open(files["cmyk.jpg"]).mode == "CMYK"
    for name, path in files.items():
        img = load_rgb(path)
        assert img.mode == "RGB" and img.size == (48, 40), name
    for name in ("rgba.png", "la.png", "alpha.webp", "palette.png"):   # transparency -> white
        a = np.asarray(load_rgb(files[name]))
        assert (a[:, :8] == 255).all(), name
        assert (a[:, 8:] < 250).any(), name
    deep = np.asarray(load_rgb(files["deep16.png"]))    # scaled to 8 bits, not clipped
    assert (deep[0, 0] == 255).all() and (deep[0, 20] == 128).all() and (deep[0, 40] == 0).all()


def test_scan_images_finds_truncated_and_garbage(tmp_path):
    good = write_images(str(tmp_path), 3)
    write_truncated(tmp_path / "trunc.jpg")
    write_garbage(tmp_path / "garbage.png")
    paths = good[:1] + [str(tmp_path / "trunc.jpg")] + good[1:] + [str(tmp_path / "garbage.png")]
    ok, bad = scan_images(paths, workers=2)
    assert ok == good
    assert [b[0] for b in bad] == [str(tmp_path / "trunc.jpg"), str(tmp_path / "garbage.png")]
    assert "truncated" in bad[0][1] and "UnidentifiedImageError" in bad[1][1]


# --- the loader --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folder24(tmp_path_factory):
    d = tmp_path_factory.mktemp("f24")
    write_images(str(d), 12, seed=1, sub="cat")
    write_images(str(d), 12, seed=2, sub="dog", ext="png")
    return d


def test_loader_shapes_len_and_channels_last(folder24, tmp_path):
    loader = TorchTwoViewLoader(cfg(folder24, tmp_path), batch_size=5, seed=0, channels_last=True)
    assert len(loader) == 24 // 5
    loader.set_epoch(0)
    batches = collect(loader)
    assert len(batches) == 4
    for q, k in batches:
        assert q.shape == k.shape == (5, 3, 32, 32) and q.dtype == torch.float32
        assert q.is_contiguous(memory_format=torch.channels_last)
        assert not torch.equal(q, k)
    assert loader.skipped == 0


def test_deterministic_across_workers_and_runs(folder24, tmp_path):
    def run(workers, epoch, seed=0):
        loader = TorchTwoViewLoader(cfg(folder24, tmp_path, num_workers=workers), batch_size=4, seed=seed)
        loader.set_epoch(epoch)
        return collect(loader)
    ref = run(0, 1)
    assert len(ref) == 6
    assert same_batches(run(2, 1), ref)
    assert same_batches(run(0, 1), ref)
    assert not torch.equal(run(0, 2)[0][0], ref[0][0])            # another epoch: new order/views
    assert not torch.equal(run(0, 1, seed=1)[0][0], ref[0][0])    # another seed too


def test_resume_skips_through_the_sampler(folder24, tmp_path, monkeypatch):
    loader = TorchTwoViewLoader(cfg(folder24, tmp_path), batch_size=4, seed=3)
    loader.set_epoch(2)
    full = collect(loader)
    loaded = []
    original = TwoViewDataset.__getitem__
    monkeypatch.setattr(TwoViewDataset, "__getitem__", lambda self, key: (loaded.append(key), original(self, key))[1])
    loader.set_epoch(2, start_step=4)
    rest = collect(loader)
    assert same_batches(rest, full[4:])
    assert len(loaded) == 2 * 4                                   # skipped batches were never loaded
    loader.set_epoch(2, start_step=len(loader))
    assert collect(loader) == []
    with pytest.raises(ValueError):
        loader.set_epoch(2, start_step=len(loader) + 1)


def test_rank_sharding(tmp_path):
    d = tmp_path / "d30"
    write_images(str(d), 30)
    loaders = [TorchTwoViewLoader(cfg(d, tmp_path), batch_size=4, rank=r, world_size=2, seed=5) for r in (0, 1)]
    assert len(loaders[0]) == len(loaders[1]) == 30 // 8
    shards = []
    for lo in loaders:
        lo.set_epoch(1)
        keys = list(lo.sampler)
        assert len(keys) == 3 * 4 and all(e == 1 for e, _ in keys)
        shards.append({i for _, i in keys})
        assert len(shards[-1]) == 12
    assert not shards[0] & shards[1]
    # The images are the sampler's: rank 1's first batch is its first four keys.
    q, k = next(iter(loaders[1]))
    items = [loaders[1].dataset[key] for key in list(loaders[1].sampler)[:4]]
    assert torch.equal(q, torch.stack([it[0] for it in items]))
    assert torch.equal(k, torch.stack([it[1] for it in items]))


def test_bad_files_are_replaced_counted_and_warned_once(tmp_path, caplog):
    d = tmp_path / "mixed"
    write_images(str(d), 14)
    write_truncated(d / "trunc.jpg")
    write_garbage(d / "garbage.jpg")
    runs = {}
    for workers in (0, 2):
        loader = TorchTwoViewLoader(cfg(d, tmp_path, num_workers=workers), batch_size=4, seed=0)
        with caplog.at_level(logging.WARNING, logger="densecl_fast.data.plan"):
            caplog.clear()
            batches = []
            for epoch in (0, 1):
                loader.set_epoch(epoch)
                batches += collect(loader)
        warned = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
        assert len(batches) == 8 and all(q.shape == (4, 3, 32, 32) for q, _ in batches)
        assert loader.bad_files == {str(d / "trunc.jpg"), str(d / "garbage.jpg")}
        assert loader.skipped >= 4                                 # both files, in both epochs
        assert len(warned) == 2                                    # but one warning per file
        runs[workers] = (batches, loader.skipped)
    assert runs[0][1] == runs[2][1]                                # counts summed over workers
    assert same_batches(runs[0][0], runs[2][0])


def test_odd_modes_through_the_loader(tmp_path):
    d = tmp_path / "modes"
    write_odd_modes(str(d))
    write_truncated(d / "trunc.jpg")
    loader = TorchTwoViewLoader(cfg(d, tmp_path), batch_size=11, seed=0)
    (q, k), = collect(loader)
    assert q.shape == (11, 3, 32, 32) and torch.isfinite(q).all() and torch.isfinite(k).all()
    assert loader.skipped >= 1 and loader.bad_files == {str(d / "trunc.jpg")}


# --- the built-in data set ---------------------------------------------------------------------

def tree_hash(folder):
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(folder)):
        dirnames.sort()
        for f in sorted(filenames):
            p = os.path.join(dirpath, f)
            h.update(os.path.relpath(p, folder).encode())
            h.update(open(p, "rb").read())
    return h.hexdigest()


def test_synthetic_set_is_deterministic_and_consistent(tmp_path):
    a = ensure_synthetic(str(tmp_path / "one"), 24, 64)
    b = ensure_synthetic(str(tmp_path / "two"), 24, 64)
    assert os.path.basename(a) == "synthetic-v1-24-64"
    assert tree_hash(a) == tree_hash(b)
    mtime = os.path.getmtime(os.path.join(a, "labels.json"))
    assert ensure_synthetic(str(tmp_path / "one"), 24, 64) == a                  # reused, not rebuilt
    assert os.path.getmtime(os.path.join(a, "labels.json")) == mtime

    meta = read_labels(a)
    assert meta["classes"] == list(CLASSES) and len(meta["images"]) == 24
    assert len({e["label"] for e in meta["images"]}) >= 4
    for i, e in enumerate(meta["images"]):
        mask = np.asarray(Image.open(os.path.join(a, e["mask"])))
        img = np.asarray(Image.open(os.path.join(a, e["image"])))
        assert mask.shape == (64, 64) and img.shape == (64, 64, 3) and mask.max() <= len(CLASSES)
        assert e["image"].split("/")[1] == CLASSES[e["label"]]
        visible = {}
        for o in e["objects"]:
            visible[o["class"]] = visible.get(o["class"], 0) + o["visible"]
        for c in range(len(CLASSES)):
            assert (mask == c + 1).sum() == visible.get(c, 0)
        assert e["label"] == max(e["objects"], key=lambda o: o["visible"])["class"]
        assert (mask > 0).sum() < mask.size                                     # some background
        rgb, mask2, _ = render_scene(i, 64)
        assert np.array_equal(mask, mask2)
        assert np.abs(img.astype(int) - rgb).mean() < 10     # its JPEG (another scene: ~60)

    paths = list_images(cfg("synthetic", tmp_path, cache_dir=str(tmp_path / "one"),
                            synthetic_images=24, synthetic_resolution=64))
    assert len(paths) == 24 and all(p.startswith(os.path.join(a, "images")) for p in paths)


def _race(cache):
    ensure_synthetic(cache, 40, 48)


def test_synthetic_generation_survives_a_race(tmp_path):
    cache = str(tmp_path / "race")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_race, args=(cache,)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert os.listdir(cache) == ["synthetic-v1-40-48"]                          # no temp folders left
    assert len(read_labels(os.path.join(cache, "synthetic-v1-40-48"))["images"]) == 40
    assert tree_hash(os.path.join(cache, "synthetic-v1-40-48")) == \
        tree_hash(ensure_synthetic(str(tmp_path / "solo"), 40, 48))


# --- scan_data ---------------------------------------------------------------------------------

def test_scan_data_cli(tmp_path, capsys):
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    try:
        import scan_data
    finally:
        sys.path.pop(0)
    d = tmp_path / "ds"
    good = write_images(str(d), 4, sub="cat")
    write_truncated(d / "cat" / "trunc.jpg")
    write_garbage(d / "cat" / "garbage.jpg")
    out = tmp_path / "clean.txt"
    assert scan_data.main([str(d), "--out", str(out), "--workers", "2"]) == 0
    err = capsys.readouterr().err
    assert "trunc.jpg" in err and "garbage.jpg" in err and "dropped 2" in err
    assert out.read_text().splitlines() == [f"{p} cat" for p in good]
    assert len((tmp_path / "clean.txt.dropped.txt").read_text().splitlines()) == 2
    # The clean list is a valid source whose labels survive.
    assert [s.label for s in list_samples(cfg(out, tmp_path))] == ["cat"] * 4

    # A list with a missing entry: reported as dropped, not an error.
    lst = tmp_path / "in.txt"
    lst.write_text(f"{good[0]}\nmissing.jpg\n")
    assert scan_data.main([str(lst), "--out", str(out)]) == 0
    assert "missing file" in capsys.readouterr().err and out.read_text().splitlines() == [good[0]]
    assert scan_data.main([str(tmp_path / "nowhere"), "--out", str(out)]) == 2

    # And it runs as a script from anywhere.
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "scan_data.py"), str(d),
                        "--out", str(tmp_path / "c2.txt")], capture_output=True, text=True, cwd=str(tmp_path))
    assert r.returncode == 0 and "garbage.jpg" in r.stderr
    assert len((tmp_path / "c2.txt").read_text().splitlines()) == 4
