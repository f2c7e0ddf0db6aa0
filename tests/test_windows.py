"""`windows`, `pad2d` and the bounds guard against PyTorch's unfold/pad and NumPy's sliding_window_view."""

from __future__ import annotations

import numpy as np
import pytest
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import convbook
from convbook import byte_extent, pad2d
from convbook.windows import check_inside, safe_as_strided, windows
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
    x = make_layout(
        np.random.default_rng(draw(st.integers(0, 2**32 - 1))),
        (n, h, w, c),
        dtype,
        layout,
    )
    return x, (kh, kw), (sh, sw), (dh, dw)


def unfold_as_windows(x, kernel, stride, dilation):
    """PyTorch's unfold (a copy, (N, C*KH*KW, L)) rearranged to (N, H_out, W_out, KH, KW, C)."""
    n, h, w, c = x.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    cols = F.unfold(
        to_t(x.transpose(0, 3, 1, 2)), kernel, dilation=dilation, stride=stride
    ).numpy()
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
    # every byte the view can reach lies between the first and the last byte of x
    base = x.__array_interface__["data"][0]
    lo, hi = byte_extent(v.shape, v.strides, v.itemsize)
    xlo, xhi = byte_extent(x.shape, x.strides, x.itemsize)
    vstart = v.__array_interface__["data"][0] - base
    assert xlo <= vstart + lo and vstart + hi <= xhi


def element_addresses(a: np.ndarray) -> np.ndarray:
    """The address of every element of `a` (data pointer + index . strides)."""
    grid = np.indices(a.shape).reshape(a.ndim, -1)
    return (
        a.__array_interface__["data"][0] + np.asarray(a.strides, dtype=np.int64) @ grid
    )


def check_elements_of_x(impl, case):
    """Every element of the window view sits at the address of an element of x: stronger than
    the guard's interval check, which a view reading the gaps of a sliced x would pass."""
    x, kernel, stride, dilation = case
    v = impl(x, kernel, stride=stride, dilation=dilation)
    assert np.isin(element_addresses(v), element_addresses(x)).all()


@given(window_cases())
def test_windows_reads_only_elements_of_x(case):
    check_elements_of_x(windows, case)


