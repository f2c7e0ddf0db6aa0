"""Section 7c's training tools: BalancedSampler and class_weights (class counts, coverage, seeds);
the bilinear sampler and the affine warp against F.affine_grid + F.grid_sample (bilinear, zeros,
align_corners=False) and a pixel-by-pixel loop; the random transforms and the elastic distortion
by construction (np.rot90, exact shifts, chapter 3's conv2d, the kernel's variance and correlation);
Augment's properties; OneCycle against torch.optim.lr_scheduler.OneCycleLR; the check of the
shift exercise. Each family also shows that a deliberately wrong version is caught.

Tolerances: the warps are compared relative to the largest value of PyTorch's result, 1e-12 in
float64 and 1e-5 in float32 (both libraries compute the positions, then the weights, in the
images' precision); uint8 results may differ by one grey level where the float32 value lies
within rounding of a half (each side rounds its own), on at most 0.5% of the pixels. Learning
rates: 1e-13 relative (the same formula in Python floats).
"""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from convbook import conv2d, read_idx
from convbook.augment import (
    Augment,
    BalancedSampler,
    OneCycle,
    affine_coords,
    affine_matrices,
    check_shift,
    class_weights,
    elastic_field,
    gaussian_matrix,
    random_affine,
    sample_bilinear,
    warp_affine,
    warp_field,
)
from convbook.data import load_sample
from convbook.layers import SGD, Adam
from test_layers import assert_caught

ROOT = Path(__file__).resolve().parents[1]
DTYPES = st.sampled_from([np.float64, np.float32])
TOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}


def rel_err(ours, ref) -> float:
    assert ours.shape == ref.shape and ours.dtype == ref.dtype, (
        ours.shape,
        ref.shape,
        ours.dtype,
        ref.dtype,
    )
    scale = max(
        float(np.abs(ref).max(initial=0)), 1e-300
    )  # a float32 1e-300 would be 0
    return float(np.abs(ours.astype(np.float64) - ref).max(initial=0)) / scale


# ---------------------------------------------------------------------------------------------
# The affine warp against PyTorch


def to_theta(matrices, h, w):
    """Our matrices (centred pixel coordinates) -> PyTorch's theta (normalised coordinates):
    S A S^-1 and S t with S = diag(2 / W, 2 / H)."""
    s = np.diag([2 / w, 2 / h])
    return np.concatenate(
        [s @ matrices[:, :, :2] @ np.linalg.inv(s), s @ matrices[:, :, 2:]], axis=2
    )


def torch_warp(images, matrices, align_corners=False):
    x = images if images.ndim == 4 else images[..., None]
    tx = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    theta = torch.from_numpy(to_theta(matrices, *images.shape[1:3])).to(tx.dtype)
    grid = F.affine_grid(theta, list(tx.shape), align_corners=align_corners)
    y = F.grid_sample(
        tx, grid, mode="bilinear", padding_mode="zeros", align_corners=align_corners
    )
    y = y.numpy().transpose(0, 2, 3, 1)
    return y if images.ndim == 4 else y[..., 0]


@st.composite
def warp_cases(draw):
    """Images (N, H, W) or (N, H, W, C), float64 or float32, and strong random affine maps:
    any matrix near the identity, shifts up to the whole image (so that some leave it)."""
    n, h, w = (
        draw(st.integers(1, 4)),
        draw(st.integers(1, 12)),
        draw(st.integers(1, 12)),
    )
    channels = draw(st.sampled_from([None, 1, 3]))
    dtype = draw(DTYPES)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = (n, h, w) if channels is None else (n, h, w, channels)
    images = rng.random(shape).astype(dtype)
    a = np.eye(2) + rng.normal(0, draw(st.sampled_from([0.0, 0.2, 0.8])), (n, 2, 2))
    shift = rng.uniform(-1, 1, (n, 2, 1)) * [[w], [h]]
    return images, np.concatenate([a, shift], axis=2)


def check_warp(case, sample=sample_bilinear, align_corners=False):
    images, matrices = case
    ours = sample(images, affine_coords(matrices, images.shape[1:3]))
    assert ours.dtype == images.dtype and ours.shape == images.shape
    assert (
        rel_err(ours, torch_warp(images, matrices, align_corners)) <= TOL[images.dtype]
    )


@given(warp_cases())
def test_warp_affine_equals_affine_grid_and_grid_sample(case):
    check_warp(case)


