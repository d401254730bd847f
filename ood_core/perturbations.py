"""Named, parameterised OoD scenarios built from in-distribution images.

Conventions shared by every perturbation:

* Input ``x`` is a floating-point tensor of shape ``(N, C, H, W)`` with values in ``[0, 1]``.
* The output is a new tensor (``x`` is never modified) with the same shape, dtype and device,
  clipped to ``[0, 1]``. Half-precision inputs are processed in float32 and cast back.
* Randomness comes only from a local ``torch.Generator`` seeded with ``seed`` and created afresh
  on each call, so a perturbation applied twice to the same input gives the same output. Random
  numbers are drawn on the CPU and then moved, so CPU and CUDA inputs get the same noise.

The registry (:data:`PERTURBATIONS`, :func:`list_perturbations`) describes every perturbation and
its parameters (:class:`Param`), so that a UI can build its widgets from it, and
:func:`make_perturbation` / :meth:`Perturbation.config` round-trip a perturbation through a plain
dict.

Example::

    p = make_perturbation("gaussian_noise", sigma=0.2, seed=3)
    x_ood = p(x_ind)
    p.describe()  # 'Gaussian noise (sigma=0.2)'
    make_perturbation(**p.config()) == p  # True
"""

from __future__ import annotations

import math
import numbers
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ood_core.params import Param
from ood_core.params import fmt_value as _fmt
from ood_core.registry import Registry

__all__ = [
    "PERTURBATIONS",
    "Brighter",
    "Contrast",
    "Darker",
    "GaussianBlur",
    "GaussianNoise",
    "HorizontalFlip",
    "Invert",
    "Param",
    "PatchShuffle",
    "Perturbation",
    "PixelShuffle",
    "Quantize",
    "Rotation",
    "UniformNoise",
    "VerticalFlip",
    "list_perturbations",
    "make_perturbation",
    "register_perturbation",
]


MAX_SEED = 2**64 - 1
"""Largest ``seed`` (``torch.Generator.manual_seed`` takes 64-bit seeds).

No perturbation parameter scales work or memory beyond the image itself: every numeric one is
bounded in its declaration (blur ``sigma <= 5`` pixels, ``patch <= 32``, ``bits <= 8``...)."""


