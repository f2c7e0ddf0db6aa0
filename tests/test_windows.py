"""`windows`, `pad2d` and the bounds guard against PyTorch's unfold/pad and NumPy's sliding_window_view."""
from __future__ import annotations

import numpy as np
import pytest
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import convbook
from convbook import byte_extent, check_inside, pad2d, safe_as_strided, windows
from conftest import LAYOUTS, make_layout, to_t


@st.composite
def window_cases(draw):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    h = draw(st.integers(dh * (kh - 1) + 1, dh * (kh - 1) + 10))
    w = draw(st.integers(dw * (kw - 1) + 1, dw * (kw - 1) + 10))
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    layout = draw(st.sampled_from(LAYOUTS))
    x = make_layout(np.random.default_rng(draw(st.integers(0, 2**32 - 1))), (n, h, w, c), dtype, layout)
    return x, (kh, kw), (sh, sw), (dh, dw)


def unfold_as_windows(x, kernel, stride, dilation):
    """PyTorch's unfold (a copy, (N, C*KH*KW, L)) rearranged to (N, H_out, W_out, KH, KW, C)."""
    n, h, w, c = x.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    cols = F.unfold(to_t(x.transpose(0, 3, 1, 2)), kernel, dilation=dilation, stride=stride).numpy()
    return cols.reshape(n, c, kh, kw, ho, wo).transpose(0, 4, 5, 2, 3, 1)


def check_windows(impl, case):
    x, kernel, stride, dilation = case
    got = impl(x, kernel, stride=stride, dilation=dilation)
    ref = unfold_as_windows(x, kernel, stride, dilation)
    assert got.shape == ref.shape
    assert np.array_equal(got, ref)  # a view reads the same numbers: exact equality


@given(window_cases())
def test_windows_equal_torch_unfold(case):
    check_windows(windows, case)


@given(window_cases())
def test_windows_is_a_readonly_view_inside_x(case):
    x, kernel, stride, dilation = case
    v = windows(x, kernel, stride=stride, dilation=dilation)
    assert not v.flags.writeable
    assert np.shares_memory(v, x) or v.size == 0
    # every byte the view can reach lies within x's own bytes
    base = x.__array_interface__["data"][0]
    lo, hi = byte_extent(v.shape, v.strides, v.itemsize)
    xlo, xhi = byte_extent(x.shape, x.strides, x.itemsize)
    vstart = v.__array_interface__["data"][0] - base
    assert xlo <= vstart + lo and vstart + hi <= xhi


def windows_from_shape(x, kernel, *, stride=1, dilation=1):
    """A classic wrong implementation: strides computed from the shape, as if x were C-contiguous."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    n, h, w, c = x.shape
    ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    it = x.itemsize
    s = (h * w * c * it, w * c * it, c * it, it)
    return np.lib.stride_tricks.as_strided(
        x, (n, ho, wo, kh, kw, c), (s[0], s[1] * sh, s[2] * sw, s[1] * dh, s[2] * dw, s[3]), writeable=False)


def test_property_catches_strides_from_shape_bug():
    """The property test fails for an implementation that is right only for contiguous inputs."""
    prop = settings(report_multiple_bugs=False)(
        given(window_cases())(lambda case: check_windows(windows_from_shape, case)))
    with pytest.raises(AssertionError):
        prop()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_windows_sliding_window_view(layout, rng):
    x = make_layout(rng, (2, 9, 8, 3), np.float64, layout)
    ref = np.lib.stride_tricks.sliding_window_view(x, (3, 5), axis=(1, 2))  # span of 3x3, dilation (1, 2)
    ref = ref[:, ::2, ::1, :, ::1, ::2].transpose(0, 1, 2, 4, 5, 3)
    assert np.array_equal(windows(x, 3, stride=(2, 1), dilation=(1, 2)), ref)


@pytest.mark.parametrize("shape,kernel", [((1, 5, 5, 1), 5), ((1, 4, 6, 2), (4, 6)), ((3, 7, 7, 1), 1),
                                          ((1, 1, 1, 1), 1)])
def test_windows_edge_cases(shape, kernel, rng):
    x = rng.standard_normal(shape)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    v = windows(x, kernel)
    assert v.shape == (shape[0], shape[1] - kh + 1, shape[2] - kw + 1, kh, kw, shape[3])
    assert np.array_equal(v, unfold_as_windows(x, (kh, kw), (1, 1), (1, 1)))


@given(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6), st.integers(1, 3),
       st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)),
       st.sampled_from(["int", "pair", "explicit"]))
def test_pad2d_equals_torch_pad(n, h, w, c, p, form):
    x = np.random.default_rng(n * h * w).standard_normal((n, h, w, c))
    t, b, l, r = p
    if form == "int":
        padding, (t, b, l, r) = t, (t, t, t, t)
    elif form == "pair":
        padding, (b, r) = (t, l), (t, l)
    else:
        padding = ((t, b), (l, r))
    ref = F.pad(to_t(x), (0, 0, l, r, t, b)).numpy()
    out = pad2d(x, padding)
    assert np.array_equal(out, ref) and not np.shares_memory(out, x)


def test_guard_refuses_views_past_either_end():
    buf = np.arange(20.0)
    x = buf[4:16].reshape(3, 4)
    check_inside(x, (2, 3, 2, 2), (32, 8, 32, 8))                      # the right 2x2 windows
    with pytest.raises(ValueError, match="would touch bytes"):
        safe_as_strided(x, (3, 3, 2, 2), (32, 8, 32, 8))              # one window row too many
    with pytest.raises(ValueError, match="would touch bytes"):
        safe_as_strided(x[::-1], (3, 4), (32, 8))                      # walks backwards out of x[::-1]
    ok = safe_as_strided(x[::-1], (3, 4), (-32, 8))
    assert np.array_equal(ok, x[::-1]) and not ok.flags.writeable
    with pytest.raises(ValueError):
        check_inside(x, (2, -1), (8, 8))


def test_public_names():
    for name in ["windows", "pad2d", "safe_as_strided", "check_inside", "byte_extent", "conv2d",
                 "nhwc_to_nchw", "nchw_to_nhwc", "hwio_to_oihw", "oihw_to_hwio"]:
        assert callable(getattr(convbook, name)), name


@given(window_cases(), st.integers(0, 2))
def test_im2col_equals_torch_unfold(case, p):
    from convbook import im2col
    x, kernel, stride, dilation = case
    cols = im2col(x, kernel, stride=stride, padding=p, dilation=dilation)
    ref = F.unfold(to_t(x.transpose(0, 3, 1, 2)), kernel, dilation=dilation, padding=p, stride=stride).numpy()
    n, c = x.shape[0], x.shape[3]
    # torch: (N, C*KH*KW, L) with rows ordered (c, kh, kw); ours: (N*L, KH*KW*C) ordered (kh, kw, c)
    ref = ref.reshape(n, c, kernel[0] * kernel[1], -1).transpose(0, 3, 2, 1).reshape(cols.shape)
    assert np.array_equal(cols, ref)
