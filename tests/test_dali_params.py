"""The DALI backend's host side, without DALI: the per-sample draws, crop windows, jitter stages
(`data/dali/params.py`) and header sizes (`data/headers.py`), against torchvision's rules."""
import math

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

from densecl_fast.data import transforms as tr
from densecl_fast.data.dali import params
from densecl_fast.data.headers import file_hw, image_hw
from helpers import binomial_ok, draws, save, textured


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
    again = params.draw_view_params(3, 5, keys, 0)
    for key in d:
        np.testing.assert_array_equal(again[key], d[key][keys])
    other = (params.draw_view_params(3, 6, keys, 0), params.draw_view_params(4, 5, keys, 0), params.draw_view_params(3, 5, keys, 1))
    for o in other:
        assert not np.array_equal(o["area_u"], again["area_u"])


def test_draws_follow_the_augmentation_keys():
    """data.jitter_prob, grayscale_prob, blur_prob set the flags' rates and data.jitter_strength
    the factor ranges; every other draw is the recipe's, so one knob changes one thing."""
    n = 20000
    recipe = draws(n, seed=4)
    aug = tr.Augmentation(jitter_prob=0.3, grayscale_prob=0.0, blur_prob=1.0, jitter_strength=0.5)
    d = params.draw_view_params(4, 0, np.arange(n), 0, augmentation=aug)
    assert binomial_ok(int(d["jitter"].sum()), n, 0.3), d["jitter"].mean()
    assert not d["gray"].any() and d["blur"].all()
    for key in ("area_u", "logr_u", "off_u", "flip", "order", "sigma"):
        np.testing.assert_array_equal(d[key], recipe[key])
    # Factors 1 + 0.4k(2u - 1) and hue 0.1k(2u - 1): the recipe's deviations scaled by k.
    np.testing.assert_allclose(d["factors"][:, :3] - 1.0, 0.5 * (recipe["factors"][:, :3] - 1.0), atol=1e-6)
    np.testing.assert_allclose(d["factors"][:, 3], 0.5 * recipe["factors"][:, 3], atol=1e-7)
    # The recipe's augmentation is the default, and the per-op overrides still win over it.
    same = params.draw_view_params(4, 0, np.arange(n), 0, augmentation=tr.Augmentation())
    for key in recipe:
        np.testing.assert_array_equal(same[key], recipe[key])
    assert not params.draw_view_params(4, 0, np.arange(n), 0, augmentation=aug, blur_p=0.0)["blur"].any()


def test_the_draws_hold_one_area_and_aspect_per_crop_attempt_and_share_no_column():
    d = params.draw_view_params(0, 0, np.arange(4), 0)
    assert d["area_u"].shape == d["logr_u"].shape == (4, params.CROP_ATTEMPTS)
    cols = []
    for name in dir(params):
        if name.startswith("_U_"):
            at = getattr(params, name)
            cols += list(range(at.start, at.stop)) if isinstance(at, slice) else [at]
    assert sorted(cols) == list(range(params.N_UNIFORMS))


def test_crop_windows_follow_torchvision_rule():
    n, H, W = 6000, 75, 100
    d = draws(n, seed=1)
    top, left, h, w = params.crop_windows_numpy(np.full(n, H), np.full(n, W), d["area_u"], d["logr_u"], d["off_u"], 0.2).T
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
        got = params.crop_windows_numpy([H2], [W2], big, lr, np.zeros((1, 2)), 0.2)[0]
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
    pre, post = params.jitter_stages(d["factors"], d["order"])

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
        assert file_hw(save(str(tmp_path / f"x.{ext}"), a, **kw)) == (37, 53)
    p = save(str(tmp_path / "prog.jpg"), a, progressive=True)
    assert file_hw(p) == (37, 53)
    assert image_hw(b"") is None and image_hw(b"garbage bytes") is None
    data = open(p, "rb").read()
    assert image_hw(data[:100]) is None   # ends before the frame header
