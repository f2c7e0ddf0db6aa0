"""conv2d_backward (every method), col2im, dilate/rot180 and conv_transpose2d against PyTorch autograd,
finite differences (independent of torch), and a deliberately wrong backward."""

from __future__ import annotations

import numpy as np
import pytest
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from convbook import (
    col2im,
    conv2d,
    conv2d_backward,
    conv2d_backward_methods,
    conv_transpose2d,
    conv_transpose2d_backward,
    dilate,
    im2col,
    rot180,
)
from convbook.backward import CONV2D_BACKWARD_METHODS, register_conv2d_backward
from convbook.transpose import conv_weight_grad, pad_or_crop
from conftest import (
    LAYOUTS,
    assert_close,
    cases_for,
    conv_cases,
    general_methods,
    make_layout,
    numerical_grad,
    require_support,
    to_t,
    torch_conv2d_grads,
)

METHODS = ["auto", *conv2d_backward_methods()]
GENERAL = ["auto", *general_methods(CONV2D_BACKWARD_METHODS)]  # solve every problem


def check_backward(impl, case, dtype, rng_seed=0):
    y_shape = conv2d(case.x, case.w, **case.kwargs, method="einsum").shape
    dy = np.random.default_rng(rng_seed).standard_normal(y_shape).astype(dtype)
    dx, dw, db = impl(dy, case.x, case.w, **case.kwargs)
    rx, rw, rb = torch_conv2d_grads(case.x, case.w, case.b, dy, **case.kwargs)
    for name, got, ref in [("dx", dx, rx), ("dw", dw, rw), ("db", db, rb)]:
        assert got.dtype == dtype, (name, got.dtype)
        try:
            assert_close(got, ref, dtype)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


@pytest.mark.parametrize("method", METHODS)
@given(data=st.data())
def test_backward_float64(method, data):
    case = data.draw(cases_for(method, np.float64))
    require_support(CONV2D_BACKWARD_METHODS, method, case.x, case.w, **case.kwargs)
    check_backward(
        lambda *a, **k: conv2d_backward(*a, method=method, **k), case, np.float64
    )


@pytest.mark.parametrize("method", METHODS)
@given(data=st.data())
def test_backward_float32(method, data):
    case = data.draw(cases_for(method, np.float32))
    require_support(CONV2D_BACKWARD_METHODS, method, case.x, case.w, **case.kwargs)
    check_backward(
        lambda *a, **k: conv2d_backward(*a, method=method, **k), case, np.float32
    )


def dilate_backward_published(dy, x, w, spec, input_grad=True):
    """The backward of chapter 6 with a published padding rule: pad the dilated dy by k-1 when the
    forward padding is 0, else by p (symmetric). Right for 3x3 kernels with padding 1 at stride 1,
    wrong in general."""
    (pt, _), (pl, _) = spec.padding
    kh, kw = spec.w_shape[:2]
    ph = kh - 1 if pt == 0 else pt
    pw = kw - 1 if pl == 0 else pl
    d = pad_or_crop(dilate(dy, spec.stride), ph, ph, pw, pw)
    dx = conv2d(d, rot180(w).transpose(0, 1, 3, 2), dilation=spec.dilation)
    dw = conv_weight_grad(
        dy, x, spec.w_shape[:2], spec.stride, spec.padding, spec.dilation
    )
    return dx, dw


def test_property_catches_the_published_padding_formula():
    register_conv2d_backward("published", priority=-1)(dilate_backward_published)
    try:
        impl = lambda *a, **k: conv2d_backward(*a, method="published", **k)  # noqa: E731
        # it is right where it was derived ...
        rng = np.random.default_rng(0)
        x, w = rng.standard_normal((2, 6, 6, 2)), rng.standard_normal((3, 3, 2, 3))
        dy = rng.standard_normal((2, 6, 6, 3))
        assert np.allclose(
            impl(dy, x, w, padding=1)[0], conv2d_backward(dy, x, w, padding=1)[0]
        )
        # ... and the property test finds where it is not
        prop = settings(max_examples=300, report_multiple_bugs=False)(
            given(case=conv_cases(np.float64))(
                lambda case: check_backward(impl, case, np.float64)
            )
        )
        with pytest.raises((AssertionError, ValueError)):
            prop()
    finally:
        del CONV2D_BACKWARD_METHODS["published"]


