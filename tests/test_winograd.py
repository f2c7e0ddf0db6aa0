"""convbook.winograd (chapter 9): Winograd F(2x2, 3x3) and F(4x4, 3x3), FFT convolution, the phase
decompositions (a strided input gradient without zeros, a dilated convolution as d^2 ordinary ones),
the direct multiply-add over taps and the cost model behind "auto", against PyTorch.

Tolerances: float64 within 1e-10 of the reference's scale (conftest's F64_TOL); float32 within
conftest's 2e-5 of scale for every method (F(4x4, 3x3), the least accurate, stays near 4e-6 on
128-channel layers with the chapter's interpolation points); the accuracy targets of the chapter
(1e-5 of scale on 128 channels) are tested on their own. Workspace caps from one byte (a tile group
of one tile row) to the default force every tiling."""

from __future__ import annotations

import math
import tracemalloc
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convbook import conv2d, conv2d_backward
from convbook.conv import conv_spec
from convbook.transpose import conv_input_grad
from convbook import winograd as wg
from conftest import (
    LAYOUTS,
    assert_close,
    conv_cases,
    make_layout,
    torch_conv2d,
    torch_conv2d_grads,
)

CAPS = [1, 300, 20_000, 2**20]


def grads_close(dy, x, w, kwargs, got, dtype, input_grad=True):
    """`got = (dx, dw)` against PyTorch's autograd."""
    rx, rw, _ = torch_conv2d_grads(x, w, None, dy, **kwargs)
    assert got[1].dtype == dtype
    assert_close(got[1], rw, dtype)
    if input_grad:
        assert got[0].dtype == dtype
        assert_close(got[0], rx, dtype)
    else:
        assert got[0] is None


@st.composite
def stride1_cases(draw, dtype, kernel=None, dilation=False):
    """A stride-1 problem: conv_cases' shapes, paddings and layouts with stride 1, 1 to 9
    input channels, a `kernel` (or a random one up to 5x5), dilation 1 unless asked."""
    k = kernel or (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    d = (draw(st.integers(1, 3)), draw(st.integers(1, 3))) if dilation else (1, 1)
    form = draw(st.sampled_from(["int", "pair", "explicit", "valid", "same"]))
    if form == "int":
        padding = draw(st.integers(0, 3))
    elif form == "pair":
        padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    elif form == "explicit":
        padding = tuple(
            tuple(draw(st.integers(0, 3)) for _ in range(2)) for _ in range(2)
        )
    else:
        padding = form
    pads = wg.conv_spec(
        np.zeros((1, 30, 30, 1)), np.zeros((*k, 1, 1)), padding=padding, dilation=d
    )[3].padding
    span = [d[i] * (k[i] - 1) + 1 - sum(pads[i]) for i in range(2)]
    h, w_ = (draw(st.integers(max(1, s), max(1, s) + 13)) for s in span)
    n, c_in, c_out = (
        draw(st.integers(1, 3)),
        draw(st.integers(1, 9)),
        draw(st.integers(1, 6)),
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = make_layout(rng, (n, h, w_, c_in), dtype, draw(st.sampled_from(LAYOUTS)))
    w = rng.standard_normal((*k, c_in, c_out)).astype(dtype)
    return x, w, dict(padding=padding, dilation=d), draw(st.sampled_from(CAPS))


def check_forward_backward(case, dtype, forward, backward, input_grad=True):
    x, w, kwargs, cap = case
    xc, wc, _, spec = conv_spec(x, w, **kwargs)
    y = forward(xc, wc, spec, cap)
    assert y.dtype == dtype and y.shape == spec.out_shape
    assert_close(y, torch_conv2d(x, w, **kwargs), dtype)
    dy = np.random.default_rng(2).standard_normal(spec.out_shape).astype(dtype)
    grads_close(
        dy, x, w, kwargs, backward(dy, xc, wc, spec, cap, input_grad), dtype, input_grad
    )


# ------------------------------------------------------------------------------------------------
# Toom-Cook matrices


@pytest.mark.parametrize(
    "m, r, points",
    [
        (2, 3, None),
        (4, 3, None),
        (4, 3, (0, 1, -1, 2, -2, math.inf)),
        (3, 2, (0, 1, -1, math.inf)),
        (2, 2, (0, 1, math.inf)),
        (6, 3, (0, 1, -1, 2, -2, Fraction(1, 2), Fraction(-1, 2), math.inf)),
        (3, 3, (0, 1, -1, 2, 3)),  # without the point at infinity
    ],
)
def test_toom_cook_matrices_compute_a_1d_correlation(m, r, points, rng):
    t = wg.toom_cook(m, r, points)
    assert (
        t.AT.shape == (m, m + r - 1)
        and t.G.shape == (m + r - 1, r)
        and t.BT.shape == (m + r - 1,) * 2
    )
    assert np.array_equal(t.BT, np.round(t.BT)), "rows of BT are scaled to integers"
    for _ in range(5):
        d, g = rng.standard_normal(m + r - 1), rng.standard_normal(r)
        np.testing.assert_allclose(
            t.AT @ ((t.G @ g) * (t.BT @ d)),
            np.correlate(d, g, "valid"),
            rtol=0,
            atol=1e-12,
        )


def test_the_points_are_named_and_give_the_textbook_f23():
    assert wg.INTERPOLATION_POINTS[2] == (0, 1, -1, math.inf)
    f = wg.WINOGRAD[2]
    # Lavin & Gray's F(2, 3), up to the sign of the column of the point at infinity
    lavin_bt = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]])
    sign = np.diag([1, 1, 1, -1])
    np.testing.assert_array_equal(sign @ f.BT, lavin_bt)
    np.testing.assert_array_equal(f.AT @ sign, [[1, 1, 1, 0], [0, 1, -1, -1]])
    np.testing.assert_array_equal(
        sign @ f.G, [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, -1]]
    )


