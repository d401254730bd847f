"""Tests for ood_core.perturbations: contracts, closed forms, validation and round trips."""

from __future__ import annotations

import pytest
import torch

from ood_core.perturbations import (
    PERTURBATIONS,
    Param,
    Perturbation,
    _rotate_bilinear,
    list_perturbations,
    make_perturbation,
)

RANDOM_KINDS = ["uniform_noise", "gaussian_noise", "pixel_shuffle", "patch_shuffle"]


def _batch(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def _make(kind: str, x: torch.Tensor, **params) -> Perturbation:
    """Default perturbation, except a patch size that divides small test images."""
    if kind == "patch_shuffle" and "patch" not in params and x.shape[-1] % 7:
        params["patch"] = 2
    return make_perturbation(kind, **params)


@pytest.mark.parametrize("shape", [(5, 1, 28, 28), (3, 3, 8, 8)])
@pytest.mark.parametrize("kind", sorted(PERTURBATIONS))
def test_shape_dtype_range_and_input_untouched(kind: str, shape: tuple[int, ...]) -> None:
    x = _batch(shape)
    before = x.clone()
    out = _make(kind, x)(x)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert out.min() >= 0 and out.max() <= 1
    assert out.data_ptr() != x.data_ptr()
    assert torch.equal(x, before)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
@pytest.mark.parametrize("kind", sorted(PERTURBATIONS))
def test_other_float_dtypes_preserved(kind: str, dtype: torch.dtype) -> None:
    x = _batch((2, 3, 14, 14)).to(dtype)
    out = make_perturbation(kind)(x)
    assert out.dtype == dtype and out.shape == x.shape


@pytest.mark.parametrize("kind", sorted(PERTURBATIONS))
def test_deterministic_given_seed(kind: str) -> None:
    x = _batch((4, 3, 28, 28))
    a = make_perturbation(kind, seed=1)(x)
    assert torch.equal(a, make_perturbation(kind, seed=1)(x))
    p = make_perturbation(kind, seed=1)
    assert torch.equal(p(x), p(x))
    # The global RNG is neither used nor advanced.
    state = torch.get_rng_state()
    make_perturbation(kind, seed=5)(x)
    assert torch.equal(state, torch.get_rng_state())
    b = make_perturbation(kind, seed=2)(x)
    assert torch.equal(a, b) != (kind in RANDOM_KINDS)
    assert PERTURBATIONS[kind].random == (kind in RANDOM_KINDS)


def test_flips() -> None:
    x = _batch((2, 3, 5, 7))
    v, h = make_perturbation("vertical_flip"), make_perturbation("horizontal_flip")
    assert torch.equal(v(x), x.flip(2))
    assert torch.equal(v(v(x)), x)
    assert torch.equal(h(x), x.flip(3))
    assert torch.equal(h(h(x)), x)


def test_darker_brighter_invert_contrast_closed_forms() -> None:
    x = _batch((3, 3, 8, 8))
    assert torch.equal(make_perturbation("darker", factor=0.5)(x), x * 0.5)
    assert torch.equal(make_perturbation("darker", factor=1)(x), x)
    b = make_perturbation("brighter", factor=2.0)(x)
    assert torch.allclose(b, 1 - (1 - x) / 2)
    assert (b >= x).all()
    assert torch.equal(make_perturbation("invert")(x), 1 - x)
    c = make_perturbation("contrast", factor=0.5)(x)
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(c, m + 0.5 * (x - m))
    assert torch.allclose(c.mean(dim=(1, 2, 3)), m.flatten(), atol=1e-6)
    flat = make_perturbation("contrast", factor=0.0)(x)
    assert torch.allclose(flat, m.expand_as(x))


def test_rotation() -> None:
    x = _batch((2, 3, 9, 9))
    assert torch.equal(make_perturbation("rotation", degrees=90)(x), torch.rot90(x, 1, (2, 3)))
    assert torch.equal(make_perturbation("rotation", degrees=-90)(x), torch.rot90(x, -1, (2, 3)))
    assert torch.equal(make_perturbation("rotation", degrees=180)(x), x.flip(2, 3))
    for deg in (0, 360, -360):
        assert torch.allclose(make_perturbation("rotation", degrees=deg)(x), x, atol=1e-6)
    # The bilinear path agrees with the exact one on square images and is identity at 0.
    for k in (1, 2, 3):
        assert torch.allclose(_rotate_bilinear(x, 90.0 * k), torch.rot90(x, k, (2, 3)), atol=1e-5)
    wide = _batch((1, 1, 6, 10))
    assert torch.allclose(_rotate_bilinear(wide, 0.0), wide, atol=1e-6)
    # Non-square 90 degrees: centre pixels land at rot90 positions, corners become black.
    out = make_perturbation("rotation", degrees=90)(wide)
    assert torch.allclose(
        out[..., 1:5, 3:7], torch.rot90(wide, 1, (2, 3))[..., 3:7, 1:5], atol=1e-5
    )
    assert (out[..., :, 0] == 0).all()
    # A generic angle keeps the centre pixel of an odd square image and blackens the corners.
    y = make_perturbation("rotation", degrees=45)(torch.ones(1, 1, 9, 9))
    assert y[0, 0, 4, 4] == pytest.approx(1.0, abs=1e-6)
    assert y[0, 0, 0, 0] == 0


def test_gaussian_blur() -> None:
    blur = make_perturbation("gaussian_blur", sigma=1.5)
    const = torch.full((2, 3, 16, 16), 0.3)
    assert torch.allclose(blur(const), const, atol=1e-6)
    i = torch.arange(32, dtype=torch.float32)
    wave = 0.5 + 0.4 * torch.sin(2 * torch.pi * i / 8)
    img = (wave[:, None] * wave[None, :]).expand(2, 3, 32, 32) + 0.05 * _batch((2, 3, 32, 32))
    out = blur(img.clamp(0, 1))
    assert torch.allclose(out.mean(dim=(2, 3)), img.mean(dim=(2, 3)), atol=0.01)
    assert (out.var(dim=(2, 3)) < 0.5 * img.var(dim=(2, 3))).all()
    # Kernel radius larger than the image still works (reflect padding of any width).
    assert make_perturbation("gaussian_blur", sigma=5.0)(_batch((1, 1, 3, 4))).shape == (1, 1, 3, 4)


def test_gaussian_noise() -> None:
    x = _batch((4, 3, 16, 16))
    assert torch.equal(make_perturbation("gaussian_noise", sigma=0.0)(x), x)
    grey = torch.full((8, 3, 32, 32), 0.5)
    noisy = make_perturbation("gaussian_noise", sigma=0.1, seed=3)(grey)
    assert (noisy - grey).std().item() == pytest.approx(0.1, rel=0.1)
    assert (noisy - grey).mean().abs() < 0.01


def test_uniform_noise_ignores_input() -> None:
    p = make_perturbation("uniform_noise", seed=4)
    out = p(torch.zeros(64, 1, 16, 16))
    assert torch.equal(out, p(torch.ones(64, 1, 16, 16)))
    assert out.mean().item() == pytest.approx(0.5, abs=0.01)


def test_quantize() -> None:
    x = _batch((3, 3, 8, 8))
    assert set(make_perturbation("quantize", bits=1)(x).unique().tolist()) <= {0.0, 1.0}
    q2 = make_perturbation("quantize", bits=2)(x)
    assert set((q2 * 3).round().unique().tolist()) <= {0.0, 1.0, 2.0, 3.0}
    assert (q2 - x).abs().max() <= 0.5 / 3 + 1e-6
    levels = torch.arange(256, dtype=torch.float32).view(1, 1, 16, 16) / 255
    assert torch.allclose(make_perturbation("quantize", bits=8)(levels), levels)


def test_patch_shuffle_preserves_patch_multiset() -> None:
    x = _batch((3, 2, 28, 28))
    p = 7
    out = make_perturbation("patch_shuffle", patch=p, seed=1)(x)

    def tiles(t: torch.Tensor) -> torch.Tensor:
        n, c, h, w = t.shape
        t = t.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return t.reshape(n, (h // p) * (w // p), -1)

    before, after = tiles(x), tiles(out)
    for i in range(x.shape[0]):
        key = lambda rows: sorted(map(tuple, rows.tolist()))  # noqa: E731
        assert key(before[i]) == key(after[i])
    assert not torch.equal(out, x)
    # Different images get different permutations (same content, different results).
    same = make_perturbation("patch_shuffle", patch=p, seed=1)(x[:1].expand(3, -1, -1, -1))
    assert not torch.equal(same[0], same[1])
    with pytest.raises(ValueError, match="patch"):
        make_perturbation("patch_shuffle", patch=5)(x)


def test_pixel_shuffle_preserves_values_with_shared_permutation() -> None:
    x = _batch((3, 3, 8, 8))
    out = make_perturbation("pixel_shuffle", seed=2)(x)
    assert torch.equal(out.flatten(1).sort(dim=1).values, x.flatten(1).sort(dim=1).values)
    assert not torch.equal(out, x)
    # One permutation for all images and channels: an index image maps consistently.
    idx = torch.arange(64, dtype=torch.float32).view(1, 1, 8, 8).expand(2, 3, 8, 8) / 63
    shuffled = make_perturbation("pixel_shuffle", seed=2)(idx)
    assert torch.equal(shuffled, shuffled[:1, :1].expand_as(shuffled))


@pytest.mark.parametrize(
    ("kind", "params", "name"),
    [
        ("darker", {"factor": 0}, "factor"),
        ("darker", {"factor": 1.5}, "factor"),
        ("darker", {"factor": float("nan")}, "factor"),
        ("darker", {"factor": "0.5"}, "factor"),
        ("quantize", {"bits": 0}, "bits"),
        ("quantize", {"bits": 2.5}, "bits"),
        ("quantize", {"bits": True}, "bits"),
        ("gaussian_blur", {"sigma": 0.0}, "sigma"),
        ("rotation", {"degrees": 400}, "degrees"),
        ("invert", {"seed": -1}, "seed"),
        ("invert", {"strength": 1}, "strength"),
    ],
)
def test_invalid_params_raise(kind: str, params: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name) as err:
        make_perturbation(kind, **params)
    assert PERTURBATIONS[kind].title in str(err.value)


def test_invalid_param_message_names_value_and_range() -> None:
    with pytest.raises(ValueError) as err:
        make_perturbation("darker", factor=0)
    assert str(err.value) == "Darker: parameter 'factor' must be in (0, 1], got 0.0"
    with pytest.raises(ValueError, match=r"\[1, 8\], got 0"):
        make_perturbation("quantize", bits=0)
    with pytest.raises(ValueError, match="unknown perturbation kind 'nope'"):
        make_perturbation("nope")


@pytest.mark.parametrize(
    "x",
    [
        torch.rand(1, 28, 28),
        torch.rand(2, 1, 1, 28, 28),
        (torch.rand(2, 1, 8, 8) * 255).to(torch.uint8),
        torch.rand(2, 0, 8, 8),
        [[0.5]],
    ],
)
def test_invalid_input_raises(x) -> None:
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        make_perturbation("invert")(x)


def test_bool_and_choice_params_validated() -> None:
    class Toy(Perturbation):
        key, title, help = "toy", "Toy", "Test only."
        params = (Param("on", "bool", False), Param("mode", "choice", "a", choices=("a", "b")))

        def _apply(self, x: torch.Tensor) -> torch.Tensor:
            return x

    assert Toy(on=True, mode="b").describe() == "Toy (on=True, mode=b)"
    with pytest.raises(ValueError, match="'on'"):
        Toy(on=1)
    with pytest.raises(ValueError, match="'mode'"):
        Toy(mode="c")
    with pytest.raises(ValueError, match="type"):
        Param("x", "complex", 0j)
    assert "toy" not in PERTURBATIONS


@pytest.mark.parametrize("kind", sorted(PERTURBATIONS))
def test_config_round_trip(kind: str) -> None:
    p = make_perturbation(kind, seed=7)
    cfg = p.config()
    assert cfg["kind"] == kind and cfg["seed"] == 7
    assert set(cfg) == {"kind", "seed", *(q.name for q in PERTURBATIONS[kind].params)}
    for rebuilt in (
        make_perturbation(**cfg),
        Perturbation.from_config(cfg),
        PERTURBATIONS[kind].from_config(cfg),
    ):
        assert type(rebuilt) is type(p) and rebuilt == p and rebuilt.config() == cfg
    x = _batch((2, 1, 28, 28))
    assert torch.equal(make_perturbation(**cfg)(x), p(x))
    assert cfg == {"kind": kind, "seed": 7, **{q.name: q.default for q in p.params}}


def test_from_config_kind_mismatch() -> None:
    with pytest.raises(ValueError, match="darker"):
        PERTURBATIONS["brighter"].from_config({"kind": "darker", "factor": 0.5})


def test_describe_and_attributes() -> None:
    noise = make_perturbation("gaussian_noise", sigma=0.1, seed=9)
    assert noise.describe() == "Gaussian noise (sigma=0.1)"
    assert noise.sigma == 0.1
    assert make_perturbation("rotation", degrees=45).describe() == "Rotation (degrees=45)"
    assert make_perturbation("quantize", bits=3).describe() == "Quantize (bits=3)"
    assert make_perturbation("uniform_noise").describe() == "Uniformly random"
    assert repr(noise) == "GaussianNoise(sigma=0.1, seed=9)"


def test_registry_listing() -> None:
    rows = list_perturbations()
    assert [r["key"] for r in rows] == list(PERTURBATIONS)
    assert len(rows) == 13
    for row in rows:
        assert row["title"] and row["help"].endswith(".")
        assert row["key"] == row["key"].lower() and " " not in row["key"]
        for param in row["params"]:
            assert isinstance(param, Param)
            param.validate(param.default, row["title"])  # defaults are valid