class Perturbation:
    """Base class: a deterministic map from a batch of images to a perturbed batch.

    Subclasses set ``key``, ``title``, ``help``, ``params`` (and ``random = True`` when they use
    the seed) and implement :meth:`_apply`. Parameter values are keyword arguments, validated on
    construction, and readable as attributes (``GaussianNoise(sigma=0.2).sigma``) or through
    :attr:`values`.
    """

    key: ClassVar[str] = ""
    title: ClassVar[str] = ""
    help: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = ()
    random: ClassVar[bool] = False

    def __init__(self, *, seed: int = 0, **params: Any) -> None:
        name = self.title or type(self).__name__
        known = {p.name: p for p in self.params}
        unknown = sorted(set(params) - set(known))
        if unknown:
            expected = ", ".join(known) or "no parameters"
            raise ValueError(f"{name}: unknown parameter(s) {unknown}; expected {expected}")
        if (
            isinstance(seed, bool)
            or not isinstance(seed, numbers.Integral)
            or not 0 <= seed <= MAX_SEED
        ):
            raise ValueError(
                f"{name}: parameter 'seed' must be an int in [0, 2**64 - 1] (the range of "
                f"torch.Generator seeds), got {seed!r}"
            )
        self.seed = int(seed)
        self.values: dict[str, Any] = {
            p.name: p.validate(params.get(p.name, p.default), name) for p in self.params
        }

    def __getattr__(self, item: str) -> Any:
        values = self.__dict__.get("values", {})
        if item in values:
            return values[item]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {item!r}")

    # --- application ------------------------------------------------------------------------
    def __call__(self, x: Tensor) -> Tensor:
        """Perturb a float batch ``(N, C, H, W)`` in ``[0, 1]``; same shape/dtype/device out."""
        if not isinstance(x, Tensor):
            raise ValueError(
                f"{self.title}: expected a float tensor of shape (N, C, H, W), "
                f"got {type(x).__name__}"
            )
        if x.ndim != 4 or not x.is_floating_point() or min(x.shape[1:]) < 1:
            raise ValueError(
                f"{self.title}: expected a float tensor of shape (N, C, H, W) with "
                f"values in [0, 1], got shape {tuple(x.shape)} and dtype {x.dtype}"
            )
        work = x if x.dtype in (torch.float32, torch.float64) else x.float()
        return self._apply(work).clamp(0.0, 1.0).to(x.dtype)  # clamp always copies

    def _apply(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _generator(self) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed(self.seed)

    # --- description and (de)serialisation --------------------------------------------------
    def describe(self) -> str:
        """Short label for tables, e.g. ``'Gaussian noise (sigma=0.1)'`` (seed not shown)."""
        if not self.values:
            return self.title
        inner = ", ".join(f"{k}={_fmt(v)}" for k, v in self.values.items())
        return f"{self.title} ({inner})"

    def config(self) -> dict[str, Any]:
        """Plain dict ``{"kind": key, **params, "seed": seed}``; see :meth:`from_config`."""
        return {"kind": self.key, **self.values, "seed": self.seed}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Perturbation:
        """Rebuild a perturbation from :meth:`config` output (dispatches on ``"kind"``)."""
        cfg = dict(config)
        kind = cfg.pop("kind", cls.key or None)
        if kind is None:
            raise ValueError("perturbation config needs a 'kind' key")
        if cls.key and kind != cls.key:
            raise ValueError(f"{cls.title}: config is for kind {kind!r}, not {cls.key!r}")
        return make_perturbation(kind, **cfg)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in {**self.values, "seed": self.seed}.items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Perturbation):
            return NotImplemented
        return type(self) is type(other) and self.config() == other.config()

    def __hash__(self) -> int:
        return hash((type(self), tuple(self.config().items())))


PERTURBATIONS: Registry = Registry("perturbation kind")
"""Perturbation key -> class, filled by :func:`register_perturbation`."""


def register_perturbation(cls: type[Perturbation]) -> type[Perturbation]:
    """Class decorator adding ``cls`` to :data:`PERTURBATIONS` under ``cls.key``."""
    return PERTURBATIONS.register(cls)


def make_perturbation(kind: str, **params: Any) -> Perturbation:
    """Build the perturbation registered as ``kind`` with the given params (and ``seed``)."""
    return PERTURBATIONS.get_class(kind)(**params)


def list_perturbations() -> list[dict[str, Any]]:
    """One row per registered perturbation: ``key``, ``title``, ``help``, ``params``, ``random``."""
    return [
        {"key": c.key, "title": c.title, "help": c.help, "params": c.params, "random": c.random}
        for c in PERTURBATIONS.values()
    ]


# --- helpers --------------------------------------------------------------------------------
def _reflect_index(n: int, pad: int, device: torch.device) -> Tensor:
    """Indices of a reflect padding (edge not repeated) of ``pad`` on each side, any ``pad``."""
    idx = torch.arange(-pad, n + pad, device=device)
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = idx.remainder(period)
    return torch.where(idx >= n, period - idx, idx)


def _rotate_bilinear(x: Tensor, degrees: float) -> Tensor:
    """Rotate counter-clockwise (as displayed, row 0 on top) about the centre; zeros outside."""
    n, _, h, w = x.shape
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    # Output pixel offset (u, v) from the centre samples the input at (c*u - s*v, s*u + c*v),
    # expressed in the normalised [-1, 1] coordinates of each axis.
    theta = torch.tensor([[c, -s * h / w, 0.0], [s * w / h, c, 0.0]], dtype=x.dtype)
    grid = F.affine_grid(
        theta.expand(n, 2, 3).to(x.device), [n, x.shape[1], h, w], align_corners=False
    )
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# --- perturbations --------------------------------------------------------------------------
@register_perturbation
class VerticalFlip(Perturbation):
    """Flip upside down (along H)."""

    key = "vertical_flip"
    title = "Vertical flip"
    help = "Flips each image upside down."

    def _apply(self, x: Tensor) -> Tensor:
        return x.flip(2)