def test_bad_points_are_refused():
    with pytest.raises(ValueError, match="distinct"):
        wg.toom_cook(2, 3, (0, 1, 1, math.inf))
    with pytest.raises(ValueError, match="needs 4 points"):
        wg.toom_cook(2, 3, (0, 1, math.inf))


# ------------------------------------------------------------------------------------------------
# Winograd forward, dx and dw


def _wino(tile):
    fwd = lambda x, w, spec, cap: wg.winograd_conv2d(x, w, spec, tile, cap)  # noqa: E731

    def bwd(dy, x, w, spec, cap, input_grad):
        dx = None
        if input_grad:
            dx = wg.input_grad_phases(
                dy, w, spec, lambda a, b, s: wg.winograd_conv2d(a, b, s, tile, cap)
            )
        return dx, wg.winograd_weight_grad(dy, x, spec, tile, cap)

    return fwd, bwd


@settings(max_examples=200)
@given(
    case=stride1_cases(np.float64, kernel=(3, 3)),
    tile=st.sampled_from([2, 4]),
    input_grad=st.booleans(),
)
def test_winograd_float64(case, tile, input_grad):
    check_forward_backward(case, np.float64, *_wino(tile), input_grad)


@given(case=stride1_cases(np.float32, kernel=(3, 3)), tile=st.sampled_from([2, 4]))
def test_winograd_float32(case, tile):
    check_forward_backward(case, np.float32, *_wino(tile))


@pytest.mark.parametrize("method", ["winograd", "winograd4"])
def test_winograd_through_the_public_functions(method, rng):
    x = rng.standard_normal((3, 17, 12, 10))[:, ::-1]
    w = rng.standard_normal((3, 3, 10, 7))
    b = rng.standard_normal(7)
    for padding in (0, 1, "same", ((2, 0), (0, 3))):
        y = conv2d(x, w, b, padding=padding, method=method)
        assert_close(y, torch_conv2d(x, w, b, padding=padding), np.float64)
        dy = rng.standard_normal(y.shape)
        dx, dw, db = conv2d_backward(dy, x, w, padding=padding, method=method)
        rx, rw, rb = torch_conv2d_grads(x, w, b, dy, padding=padding)
        for got, ref in ((dx, rx), (dw, rw), (db, rb)):
            assert_close(got, ref, np.float64)


@pytest.mark.parametrize("method", ["winograd", "winograd4"])
@pytest.mark.parametrize(
    "kwargs, constraint",
    [
        (dict(k=5), "3x3 kernel"),
        (dict(k=1), "3x3 kernel"),
        (dict(stride=2), "stride 1"),
        (dict(dilation=2), "dilation 1"),
        (dict(stride=(1, 2)), "stride 1"),
    ],
)
def test_winograd_refuses_what_it_cannot_compute(method, kwargs, constraint):
    kwargs = dict(kwargs)
    k = kwargs.pop("k", 3)
    x, w = np.zeros((1, 12, 12, 2)), np.zeros((k, k, 2, 2))
    with pytest.raises(ValueError, match=constraint):
        conv2d(x, w, method=method, **kwargs)
    dy = conv2d(x, w, **kwargs)
    with pytest.raises(ValueError, match=constraint):
        conv2d_backward(dy, x, w, method=method, **kwargs)