def test_warp_affine_uint8_is_torchs_result_rounded():
    images = load_sample("test")[0][:200]
    rng = np.random.default_rng(0)
    matrices = np.concatenate(
        [np.eye(2) + rng.normal(0, 0.3, (200, 2, 2)), rng.uniform(-8, 8, (200, 2, 1))],
        2,
    )
    ours = warp_affine(images, matrices)
    theirs = np.rint(torch_warp(images.astype(np.float32), matrices)).astype(int)
    off = np.abs(ours.astype(int) - theirs)
    assert ours.dtype == np.uint8 and off.max() <= 1 and off.mean() <= 0.005


def swapped_xy(images, coords):
    """Wrong: reads the positions as (row, column)."""
    return sample_bilinear(images, coords[..., ::-1])


def test_property_catches_swapped_coordinates():
    assert_caught(warp_cases(), lambda case: check_warp(case, sample=swapped_xy))


@pytest.mark.filterwarnings("ignore:Since version 1.3.0, affine_grid behavior")
def test_property_tells_the_two_align_corners_conventions_apart():
    assert_caught(warp_cases(), lambda case: check_warp(case, align_corners=True))


def bilinear_loop(image, coords):
    """The formula, one output pixel at a time, with a bounds test for each neighbour."""
    h, w = image.shape[:2]
    out = np.zeros(coords.shape[:2] + image.shape[2:])
    for i, j in np.ndindex(*coords.shape[:2]):
        x, y = coords[i, j]
        x0, y0 = math.floor(x), math.floor(y)
        for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
            for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                if 0 <= yy < h and 0 <= xx < w:
                    out[i, j] += wy * wx * image[yy, xx]
    return out


@given(
    st.integers(1, 6),
    st.integers(1, 6),
    st.sampled_from([None, 2]),
    st.integers(0, 2**32 - 1),
)
def test_sample_bilinear_equals_the_formula_pixel_by_pixel(h, w, channels, seed):
    rng = np.random.default_rng(seed)
    images = rng.random((2, h, w) if channels is None else (2, h, w, channels))
    coords = rng.uniform(-3, max(h, w) + 3, (2, 4, 5, 2))
    coords[0, 0] = np.round(
        coords[0, 0]
    )  # whole numbers: the pixel itself (or 0), exactly
    ours = sample_bilinear(images, coords)
    loop = np.stack([bilinear_loop(im, c) for im, c in zip(images, coords)])
    assert rel_err(ours, loop) < 1e-14 and np.array_equal(ours[0, 0], loop[0, 0])


def test_sample_bilinear_to_another_output_size():
    """Output of another size than the input: a 2x magnification of the centre."""
    image = np.arange(16.0).reshape(1, 4, 4)
    ys, xs = np.mgrid[0:7, 0:7] / 2 + 0.0
    coords = np.stack([xs, ys], -1)[None]
    out = sample_bilinear(image, coords)
    assert out.shape == (1, 7, 7) and np.array_equal(out[0, ::2, ::2], image[0])
    assert out[0, 1, 1] == image[0, :2, :2].mean()


# ---------------------------------------------------------------------------------------------
# The random motions, by construction


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.uint8])
def test_quarter_and_half_turns_are_rot90(dtype):
    x = (255 * np.random.default_rng(0).random((3, 9, 9))).astype(dtype)
    ones, zeros = np.ones(3), np.zeros((3, 2))
    for quarters in (1, 2, 3):
        turned = warp_affine(x, affine_matrices(90 * quarters * ones, ones, zeros))
        expected = np.rot90(x, quarters, axes=(1, 2))
        assert np.abs(turned.astype(float) - expected).max() <= (
            0 if dtype == np.uint8 else 1e-4
        )


@given(st.integers(-12, 12), st.integers(-12, 12))
def test_a_shift_moves_the_content_by_whole_pixels(dx, dy):
    x = np.random.default_rng(1).integers(0, 256, (2, 10, 8), dtype=np.uint8)
    moved = warp_affine(
        x, affine_matrices(np.zeros(2), np.ones(2), np.tile([dx, dy], (2, 1)))
    )
    expected = np.zeros_like(x)
    for i, j in np.ndindex(10, 8):
        if 0 <= i - dy < 10 and 0 <= j - dx < 8:
            expected[:, i, j] = x[:, i - dy, j - dx]
    assert np.array_equal(moved, expected)


