"""Max and average pooling, forward and backward, against PyTorch and finite differences.

Covers every option of F.max_pool2d / F.avg_pool2d (ceil_mode, dilation, return_indices,
count_include_pad, divisor_override, 1-element tuples and stride=()), NaN and infinities,
empty inputs, the gradients' dtype rule, and the errors.

Tolerances: maxima select an input, so outputs and indices must be equal (NaN equal to NaN);
gradients and means go through conftest.assert_close (1e-10 relative in float64, 2e-5 in
float32), since a pixel that wins several windows adds their dy in another order than PyTorch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from convbook import avg_pool2d, avg_pool2d_backward, max_pool2d, max_pool2d_backward
from convbook.pool import pool_geometry, pool_out_size
from conftest import (
    LAYOUTS,
    assert_close,
    make_layout,
    numerical_grad,
    pool_cases,
    to_t,
)

SPECIALS = np.array([np.nan, np.inf, -np.inf])


def nchw(a: np.ndarray) -> torch.Tensor:
    return to_t(a.transpose(0, 3, 1, 2))


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def torch_pool(kind, x, kernel, dy_seed=0, **kw):
    """(y, dy, dx[, indices]) of F.max_pool2d / F.avg_pool2d on NHWC arrays."""
    tx = nchw(x).requires_grad_()
    if kind == "max":
        y, idx = F.max_pool2d(tx, kernel, return_indices=True, **kw)
    else:
        y, idx = F.avg_pool2d(tx, kernel, **kw), None
    dy = np.random.default_rng(dy_seed).standard_normal(y.shape).astype(x.dtype)
    y.backward(to_t(dy))
    out = nhwc(y), dy.transpose(0, 2, 3, 1), nhwc(tx.grad)
    return out + ((nhwc(idx),) if idx is not None else ())


def check_pool(kind, fwd, bwd, case):
    x, kernel, stride, padding = case
    y_ref, dy, dx_ref = torch_pool(kind, x, kernel, stride=stride, padding=padding)[:3]
    y = fwd(x, kernel, stride=stride, padding=padding)
    assert y.dtype == x.dtype
    assert_close(y, y_ref, x.dtype)
    dx = bwd(dy, x, kernel, stride=stride, padding=padding)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    assert_close(dx, dx_ref, x.dtype)


@given(pool_cases())
def test_max_pool_equals_torch(case):
    check_pool("max", max_pool2d, max_pool2d_backward, case)


@given(pool_cases())
def test_avg_pool_equals_torch(case):
    check_pool("avg", avg_pool2d, avg_pool2d_backward, case)


def max_pool_backward_last_tie(dy, x, kernel, *, stride=None, padding=0):
    """Wrong on ties: sends the gradient to the *last* maximum of each window."""
    flipped = max_pool2d_backward(
        dy[:, ::-1, ::-1], x[:, ::-1, ::-1], kernel, stride=stride, padding=padding
    )
    return flipped[:, ::-1, ::-1]


def test_property_catches_wrong_tie_breaking():
    prop = settings(max_examples=300, report_multiple_bugs=False)(
        given(pool_cases())(
            lambda case: check_pool("max", max_pool2d, max_pool_backward_last_tie, case)
        )
    )
    with pytest.raises((AssertionError, ValueError)):
        prop()


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize(
    "kernel,stride,padding", [(2, None, 0), (3, 2, 1), ((3, 2), 1, (1, 0))]
)
def test_pool_finite_differences(kind, kernel, stride, padding):
    """Independent of torch. Distinct values keep the max away from ties, where it is not
    differentiable."""
    rng = np.random.default_rng(5)
    x = rng.permutation(2 * 6 * 5 * 2).reshape(2, 6, 5, 2) / 10.0
    fwd, bwd = (
        (max_pool2d, max_pool2d_backward)
        if kind == "max"
        else (avg_pool2d, avg_pool2d_backward)
    )
    g = rng.standard_normal(fwd(x, kernel, stride=stride, padding=padding).shape)
    loss = lambda: float(np.sum(fwd(x, kernel, stride=stride, padding=padding) * g))  # noqa: E731
    # h = 1e-6 is far below the 0.1 gap between values, so no window changes its arg-max
    np.testing.assert_allclose(
        bwd(g, x, kernel, stride=stride, padding=padding),
        numerical_grad(loss, x),
        rtol=1e-7,
        atol=1e-7,
    )


@pytest.mark.parametrize(
    "kernel,stride,padding", [(2, 2, 1), (3, 1, 1), ((3, 2), 2, (1, 1))]
)
def test_max_pool_infinite_inputs(kernel, stride, padding):
    """-inf pixels (e.g. from masking): the gradient never goes to the padding, as in PyTorch."""
    rng = np.random.default_rng(2)
    x = np.where(
        rng.random((2, 5, 4, 2)) < 0.6, -np.inf, rng.standard_normal((2, 5, 4, 2))
    )
    x[0] = -np.inf
    y_ref, dy, dx_ref, _ = torch_pool(
        "max", x, kernel, 1, stride=stride, padding=padding
    )
    assert np.array_equal(max_pool2d(x, kernel, stride=stride, padding=padding), y_ref)
    assert np.array_equal(
        max_pool2d_backward(dy, x, kernel, stride=stride, padding=padding), dx_ref
    )


# ---------------------------------------------------------------------------------------------
# NaN (issue: the gradient went to the first tap, or was dropped on padding; PyTorch sends it to
# the last NaN of the window)


@pytest.mark.parametrize(
    "kernel,stride,padding", [(2, 2, 0), (3, 1, 1), (3, 2, 1), ((2, 3), 1, (1, 1))]
)
def test_max_pool_nan_goes_to_the_last_nan_like_torch(kernel, stride, padding):
    nan, inf = np.nan, np.inf
    x = np.array(
        [
            [1.0, nan, 2.0, -inf, -inf],
            [nan, 5.0, inf, -inf, -inf],
            [3.0, nan, 1.0, 0.0, inf],
            [nan, nan, -inf, 4.0, nan],
        ]
    ).reshape(1, 4, 5, 1)
    x = np.concatenate([x, x[:, ::-1]], axis=3)  # a second channel, rows reversed
    kw = dict(stride=stride, padding=padding)
    y_ref, dy, dx_ref, idx_ref = torch_pool("max", x, kernel, **kw)
    y, idx = max_pool2d(x, kernel, **kw, return_indices=True)
    assert np.array_equal(max_pool2d(x, kernel, **kw), y_ref, equal_nan=True)
    assert np.array_equal(y, y_ref, equal_nan=True) and np.array_equal(idx, idx_ref)
    assert np.array_equal(max_pool2d_backward(dy, x, kernel, **kw), dx_ref)


def test_max_pool_nan_in_a_padded_corner():
    """The NaN sits where the padding is the first tap: the old code dropped its gradient."""
    x = np.array([[np.nan, 1.0], [2.0, 3.0]]).reshape(1, 2, 2, 1)
    kw = dict(stride=1, padding=1)
    _, dy, dx_ref, _ = torch_pool("max", x, 3, **kw)
    dx = max_pool2d_backward(dy, x, 3, **kw)
    assert np.array_equal(dx, dx_ref) and dx[0, 0, 0, 0] == dy.sum()


def sprinkle(x: np.ndarray, rng: np.random.Generator, fraction: float) -> np.ndarray:
    x = np.array(x, copy=True)
    hit = rng.random(x.shape) < fraction
    x[hit] = rng.choice(SPECIALS, size=int(hit.sum()))
    return x


@st.composite
def option_cases(draw, kind="max", specials=True):
    """Random pooling problems with every PyTorch option: kernel, stride (None, () or 1/2
    values), padding <= kernel // 2, dilation (max only), ceil_mode, the avg divisors; values
    with ties, and NaN/+-inf if `specials`. Windows that hold no pixel (our refusal) are
    filtered out. Returns (x, kernel, kwargs)."""
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    form = draw(st.sampled_from(["int", "pair", "one"]))

    def as_arg(a, b):
        if a != b or form == "pair":
            return (a, b)
        return a if form == "int" else (a,)

    kernel = as_arg(kh, kw)
    kwargs = {}
    stride = draw(st.sampled_from(["none", "empty", "given"]))
    if stride == "empty":
        kwargs["stride"] = ()
    elif stride == "given":
        sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        kwargs["stride"] = as_arg(sh, sw)
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    kwargs["padding"] = as_arg(ph, pw)
    if kind == "max":
        kwargs["dilation"] = as_arg(draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    else:
        kwargs["count_include_pad"] = draw(st.booleans())
        kwargs["divisor_override"] = draw(st.sampled_from([None, None, 1, 3, -2]))
    kwargs["ceil_mode"] = draw(st.booleans())
    n, c = draw(st.integers(0, 2)), draw(st.integers(1, 3))
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = make_layout(rng, (n, h, w, c), dtype, draw(st.sampled_from(LAYOUTS)))
    if draw(st.booleans()):
        x = (np.round(x * 2) / 2).astype(dtype)
    if specials and draw(st.booleans()):
        x = sprinkle(x, rng, draw(st.sampled_from([0.05, 0.3, 0.8])))
    try:
        pool_geometry(
            x,
            kernel,
            kwargs.get("stride"),
            kwargs["padding"],
            kwargs.get("dilation", 1),
            kwargs["ceil_mode"],
        )
    except ValueError:
        assume(False)
    return x, kernel, kwargs


@given(option_cases("max"))
def test_max_pool_options_equal_torch(case):
    """Forward values, indices and gradient of every option, NaN and +-inf included."""
    x, kernel, kw = case
    y_ref, dy, dx_ref, idx_ref = torch_pool("max", x, kernel, **kw)
    y, idx = max_pool2d(x, kernel, **kw, return_indices=True)
    assert y.dtype == x.dtype and idx.dtype == np.int64
    assert np.array_equal(max_pool2d(x, kernel, **kw), y_ref, equal_nan=True)
    assert np.array_equal(y, y_ref, equal_nan=True) and np.array_equal(idx, idx_ref)
    dx = max_pool2d_backward(dy, x, kernel, **kw)
    assert dx.dtype == x.dtype and np.array_equal(np.isnan(dx), np.isnan(dx_ref))
    assert_close(np.nan_to_num(dx), np.nan_to_num(dx_ref), x.dtype)


@pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning"
)  # inf - inf
@given(option_cases("avg"))
def test_avg_pool_options_equal_torch(case):
    x, kernel, kw = case
    y_ref, dy, dx_ref = torch_pool("avg", x, kernel, **kw)
    y = avg_pool2d(x, kernel, **kw)
    assert y.dtype == x.dtype
    assert np.array_equal(np.isnan(y), np.isnan(y_ref)) and np.array_equal(
        np.isinf(y), np.isinf(y_ref)
    )
    finite = np.isfinite(y_ref)
    assert np.array_equal(y[~finite], y_ref[~finite], equal_nan=True)
    assert_close(np.where(finite, y, 0), np.where(finite, y_ref, 0), x.dtype)
    dx = avg_pool2d_backward(dy, x, kernel, **kw)  # dy is finite: so is dx
    assert dx.dtype == x.dtype
    assert_close(dx, dx_ref, x.dtype)


def max_pool_backward_nan_as_inf(dy, x, kernel, **kw):
    """Wrong on NaN: treats NaN as +inf, so the first NaN (or an earlier +inf) wins."""
    return max_pool2d_backward(dy, np.where(np.isnan(x), np.inf, x), kernel, **kw)


def test_property_catches_nan_treated_as_infinity():
    def check(case):
        x, kernel, kw = case
        _, dy, dx_ref, _ = torch_pool("max", x, kernel, **kw)
        dx = max_pool_backward_nan_as_inf(dy, x, kernel, **kw)
        assert_close(np.nan_to_num(dx), np.nan_to_num(dx_ref), x.dtype)

    prop = settings(max_examples=300, report_multiple_bugs=False)(
        given(option_cases("max"))(check)
    )
    with pytest.raises((AssertionError, ValueError)):
        prop()


# ---------------------------------------------------------------------------------------------
# Argument forms, sizes, empty inputs, errors


@pytest.mark.parametrize(
    "kw",
    [
        dict(kernel=(2,)),
        dict(kernel=3, stride=()),
        dict(kernel=3, stride=(1,)),
        dict(kernel=3, padding=(1,)),
        dict(kernel=2, dilation=(2,)),
        dict(kernel=[3, 2], stride=[2, 1], padding=[1, 0]),
    ],
)
def test_pytorch_argument_forms_are_accepted(kw):
    x = np.random.default_rng(0).standard_normal((2, 7, 6, 3))
    kw = dict(kw)
    kernel = kw.pop("kernel")
    y_ref, dy, dx_ref, idx_ref = torch_pool("max", x, kernel, **kw)
    assert np.array_equal(max_pool2d(x, kernel, **kw), y_ref)
    assert_close(max_pool2d_backward(dy, x, kernel, **kw), dx_ref, x.dtype)
    if "dilation" not in kw:
        y_ref, dy, dx_ref = torch_pool("avg", x, kernel, **kw)
        assert_close(avg_pool2d(x, kernel, **kw), y_ref, x.dtype)
        assert_close(avg_pool2d_backward(dy, x, kernel, **kw), dx_ref, x.dtype)


def test_pool_out_size_equals_torch_exhaustively():
    for size, kernel, stride, dilation in np.ndindex(9, 5, 4, 4):
        if not (size and kernel and stride and dilation):
            continue
        for padding in range(kernel // 2 + 1):
            for ceil_mode in (False, True):
                ours = pool_out_size(size, kernel, stride, padding, dilation, ceil_mode)
                x = torch.empty(1, 1, size, 1, device="meta")
                try:
                    theirs = F.max_pool2d(
                        x,
                        (kernel, 1),
                        (stride, 1),
                        (padding, 0),
                        (dilation, 1),
                        ceil_mode=ceil_mode,
                    ).shape[2]
                except RuntimeError:
                    theirs = None
                assert (ours if ours >= 1 else None) == theirs, (
                    size,
                    kernel,
                    stride,
                    padding,
                    dilation,
                )


@pytest.mark.parametrize(
    "shape,kw",
    [
        ((1, 0, 4, 1), dict(kernel=2, padding=1)),
        ((1, 4, 0, 1), dict(kernel=1)),
        ((1, 4, 4, 0), dict(kernel=2)),
        ((2, 0, 0, 3), dict(kernel=2, padding=1, ceil_mode=True)),
    ],
)
@pytest.mark.parametrize("fn", [max_pool2d, avg_pool2d])
def test_empty_image_raises_like_torch(shape, kw, fn):
    """An empty H, W or C: PyTorch raises; the old max_pool2d returned -inf windows."""
    kw = dict(kw)
    kernel = kw.pop("kernel")
    with pytest.raises(RuntimeError):
        getattr(F, fn.__name__)(torch.zeros(shape).permute(0, 3, 1, 2), kernel, **kw)
    with pytest.raises(ValueError, match="non-empty H, W and C"):
        fn(np.zeros(shape), kernel, **kw)


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_empty_batch_gives_empty_results_like_torch(kind):
    x = np.zeros((0, 5, 6, 3))
    fwd, bwd = (
        (max_pool2d, max_pool2d_backward)
        if kind == "max"
        else (avg_pool2d, avg_pool2d_backward)
    )
    y_ref, dy, dx_ref = torch_pool(kind, x, 2, padding=1)[:3]
    assert fwd(x, 2, padding=1).shape == y_ref.shape == (0, 3, 4, 3)
    assert bwd(dy, x, 2, padding=1).shape == dx_ref.shape == x.shape


def test_a_window_of_padding_only_is_refused():
    """PyTorch returns -inf and an index outside the image for such a window."""
    kw = dict(stride=2, padding=1, dilation=3, ceil_mode=True)
    _, index = F.max_pool2d(torch.zeros(1, 1, 1, 1), 2, return_indices=True, **kw)
    assert index.item() >= 1
    with pytest.raises(ValueError, match="only padding"):
        max_pool2d(np.zeros((1, 1, 1, 1)), 2, **kw)


DTYPES = [np.float32, np.float64, np.int16, np.uint8]


@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("dy_dtype", [np.float32, np.float64, np.int32])
def test_both_gradients_follow_one_dtype_rule(x_dtype, dy_dtype):
    """dx has x's and dy's dtypes promoted, integers counting as float64 (before, the average
    pool's gradient took dy's dtype alone, the max pool's both)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 9, (2, 6, 6, 3)).astype(x_dtype)
    dy = rng.integers(-3, 4, (2, 3, 3, 3)).astype(dy_dtype)
    as_float = lambda d: (
        np.dtype(d) if np.issubdtype(d, np.floating) else np.dtype(np.float64)
    )  # noqa: E731
    expected = np.result_type(as_float(x_dtype), as_float(dy_dtype))
    dx_max, dx_avg = max_pool2d_backward(dy, x, 2), avg_pool2d_backward(dy, x, 2)
    assert dx_max.dtype == dx_avg.dtype == expected
    tx = torch.tensor(x.astype(np.float64)).permute(0, 3, 1, 2).requires_grad_()
    F.max_pool2d(tx, 2).backward(
        torch.tensor(dy.astype(np.float64)).permute(0, 3, 1, 2)
    )
    assert np.array_equal(dx_max, tx.grad.permute(0, 2, 3, 1).numpy())


BAD = [
    (
        lambda x: max_pool2d(x, ()),
        ValueError,
        "kernel must be an int or a tuple of one or two",
    ),
    (lambda x: max_pool2d(x, (2, 2, 2)), ValueError, "kernel"),
    (lambda x: max_pool2d(x, 2, stride=(1, 1, 1)), ValueError, "stride"),
    (lambda x: max_pool2d(x, 2, padding=()), ValueError, "padding"),
    (lambda x: max_pool2d(x, 2, dilation=()), ValueError, "dilation"),
    (lambda x: max_pool2d(x, 2, dilation=0), ValueError, "dilation must be >= 1"),
    (lambda x: max_pool2d(x, 3, padding=-1), ValueError, "padding must be >= 0"),
    (
        lambda x: max_pool2d(x, 3, stride=1, padding=2, dilation=2),
        ValueError,
        "at most half",
    ),
    (lambda x: max_pool2d(x, 2, ceil_mode=1), TypeError, "ceil_mode"),
    (lambda x: max_pool2d(x, 2, return_indices=None), TypeError, "return_indices"),
    (lambda x: avg_pool2d(x, 2, divisor_override=0), ValueError, "divisor_override"),
    (lambda x: avg_pool2d(x, 2, divisor_override=2.5), TypeError, "divisor_override"),
    (lambda x: avg_pool2d(x, 2, divisor_override=True), TypeError, "divisor_override"),
    (
        lambda x: avg_pool2d(x, 2, count_include_pad="no"),
        TypeError,
        "count_include_pad",
    ),
    (lambda x: avg_pool2d(x, 9, ceil_mode=False), ValueError, "kernel"),
    (
        lambda x: avg_pool2d_backward(np.zeros((2, 4, 4, 3)), x, 2),
        ValueError,
        "dy must",
    ),
]


@pytest.mark.parametrize("call,error,words", BAD)
def test_bad_arguments_raise_naming_them(call, error, words):
    with pytest.raises(error, match=words):
        call(np.zeros((2, 7, 7, 3)))


def test_ceil_mode_windows_larger_than_the_image_like_torch():
    """In ceil mode a kernel larger than the image still gives one window, as in PyTorch."""
    x = np.random.default_rng(1).standard_normal((2, 3, 5, 2))
    for kind, fwd in (("max", max_pool2d), ("avg", avg_pool2d)):
        y_ref = torch_pool(kind, x, (4, 6), ceil_mode=True)[0]
        assert_close(fwd(x, (4, 6), ceil_mode=True), y_ref, x.dtype)
    with pytest.raises(ValueError, match="kernel"):
        max_pool2d(x, (4, 6))


# ---------------------------------------------------------------------------------------------
# PyTorch's own samples (OpInfo) for F.max_pool2d and F.avg_pool2d, every one in scope


def opinfo_samples(name: str, dtype: torch.dtype):
    from torch.testing._internal.common_methods_invocations import op_db

    op = next(op for op in op_db if op.name == name and op.variant_test_name == "")
    return list(op.sample_inputs("cpu", dtype, requires_grad=True))


AVG_ARGS = (
    "kernel",
    "stride",
    "padding",
    "ceil_mode",
    "count_include_pad",
    "divisor_override",
)
MAX_ARGS = ("kernel", "stride", "padding", "dilation", "ceil_mode", "return_indices")


def ours_from_sample(sample, names):
    """(NHWC x, kernel, keyword arguments for our functions) of an OpInfo sample."""
    given = {"kernel_size": "kernel"}
    args = dict(zip(names, sample.args))
    args.update({given.get(k, k): v for k, v in sample.kwargs.items()})
    x = sample.input.detach().numpy()
    x = x[None] if x.ndim == 3 else x
    return x.transpose(0, 2, 3, 1), args.pop("kernel"), args


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "name", ["nn.functional.max_pool2d", "nn.functional.avg_pool2d"]
)
def test_every_opinfo_sample_equals_torch(name, dtype):
    kind, names = ("max", MAX_ARGS) if "max" in name else ("avg", AVG_ARGS)
    fwd, bwd = (
        (max_pool2d, max_pool2d_backward)
        if kind == "max"
        else (avg_pool2d, avg_pool2d_backward)
    )
    samples = opinfo_samples(name, dtype)
    assert len(samples) > (1000 if kind == "max" else 5)
    for k, sample in enumerate(samples):
        x, kernel, kw = ours_from_sample(sample, names)
        sample.input.grad = None
        ref = getattr(F, name.split(".")[-1])(
            sample.input, *sample.args, **sample.kwargs
        )
        ref_y = ref[0] if isinstance(ref, tuple) else ref
        dy = torch.randn(
            ref_y.shape, dtype=dtype, generator=torch.Generator().manual_seed(k)
        )
        ref_y.backward(dy)
        batched = lambda t: (
            (t[None] if t.ndim == 3 else t).detach().numpy().transpose(0, 2, 3, 1)
        )  # noqa: E731
        y = fwd(x, kernel, **kw)
        if kw.get("return_indices"):
            y, idx = y
            assert np.array_equal(idx, batched(ref[1])), (k, kw)
        assert_close(y, batched(ref_y), x.dtype)
        back_kw = {key: v for key, v in kw.items() if key != "return_indices"}
        dx = bwd(batched(dy), x, kernel, **back_kw)
        assert dx.dtype == x.dtype
        assert_close(dx, batched(sample.input.grad), x.dtype)