@pytest.mark.parametrize("method", GENERAL)
def test_input_grad_false_skips_dx(method):
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((2, 7, 6, 2)), rng.standard_normal((3, 3, 2, 4))
    dy = rng.standard_normal((2, 4, 3, 4))
    dx, dw, db = conv2d_backward(dy, x, w, stride=2, padding=1, method=method)
    none, dw2, db2 = conv2d_backward(
        dy, x, w, stride=2, padding=1, method=method, input_grad=False
    )
    assert dx is not None and none is None
    assert np.array_equal(dw, dw2) and np.array_equal(db, db2)


@pytest.mark.parametrize("method", GENERAL[1:])
@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(stride=2, padding=1),
        dict(stride=(2, 3), dilation=(2, 1)),
        dict(padding="same", dilation=2),
        dict(padding=((0, 2), (1, 0)), stride=2),
    ],
)
def test_finite_differences(method, kw):
    """Independent of torch: central differences of L = sum(conv2d(x, w, b) * g) in float64."""
    rng = np.random.default_rng(7)
    x, w, b = (
        rng.standard_normal((2, 6, 5, 2)),
        rng.standard_normal((3, 2, 2, 3)),
        rng.standard_normal(3),
    )
    g = rng.standard_normal(conv2d(x, w, b, **kw).shape)
    loss = lambda: float(np.sum(conv2d(x, w, b, method="naive", **kw) * g))  # noqa: E731
    dx, dw, db = conv2d_backward(g, x, w, method=method, **kw)
    # L is linear in each argument, so central differences are exact up to rounding (~1e-10)
    for got, arr in [(dx, x), (dw, w), (db, b)]:
        np.testing.assert_allclose(got, numerical_grad(loss, arr), rtol=1e-7, atol=1e-7)


@given(
    st.integers(1, 2),
    st.integers(1, 8),
    st.integers(1, 8),
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(0, 2),
    st.integers(1, 2),
    st.sampled_from(LAYOUTS),
)
def test_col2im_of_im2col_is_x_times_window_count(n, h, w, c, k, s, d, p, seed, layout):
    if h + 2 * p < d * (k - 1) + 1 or w + 2 * p < d * (k - 1) + 1:
        return
    x = make_layout(np.random.default_rng(seed), (n, h, w, c), np.float64, layout)
    geom = dict(stride=s, padding=p, dilation=d)
    back = col2im(im2col(x, k, **geom), x.shape, k, **geom)
    # independent window count: torch's fold of unfold(ones) counts how many windows cover each pixel
    ones = to_t(np.ones((1, 1, h, w)))
    count = F.fold(
        F.unfold(ones, k, dilation=d, padding=p, stride=s),
        (h, w),
        k,
        dilation=d,
        padding=p,
        stride=s,
    ).numpy()[0, 0]
    np.testing.assert_allclose(
        back, x * count[None, :, :, None], rtol=1e-12, atol=1e-12
    )


@given(
    st.integers(1, 3),
    st.integers(1, 6),
    st.integers(1, 6),
    st.integers(1, 3),
    st.integers(1, 4),
    st.integers(1, 4),
)
def test_dilate_matches_torch_conv_transpose_with_identity(n, h, w, c, sh, sw):
    x = np.random.default_rng(h * w).standard_normal((n, h, w, c))
    ones = to_t(np.ones((c, 1, 1, 1)))
    ref = F.conv_transpose2d(
        to_t(x.transpose(0, 3, 1, 2)), ones, stride=(sh, sw), groups=c
    )
    assert np.array_equal(dilate(x, (sh, sw)), ref.numpy().transpose(0, 2, 3, 1))


def test_rot180():
    w = np.arange(2 * 3 * 1 * 1.0).reshape(2, 3, 1, 1)
    assert np.array_equal(rot180(w)[..., 0, 0], [[5, 4, 3], [2, 1, 0]])