def test_scaling_is_about_the_centre():
    yy, xx = np.mgrid[0:29, 0:29]
    blob = np.exp(-((yy - 10) ** 2 + (xx - 18) ** 2) / 2.0)[
        None
    ]  # (4 up, 4 right) of the centre
    for s in (2.0, 0.5):
        scaled = warp_affine(blob, affine_matrices([0.0], [s], [[0.0, 0.0]]))
        i, j = np.unravel_index(scaled[0].argmax(), (29, 29))
        assert (i - 14, j - 14) == (-4 * s, 4 * s)


def test_random_affine_ranges_seeds_and_independence():
    maps = random_affine(
        4000,
        max_shift=3,
        max_rotation=20,
        scale=(0.8, 1.2),
        rng=np.random.default_rng(0),
    )
    angle = np.rad2deg(np.arctan2(maps[:, 1, 0], maps[:, 0, 0]))
    factor = 1 / np.sqrt(np.linalg.det(maps[:, :, :2]))
    shift = -np.linalg.solve(maps[:, :, :2], maps[:, :, 2:])[..., 0]
    assert np.abs(angle).max() <= 20 and np.abs(angle).max() > 19
    assert 0.8 <= factor.min() < 0.81 and 1.19 < factor.max() <= 1.2
    assert np.abs(shift).max() <= 3 and len(np.unique(angle)) == 4000
    assert abs(np.corrcoef(angle, factor)[0, 1]) < 0.1  # drawn independently
    assert np.array_equal(
        maps,
        random_affine(
            4000,
            max_shift=3,
            max_rotation=20,
            scale=(0.8, 1.2),
            rng=np.random.default_rng(0),
        ),
    )


# ---------------------------------------------------------------------------------------------
# Elastic distortions, by construction


def test_gaussian_matrix_is_the_sampled_kernel():
    g = gaussian_matrix(40, 2.5)
    radius = int(4 * 2.5 + 0.5)
    k = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (k / 2.5) ** 2)
    kernel /= kernel.sum()
    assert np.allclose(g[20 - radius : 21 + radius, 20], kernel, rtol=1e-14, atol=0)
    assert np.allclose(g, g.T) and np.allclose(g[radius : 40 - radius].sum(axis=1), 1)
    assert np.all(g[0, radius + 1 :] == 0)


@pytest.mark.parametrize(
    "shape,sigma", [((28, 28), 4.0), ((20, 33), 2.0), ((9, 9), 1.0)]
)
def test_elastic_field_is_a_convolution_of_its_noise(shape, sigma):
    """The two matrix products equal chapter 3's conv2d with the 2-D kernel g g^T and zero
    padding, applied to the same noise (drawn again from the same seed)."""
    h, w = shape
    field = elastic_field(
        4, shape, alpha=3.0, sigma=sigma, rng=np.random.default_rng(5)
    )
    noise = np.random.default_rng(5).random((2, 4, h, w), dtype=np.float32) * 2 - 1
    radius = int(4 * sigma + 0.5)
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    kernel = np.outer(k, k)[:, :, None, None]
    by_conv = conv2d(
        noise.reshape(8, h, w, 1).astype(np.float64), kernel, padding=radius
    )
    expected = 3.0 * np.moveaxis(by_conv.reshape(2, 4, h, w), 0, -1)
    assert field.shape == (4, h, w, 2) and field.dtype == np.float32
    assert rel_err(field, expected.astype(np.float32)) < 1e-5


def test_elastic_field_variance_and_smoothness_away_from_the_edges():
    """Variance alpha^2 / 3 * (sum g^2)^2 and neighbour correlation sum g_k g_k+1 / sum g^2,
    within sampling error (about 3% for the variance over these fields)."""
    for sigma in (2.0, 4.0):
        big = elastic_field(
            150, (90, 90), alpha=7.0, sigma=sigma, rng=np.random.default_rng(int(sigma))
        )
        inner = big[:, 20:-20, 20:-20].astype(np.float64)
        g = gaussian_matrix(90, sigma)[45]
        g = g[g > 0]
        var = 49 * (g @ g) ** 2 / 3
        for axis in (1, 2):
            a, b = (
                np.moveaxis(inner, axis, 1)[:, 1:],
                np.moveaxis(inner, axis, 1)[:, :-1],
            )
            assert (
                abs(np.mean(a * b) / np.mean(inner**2) - (g[1:] @ g[:-1]) / (g @ g))
                < 0.01
            )
        assert abs(inner.var() / var - 1) < 0.12