def windows_from_shape(x, kernel, *, stride=1, dilation=1):
    """A classic wrong implementation: strides computed from the shape, as if x were C-contiguous."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    n, h, w, c = x.shape
    ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    it = x.itemsize
    s = (h * w * c * it, w * c * it, c * it, it)
    return np.lib.stride_tricks.as_strided(
        x,
        (n, ho, wo, kh, kw, c),
        (s[0], s[1] * sh, s[2] * sw, s[1] * dh, s[2] * dw, s[3]),
        writeable=False,
    )


def test_property_catches_strides_from_shape_bug():
    """The property test fails for an implementation that is right only for contiguous inputs."""
    prop = settings(report_multiple_bugs=False)(
        given(window_cases())(lambda case: check_windows(windows_from_shape, case))
    )
    with pytest.raises(AssertionError):
        prop()


def test_element_check_catches_strides_from_shape_on_a_sliced_input(rng):
    """On an input with gaps (every other row and column), the strides-from-shape view reads
    bytes that are not elements of x, yet stays inside x's interval: the guard would let it
    through, the element check does not."""
    x = make_layout(rng, (1, 6, 6, 2), np.float64, "strided")
    wrong = windows_from_shape(x, (3, 3), stride=(1, 1), dilation=(1, 1))
    check_inside(x, wrong.shape, wrong.strides)  # in bounds ...
    with pytest.raises(AssertionError):
        check_elements_of_x(
            windows_from_shape, (x, (3, 3), (1, 1), (1, 1))
        )  # ... but wrong


@pytest.mark.parametrize("layout", LAYOUTS)
def test_windows_sliding_window_view(layout, rng):
    x = make_layout(rng, (2, 9, 8, 3), np.float64, layout)
    ref = np.lib.stride_tricks.sliding_window_view(
        x, (3, 5), axis=(1, 2)
    )  # span of 3x3, dilation (1, 2)
    ref = ref[:, ::2, ::1, :, ::1, ::2].transpose(0, 1, 2, 4, 5, 3)
    assert np.array_equal(windows(x, 3, stride=(2, 1), dilation=(1, 2)), ref)


@pytest.mark.parametrize(
    "shape,kernel",
    [((1, 5, 5, 1), 5), ((1, 4, 6, 2), (4, 6)), ((3, 7, 7, 1), 1), ((1, 1, 1, 1), 1)],
)
def test_windows_edge_cases(shape, kernel, rng):
    x = rng.standard_normal(shape)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    v = windows(x, kernel)
    assert v.shape == (shape[0], shape[1] - kh + 1, shape[2] - kw + 1, kh, kw, shape[3])
    assert np.array_equal(v, unfold_as_windows(x, (kh, kw), (1, 1), (1, 1)))


@given(
    st.integers(1, 3),
    st.integers(1, 6),
    st.integers(1, 6),
    st.integers(1, 3),
    st.tuples(
        st.integers(0, 3), st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)
    ),
    st.sampled_from(["int", "pair", "explicit"]),
)
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
    check_inside(x, (2, 3, 2, 2), (32, 8, 32, 8))  # the right 2x2 windows
    with pytest.raises(ValueError, match="would touch bytes"):
        safe_as_strided(x, (3, 3, 2, 2), (32, 8, 32, 8))  # one window row too many
    with pytest.raises(ValueError, match="would touch bytes"):
        safe_as_strided(x[::-1], (3, 4), (32, 8))  # walks backwards out of x[::-1]
    ok = safe_as_strided(x[::-1], (3, 4), (-32, 8))
    assert np.array_equal(ok, x[::-1]) and not ok.flags.writeable
    with pytest.raises(ValueError):
        check_inside(x, (2, -1), (8, 8))


def test_guard_checks_an_interval_exactly():
    """The guard's guarantee, to the byte: a view may read anything between the first and the
    last byte of x (the gaps of a sliced x included), and nothing outside."""
    parent = np.arange(12.0).reshape(3, 4)
    x = parent[:, ::2]  # (3, 2), strides (32, 16): gaps at columns 1, 3
    gaps = safe_as_strided(x, (3, 3), (32, 8))  # reads parent's column 1: accepted
    assert set(gaps.ravel()) - set(x.ravel()) == {1.0, 5.0, 9.0}
    check_inside(x, (11,), (8,))  # bytes [0, 88): x's whole interval
    with pytest.raises(ValueError, match="would touch bytes"):
        check_inside(x, (12,), (8,))  # one element more: [0, 96)
    r = parent[::-1, ::-2]  # negative strides: interval [-80, 8)
    assert byte_extent(r.shape, r.strides, 8) == (-80, 8)
    check_inside(r, (11,), (-8,))
    with pytest.raises(ValueError, match="would touch bytes"):
        check_inside(r, (12,), (-8,))


@st.composite
def strided_views(draw):
    """Views of a 3-D array with random steps (negative too), transposes and broadcasts."""
    base = np.arange(
        4 * 5 * 6, dtype=draw(st.sampled_from([np.float64, np.float32, np.int16]))
    )
    v = base.reshape(4, 5, 6)
    key = tuple(
        slice(
            draw(st.integers(0, n - 1)), None, draw(st.sampled_from([-3, -2, -1, 1, 2]))
        )
        for n in v.shape
    )
    v = v[key].transpose(draw(st.permutations([0, 1, 2])))
    if draw(st.booleans()):
        v = np.broadcast_to(v[:, :1], (v.shape[0], 3, v.shape[2]))  # a stride-0 axis
    return v


@given(strided_views())
def test_byte_extent_equals_numpy_byte_bounds(v):
    """byte_extent (chapter 1) against NumPy's own byte_bounds, an independent implementation."""
    byte_bounds = pytest.importorskip("numpy.lib.array_utils").byte_bounds
    start = v.__array_interface__["data"][0]
    lo, hi = byte_extent(v.shape, v.strides, v.itemsize)
    assert (start + lo, start + hi) == byte_bounds(v)


MODULES = {"memory": "Chapter 1", "windows": "Chapter 2", "conv": "Chapter 3"}