def test_a_wrong_transform_matrix_is_caught(rng):
    """One entry of B^T off by one (or a wrong interpolation point in one matrix only): the
    comparison with PyTorch must fail."""
    x, w = rng.standard_normal((2, 9, 9, 4)), rng.standard_normal((3, 3, 4, 3))
    xc, wc, _, spec = conv_spec(x, w, padding=1)
    ref = torch_conv2d(x, w, padding=1)
    good = wg.WINOGRAD[2]
    assert_close(wg.winograd_conv2d(xc, wc, spec, wg=good), ref, np.float64)
    bt = good.BT.copy()
    bt[1, 2] += 1
    other = wg.toom_cook(2, 3, (0, 1, 2, math.inf))
    for bad in (good._replace(BT=bt), good._replace(G=other.G)):
        with pytest.raises(AssertionError, match="max abs error"):
            assert_close(wg.winograd_conv2d(xc, wc, spec, wg=bad), ref, np.float64)
    dy = rng.standard_normal(spec.out_shape)
    rw = torch_conv2d_grads(x, w, None, dy, padding=1)[1]
    with pytest.raises(AssertionError, match="max abs error"):
        assert_close(
            wg.winograd_weight_grad(dy, xc, spec, wg=good._replace(BT=bt)),
            rw,
            np.float64,
        )