class RoughField:
    """Wrong: forgets to smooth (alpha times the raw noise)."""

    def __call__(self, n, shape, alpha, rng):
        return alpha * (rng.random((n,) + shape + (2,)) * 2 - 1)


def test_the_smoothness_check_catches_an_unsmoothed_field():
    field = RoughField()(150, (90, 90), 7.0, np.random.default_rng(0))
    inner = field[:, 20:-20, 20:-20]
    g = gaussian_matrix(90, 4.0)[45]
    corr = np.mean(inner[:, 1:] * inner[:, :-1]) / np.mean(inner**2)
    assert abs(corr - (g[1:] @ g[:-1]) / (g @ g)) > 0.5


def test_alpha_scales_the_field_and_nothing_else():
    a = elastic_field(3, (12, 10), alpha=2.0, rng=np.random.default_rng(1))
    b = elastic_field(3, (12, 10), alpha=6.0, rng=np.random.default_rng(1))
    assert np.allclose(b, 3 * a, rtol=1e-6, atol=0)
    assert not np.allclose(
        a, elastic_field(3, (12, 10), alpha=2.0, rng=np.random.default_rng(2))
    )
    assert np.array_equal(
        elastic_field(2, (5, 5), alpha=0.0, rng=np.random.default_rng(1)),
        np.zeros((2, 5, 5, 2)),
    )


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
def test_a_zero_field_is_the_identity_bit_for_bit(dtype):
    x = (255 * np.random.default_rng(2).random((3, 7, 6, 2))).astype(dtype)
    assert np.array_equal(warp_field(x, np.zeros((3, 7, 6, 2))), x)


@given(st.integers(-9, 9), st.integers(-9, 9))
def test_a_constant_whole_field_is_an_exact_shift(dx, dy):
    """Output pixel p reads p + (dx, dy): the content moves by (-dx, -dy)."""
    x = np.random.default_rng(3).integers(0, 256, (2, 8, 7), dtype=np.uint8)
    out = warp_field(x, np.broadcast_to(np.array([dx, dy], float), (2, 8, 7, 2)))
    expected = np.zeros_like(x)
    for i, j in np.ndindex(8, 7):
        if 0 <= i + dy < 8 and 0 <= j + dx < 7:
            expected[:, i, j] = x[:, i + dy, j + dx]
    assert np.array_equal(out, expected)


def test_a_constant_fractional_field_is_the_affine_shift():
    x = np.random.default_rng(4).random((5, 11, 13))
    d = np.array([0.37, -2.6])
    m = np.broadcast_to(np.array([[1.0, 0.0, d[0]], [0.0, 1.0, d[1]]]), (5, 2, 3))
    assert (
        rel_err(warp_field(x, np.broadcast_to(d, (5, 11, 13, 2))), torch_warp(x, m))
        < 1e-12
    )


# ---------------------------------------------------------------------------------------------
# Augment


def test_augment_keeps_shape_dtype_range_and_input():
    rng = np.random.default_rng(0)
    for images in [
        load_sample("test")[0][:32],
        rng.standard_normal((8, 10, 12, 3)).astype(np.float32),
        rng.random((4, 28, 28)),
    ]:
        before = images.copy()
        out = Augment(rng=np.random.default_rng(1))(images)
        assert out.shape == images.shape and out.dtype == images.dtype
        assert np.array_equal(images, before)
        assert min(images.min(), 0) <= out.min() and out.max() <= max(images.max(), 0)


def test_augment_is_seeded_and_gives_each_image_its_own_transform():
    images = load_sample("test")[0][:16]
    a = Augment(rng=np.random.default_rng(7))(images)
    assert np.array_equal(a, Augment(rng=np.random.default_rng(7))(images))
    assert not np.array_equal(a, Augment(rng=np.random.default_rng(8))(images))
    copies = np.repeat(images[:1], 32, axis=0)
    out = Augment(rng=np.random.default_rng(7))(copies).reshape(32, -1)
    assert len(np.unique(out, axis=0)) == 32
    augment = Augment(rng=np.random.default_rng(7))
    assert not np.array_equal(augment(images), augment(images))  # every call draws anew


