"""The MoCo-v2 / DenseCL augmentation of one view, and the two-view wrapper.

Per view, in the recipe's order:
    RandomResizedCrop(size, scale=(min_scale, 1), ratio=(3/4, 4/3))
    ColorJitter(0.4, 0.4, 0.4, 0.1)            with p = 0.8
    RandomGrayscale                            with p = 0.2
    GaussianBlur(sigma ~ U[0.1, 2.0])          with p = 0.5
    RandomHorizontalFlip                       with p = 0.5
    ToTensor, Normalize(ImageNet mean/std)

The jitter, grayscale and blur probabilities and the jitter strength (a factor on the four jitter
ranges) are configurable (`Augmentation`, from data.jitter_prob, ...) for data the recipe does not
suit, e.g. small greyscale images; the defaults are the recipe's.

The random draws are separated from their application (`sample_params` / `apply`) so that tests
can measure the rates exactly and check that `apply` does what the drawn parameters say. The
draws use torchvision's own `get_params` and the global torch RNG, so seeding torch before a call
(as the loader does per sample) makes a view reproducible. The constants are public so that
other backends (DALI) implement the same recipe.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image

from ..config import validate_augmentation

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
JITTER_PROB = 0.8
JITTER_BRIGHTNESS = 0.4
JITTER_CONTRAST = 0.4
JITTER_SATURATION = 0.4
JITTER_HUE = 0.1
GRAYSCALE_PROB = 0.2
BLUR_PROB = 0.5
BLUR_SIGMA = (0.1, 2.0)
FLIP_PROB = 0.5


@dataclass(frozen=True)
class Augmentation:
    """The configurable part of the recipe; the defaults are MoCo-v2's. Both backends take it."""
    jitter_prob: float = JITTER_PROB
    grayscale_prob: float = GRAYSCALE_PROB
    blur_prob: float = BLUR_PROB
    jitter_strength: float = 1.0      # multiplies brightness/contrast/saturation 0.4 and hue 0.1

    def __post_init__(self):
        # Checked however it is made (a config built in code, a test, the DALI params): a strength
        # torchvision rounds away would move the torch backend's draws and not DALI's.
        validate_augmentation(self)

    @classmethod
    def of(cls, data_cfg) -> "Augmentation":
        """From a `config.DataConfig`, checked (a config built in code reaches the loaders unvalidated)."""
        validate_augmentation(data_cfg)
        return cls(float(data_cfg.jitter_prob), float(data_cfg.grayscale_prob), float(data_cfg.blur_prob),
                   float(data_cfg.jitter_strength))

    def jitter_ranges(self) -> Tuple[float, float, float, float]:
        """Brightness, contrast, saturation and hue strengths (ColorJitter's arguments)."""
        k = self.jitter_strength
        return JITTER_BRIGHTNESS * k, JITTER_CONTRAST * k, JITTER_SATURATION * k, JITTER_HUE * k


def blur_kernel_size(image_size: int) -> int:
    """Odd Gaussian kernel side for views of `image_size` pixels.

    SimCLR's rule, ~10% of the side rounded to odd (23 at 224), so the blur scales with the
    view. It is floored at 2*ceil(3*sigma_max)+1 = 13 because a kernel narrower than +-3 sigma
    renormalises away the tails and blurs less than the drawn sigma says (at 96 px the 10% rule
    alone would give 9, i.e. +-2 sigma at sigma = 2).
    """
    ten_percent = int(0.1 * image_size) // 2 * 2 + 1
    three_sigma = 2 * math.ceil(3 * BLUR_SIGMA[1]) + 1
    return max(ten_percent, three_sigma)