@register_perturbation
class HorizontalFlip(Perturbation):
    """Mirror left-right (along W)."""

    key = "horizontal_flip"
    title = "Horizontal flip"
    help = "Mirrors each image left to right."

    def _apply(self, x: Tensor) -> Tensor:
        return x.flip(3)


@register_perturbation
class Darker(Perturbation):
    """``x * factor``."""

    key = "darker"
    title = "Darker"
    help = "Multiplies every pixel by factor, pulling the image towards black."
    params = (
        Param(
            "factor",
            "float",
            0.5,
            0.0,
            1.0,
            low_exclusive=True,
            help="Brightness multiplier; 1 leaves the image unchanged.",
        ),
    )

    def _apply(self, x: Tensor) -> Tensor:
        return x * self.values["factor"]


@register_perturbation
class Brighter(Perturbation):
    """``1 - (1 - x) / factor``: :class:`Darker` of the inverted image, so white stays white."""

    key = "brighter"
    title = "Brighter"
    help = "Divides the distance to white by factor, so black becomes 1 - 1/factor."
    params = (
        Param(
            "factor",
            "float",
            1.5,
            1.0,
            10.0,
            help="How much closer to white each pixel gets; 1 leaves it unchanged.",
        ),
    )

    def _apply(self, x: Tensor) -> Tensor:
        return 1.0 - (1.0 - x) / self.values["factor"]


@register_perturbation
class Contrast(Perturbation):
    """``m + factor * (x - m)`` with ``m`` the mean of each image over (C, H, W), clipped."""

    key = "contrast"
    title = "Contrast"
    help = "Scales each image's deviations from its mean: < 1 flattens, > 1 exaggerates."
    params = (
        Param("factor", "float", 0.5, 0.0, 5.0, help="0 gives a flat grey image, 1 the original."),
    )

    def _apply(self, x: Tensor) -> Tensor:
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        return m + self.values["factor"] * (x - m)


@register_perturbation
class UniformNoise(Perturbation):
    """Replace every image by i.i.d. ``U[0, 1)`` noise."""

    key = "uniform_noise"
    title = "Uniformly random"
    help = "Replaces each image by uniform random noise in [0, 1)."
    random = True

    def _apply(self, x: Tensor) -> Tensor:
        return torch.rand(x.shape, generator=self._generator(), dtype=x.dtype).to(x.device)


@register_perturbation
class GaussianNoise(Perturbation):
    """``x + sigma * N(0, 1)`` (i.i.d. per pixel and channel), clipped."""

    key = "gaussian_noise"
    title = "Gaussian noise"
    help = "Adds independent Gaussian noise of standard deviation sigma to every pixel."
    params = (Param("sigma", "float", 0.1, 0.0, 1.0, help="Noise standard deviation."),)
    random = True

    def _apply(self, x: Tensor) -> Tensor:
        sigma = self.values["sigma"]
        if sigma == 0.0:
            return x
        noise = torch.randn(x.shape, generator=self._generator(), dtype=x.dtype).to(x.device)
        return x + sigma * noise


@register_perturbation
class GaussianBlur(Perturbation):
    """Separable Gaussian blur, radius ``ceil(3 sigma)``, reflect padding (edge not repeated)."""

    key = "gaussian_blur"
    title = "Gaussian blur"
    help = "Blurs each image with a Gaussian kernel of standard deviation sigma pixels."
    params = (
        Param(
            "sigma",
            "float",
            1.0,
            0.0,
            5.0,
            low_exclusive=True,
            help="Kernel standard deviation in pixels.",
        ),
    )

    def _apply(self, x: Tensor) -> Tensor:
        sigma = self.values["sigma"]
        r = math.ceil(3 * sigma)
        t = torch.arange(-r, r + 1, dtype=torch.float64)
        k = torch.exp(-(t**2) / (2 * sigma**2))
        k = (k / k.sum()).to(device=x.device, dtype=x.dtype)
        c, h, w = x.shape[1:]
        x = x.index_select(2, _reflect_index(h, r, x.device))
        x = x.index_select(3, _reflect_index(w, r, x.device))
        x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, 2 * r + 1), groups=c)
        return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, 2 * r + 1, 1), groups=c)