def test_augment_at_zero_is_the_identity_and_each_part_acts():
    images = load_sample("test")[0][:8]
    zero = dict(max_shift=0, max_rotation=0, scale=(1, 1), alpha=0)
    assert np.array_equal(Augment(**zero, rng=np.random.default_rng(0))(images), images)
    for part in [
        dict(max_shift=2),
        dict(max_rotation=10),
        dict(scale=(0.8, 1.2)),
        dict(alpha=16),
    ]:
        out = Augment(**{**zero, **part}, rng=np.random.default_rng(0))(images)
        assert not np.array_equal(out, images), part


def test_a_batch_is_sampled_as_its_images_one_by_one():
    images = load_sample("test")[0][:20]
    coords = Augment(rng=np.random.default_rng(2)).coords(20, (28, 28))
    one_by_one = np.concatenate(
        [sample_bilinear(images[i : i + 1], coords[i : i + 1]) for i in range(20)]
    )
    assert np.array_equal(sample_bilinear(images, coords), one_by_one)


def test_augment_config_is_json_and_rebuilds_it():
    augment = Augment(
        max_shift=np.float32(1.5),
        max_rotation=np.int64(5),
        scale=(0.95, 1.05),
        alpha=8,
        sigma=3,
    )
    cfg = augment.config()
    assert json.loads(json.dumps(cfg)) == cfg
    rebuilt = Augment(
        **{**cfg, "scale": tuple(cfg["scale"])}, rng=np.random.default_rng(0)
    )
    images = load_sample("test")[0][:4]
    assert np.array_equal(
        rebuilt(images), Augment(**cfg, rng=np.random.default_rng(0))(images)
    )


@pytest.mark.parametrize(
    "make,error,words",
    [
        (
            lambda: Augment(max_shift=-1),
            ValueError,
            "max_shift must be a finite number >= 0",
        ),
        (
            lambda: Augment(max_rotation="10"),
            TypeError,
            "max_rotation must be a number",
        ),
        (lambda: Augment(scale=1.1), TypeError, "scale must be a pair"),
        (lambda: Augment(scale=(1.2, 0.8)), ValueError, "low <= high"),
        (
            lambda: Augment(scale=(0, 1)),
            ValueError,
            "scale must be a finite number > 0",
        ),
        (lambda: Augment(alpha=float("nan")), ValueError, "alpha"),
        (lambda: Augment(sigma=0), ValueError, "sigma must be a finite number > 0"),
        (lambda: Augment(rng=3), TypeError, "rng"),
        (
            lambda: Augment()(np.zeros((4, 28), np.uint8)),
            ValueError,
            r"\(N, H, W\) or \(N, H, W, C\)",
        ),
        (
            lambda: Augment()(np.zeros((4, 28, 28), np.int32)),
            TypeError,
            "uint8 or floating",
        ),
        (
            lambda: sample_bilinear(np.zeros((2, 4, 4)), np.zeros((3, 4, 4, 2))),
            ValueError,
            r"\(2, H_out",
        ),
        (
            lambda: sample_bilinear(np.zeros((2, 4, 4)), np.full((2, 4, 4, 2), np.nan)),
            ValueError,
            "finite",
        ),
        (
            lambda: warp_affine(np.zeros((2, 4, 4)), np.zeros((2, 3, 3))),
            ValueError,
            r"\(N, 2, 3\)",
        ),
        (
            lambda: warp_field(np.zeros((2, 4, 4)), np.zeros((2, 4, 4))),
            ValueError,
            "field must have shape",
        ),
        (
            lambda: affine_matrices([0.0], [0.0], [[0.0, 0.0]]),
            ValueError,
            "scale must be finite and > 0",
        ),
        (
            lambda: affine_matrices([0.0, 1.0], [1.0], [[0.0, 0.0]]),
            ValueError,
            "rotation",
        ),
        (lambda: random_affine(0), ValueError, "n must be >= 1"),
        (lambda: elastic_field(2, (0, 5)), ValueError, "shape"),
        (lambda: gaussian_matrix(5, -1.0), ValueError, "sigma"),
    ],
)
def test_bad_arguments_are_named(make, error, words):
    with pytest.raises(error, match=words):
        make()


# ---------------------------------------------------------------------------------------------
# BalancedSampler and class weights