@pytest.mark.parametrize("tile, bound", [(2, 1e-5), (4, 1e-5)])
def test_float32_error_on_128_channel_layers(tile, bound):
    """The chapter's accuracy target: float32 within 1e-5 of the output's scale against
    float64 PyTorch on a 128-channel layer (x ~ N(0, 1), w scaled to keep y ~ N(0, 1))."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 14, 14, 128))
    w = rng.standard_normal((3, 3, 128, 128)) / math.sqrt(9 * 128)
    ref = torch_conv2d(x, w, padding=1)
    x32, w32, _, spec = conv_spec(x.astype(np.float32), w.astype(np.float32), padding=1)
    err = (
        np.abs(wg.winograd_conv2d(x32, w32, spec, tile) - ref).max() / np.abs(ref).max()
    )
    assert err < bound, err


def test_the_lavin_points_lose_more_digits_than_ours():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 14, 14, 64)).astype(np.float32)
    w = (rng.standard_normal((3, 3, 64, 64)) / 24).astype(np.float32)
    ref = torch_conv2d(x.astype(np.float64), w.astype(np.float64), padding=1)
    _, _, _, spec = conv_spec(x, w, padding=1)
    lavin = wg.toom_cook(4, 3, (0, 1, -1, 2, -2, math.inf))
    err = {
        k: np.abs(wg.winograd_conv2d(x, w, spec, wg=t) - ref).max()
        for k, t in (("ours", wg.WINOGRAD[4]), ("lavin", lavin))
    }
    assert err["lavin"] > 1.5 * err["ours"], err


# ------------------------------------------------------------------------------------------------
# FFT


def _fft_bwd(dy, x, w, spec, cap, input_grad):
    dx = None
    if input_grad:
        dx = wg.input_grad_phases(
            dy, w, spec, lambda a, b, s: wg.fft_conv2d(a, b, s, cap)
        )
    return dx, wg.fft_weight_grad(dy, x, spec, cap)


@settings(max_examples=150)
@given(case=stride1_cases(np.float64, dilation=True), input_grad=st.booleans())
def test_fft_float64(case, input_grad):
    check_forward_backward(case, np.float64, wg.fft_conv2d, _fft_bwd, input_grad)


@given(case=stride1_cases(np.float32, dilation=True))
def test_fft_float32(case):
    check_forward_backward(case, np.float32, wg.fft_conv2d, _fft_bwd)


def test_fft_sizes_are_5_smooth_and_minimal():
    def smooth(n):
        for p in (2, 3, 5):
            while n % p == 0:
                n //= p
        return n == 1

    for n in range(1, 400):
        s = wg.fft_size(n)
        assert s >= n and smooth(s) and not any(smooth(k) for k in range(n, s))


def test_fft_refuses_a_stride():
    x, w = np.zeros((1, 9, 9, 2)), np.zeros((3, 3, 2, 2))
    with pytest.raises(ValueError, match="method='fft' needs stride 1"):
        conv2d(x, w, stride=2, method="fft")


def test_fft_plan_keeps_the_kernel_spectrum_within_the_cap():
    x, w = np.zeros((64, 56, 56, 64), np.float32), np.zeros((7, 7, 64, 64), np.float32)
    spec = conv_spec(x, w, padding=3)[3]
    for cap in (8 * 2**20, 64 * 2**20):
        p = wg.plan_fft(spec, cap)
        assert 2 * 4 * p.lh * (p.lw // 2 + 1) * 64 * 64 <= cap // 2
        assert p.rows == min(56, p.lh - 6) and p.cols == min(56, p.lw - 6)
    # nothing fits in 1 MiB: the smallest lengths that hold the 7x7 kernel (fft_size(7) = 8)
    assert wg.plan_fft(spec, 2**20)[3:] == (8, 8)


# ------------------------------------------------------------------------------------------------
# Phase decompositions


@settings(max_examples=250)
@given(case=conv_cases(np.float64))
def test_strided_input_gradient_by_phases_equals_dilate_and_convolve(case):
    """Any stride, padding and dilation: dx by s^2 stride-1 convolutions without zeros equals
    chapter 6's dilate-pad-rotate convolution and PyTorch's gradient."""
    x, w, _, spec = conv_spec(case.x, case.w, **case.kwargs)
    dy = np.random.default_rng(3).standard_normal(spec.out_shape)
    dx = wg.input_grad_phases(dy, w, spec, wg.conv2d_fast)
    ch6 = conv_input_grad(
        dy, w, spec.x_shape[1:3], spec.stride, spec.padding, spec.dilation
    )
    np.testing.assert_allclose(dx, ch6, rtol=0, atol=1e-10 * (1 + np.abs(ch6).max()))
    assert_close(
        dx, torch_conv2d_grads(case.x, case.w, None, dy, **case.kwargs)[0], np.float64
    )


def test_phases_multiply_no_zero(rng):
    """The phase sub-kernels use every tap exactly once, and their products add up to the
    useful ones: (H W / s^2) K^2 per channel pair instead of chapter 6's H W K^2."""
    x, w = np.zeros((1, 28, 28, 1)), np.zeros((3, 3, 1, 1))
    spec = conv_spec(x, w, stride=2, padding=1)[3]
    phases = list(wg._grad_phases(spec))
    assert sorted(len(t[0]) * len(t[1]) for _, _, t, _, _ in phases) == [1, 2, 2, 4]
    products = sum(
        math.prod(s.out_shape[1:3]) * math.prod(s.w_shape[:2])
        for s in wg._grad_phase_specs(spec)
    )
    assert (
        products == 14 * 14 * 9
    )  # each output pixel's 9 taps, once: no zero of dilate(dy)


@settings(max_examples=150)
@given(case=stride1_cases(np.float64, dilation=True), input_grad=st.booleans())
def test_dilated_by_phases(case, input_grad):
    fwd = lambda x, w, spec, cap: wg.dilated_conv2d(x, w, spec, wg.conv2d_fast)  # noqa: E731
    bwd = lambda dy, x, w, spec, cap, ig: wg.dilated_backward(  # noqa: E731
        dy, x, w, spec, ig, wg.conv2d_backward_fast
    )
    check_forward_backward(case, np.float64, fwd, bwd, input_grad)


@given(case=conv_cases(np.float32))
def test_registered_methods_float32_any_geometry(case):
    """Every new method on random problems, float32, where it applies (else a ValueError)."""
    y_ref = torch_conv2d(case.x, case.w, case.b, **case.kwargs)
    dy = np.random.default_rng(4).standard_normal(y_ref.shape).astype(np.float32)
    grads = torch_conv2d_grads(case.x, case.w, case.b, dy, **case.kwargs)
    for method in ("winograd", "winograd4", "fft", "dilated", "taps"):
        try:
            y = conv2d(case.x, case.w, case.b, method=method, **case.kwargs)
        except ValueError as e:
            assert method != "taps" and "needs" in str(e)
            continue
        assert_close(y, y_ref, np.float32)
    for method in ("winograd", "winograd4", "fft", "dilated", "phases"):
        try:
            got = conv2d_backward(dy, case.x, case.w, method=method, **case.kwargs)
        except ValueError as e:
            assert method != "phases" and "needs" in str(e)
            continue
        for g, r in zip(got, grads):
            assert_close(g, r, np.float32)