@register_perturbation
class Rotation(Perturbation):
    """Rotate counter-clockwise about the centre (bilinear, zeros outside the source).

    Multiples of 90 degrees on square images (and of 180 on any image) are exact
    (``torch.rot90`` / flips); ``rotation(90)`` equals ``torch.rot90(x, 1, dims=(2, 3))``.
    """

    key = "rotation"
    title = "Rotation"
    help = "Rotates each image counter-clockwise by the given angle; corners become black."
    params = (
        Param(
            "degrees",
            "float",
            90.0,
            -360.0,
            360.0,
            help="Angle in degrees, positive is counter-clockwise.",
        ),
    )

    def _apply(self, x: Tensor) -> Tensor:
        degrees = self.values["degrees"]
        if degrees % 90 == 0:
            k = int(degrees // 90) % 4
            if k == 0:
                return x
            if k == 2:
                return x.flip(2, 3)
            if x.shape[2] == x.shape[3]:
                return torch.rot90(x, k, dims=(2, 3))
        return _rotate_bilinear(x, degrees)


@register_perturbation
class PixelShuffle(Perturbation):
    """One random permutation of the H*W pixel positions (from ``seed``), shared by all images
    and channels: destroys spatial structure but keeps each image's pixel values."""

    key = "pixel_shuffle"
    title = "Pixel shuffle"
    help = "Moves every pixel to a random position (the same permutation for all images)."
    random = True

    def _apply(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        perm = torch.randperm(h * w, generator=self._generator()).to(x.device)
        return x.reshape(n, c, h * w)[:, :, perm].reshape(n, c, h, w)


@register_perturbation
class PatchShuffle(Perturbation):
    """Cut each image into non-overlapping ``patch x patch`` tiles and permute them, with a
    different permutation per image (all from ``seed``). H and W must be divisible by ``patch``."""

    key = "patch_shuffle"
    title = "Patch shuffle"
    help = "Cuts each image into square patches and shuffles them like a jigsaw puzzle."
    params = (Param("patch", "int", 7, 1, 32, help="Patch side in pixels; must divide H and W."),)
    random = True

    def _apply(self, x: Tensor) -> Tensor:
        p = self.values["patch"]
        n, c, h, w = x.shape
        if h % p or w % p:
            raise ValueError(
                f"{self.title}: parameter 'patch'={p} must divide the image height "
                f"and width, got H={h}, W={w}"
            )
        gh, gw = h // p, w // p
        tiles = x.reshape(n, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, -1)
        perm = torch.rand(n, gh * gw, generator=self._generator()).argsort(dim=1).to(x.device)
        tiles = tiles.gather(1, perm.unsqueeze(-1).expand_as(tiles))
        return tiles.reshape(n, gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)


@register_perturbation
class Quantize(Perturbation):
    """Colour-depth reduction: ``floor(x * L + 0.5) / L`` with ``L = 2**bits - 1``."""

    key = "quantize"
    title = "Quantize"
    help = "Reduces each channel to 2**bits evenly spaced levels (posterisation)."
    params = (Param("bits", "int", 2, 1, 8, help="Bits per channel kept."),)

    def _apply(self, x: Tensor) -> Tensor:
        levels = 2 ** self.values["bits"] - 1
        return torch.floor(x * levels + 0.5) / levels


@register_perturbation
class Invert(Perturbation):
    """Photographic negative: ``1 - x``."""

    key = "invert"
    title = "Invert"
    help = "Replaces each pixel value v by 1 - v (negative image)."

    def _apply(self, x: Tensor) -> Tensor:
        return 1.0 - x