def _blur_matrix(n: int, weights: torch.Tensor) -> torch.Tensor:
    """n x n matrix of a 1-D convolution with reflect padding (torchvision's border rule)."""
    half = len(weights) // 2
    src = torch.arange(n)[:, None] + torch.arange(-half, half + 1)[None]
    src = src.abs()                                        # reflect at 0, edge not repeated
    src = torch.where(src > n - 1, 2 * (n - 1) - src, src)  # reflect at n-1
    m = torch.zeros(n, n, dtype=weights.dtype)
    return m.scatter_add_(1, src, weights.expand(n, -1).contiguous())


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Same result as torchvision's F.gaussian_blur on a float C x H x W tensor, computed as two
    banded matrix products (the separable kernel), 5-10x faster than its dense 2-D convolution."""
    half = (kernel_size - 1) * 0.5
    t = torch.linspace(-half, half, kernel_size, dtype=x.dtype)
    w = torch.exp(-0.5 * (t / sigma) ** 2)
    w = w / w.sum()
    return _blur_matrix(x.shape[-2], w) @ x @ _blur_matrix(x.shape[-1], w).T


@dataclass(frozen=True)
class ViewParams:
    crop: Tuple[int, int, int, int]          # top, left, height, width in the source image
    jitter: Optional[Tuple[Tuple[int, ...], float, float, float, float]]  # (order, b, c, s, h) or None
    grayscale: bool
    blur_sigma: Optional[float]              # None = no blur
    flip: bool


class ViewTransform:
    """One augmented view: PIL RGB image -> float32 tensor 3 x size x size, normalised."""

    def __init__(self, image_size: int, min_scale: float = 0.2, augmentation: Augmentation = Augmentation()):
        self.image_size = int(image_size)
        self.scale = (float(min_scale), 1.0)
        self.aug = augmentation
        self.blur_kernel = blur_kernel_size(self.image_size)
        # ColorJitter turns the scalar strengths into the (min, max) ranges its get_params wants.
        self._jitter_ranges = T.ColorJitter(*augmentation.jitter_ranges())

    def sample_params(self, img: Image.Image) -> ViewParams:
        # Every parameter is drawn whether or not its op fires, so a view always consumes the same
        # amount of randomness: keeps the draws of later ops aligned when one probability changes.
        crop = T.RandomResizedCrop.get_params(img, list(self.scale), list(CROP_RATIO))
        j = self._jitter_ranges
        order, b, c, s, h = T.ColorJitter.get_params(j.brightness, j.contrast, j.saturation, j.hue)
        jitter_on = torch.rand(1).item() < self.aug.jitter_prob
        gray = torch.rand(1).item() < self.aug.grayscale_prob
        sigma = T.GaussianBlur.get_params(*BLUR_SIGMA)
        blur_on = torch.rand(1).item() < self.aug.blur_prob
        flip = torch.rand(1).item() < FLIP_PROB
        return ViewParams(
            crop=tuple(int(v) for v in crop),
            jitter=(tuple(int(i) for i in order), b, c, s, h) if jitter_on else None,
            grayscale=gray,
            blur_sigma=sigma if blur_on else None,
            flip=flip,
        )

    def apply(self, img: Image.Image, p: ViewParams) -> torch.Tensor:
        top, left, h, w = p.crop
        size = [self.image_size, self.image_size]
        img = F.resized_crop(img, top, left, h, w, size, interpolation=T.InterpolationMode.BILINEAR, antialias=True)
        if p.jitter is not None:
            order, b, c, s, hue = p.jitter
            ops = (lambda x: F.adjust_brightness(x, b), lambda x: F.adjust_contrast(x, c),
                   lambda x: F.adjust_saturation(x, s), lambda x: F.adjust_hue(x, hue))
            for i in order:
                img = ops[i](img)
        if p.grayscale:
            img = F.rgb_to_grayscale(img, num_output_channels=3)
        x = F.to_tensor(img)
        # Blur and flip run on the float tensor: one uint8 round trip fewer than torchvision's
        # PIL path, and a flip commutes with the symmetric blur anyway.
        if p.blur_sigma is not None:
            x = gaussian_blur(x, self.blur_kernel, p.blur_sigma)
        if p.flip:
            x = x.flip(-1)
        return F.normalize(x, IMAGENET_MEAN, IMAGENET_STD)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.apply(img, self.sample_params(img))


class TwoViewTransform:
    """Two views drawn independently from one decoded image (query, key)."""

    def __init__(self, image_size: int, min_scale: float = 0.2, augmentation: Augmentation = Augmentation()):
        self.view = ViewTransform(image_size, min_scale, augmentation)

    def __call__(self, img: Image.Image) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.view(img), self.view(img)


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of the normalisation (for visualisation and tests), channels on dim -3."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return x * std + mean
