"""conv2d, every method, against torch.nn.functional.conv2d over random configurations."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convbook import (
    conv2d,
    conv2d_methods,
    hwio_to_oihw,
    nchw_to_nhwc,
    nhwc_to_nchw,
    oihw_to_hwio,
)
from convbook.conv import CONV2D_METHODS, conv_spec, padded
from conftest import (
    assert_close,
    cases_for,
    conv_cases,
    general_methods,
    require_support,
    torch_conv2d,
)

METHODS = ["auto", *conv2d_methods()]
GENERAL = [
    "auto",
    *general_methods(CONV2D_METHODS),
]  # the methods that solve every problem


def check_conv2d(impl, case, dtype):
    y = impl(case.x, case.w, case.b, **case.kwargs)
    ref = torch_conv2d(case.x, case.w, case.b, **case.kwargs)
    assert y.dtype == dtype
    assert_close(y, ref, dtype)


@pytest.mark.parametrize("method", METHODS)
@given(data=st.data())
def test_conv2d_float64(method, data):
    case = data.draw(cases_for(method, np.float64))
    require_support(CONV2D_METHODS, method, case.x, case.w, **case.kwargs)
    check_conv2d(lambda *a, **k: conv2d(*a, method=method, **k), case, np.float64)


@pytest.mark.parametrize("method", METHODS)
@given(data=st.data())
def test_conv2d_float32(method, data):
    case = data.draw(cases_for(method, np.float32))
    require_support(CONV2D_METHODS, method, case.x, case.w, **case.kwargs)
    check_conv2d(lambda *a, **k: conv2d(*a, method=method, **k), case, np.float32)


def conv2d_strides_swapped(x, w, b=None, *, stride=1, padding=0, dilation=1):
    """A subtly wrong conv2d: uses the width stride for the height and vice versa."""
    s = (stride, stride) if isinstance(stride, int) else stride
    return conv2d(
        x,
        w,
        b,
        stride=(s[1], s[0]),
        padding=padding,
        dilation=dilation,
        method="einsum",
    )


def conv2d_flipped_kernel(x, w, b=None, **kw):
    """A true (flipped-kernel) convolution instead of PyTorch's cross-correlation."""
    return conv2d(x, w[::-1, ::-1], b, **kw, method="einsum")


@pytest.mark.parametrize("wrong", [conv2d_strides_swapped, conv2d_flipped_kernel])
def test_property_catches_wrong_implementations(wrong):
    prop = settings(max_examples=300, report_multiple_bugs=False)(
        given(case=conv_cases(np.float64))(
            lambda case: check_conv2d(wrong, case, np.float64)
        )
    )
    with pytest.raises(AssertionError):
        prop()


@pytest.mark.parametrize("method", GENERAL)
@pytest.mark.parametrize(
    "xs,ws,kw",
    [
        ((1, 6, 5, 1), (1, 1, 1, 1), {}),  # 1x1 kernel, C = 1, batch 1
        ((2, 6, 5, 3), (1, 1, 3, 4), dict(stride=2)),  # 1x1 kernel with stride
        ((1, 5, 4, 2), (5, 4, 2, 3), {}),  # kernel = image
        ((1, 3, 3, 1), (5, 5, 1, 1), dict(padding=1)),  # kernel = padded image
        ((1, 3, 3, 1), (3, 3, 1, 2), dict(padding="same", dilation=2)),
        (
            (1, 7, 6, 1),
            (4, 2, 1, 1),
            dict(padding="same"),
        ),  # even kernel: asymmetric 'same'
        ((1, 1, 1, 1), (1, 1, 1, 1), {}),
    ],
)
def test_conv2d_edge_cases(method, xs, ws, kw, rng):
    x, w, b = (
        rng.standard_normal(xs),
        rng.standard_normal(ws),
        rng.standard_normal(ws[3]),
    )
    assert_close(
        conv2d(x, w, b, method=method, **kw), torch_conv2d(x, w, b, **kw), np.float64
    )


def test_dtypes(rng):
    x, w = rng.standard_normal((1, 5, 5, 2)), rng.standard_normal((3, 3, 2, 2))
    assert conv2d(x.astype(np.float32), w.astype(np.float32)).dtype == np.float32
    assert conv2d(x.astype(np.float32), w).dtype == np.float64  # NumPy promotion
    xi = rng.integers(
        0, 255, (1, 5, 5, 2), dtype=np.uint8
    )  # integer images work, in float64
    y = conv2d(xi, w.astype(np.float32))
    assert y.dtype == np.float64 or y.dtype == np.float32
    assert_close(conv2d(xi, w), torch_conv2d(xi.astype(np.float64), w), np.float64)


def test_layout_converters_index_mapping(rng):
    x = rng.standard_normal((2, 3, 4, 5))
    n, h, w, c = 1, 2, 3, 4
    assert nhwc_to_nchw(x)[n, c, h, w] == x[n, h, w, c]
    assert nchw_to_nhwc(nhwc_to_nchw(x)) is not x and np.array_equal(
        nchw_to_nhwc(nhwc_to_nchw(x)), x
    )
    k = rng.standard_normal((3, 2, 4, 5))  # (KH, KW, C_in, C_out)
    assert hwio_to_oihw(k)[4, 3, 2, 1] == k[2, 1, 3, 4]
    assert np.array_equal(oihw_to_hwio(hwio_to_oihw(k)), k)


def test_auto_picks_a_registered_method_and_no_padding_copy(rng):
    x, w = rng.standard_normal((1, 5, 5, 2)), rng.standard_normal((3, 3, 2, 2))
    xc, _, _, spec = conv_spec(x, w)
    assert padded(xc, spec) is xc  # no padding: no copy
    assert set(conv2d_methods()) >= {"naive", "einsum"}


@pytest.mark.parametrize("registry", ["conv2d", "conv2d_backward"])
def test_domains_match_the_registry(registry):
    """conftest's DOMAINS names every method that has a domain, and the cases it draws for a
    method are ones the method's `supports` accepts (the table cannot go stale unnoticed)."""
    from conftest import DOMAINS

    from convbook.backward import CONV2D_BACKWARD_METHODS

    reg = CONV2D_METHODS if registry == "conv2d" else CONV2D_BACKWARD_METHODS
    restricted = [m for m in reg.names() if m not in general_methods(reg)]
    assert set(restricted) <= set(DOMAINS), (
        f"no domain in conftest.DOMAINS for {restricted}"
    )

    @settings(max_examples=40)
    @given(data=st.data())
    def prop(data):
        for m in restricted:
            case = data.draw(cases_for(m))
            assert reg.supports(m, conv_spec(case.x, case.w, **case.kwargs)[3]), m

    prop()