def test_taps_method(rng):
    for kwargs in (
        dict(stride=2, padding=1, dilation=2),
        dict(padding=((0, 1), (2, 0))),
    ):
        for c_in in (1, 3):
            x = rng.standard_normal((5, 9, 8, c_in))
            w = rng.standard_normal((3, 2, c_in, 4))
            xc, wc, _, spec = conv_spec(x, w, **kwargs)
            for cap in (1, 10**6):
                assert_close(
                    wg.taps_conv2d(xc, wc, spec, cap),
                    torch_conv2d(x, w, **kwargs),
                    np.float64,
                )


# ------------------------------------------------------------------------------------------------
# Workspace and auto


def _peak_extra(fn):
    tracemalloc.start()
    tracemalloc.reset_peak()
    out = fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak - sum(
        a.nbytes for a in (out if isinstance(out, tuple) else (out,)) if a is not None
    )


@pytest.mark.parametrize("tile", [2, 4])
def test_winograd_workspace_does_not_grow_with_the_batch(tile):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 3, 32, 32), dtype=np.float32)
    peaks = {}
    for n in (8, 64):
        x = rng.standard_normal((n, 28, 28, 32), dtype=np.float32)
        spec = conv_spec(x, w, padding=1)[3]
        dy = rng.standard_normal(spec.out_shape, dtype=np.float32)
        peaks[n] = (
            _peak_extra(lambda: wg.winograd_conv2d(x, w, spec, tile)),
            _peak_extra(lambda: wg.winograd_weight_grad(dy, x, spec, tile)),
        )
    kernel = (tile + 2) ** 2 * 32 * 32 * 4  # the transformed kernel (and dw~), per call
    for f, b in peaks.values():
        assert 0 < f <= wg.WINOGRAD_TILE_BYTES + 2 * kernel, f
        assert 0 < b <= wg.WINOGRAD_TILE_BYTES + 3 * kernel, b
    assert peaks[64][0] < 1.2 * peaks[8][0] + 2**16


def test_auto_decisions_follow_the_cost_model():
    """With the package's rates: a large 3x3 layer goes to Winograd, a first layer, a 1x1 and
    a strided forward stay with chapter 8's tiles, a dilated 3x3 is split into phases, and a
    large kernel on few channels goes to the FFT."""

    def spec(n, h, c_in, c_out, k, **kw):
        return conv_spec(
            np.zeros((n, h, h, c_in), np.float32),
            np.zeros((k, k, c_in, c_out), np.float32),
            **kw,
        )[3]

    assert wg.choose_conv2d(spec(64, 56, 64, 64, 3, padding=1)).startswith("winograd")
    assert wg.choose_conv2d(spec(64, 28, 1, 32, 3, padding=1)) == "fast"
    assert wg.choose_conv2d(spec(64, 28, 64, 128, 1)) == "fast"
    assert wg.choose_conv2d(spec(64, 28, 32, 64, 3, stride=2, padding=1)) == "fast"
    assert wg.choose_conv2d(spec(64, 28, 32, 32, 3, padding=2, dilation=2)) == "dilated"
    assert wg.choose_conv2d(spec(8, 64, 8, 8, 21, padding=10)) == "fft"
    assert wg.choose_conv2d(spec(8, 64, 8, 8, 5, padding=2)) == "fast"
    for s in (
        spec(64, 56, 64, 64, 3, padding=1),
        spec(64, 28, 32, 64, 3, stride=2, padding=1),
    ):
        assert wg.choose_conv2d_backward(s) in wg.backward_costs(s)
    assert (
        wg.choose_conv2d(spec(2, 14, 512, 512, 3, padding=1)) != "winograd4"
    )  # float32 > 256


@given(case=conv_cases(np.float64))
def test_auto_equals_pytorch(case):
    y = conv2d(case.x, case.w, case.b, **case.kwargs)
    assert_close(y, torch_conv2d(case.x, case.w, case.b, **case.kwargs), np.float64)
    dy = np.random.default_rng(5).standard_normal(y.shape)
    got = conv2d_backward(dy, case.x, case.w, **case.kwargs)
    for g, r in zip(got, torch_conv2d_grads(case.x, case.w, case.b, dy, **case.kwargs)):
        assert_close(g, r, np.float64)