def sampler_problems(sampler, labels, epochs):
    """The promises of BalancedSampler's docstring, checked over `epochs` epochs."""
    m, problems = sampler.per_class, []
    seen = np.zeros(len(labels), int)
    pools = [np.flatnonzero(labels == k) for k in np.unique(labels)]
    for e in range(1, epochs + 1):
        order = sampler.epoch()
        draws = np.bincount(order, minlength=len(labels))
        seen += draws
        if len(order) != m * len(pools):
            problems.append(f"epoch {e} has {len(order)} draws")
        for pool in pools:
            if draws[pool].sum() != m:
                problems.append("class drawn other than per_class times")
            elif len(pool) <= m and not set(draws[pool]) <= {
                m // len(pool),
                m // len(pool) + 1,
            }:
                problems.append("small class not drawn evenly")
            elif len(pool) > m and (draws[pool].max() > 1 or np.ptp(seen[pool]) > 1):
                problems.append(
                    "large class: an image twice, or unevenly over the epochs"
                )
            if e == -(-len(pool) // m) and seen[pool].min() == 0:
                problems.append(
                    "an image not drawn within ceil(count / per_class) epochs"
                )
    return problems


@st.composite
def label_sets(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    k = draw(st.integers(1, 8))
    counts = rng.integers(1, draw(st.sampled_from([3, 20, 60])), k)
    classes = rng.choice(50, k, replace=False)  # not 0..k-1, not sorted
    labels = rng.permutation(np.repeat(classes, counts))
    per_class = draw(st.one_of(st.none(), st.integers(1, 40)))
    return labels, per_class, int(rng.integers(2**31))


@given(label_sets())
@settings(max_examples=80)
def test_balanced_sampler_keeps_its_promises(case):
    labels, per_class, seed = case
    sampler = BalancedSampler(
        labels, per_class=per_class, rng=np.random.default_rng(seed)
    )
    if per_class is None:
        assert sampler.per_class == max(1, round(len(labels) / len(np.unique(labels))))
    assert sampler_problems(sampler, labels, epochs=12) == []


def test_balanced_sampler_is_seeded_and_batches_cut_one_epoch():
    labels = np.repeat(np.arange(5), [3, 50, 7, 120, 20])
    first = BalancedSampler(labels, rng=np.random.default_rng(1)).epoch()
    assert np.array_equal(
        first, BalancedSampler(labels, rng=np.random.default_rng(1)).epoch()
    )
    assert not np.array_equal(
        first, BalancedSampler(labels, rng=np.random.default_rng(2)).epoch()
    )
    pieces = list(BalancedSampler(labels, rng=np.random.default_rng(1)).batches(16))
    assert np.array_equal(np.concatenate(pieces), first)
    assert all(len(p) == 16 for p in pieces[:-1]) and 0 < len(pieces[-1]) <= 16
    assert len(BalancedSampler(labels)) == 5 * 40


class ChoiceSampler(BalancedSampler):
    """Wrong: per_class draws of each class with replacement."""

    def epoch(self):
        return self.rng.permutation(
            np.concatenate([self.rng.choice(p, self.per_class) for p in self.pools])
        )


class ShuffleSampler(BalancedSampler):
    """Wrong: an ordinary shuffled epoch."""

    def epoch(self):
        return self.rng.permutation(np.concatenate(self.pools))


@pytest.mark.parametrize("cls", [ChoiceSampler, ShuffleSampler])
def test_the_sampler_check_catches_wrong_samplers(cls):
    labels = np.repeat(np.arange(6), [2, 90, 9, 300, 40, 41])
    assert sampler_problems(
        cls(labels, rng=np.random.default_rng(0)), labels, epochs=12
    )


def test_class_weights_give_every_class_the_same_total():
    labels = np.repeat([0, 2, 3, 7], [5, 100, 20, 1])
    w = class_weights(labels, num_classes=9)
    assert w.shape == (9,) and np.all(w[[1, 4, 5, 6, 8]] == 0)
    assert np.allclose(
        np.bincount(labels, weights=w[labels])[[0, 2, 3, 7]], len(labels) / 4
    )
    assert np.isclose(w[labels].mean(), 1) and class_weights(labels).shape == (8,)


@pytest.mark.parametrize(
    "make,error,words",
    [
        (lambda: BalancedSampler(np.array([], int)), ValueError, "non-empty 1-D"),
        (lambda: BalancedSampler(np.zeros((2, 3), int)), ValueError, "non-empty 1-D"),
        (lambda: BalancedSampler(np.array([0.0, 1.0])), TypeError, "integers"),
        (lambda: BalancedSampler(np.array([0, -1])), ValueError, ">= 0"),
        (
            lambda: BalancedSampler(np.array([0, 1]), per_class=0),
            ValueError,
            "per_class",
        ),
        (lambda: BalancedSampler(np.array([0, 1]), rng="seed"), TypeError, "rng"),
        (
            lambda: list(BalancedSampler(np.array([0, 1])).batches(0)),
            ValueError,
            "batch_size",
        ),
        (
            lambda: class_weights(np.array([0, 5]), num_classes=3),
            ValueError,
            "num_classes = 3",
        ),
    ],
)
def test_sampler_and_weights_name_bad_arguments(make, error, words):
    with pytest.raises(error, match=words):
        make()


# ---------------------------------------------------------------------------------------------
# OneCycle against torch.optim.lr_scheduler.OneCycleLR


def torch_rates(total_steps, **kw):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        opt, total_steps=total_steps, cycle_momentum=False, **kw
    )
    rates = [schedule.get_last_lr()[0]]
    for _ in range(total_steps):
        opt.step()
        schedule.step()
        rates.append(schedule.get_last_lr()[0])
    with pytest.raises(ValueError):
        schedule.step()
    return rates


@st.composite
def schedules(draw):
    total = draw(st.integers(4, 400))
    pct = draw(st.floats(0.05, 0.95))
    if not 0 < pct * total - 1 < total - 1:
        pct = 0.5
    return total, dict(
        max_lr=draw(st.sampled_from([1e-3, 0.01, 0.3])),
        pct_start=pct,
        div_factor=draw(st.sampled_from([5.0, 25.0])),
        final_div_factor=draw(st.sampled_from([10.0, 1e4])),
        anneal_strategy=draw(st.sampled_from(["cos", "linear"])),
    )


def check_schedule(case, cls=OneCycle):
    total, kw = case
    kw = dict(kw)
    anneal = kw.pop("anneal_strategy")
    theirs = torch_rates(total, anneal_strategy=anneal, **kw)
    opt = SGD({}, lr=1.0)
    schedule = cls(opt, kw.pop("max_lr"), total, anneal=anneal, **kw)
    ours = [opt.lr] + [schedule.step() for _ in range(total)]
    assert all(abs(a - b) <= 1e-13 * abs(b) for a, b in zip(ours, theirs))
    with pytest.raises(ValueError, match="total_steps"):
        schedule.step()


@given(schedules())
def test_one_cycle_equals_one_cycle_lr(case):
    check_schedule(case)


class OneCycleOffByOne(OneCycle):
    """Wrong: the rise ends one step late."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rise_end += 1


def test_property_catches_an_off_by_one_schedule():
    assert_caught(
        schedules(),
        lambda case: check_schedule(case, cls=OneCycleOffByOne),
        max_examples=50,
    )


def test_one_cycle_drives_adam_as_torch_does():
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((4, 3))}
    theirs = torch.from_numpy(params["w"].copy()).requires_grad_()
    opt, topt = Adam(params), torch.optim.Adam([theirs])
    schedule, tschedule = (
        OneCycle(opt, 0.02, 30),
        torch.optim.lr_scheduler.OneCycleLR(
            topt, 0.02, total_steps=30, cycle_momentum=False
        ),
    )
    for _ in range(30):
        g = rng.standard_normal((4, 3))
        opt.step({"w": g})
        theirs.grad = torch.from_numpy(g)
        topt.step()
        schedule.step()
        tschedule.step()
    assert np.abs(params["w"] - theirs.detach().numpy()).max() < 1e-12


@pytest.mark.parametrize(
    "make,error,words",
    [
        (lambda: OneCycle(object(), 0.1, 10), TypeError, "lr attribute"),
        (lambda: OneCycle(Adam({}), 0.1, 10, anneal="exp"), ValueError, "anneal"),
        (lambda: OneCycle(Adam({}), 0.0, 10), ValueError, "max_lr"),
        (lambda: OneCycle(Adam({}), 0.1, 0), ValueError, "total_steps"),
        (
            lambda: OneCycle(Adam({}), 0.1, 10, pct_start=0.1),
            ValueError,
            "at least one step to each phase",
        ),
        (
            lambda: OneCycle(Adam({}), 0.1, 10, pct_start=1.0),
            ValueError,
            "at least one step to each phase",
        ),
        (lambda: OneCycle(Adam({}), 0.1, 10, div_factor=0), ValueError, "div_factor"),
    ],
)
def test_one_cycle_names_bad_arguments(make, error, words):
    """PyTorch divides by zero for pct_start * total_steps = 1; we say why instead."""
    with pytest.raises(error, match=words):
        make()


# ---------------------------------------------------------------------------------------------
# The check of exercise 7c.1 (my_shift)


def shift_by_padding(images, dx, dy):
    """A right answer, by a different route from the chapter's: per-image slices of a padded
    batch, gathered with one fancy index built from broadcast offsets."""
    n, h, w = images.shape
    b = int(max(np.abs(dx).max(), np.abs(dy).max()))
    padded = np.zeros((n, h + 2 * b, w + 2 * b), images.dtype)
    padded[:, b : b + h, b : b + w] = images
    r = np.clip(
        np.arange(h)[None, :, None] - np.asarray(dy)[:, None, None] + b,
        0,
        h + 2 * b - 1,
    )
    c = np.clip(
        np.arange(w)[None, None, :] - np.asarray(dx)[:, None, None] + b,
        0,
        w + 2 * b - 1,
    )
    return padded[np.arange(n)[:, None, None], r, c]


def test_check_shift_accepts_a_right_answer():
    assert check_shift(shift_by_padding) is True


def test_check_shift_accepts_a_plain_loop_too():
    def loop(images, dx, dy):
        out = np.zeros_like(images)
        for k in range(len(images)):
            for i, j in np.ndindex(*images.shape[1:]):
                if (
                    0 <= i - dy[k] < images.shape[1]
                    and 0 <= j - dx[k] < images.shape[2]
                ):
                    out[k, i, j] = images[k, i - dy[k], j - dx[k]]
        return out

    assert check_shift(loop)


def _mutating(images, dx, dy):
    out = shift_by_padding(images, dx, dy)
    images[...] = 0
    return out


@pytest.mark.parametrize(
    "wrong,words",
    [
        (
            lambda im, dx, dy: shift_by_padding(im, -np.asarray(dx), -np.asarray(dy)),
            "the wrong way",
        ),
        (lambda im, dx, dy: shift_by_padding(im, dy, dx), "dx and dy are swapped"),
        (
            lambda im, dx, dy: np.stack(
                [np.roll(a, (y, x), axis=(0, 1)) for a, x, y in zip(im, dx, dy)]
            ),
            "np.roll wraps around",
        ),
        (lambda im, dx, dy: shift_by_padding(im, dx, dy).astype(np.float64), "dtype"),
        (lambda im, dx, dy: list(shift_by_padding(im, dx, dy)), "NumPy array"),
        (_mutating, "changes its input"),
        (
            lambda im, dx, dy: shift_by_padding(
                im, np.asarray(dx) - (np.asarray(dx) < 0), dy
            ),
            "wrong pixels",
        ),
    ],
)
def test_check_shift_says_what_is_wrong(wrong, words):
    with pytest.raises(AssertionError, match=words):
        check_shift(wrong)


def test_check_shift_on_the_stub():
    def stub(images, dx, dy):
        raise NotImplementedError

    with pytest.raises(AssertionError, match="NotImplementedError"):
        check_shift(stub)


# ---------------------------------------------------------------------------------------------
# The class counts that section 7c stores are those of the official ByMerge test file


def stored_counts() -> dict[str, int]:
    nb = json.loads((ROOT / "book" / "07c_training.ipynb").read_text())
    for cell in nb["cells"]:
        src = "".join(cell["source"])
        if src.startswith("BYMERGE_TEST_COUNTS = {"):
            return ast.literal_eval(src[src.index("{") : src.index("}") + 1])
    raise AssertionError(
        "section 7c has no cell that starts with BYMERGE_TEST_COUNTS = {"
    )


def test_section_7c_stores_the_official_bymerge_test_counts(emnist_dir):
    labels = read_idx(
        emnist_dir / "emnist-bymerge-test-labels-idx1-ubyte.gz", expect_ndim=1
    )
    mapping = load_sample("test")[2]  # ByMerge's mapping
    counts = np.bincount(labels, minlength=47)
    assert stored_counts() == {mapping[k]: int(counts[k]) for k in range(47)}