@st.composite
def transpose_cases(draw):
    g = draw(st.sampled_from([1, 1, 2, 3]))
    n, ci, co = (
        draw(st.integers(1, 3)),
        g * draw(st.integers(1, 3)),
        g * draw(st.integers(1, 3)),
    )
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw, dh, dw = (draw(st.integers(1, 3)) for _ in range(4))
    ph, pw = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    oph, opw = (
        draw(st.integers(0, max(sh, dh) - 1)),
        draw(st.integers(0, max(sw, dw) - 1)),
    )
    h, w = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    hout = (h - 1) * sh - 2 * ph + dh * (kh - 1) + oph + 1
    wout = (w - 1) * sw - 2 * pw + dw * (kw - 1) + opw + 1
    if hout < 1 or wout < 1:
        ph = pw = 0
    layout = draw(st.sampled_from(LAYOUTS))
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = make_layout(rng, (n, h, w, ci), dtype, layout)
    wt = rng.standard_normal((kh, kw, co // g, ci)).astype(dtype)
    kw_ = dict(
        stride=(sh, sw), padding=(ph, pw), output_padding=(oph, opw), dilation=(dh, dw)
    )
    if g > 1:
        kw_["groups"] = g
    if draw(st.booleans()):
        kw_["b"] = rng.standard_normal(co).astype(dtype)
    return x, wt, kw_


def torch_transpose(x, w, kw, requires_grad=False):
    """F.conv_transpose2d on NHWC x and our (KH, KW, C_out // g, C_in) w; returns tensors."""
    geom = {k: v for k, v in kw.items() if k != "b"}
    tx = to_t(x.transpose(0, 3, 1, 2)).requires_grad_(requires_grad)
    tw = to_t(w.transpose(3, 2, 0, 1)).requires_grad_(requires_grad)
    b = kw.get("b")
    tb = None if b is None else to_t(b).requires_grad_(requires_grad)
    return tx, tw, tb, F.conv_transpose2d(tx, tw, tb, **geom)


def check_transpose(impl, case):
    x, w, kw = case
    ref = torch_transpose(x, w, kw)[3]
    assert_close(impl(x, w, **kw), ref.numpy().transpose(0, 2, 3, 1), x.dtype)


@given(transpose_cases())
def test_conv_transpose2d_backward_equals_torch(case):
    """conv_transpose2d's own backward: dx, dw, db against autograd through PyTorch's."""
    x, w, kw = case
    kw.setdefault("b", np.zeros(w.shape[2] * kw.get("groups", 1), x.dtype))
    tx, tw, tb, tz = torch_transpose(x, w, kw, requires_grad=True)
    dz = np.random.default_rng(1).standard_normal(tuple(tz.shape)).astype(x.dtype)
    tz.backward(to_t(dz))
    geom = {k: v for k, v in kw.items() if k != "b"}
    dx, dw, db = conv_transpose2d_backward(dz.transpose(0, 2, 3, 1), x, w, **geom)
    for name, got, ref in [
        ("dx", dx, tx.grad.numpy().transpose(0, 2, 3, 1)),
        ("dw", dw, tw.grad.numpy().transpose(2, 3, 1, 0)),
        ("db", db, tb.grad.numpy()),
    ]:
        assert got.dtype == x.dtype, name
        try:
            assert_close(got, ref, x.dtype)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


@given(transpose_cases())
def test_conv_transpose2d_equals_torch(case):
    check_transpose(conv_transpose2d, case)


def test_conv_transpose2d_is_conv2d_input_gradient():
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((2, 10, 8, 3)), rng.standard_normal((3, 2, 3, 4))
    dy = rng.standard_normal(conv2d(x, w, stride=2, padding=1).shape)
    dx = conv2d_backward(dy, x, w, stride=2, padding=1, method="col2im")[0]
    # rows: 10 -> 5 with the last padded row unread, so 5 -> 10 needs output_padding 1; columns: 8 -> 5 -> 8
    assert np.allclose(
        conv_transpose2d(dy, w, stride=2, padding=1, output_padding=(1, 0)), dx
    )
    assert conv_transpose2d(dy, w, stride=2, padding=1).shape == (2, 9, 8, 3)


def test_property_catches_transpose_without_rotation():
    def wrong(x, w, **kw):
        return conv_transpose2d(x, w[::-1, ::-1], **kw)

    prop = settings(report_multiple_bugs=False)(
        given(transpose_cases())(lambda case: check_transpose(wrong, case))
    )
    with pytest.raises(AssertionError):
        prop()
