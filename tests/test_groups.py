"""Grouped and depthwise convolution (section 3a): every conv2d and conv2d_backward method with
`groups=` against PyTorch over random problems (forward; dx, dw, db), float64 and float32, every
memory layout; bad group counts; and a grouped convolution that takes a group's input channels
interleaved instead of as a block is caught."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from convbook import conv2d, conv2d_backward, conv2d_backward_methods, conv2d_methods
from conftest import (
    LAYOUTS,
    assert_close,
    general_methods,
    make_layout,
    require_support,
    to_t,
)
from convbook.backward import CONV2D_BACKWARD_METHODS
from convbook.conv import CONV2D_METHODS


@st.composite
def grouped_cases(draw, dtype=np.float64):
    g = draw(st.integers(1, 4))
    c, m = draw(st.integers(1, 3)), draw(st.integers(1, 3))  # per group
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    span = [d * (k - 1) + 1 for d, k in zip(dilation, (kh, kw))]
    h = draw(st.integers(max(1, span[0] - 2 * padding[0]), span[0] + 6))
    w_ = draw(st.integers(max(1, span[1] - 2 * padding[1]), span[1] + 6))
    n = draw(st.integers(1, 2))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = make_layout(rng, (n, h, w_, g * c), dtype, draw(st.sampled_from(LAYOUTS)))
    wt = rng.standard_normal((kh, kw, c, g * m)).astype(dtype)
    b = rng.standard_normal(g * m).astype(dtype) if draw(st.booleans()) else None
    return x, wt, b, g, dict(stride=stride, padding=padding, dilation=dilation)


def torch_forward(x, w, b, g, geom):
    y = F.conv2d(
        to_t(x.transpose(0, 3, 1, 2)),
        to_t(w.transpose(3, 2, 0, 1)),
        None if b is None else to_t(b),
        groups=g,
        **geom,
    )
    return y.numpy().transpose(0, 2, 3, 1)


def torch_grads(dy, x, w, g, geom):
    tx = to_t(x.transpose(0, 3, 1, 2)).requires_grad_()
    tw = to_t(w.transpose(3, 2, 0, 1)).requires_grad_()
    tb = torch.zeros(w.shape[3], dtype=tx.dtype, requires_grad=True)
    F.conv2d(tx, tw, tb, groups=g, **geom).backward(to_t(dy.transpose(0, 3, 1, 2)))
    return (
        tx.grad.numpy().transpose(0, 2, 3, 1),
        tw.grad.numpy().transpose(2, 3, 1, 0),
        tb.grad.numpy(),
    )


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("method", ["auto", *general_methods(CONV2D_METHODS)])
@settings(max_examples=60)
@given(data=st.data())
def test_grouped_forward(method, dtype, data):
    x, w, b, g, geom = data.draw(grouped_cases(dtype))
    require_support(CONV2D_METHODS, method, x, w, groups=g, **geom)
    y = conv2d(x, w, b, groups=g, method=method, **geom)
    assert y.dtype == dtype
    assert_close(y, torch_forward(x, w, b, g, geom), dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("method", ["auto", *general_methods(CONV2D_BACKWARD_METHODS)])
@settings(max_examples=60)
@given(data=st.data())
def test_grouped_backward(method, dtype, data):
    x, w, _, g, geom = data.draw(grouped_cases(dtype))
    y_shape = conv2d(x, w, groups=g, method="einsum", **geom).shape
    dy = np.random.default_rng(0).standard_normal(y_shape).astype(dtype)
    require_support(CONV2D_BACKWARD_METHODS, method, x, w, groups=g, **geom)
    got = conv2d_backward(dy, x, w, groups=g, method=method, **geom)
    for name, a, r in zip(("dx", "dw", "db"), got, torch_grads(dy, x, w, g, geom)):
        assert a.dtype == dtype, name
        try:
            assert_close(a, r, dtype)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


def grouped_interleaved(x, w, b=None, *, groups, **geom):
    """A subtly wrong grouped convolution: group k reads channels k, k+g, k+2g, ..."""
    c, m = w.shape[2], w.shape[3] // groups
    parts = [
        conv2d(x[..., k::groups], w[..., k * m : (k + 1) * m], **geom)
        for k in range(groups)
    ]
    y = np.concatenate(parts, axis=3)
    return y if b is None else y + b


def test_the_property_catches_interleaved_groups():
    @settings(max_examples=200, report_multiple_bugs=False)
    @given(data=st.data())
    def prop(data):
        x, w, b, g, geom = data.draw(grouped_cases())
        assert_close(
            grouped_interleaved(x, w, b, groups=g, **geom),
            torch_forward(x, w, b, g, geom),
            np.float64,
        )

    with pytest.raises(AssertionError):
        prop()


@pytest.mark.parametrize(
    "kw,word",
    [
        (dict(groups=0), "groups must be an int >= 1"),
        (dict(groups=2.0), "groups must be an int"),
        (dict(groups=True), "groups must be an int"),
        (dict(groups=4), "channel mismatch for groups=4"),
        (
            dict(groups=3, w_in=2, c_out=4),
            "channel mismatch for groups=3",
        ),  # C_out not a multiple
    ],
)
def test_bad_groups(kw, word):
    w_in, c_out = kw.pop("w_in", 3), kw.pop("c_out", 6)
    x, w = np.zeros((1, 5, 5, 6)), np.zeros((3, 3, w_in, c_out))
    with pytest.raises((ValueError, TypeError), match=word):
        conv2d(x, w, **kw)
    with pytest.raises((ValueError, TypeError), match=word):
        conv2d_backward(np.zeros((1, 3, 3, c_out)), x, w, **kw)
