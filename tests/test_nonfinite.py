"""NaN and infinities through every convolution (forward and backward, every method) and every
pooling function, against PyTorch: the same entries come out NaN, the same come out +-inf (with the
same sign), and the finite entries agree within the usual tolerances.

Non-finite values are put into the data (`x`, and `dy` for the backward pass of an unpadded layer),
never into the kernel: a zero inserted by padding times an infinite number is NaN in any library
that multiplies it, and libraries differ in which zeros they skip (PyTorch's own float32 and float64
paths disagree on the weight gradient of a padded layer with an infinite `dy`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from convbook import (
    avg_pool2d,
    avg_pool2d_backward,
    conv2d,
    conv2d_backward,
    conv2d_backward_methods,
    conv2d_methods,
    conv_transpose2d,
    max_pool2d,
    max_pool2d_backward,
    nchw_to_nhwc,
    nhwc_to_nchw,
)
from convbook.backward import CONV2D_BACKWARD_METHODS
from convbook.conv import CONV2D_METHODS, conv_spec
from conftest import (
    cases_for,
    require_support,
    assert_close,
    conv_cases,
    pool_cases,
    to_t,
    torch_conv2d,
    torch_conv2d_grads,
)

SPECIALS = np.array([np.nan, np.inf, -np.inf])


def sprinkle(a: np.ndarray, seed: int, fraction: float = 0.08) -> np.ndarray:
    """A copy of `a` (any layout) with about `fraction` of its entries NaN, +inf or -inf."""
    rng = np.random.default_rng(seed)
    out = np.array(a, copy=True)
    hit = rng.random(out.shape) < fraction
    out[hit] = rng.choice(SPECIALS, size=int(hit.sum())).astype(out.dtype)
    return out


def assert_same(got: np.ndarray, ref: np.ndarray, dtype) -> None:
    """NaN where `ref` is NaN, the same infinities, and the finite part close."""
    assert got.shape == ref.shape, f"shape {got.shape} != {ref.shape}"
    nan_g, nan_r = np.isnan(got), np.isnan(ref)
    assert np.array_equal(nan_g, nan_r), (
        f"NaN at {np.argwhere(nan_g & ~nan_r)[:3].tolist()} (not in PyTorch), "
        f"missing at {np.argwhere(nan_r & ~nan_g)[:3].tolist()}"
    )
    inf_r = np.isinf(ref)
    assert np.array_equal(np.isinf(got), inf_r), "infinities differ from PyTorch's"
    assert np.array_equal(got[inf_r], ref[inf_r]), "infinities of the wrong sign"
    finite = ~(nan_r | inf_r)
    assert_close(np.where(finite, got, 0), np.where(finite, ref, 0), dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("method", ["auto", *conv2d_methods()])
@settings(max_examples=60)
@given(data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_conv2d_with_nonfinite_input(method, dtype, data, seed):
    case = data.draw(cases_for(method))
    x = sprinkle(case.x, seed).astype(dtype)
    w = case.w.astype(dtype)
    b = None if case.b is None else case.b.astype(dtype)
    require_support(CONV2D_METHODS, method, x, w, **case.kwargs)
    got = conv2d(x, w, b, **case.kwargs, method=method)
    assert_same(got, torch_conv2d(x, w, b, **case.kwargs), dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("method", ["auto", *conv2d_backward_methods()])
@settings(max_examples=60)
@given(data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_conv2d_backward_with_nonfinite_input_and_gradient(method, dtype, data, seed):
    case = data.draw(cases_for(method))
    x = sprinkle(case.x, seed).astype(dtype)
    w = case.w.astype(dtype)
    y_shape = conv2d(case.x, case.w, **case.kwargs, method="einsum").shape
    dy = np.random.default_rng(seed).standard_normal(y_shape)
    if conv_spec(case.x, case.w, **case.kwargs)[3].padding == ((0, 0), (0, 0)):
        dy = sprinkle(dy, seed + 1)
    dy = dy.astype(dtype)
    require_support(CONV2D_BACKWARD_METHODS, method, x, w, **case.kwargs)
    dx, dw, db = conv2d_backward(dy, x, w, **case.kwargs, method=method)
    rx, rw, rb = torch_conv2d_grads(x, w, None, dy, **case.kwargs)
    for name, g, r in [("dx", dx, rx), ("dw", dw, rw), ("db", db, rb)]:
        try:
            assert_same(g, r, dtype)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


@settings(max_examples=80)
@given(case=conv_cases(allow_same=False), seed=st.integers(0, 2**32 - 1))
def test_conv_transpose2d_with_nonfinite_input(case, seed):
    """conv_transpose2d is the input gradient: feed it a non-finite "dy"."""
    pad = case.padding
    if isinstance(pad, str) or (isinstance(pad, tuple) and isinstance(pad[0], tuple)):
        return  # PyTorch's conv_transpose2d takes symmetric integer padding only
    y_shape = conv2d(case.x, case.w, **case.kwargs, method="einsum").shape
    d = sprinkle(np.random.default_rng(seed).standard_normal(y_shape), seed)
    st_, dil, p_ = (np.broadcast_to(v, 2) for v in (case.stride, case.dilation, pad))
    kh_kw = np.array(case.w.shape[:2])
    if min((np.array(y_shape[1:3]) - 1) * st_ - 2 * p_ + dil * (kh_kw - 1) + 1) < 1:
        return  # the padding crops the whole output away: both libraries refuse
    ours = conv_transpose2d(
        d, case.w, stride=case.stride, padding=pad, dilation=case.dilation
    )
    h, w_ = ours.shape[1:3]
    ref = F.conv_transpose2d(
        to_t(nhwc_to_nchw(d)),
        to_t(case.w.transpose(3, 2, 0, 1)),
        stride=case.stride,
        padding=pad,
        dilation=case.dilation,
    ).numpy()
    assert_same(ours, nchw_to_nhwc(ref)[:, :h, :w_], np.float64)


def conv2d_nan_to_zero(x, w, b=None, **kw):
    """A subtly wrong conv2d: treats NaN as 0 (as a `nansum` or a NaN-killing ReLU would)."""
    return conv2d(np.where(np.isnan(x), 0, x), w, b, **kw)


def test_the_nonfinite_check_catches_a_nan_dropping_convolution():
    @settings(max_examples=200, report_multiple_bugs=False)
    @given(case=conv_cases(), seed=st.integers(0, 2**32 - 1))
    def prop(case, seed):
        x = sprinkle(case.x, seed)
        assert_same(
            conv2d_nan_to_zero(x, case.w, case.b, **case.kwargs),
            torch_conv2d(x, case.w, case.b, **case.kwargs),
            np.float64,
        )

    with pytest.raises(AssertionError, match="NaN"):
        prop()