@pytest.mark.parametrize("module", MODULES)
def test_module_docstring_names_its_chapter(module):
    import importlib

    doc = importlib.import_module(f"convbook.{module}").__doc__
    assert doc.startswith(MODULES[module] + ":"), doc


def public_callables():
    """Every function and method a user reaches from `convbook.__all__` (the namesake
    function of the callable modules `windows` and `im2col` included)."""
    import inspect
    import types

    out = []
    for name in convbook.__all__:
        obj = getattr(convbook, name)
        if isinstance(obj, types.ModuleType):  # a callable module, or a namespace
            obj = getattr(obj, name, None)
        if inspect.isfunction(obj):
            out.append((name, obj))
        elif inspect.isclass(obj):
            out += [
                (f"{name}.{n}", f)
                for n, f in vars(obj).items()
                if inspect.isfunction(f) and (not n.startswith("_") or n == "__init__")
            ]
    return out


def test_public_functions_are_typed():
    """Every public function and method annotates each parameter and its return (what the
    API reference shows, and what type checkers read through py.typed)."""
    import inspect

    functions = public_callables()
    assert len(functions) > len(convbook.__all__)
    for name, f in functions:
        sig = inspect.signature(f)
        untyped = [
            p.name
            for p in sig.parameters.values()
            if p.annotation is inspect.Parameter.empty and p.name != "self"
        ]
        assert not untyped, f"{name}: untyped {untyped}"
        if not name.endswith("__init__"):
            assert sig.return_annotation is not inspect.Signature.empty, (
                f"{name}: return"
            )


def test_the_typing_check_catches_an_untyped_function(monkeypatch):
    """The check above can fail: a public function that lost an annotation is reported."""

    def untyped(x, kernel: int) -> None: ...

    monkeypatch.setattr(convbook, "pad2d", untyped)
    with pytest.raises(AssertionError, match="pad2d: untyped"):
        test_public_functions_are_typed()


def test_public_names():
    """The top level holds what users import (convbook.__all__); helpers stay in their modules;
    `convbook.windows` and `convbook.im2col` are the modules, callable like their functions."""
    import importlib
    import types

    for name in [
        "windows",
        "pad2d",
        "byte_extent",
        "conv2d",
        "im2col",
        "col2im",
        "nhwc_to_nchw",
        "nchw_to_nhwc",
        "hwio_to_oihw",
        "oihw_to_hwio",
    ]:
        assert name in convbook.__all__ and callable(getattr(convbook, name)), name
    for helper in [
        "safe_as_strided",
        "check_inside",
        "check_array",
        "as_pair",
        "SHA256",
    ]:
        assert not hasattr(convbook, helper), helper
    for module in ["windows", "im2col"]:
        m = importlib.import_module(f"convbook.{module}")
        assert isinstance(m, types.ModuleType) and getattr(convbook, module) is m
    x = np.arange(25.0).reshape(1, 5, 5, 1)
    assert np.array_equal(convbook.windows(x, 3), convbook.windows.windows(x, 3))
    assert np.array_equal(convbook.im2col(x, 3), convbook.im2col.im2col(x, 3))
    star = {}
    exec("from convbook import *", star)
    assert set(convbook.__all__) <= set(star)


@given(window_cases(), st.integers(0, 2))
def test_im2col_equals_torch_unfold(case, p):
    from convbook import im2col

    x, kernel, stride, dilation = case
    cols = im2col(x, kernel, stride=stride, padding=p, dilation=dilation)
    ref = F.unfold(
        to_t(x.transpose(0, 3, 1, 2)),
        kernel,
        dilation=dilation,
        padding=p,
        stride=stride,
    ).numpy()
    n, c = x.shape[0], x.shape[3]
    # torch: (N, C*KH*KW, L) with rows ordered (c, kh, kw); ours: (N*L, KH*KW*C) ordered (kh, kw, c)
    ref = (
        ref.reshape(n, c, kernel[0] * kernel[1], -1)
        .transpose(0, 3, 2, 1)
        .reshape(cols.shape)
    )
    assert np.array_equal(cols, ref)
