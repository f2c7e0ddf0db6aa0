"""The layers, loss and optimizers of chapter 7b against PyTorch (autograd, torch.optim,
F.cross_entropy, nn.BatchNorm2d/1d with their running statistics) and finite differences;
saving and loading chapter 7's model; deliberately wrong layers that the properties must
catch.

Tolerances (conftest.assert_close): max |ours - torch| <= 1e-10 * (1 + max |torch|) in float64
and 2e-5 * (1 + max |torch|) in float32. ReLU, Flatten, Dropout and the max-pool outputs only
select or move values and must agree exactly; a max-pool gradient may add a few dy values at
one pixel in another order than PyTorch does, so it gets the tolerance.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from convbook import (
    hwio_to_oihw,
    max_pool2d,
    max_pool2d_backward,
    nchw_to_nhwc,
    nhwc_to_nchw,
    oihw_to_hwio,
)
from convbook.layers import (
    SGD,
    Adam,
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    Dropout,
    Flatten,
    Linear,
    MaxPool2d,
    ReLU,
    Sequential,
    softmax_cross_entropy,
)
from convbook.train import Model, emnist_cnn, load_model
from conftest import assert_close, conv_cases, pool_cases, to_t
from test_pool import option_cases

DTYPES = st.sampled_from([np.float64, np.float32])


def torch_dtype(dtype):
    return torch.float64 if np.dtype(dtype) == np.float64 else torch.float32


def run_layer(layer, x, seed=0):
    """Our forward and backward with a random dy: (y, dy, dx)."""
    y = layer.forward(x)
    dy = np.random.default_rng(seed).standard_normal(y.shape).astype(y.dtype)
    return y, dy, layer.backward(dy)


def autograd(fn, x, dy):
    """(y, dx) of the torch function fn at x (a NumPy array in fn's layout) given dy."""
    tx = to_t(x).requires_grad_()
    ty = fn(tx)
    ty.backward(to_t(dy))
    return ty.detach().numpy(), tx.grad.numpy()


class ReplayMask:
    """Stands in for a np.random.Generator: our Dropout keeps the units where random() >= p,
    so returning 1.0 where torch kept a unit and 0.0 elsewhere replays torch's mask."""

    def __init__(self, keep):
        self.keep = keep

    def random(self, shape):
        assert shape == self.keep.shape
        return self.keep.astype(np.float64)


def seeded_dropout(x, p, seed):
    """F.dropout (training) right after torch.manual_seed(seed); the global RNG is restored."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return F.dropout(x, p, training=True)


def assert_caught(strategy, check, *, max_examples=100, errors=AssertionError):
    """A property that must fail: `check` over `strategy`'s examples raises `errors` for one
    of the first `max_examples` (so a deliberately wrong implementation is caught)."""
    prop = settings(max_examples=max_examples, report_multiple_bugs=False)(
        given(strategy)(check)
    )
    with pytest.raises(errors):
        prop()


# ---------------------------------------------------------------------------------------------
# Conv2d


def check_conv2d(case, dtype, input_grad, cls=Conv2d):
    kh, kw, c_in, c_out = case.w.shape
    layer = cls(
        c_in, c_out, (kh, kw), **case.kwargs, input_grad=input_grad, dtype=dtype
    )
    assert layer.params["w"].dtype == dtype and layer.params["w"].shape == case.w.shape
    b = (
        case.b
        if case.b is not None
        else np.random.default_rng(1).standard_normal(c_out)
    )
    layer.params["w"][...] = case.w
    layer.params["b"][...] = b
    y, dy, dx = run_layer(layer, case.x)
    t = lambda a: to_t(a).requires_grad_()
    tx, tw, tb = t(nhwc_to_nchw(case.x)), t(hwio_to_oihw(case.w)), t(b.astype(dtype))
    if isinstance(case.padding, tuple) and isinstance(case.padding[0], tuple):
        (top, bottom), (left, right) = case.padding
        inp, pad = F.pad(tx, (left, right, top, bottom)), 0
    else:
        inp, pad = tx, case.padding
    ty = F.conv2d(inp, tw, tb, stride=case.stride, padding=pad, dilation=case.dilation)
    ty.backward(to_t(nhwc_to_nchw(dy)))
    assert y.dtype == dtype
    assert_close(y, nchw_to_nhwc(ty.detach().numpy()), dtype)
    if input_grad:
        assert_close(dx, nchw_to_nhwc(tx.grad.numpy()), dtype)
    else:
        assert dx is None
    assert_close(layer.grads["w"], oihw_to_hwio(tw.grad.numpy()), dtype)
    assert_close(layer.grads["b"], tb.grad.numpy(), dtype)


@given(case=conv_cases(np.float64), input_grad=st.booleans())
def test_conv2d_layer_float64(case, input_grad):
    check_conv2d(case, np.float64, input_grad)


@given(case=conv_cases(np.float32), input_grad=st.booleans())
def test_conv2d_layer_float32(case, input_grad):
    check_conv2d(case, np.float32, input_grad)


def test_conv2d_he_initialisation():
    """std sqrt(2 / fan_in) within sampling error (50k weights: relative error ~ 0.3%)."""
    layer = Conv2d(64, 96, (3, 3), rng=np.random.default_rng(0))
    w = layer.params["w"]
    assert w.dtype == np.float32 and np.all(layer.params["b"] == 0)
    assert (
        abs(w.std() / np.sqrt(2 / (9 * 64)) - 1) < 0.02
        and abs(w.mean()) < 0.01 * w.std()
    )
    lin = Linear(500, 200, rng=np.random.default_rng(0))
    assert abs(lin.params["w"].std() / np.sqrt(2 / 500) - 1) < 0.02


# ---------------------------------------------------------------------------------------------
# ReLU


@st.composite
def relu_inputs(draw):
    """Arrays of small integers (many exact zeros) or normals, 2-D or 4-D, both dtypes."""
    shape = draw(st.sampled_from([(3, 7), (2, 4, 5, 3), (1, 1), (5, 3, 2, 1)]))
    dtype = draw(DTYPES)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        return rng.integers(-2, 3, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def check_relu(x, cls=ReLU):
    y, dy, dx = run_layer(cls(), x)
    y_ref, dx_ref = autograd(torch.relu, x, dy)
    assert y.dtype == x.dtype and dx.dtype == x.dtype
    assert np.array_equal(y, y_ref) and np.array_equal(dx, dx_ref)


@given(relu_inputs())
def test_relu_equals_torch_exactly(x):
    check_relu(x)


SPECIAL = np.array([np.nan, -np.nan, -0.0, 0.0, np.inf, -np.inf, 2.0, -3.0])


def same_bits(a, b):
    """Equal values, NaN equal to NaN, and -0.0 told apart from +0.0."""
    return np.array_equal(a, b, equal_nan=True) and np.array_equal(
        np.signbit(a), np.signbit(b)
    )


def check_relu_special(x, dy, cls=ReLU):
    layer = cls()
    y, dx = layer.forward(x), layer.backward(dy)
    tx = to_t(x).requires_grad_()
    ty = torch.relu(tx)
    ty.backward(to_t(dy))
    assert same_bits(y, ty.detach().numpy()) and same_bits(dx, tx.grad.numpy())


@given(
    st.sampled_from([(7,), (3, 50), (2, 5, 4, 3), (1, 1)]),
    DTYPES,
    st.integers(0, 2**32 - 1),
)
def test_relu_nan_zeros_and_infinities_bit_for_bit(shape, dtype, seed):
    """NaN propagates forward and its gradient passes, -0.0 stays -0.0, -inf gives +0, and the
    gradient is +0 where x <= 0 even for an infinite or NaN dy: as torch.relu and autograd."""
    rng = np.random.default_rng(seed)
    x, dy = (rng.choice(SPECIAL, size=shape).astype(dtype) for _ in range(2))
    check_relu_special(x, dy)


class ReLUZeroingNaN(ReLU):
    """Wrong (the earlier version): NaN -> 0 forward, and its gradient blocked."""

    def forward(self, x):
        self.mask_ = x > 0
        return np.where(self.mask_, x, 0).astype(x.dtype)

    def backward(self, dy):
        return np.where(self.mask_, dy, 0).astype(dy.dtype)


def test_property_catches_a_relu_that_zeroes_nan():
    prop = settings(max_examples=100, report_multiple_bugs=False)(
        given(st.sampled_from([(7,), (3, 50)]), DTYPES, st.integers(0, 2**32 - 1))(
            lambda shape, dtype, seed: check_relu_special(
                *(
                    np.random.default_rng(seed + k)
                    .choice(SPECIAL, size=shape)
                    .astype(dtype)
                    for k in range(2)
                ),
                cls=ReLUZeroingNaN,
            )
        )
    )
    with pytest.raises(AssertionError):
        prop()


def test_relu_keeps_the_input_layout_and_the_big_arrays():
    """A transposed (NCHW-strided) input and the emnist-sized one: the same bits as torch."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3, 9, 7)).astype(np.float32).transpose(0, 2, 3, 1)
    x[0, 0, 0] = -0.0
    check_relu_special(x, rng.standard_normal(x.shape).astype(np.float32))


# ---------------------------------------------------------------------------------------------
# MaxPool2d


def check_max_pool(case, cls=MaxPool2d, **options):
    """The layer against F.max_pool2d and autograd, and against chapter 5b's functions;
    NaN must come out where PyTorch's does."""
    x, kernel, stride, padding = case
    layer = cls(kernel, stride, padding, **options)
    y, dy, dx = run_layer(layer, x)
    kw = dict(stride=stride, padding=padding, **options)
    pool = lambda tx: F.max_pool2d(tx, kernel, **kw)  # noqa: E731
    y_ref, dx_ref = autograd(pool, nhwc_to_nchw(x), nhwc_to_nchw(dy))
    assert y.dtype == x.dtype and dx.dtype == x.dtype and dx.shape == x.shape
    assert np.array_equal(y, nchw_to_nhwc(y_ref), equal_nan=True)
    assert np.array_equal(y, max_pool2d(x, kernel, **kw), equal_nan=True)
    assert_close(dx, nchw_to_nhwc(dx_ref), x.dtype)
    assert_close(dx, max_pool2d_backward(dy, x, kernel, **kw), x.dtype)


@given(pool_cases(infinities=True))
def test_max_pool_layer_equals_torch_and_chapter_5b(case):
    check_max_pool(case)


@pytest.mark.parametrize(
    "kernel,stride,padding", [(2, 2, 1), (3, 1, 1), ((3, 2), 2, (1, 1)), (4, 1, 2)]
)
def test_max_pool_layer_all_minus_inf(kernel, stride, padding):
    """Every pixel -inf: each gradient goes to the first tap inside the image, never the padding."""
    x = np.full((1, 5, 4, 2), -np.inf)
    check_max_pool((x, kernel, stride, padding))


def test_max_pool_layer_overlapping_windows_add_up():
    """A pixel that is the maximum of four overlapping windows receives their four dy."""
    x = np.zeros((1, 5, 5, 1))
    x[0, 2, 2, 0] = 1.0
    layer = MaxPool2d(3, stride=1)
    layer.forward(x)
    dx = layer.backward(np.ones((1, 3, 3, 1)))
    assert dx[0, 2, 2, 0] == 9 and dx.sum() == 9


@given(option_cases("max"))
def test_max_pool_layer_every_option_with_nan_and_inf(case):
    """Dilation, ceil mode, 1-tuples, NaN and +-inf: the layer's two paths against torch."""
    x, kernel, kw = case
    check_max_pool(
        (x, kernel, kw.get("stride"), kw["padding"]),
        dilation=kw["dilation"],
        ceil_mode=kw["ceil_mode"],
    )


@st.composite
def two_by_two_cases(draw):
    """Inputs for the 2x2, stride 2 fast path: even and odd sizes, ties, -0.0, NaN, +-inf."""
    h, w = draw(st.integers(2, 9)), draw(st.integers(2, 9))
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, 1.0, -1.0, 0.5])
    dtype = draw(DTYPES)
    if draw(st.booleans()):
        x = rng.choice(values, size=(n, h, w, c))
    else:
        x = np.round(rng.standard_normal((n, h, w, c)) * 2) / 2
    return x.astype(dtype), (2, (2, 2), (2,))[draw(st.integers(0, 2))]


@given(two_by_two_cases())
def test_max_pool_fast_path_equals_torch(case):
    x, kernel = case
    check_max_pool((x, kernel, None, 0))


class MaxPool2dColumnsFirst(MaxPool2d):
    """Wrong on ties: the 2x2 path compares the pairs of rows first, then of columns."""

    def forward(self, x):
        return (
            super()
            .forward(np.ascontiguousarray(x.transpose(0, 2, 1, 3)))
            .transpose(0, 2, 1, 3)
        )

    def backward(self, dy):
        return (
            super()
            .backward(np.ascontiguousarray(dy.transpose(0, 2, 1, 3)))
            .transpose(0, 2, 1, 3)
        )


def test_property_catches_a_fast_path_with_the_wrong_tie_order():
    assert_caught(
        two_by_two_cases(),
        lambda case: check_max_pool((case[0], 2, None, 0), cls=MaxPool2dColumnsFirst),
        max_examples=200,
    )


@pytest.mark.parametrize("kernel", [2, 3])
@pytest.mark.parametrize(
    "x_dtype,dy_dtype",
    [
        (np.float64, np.float32),
        (np.float32, np.float64),
        (np.int16, np.float32),
        (np.float32, np.float32),
    ],
)
def test_max_pool_layer_gradient_dtype_is_chapter_5bs(kernel, x_dtype, dy_dtype):
    x = (
        np.random.default_rng(0)
        .permutation(2 * 6 * 6 * 3)
        .reshape(2, 6, 6, 3)
        .astype(x_dtype)
    )
    layer = MaxPool2d(kernel)
    dy = np.ones(layer.forward(x).shape, dy_dtype)
    dx, ref = layer.backward(dy), max_pool2d_backward(dy, x, kernel)
    assert dx.dtype == ref.dtype and np.array_equal(dx, ref)


# ---------------------------------------------------------------------------------------------
# Flatten


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 1, 1, 7), (3, 2, 2, 1), (4, 6)])
def test_flatten_is_nhwc_order(shape):
    x = np.random.default_rng(0).standard_normal(shape)
    layer = Flatten()
    y, dy, dx = run_layer(layer, x)
    assert y.shape == (shape[0], int(np.prod(shape[1:])))
    if x.ndim == 4:
        flat = lambda tx: torch.flatten(tx.permute(0, 2, 3, 1), 1)
        y_ref, dx_ref = autograd(flat, nhwc_to_nchw(x), dy)
        assert np.array_equal(y, y_ref) and np.array_equal(dx, nchw_to_nhwc(dx_ref))
        nchw_flat = torch.flatten(to_t(nhwc_to_nchw(x)), 1).numpy()
        assert np.array_equal(y, nchw_flat) == (
            shape[3] == 1 or shape[1] * shape[2] == 1
        )
    assert np.array_equal(dx, dy.reshape(shape))


# ---------------------------------------------------------------------------------------------
# Linear


def check_linear(n, n_in, n_out, dtype, seed, cls=Linear):
    rng = np.random.default_rng(seed)
    layer = cls(n_in, n_out, rng=rng, dtype=dtype)
    layer.params["b"][...] = rng.standard_normal(n_out)
    x = rng.standard_normal((n, n_in)).astype(dtype)
    y, dy, dx = run_layer(layer, x, seed)
    tx, tw, tb = (
        to_t(a).requires_grad_() for a in (x, layer.params["w"].T, layer.params["b"])
    )
    ty = F.linear(tx, tw, tb)  # PyTorch's weight is (out, in): the transpose of ours
    ty.backward(to_t(dy))
    assert y.dtype == dtype
    assert_close(y, ty.detach().numpy(), dtype)
    assert_close(dx, tx.grad.numpy(), dtype)
    assert_close(layer.grads["w"], tw.grad.numpy().T, dtype)
    assert_close(layer.grads["b"], tb.grad.numpy(), dtype)


@given(
    st.integers(1, 8),
    st.integers(1, 40),
    st.integers(1, 20),
    DTYPES,
    st.integers(0, 2**32 - 1),
)
def test_linear_equals_torch(n, n_in, n_out, dtype, seed):
    check_linear(n, n_in, n_out, dtype, seed)


def test_linear_large_fan_in_float32():
    check_linear(64, 3136, 128, np.float32, 0)


# ---------------------------------------------------------------------------------------------
# Dropout


@given(
    st.sampled_from([(16, 30), (2, 5, 4, 3), (1, 1)]),
    st.sampled_from([0.1, 0.25, 0.5, 0.9]),
    DTYPES,
    st.integers(0, 1000),
)
def test_dropout_equals_torch_with_the_same_mask(shape, p, dtype, seed):
    x = np.random.default_rng(seed).standard_normal(shape).astype(dtype) + 3  # no zeros
    keep = seeded_dropout(to_t(np.ones(shape, dtype)), p, seed).numpy() != 0
    layer = Dropout(p, rng=ReplayMask(keep))
    y, dy, dx = run_layer(layer, x)
    y_ref, dx_ref = autograd(lambda tx: seeded_dropout(tx, p, seed), x, dy)
    assert y.dtype == dtype and dx.dtype == dtype
    assert np.array_equal(y, y_ref) and np.array_equal(dx, dx_ref)
    assert np.array_equal(y == 0, ~keep)


@pytest.mark.parametrize("p", [0.0, 0.2, 0.5])
def test_dropout_statistics_and_eval_mode(p):
    x = np.ones((1000, 1000), np.float32)
    layer = Dropout(p, rng=np.random.default_rng(1))
    y = layer.forward(x)
    sd = np.sqrt(p * (1 - p) / x.size)
    assert (
        abs(np.mean(y == 0) - p) <= 5 * sd
        and abs(y.mean() - 1) <= 5 * sd / (1 - p) + 1e-6
    )
    assert y.dtype == np.float32
    layer.training = False
    assert layer.forward(x) is x and layer.backward(x) is x


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_dropout_rejects_bad_p(p):
    with pytest.raises(ValueError, match="p must be"):
        Dropout(p)


# ---------------------------------------------------------------------------------------------
# Softmax cross-entropy


@given(
    st.integers(1, 20),
    st.integers(2, 50),
    st.sampled_from([1.0, 30.0, 1e4]),
    DTYPES,
    st.integers(0, 2**32 - 1),
)
def test_softmax_cross_entropy_equals_torch(n, k, scale, dtype, seed):
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal((n, k))).astype(dtype)
    labels = rng.integers(0, k, size=n)
    with np.errstate(
        over="raise", invalid="raise", divide="raise"
    ):  # no overflow, no NaN
        loss, grad = softmax_cross_entropy(logits, labels)
    tz = to_t(logits).requires_grad_()
    ref = F.cross_entropy(tz, torch.from_numpy(labels))
    ref.backward()
    assert isinstance(loss, float) and np.isfinite(loss) and grad.dtype == dtype
    assert abs(loss - ref.item()) <= (1e-10 if dtype == np.float64 else 2e-5) * (
        1 + abs(ref.item())
    )
    assert_close(grad, tz.grad.numpy(), dtype)


def test_softmax_cross_entropy_extreme_logits():
    """+-1e4 logits: the naive formula gives inf/inf; ours gives the exact loss, no warning."""
    logits = np.array([[1e4, 0.0, -1e4], [-1e4, 1e4, 1e4], [0.0, 0.0, 1e4]])
    labels = np.array([0, 2, 0])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        loss, grad = softmax_cross_entropy(logits, labels)
    assert abs(loss - (0 + np.log(2) + 1e4) / 3) < 1e-9
    expected = np.array([[0, 0, 0], [0, 0.5, -0.5], [-1, 0, 1]]) / 3
    assert np.abs(grad - expected).max() < 1e-12


# ---------------------------------------------------------------------------------------------
# Optimizers


@st.composite
def optimizer_runs(draw):
    dtype = draw(DTYPES)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    params = {
        "w": rng.standard_normal((3, 4)).astype(dtype),
        "b": rng.standard_normal(5).astype(dtype),
    }
    steps = draw(st.integers(1, 15))
    grads = [
        {
            k: (rng.standard_normal(v.shape) * 10.0 ** rng.integers(-3, 2)).astype(
                dtype
            )
            for k, v in params.items()
        }
        for _ in range(steps)
    ]
    if draw(st.booleans()):
        kw = {
            "lr": draw(st.sampled_from([1e-3, 0.01, 0.1])),
            "momentum": draw(st.sampled_from([0.0, 0.5, 0.9])),
        }
        return SGD, torch.optim.SGD, kw, params, grads
    kw = {
        "lr": draw(st.sampled_from([1e-3, 0.01, 0.1])),
        "betas": draw(st.sampled_from([(0.9, 0.999), (0.8, 0.99), (0.5, 0.9)])),
        "eps": draw(st.sampled_from([1e-8, 1e-6])),
    }
    return Adam, torch.optim.Adam, kw, params, grads


def check_optimizer(run, ours_cls=None):
    cls, torch_cls, kw, params0, grads = run
    ours = {k: v.copy() for k, v in params0.items()}
    theirs = {k: to_t(v).requires_grad_() for k, v in params0.items()}
    opt, topt = (ours_cls or cls)(ours, **kw), torch_cls(list(theirs.values()), **kw)
    dtype = params0["w"].dtype
    tol = 1e-12 if dtype == np.float64 else 1e-6
    for g in grads:
        opt.step(g)
        for k, p in theirs.items():
            p.grad = to_t(g[k])
        topt.step()
        for k, p in ours.items():
            ref = theirs[k].detach().numpy()
            assert p.dtype == dtype
            assert np.abs(p - ref).max() <= tol * (1 + np.abs(ref).max()), (
                cls.__name__,
                k,
            )


@given(optimizer_runs())
def test_optimizers_equal_torch_optim(run):
    check_optimizer(run)


def test_optimizer_updates_the_network_in_place():
    net = Sequential(Linear(4, 3, rng=np.random.default_rng(0)))
    w = net.layers[0].params["w"]
    before = w.copy()
    opt = Adam(net.parameters(), lr=0.1)
    net.forward(np.ones((2, 4), np.float32))
    net.backward(np.ones((2, 3), np.float32))
    opt.step(net.gradients())
    assert net.layers[0].params["w"] is w and np.all(
        np.abs(w - before) > 0.09
    )  # first step: lr * sign


# ---------------------------------------------------------------------------------------------
# Whole networks


def small_net(dtype, seed=0, p=0.3):
    g = np.random.default_rng(seed)
    return Sequential(
        Conv2d(1, 4, 3, padding=1, input_grad=False, rng=g, dtype=dtype),
        ReLU(),
        MaxPool2d(3, stride=2, padding=1),
        Conv2d(4, 6, 3, stride=2, padding=1, rng=g, dtype=dtype),
        ReLU(),
        MaxPool2d(2),
        Flatten(),
        Linear(24, 16, rng=g, dtype=dtype),
        ReLU(),
        Dropout(p),
        Linear(16, 5, rng=g, dtype=dtype),
    )


class TorchDropout(torch.nn.Module):
    def __init__(self, p, seed):
        super().__init__()
        self.p, self.seed = p, seed

    def forward(self, x):
        return seeded_dropout(x, self.p, self.seed)


def torch_twin(net, x, seed=0):
    """torch.nn.Sequential computing the same function as `net` on NCHW input, with the weights
    copied (HWIO -> OIHW, Linear transposed, the Linear after Flatten with its rows permuted from
    (h, w, c) to (c, h, w)); our Dropout layers replay torch's masks. Also returns, per layer,
    a function turning the twin module's parameter gradients into ours."""
    modules, to_ours, hwc, h = [], [], None, x
    dt = torch_dtype(x.dtype)
    for layer in net.layers:
        name = type(layer).__name__
        back = lambda m: {}
        if name == "Conv2d":
            c_in, c_out, kernel = layer.shape
            m = torch.nn.Conv2d(c_in, c_out, kernel, **layer.geom, dtype=dt)
            with torch.no_grad():
                m.weight.copy_(to_t(hwio_to_oihw(layer.params["w"])))
                m.bias.copy_(to_t(layer.params["b"]))
            back = lambda m: {
                "w": oihw_to_hwio(m.weight.grad.numpy()),
                "b": m.bias.grad.numpy(),
            }
        elif name == "Linear":
            w = layer.params["w"]
            m = torch.nn.Linear(*w.shape, dtype=dt)
            if hwc is None:
                w_t, back = (
                    w.T,
                    lambda m: {"w": m.weight.grad.numpy().T, "b": m.bias.grad.numpy()},
                )
            else:
                hh, ww, cc = hwc
                w_t = (
                    w.reshape(hh, ww, cc, -1)
                    .transpose(3, 2, 0, 1)
                    .reshape(-1, hh * ww * cc)
                )

                def back(m, hh=hh, ww=ww, cc=cc):
                    g = (
                        m.weight.grad.numpy()
                        .reshape(-1, cc, hh, ww)
                        .transpose(2, 3, 1, 0)
                    )
                    return {"w": g.reshape(hh * ww * cc, -1), "b": m.bias.grad.numpy()}

                hwc = None
            with torch.no_grad():
                m.weight.copy_(to_t(w_t))
                m.bias.copy_(to_t(layer.params["b"]))
        elif name == "Flatten":
            m, hwc = torch.nn.Flatten(), h.shape[1:]
        elif name == "ReLU":
            m = torch.nn.ReLU()
        elif name == "MaxPool2d":
            m = torch.nn.MaxPool2d(
                layer.kernel,
                layer.stride,
                layer.padding,
                layer.dilation,
                ceil_mode=layer.ceil_mode,
            )
        elif name == "Dropout":
            keep = (
                seeded_dropout(torch.ones(h.shape, dtype=dt), layer.p, seed).numpy()
                != 0
            )
            layer.rng, m = ReplayMask(keep), TorchDropout(layer.p, seed)
        else:
            raise TypeError(name)
        modules.append(m)
        to_ours.append(back)
        h = layer.forward(h)
    return torch.nn.Sequential(*modules), to_ours


def check_network(net, x, labels):
    twin, to_ours = torch_twin(net, x)
    loss, dlogits = softmax_cross_entropy(net.forward(x), labels)
    net.backward(dlogits)
    ours = net.gradients()
    t_loss = F.cross_entropy(twin(to_t(nhwc_to_nchw(x))), torch.from_numpy(labels))
    t_loss.backward()
    theirs = {
        f"{i}.{k}": v
        for i, (m, back) in enumerate(zip(twin, to_ours))
        for k, v in back(m).items()
    }
    assert sorted(ours) == sorted(theirs) == sorted(net.parameters())
    assert (
        abs(loss - t_loss.item())
        <= (1e-10 if x.dtype == np.float64 else 2e-5) * t_loss.item()
    )
    for k in ours:
        assert ours[k].dtype == x.dtype
        assert_close(ours[k], theirs[k], x.dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_small_network_gradients_equal_torch(dtype, seed):
    rng = np.random.default_rng(seed)
    net = small_net(dtype, seed)
    for layer in net.layers:
        if "b" in layer.params:
            layer.params["b"][...] = 0.1 * rng.standard_normal(layer.params["b"].shape)
    check_network(
        net,
        rng.standard_normal((6, 16, 16, 1)).astype(dtype),
        rng.integers(0, 5, size=6),
    )


def test_emnist_cnn_gradients_equal_torch():
    rng = np.random.default_rng(0)
    net = emnist_cnn(47, seed=0)
    check_network(
        net,
        rng.standard_normal((16, 28, 28, 1)).astype(np.float32),
        rng.integers(0, 47, size=16),
    )


def test_network_finite_differences():
    """Independent of torch: central differences (h = 1e-6, float64) at a few parameter entries."""
    rng = np.random.default_rng(3)
    net = small_net(np.float64, seed=3)
    net.layers[9].rng = ReplayMask(
        rng.random((6, 16)) >= 0.3
    )  # the same mask at every evaluation
    x, labels = rng.standard_normal((6, 16, 16, 1)), rng.integers(0, 5, size=6)
    _, dlogits = softmax_cross_entropy(net.forward(x), labels)
    net.backward(dlogits)
    grads = {k: v.copy() for k, v in net.gradients().items()}
    for name, p in net.parameters().items():
        for _ in range(3):
            k = tuple(int(rng.integers(0, s)) for s in p.shape)
            old = p[k]
            p[k] = old + 1e-6
            lp = softmax_cross_entropy(net.forward(x), labels)[0]
            p[k] = old - 1e-6
            lm = softmax_cross_entropy(net.forward(x), labels)[0]
            p[k] = old
            assert (
                abs((lp - lm) / 2e-6 - grads[name][k])
                <= 1e-7 * np.abs(grads[name]).max()
            ), (name, k)


def test_sequential_train_eval_and_parameter_names():
    net = small_net(np.float32)
    assert list(net.parameters()) == [
        "0.w",
        "0.b",
        "3.w",
        "3.b",
        "7.w",
        "7.b",
        "10.w",
        "10.b",
    ]
    assert net.parameters()["7.w"] is net.layers[7].params["w"]
    x = np.ones((2, 16, 16, 1), np.float32)
    assert net.eval() is net and not any(layer.training for layer in net.layers)
    assert np.array_equal(net.forward(x), net.forward(x))  # no dropout in evaluation
    net.train()
    assert all(layer.training for layer in net.layers)


# ---------------------------------------------------------------------------------------------
# Saving and loading (chapter 7's Model)


def test_model_save_load_round_trip(tmp_path):
    net = emnist_cnn(47, seed=5)
    model = Model(net, 0.17, 0.33, {k: chr(65 + k % 26) for k in range(47)})
    images = np.random.default_rng(0).integers(
        0, 256, size=(20, 28, 28), dtype=np.uint8
    )
    path = model.save(tmp_path / "model")  # no suffix: np.savez appends .npz
    assert path == tmp_path / "model.npz" and path.exists()
    loaded = load_model(path)
    assert np.array_equal(loaded.predict(images), model.predict(images))
    assert np.array_equal(loaded.logits(images), model.logits(images))
    assert (loaded.mean, loaded.std, loaded.mapping) == (
        model.mean,
        model.std,
        model.mapping,
    )
    for k, v in net.parameters().items():
        assert (
            np.array_equal(loaded.net.parameters()[k], v)
            and loaded.net.parameters()[k].dtype == v.dtype
        )
    assert [l.config() for l in loaded.net.layers] == [l.config() for l in net.layers]


def test_model_round_trip_with_pairs_and_explicit_padding(tmp_path):
    """Layer configs with tuples, explicit ((top, bottom), (left, right)) padding, 'same', None."""
    g = np.random.default_rng(0)
    net = Sequential(
        Conv2d(
            1,
            3,
            (3, 5),
            stride=(1, 2),
            padding=((1, 1), (2, 2)),
            input_grad=False,
            rng=g,
        ),
        ReLU(),
        Conv2d(3, 4, 3, padding="same", dilation=(1, 2), rng=g),
        ReLU(),
        MaxPool2d((2, 3), stride=(2, 1), padding=(1, 1)),
        MaxPool2d(2),
        Flatten(),
        Linear(7 * 7 * 4, 10, rng=g),
        Dropout(0.1),
        Linear(10, 3, rng=g),
    )
    model = Model(net, 0.5, 0.25, {0: "a", 1: "b", 2: "c"})
    images = g.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    loaded = load_model(model.save(tmp_path / "m.npz"))
    assert np.array_equal(loaded.logits(images), model.logits(images))


@pytest.mark.parametrize("shape", [(2, 28, 27), (2, 28, 28, 1), (28, 28), (3, 27, 28)])
def test_predict_validates_the_input_shape(shape):
    model = Model(emnist_cnn(47, seed=0), 0.17, 0.33, {k: str(k) for k in range(47)})
    with pytest.raises(ValueError, match=r"\(N, 28, 28\)"):
        model.predict(np.zeros(shape, np.uint8))


def test_predict_on_an_empty_batch():
    model = Model(emnist_cnn(47, seed=0), 0.17, 0.33, {k: str(k) for k in range(47)})
    assert model.predict(np.zeros((0, 28, 28), np.uint8)).shape == (0,)


# ---------------------------------------------------------------------------------------------
# The properties catch wrong layers


class ReLUPassingAtZero(ReLU):
    """Wrong: passes the gradient where x == 0 (PyTorch passes 0 there)."""

    def forward(self, x):
        self.x_ = x
        return super().forward(x)

    def backward(self, dy):
        return np.where((self.x_ > 0) | (self.x_ == 0), dy, 0).astype(dy.dtype)


class LinearWithoutTranspose(Linear):
    """Wrong: dx = dy @ w instead of dy @ w.T (only the shapes of square layers fit)."""

    def backward(self, dy):
        super().backward(dy)
        return dy @ self.params["w"]


class AdamWithoutBiasCorrection(Adam):
    """Wrong: forgets the bias correction, so the first steps are far too small."""

    def step(self, grads):
        self.t += 1
        b1, b2 = self.betas
        for k, p in self.params.items():
            self.m[k] = b1 * self.m[k] + (1 - b1) * grads[k]
            self.v[k] = b2 * self.v[k] + (1 - b2) * grads[k] ** 2
            p -= (self.lr * self.m[k] / (np.sqrt(self.v[k]) + self.eps)).astype(p.dtype)


def test_property_catches_relu_passing_gradient_at_zero():
    assert_caught(relu_inputs(), lambda x: check_relu(x, cls=ReLUPassingAtZero))


def test_property_catches_linear_without_transpose():
    shapes = st.tuples(
        st.integers(1, 8),
        st.integers(1, 40),
        st.integers(1, 20),
        DTYPES,
        st.integers(0, 2**32 - 1),
    )
    assert_caught(
        shapes,
        lambda args: check_linear(*args, cls=LinearWithoutTranspose),
        errors=(AssertionError, ValueError),
    )


def test_linear_without_transpose_is_caught_on_square_layers():
    """Square layers get past the shapes, so the values must catch it."""
    with pytest.raises(AssertionError):
        check_linear(4, 6, 6, np.float64, 0, cls=LinearWithoutTranspose)


def test_property_catches_adam_without_bias_correction():
    assert_caught(
        optimizer_runs(),
        lambda run: check_optimizer(
            run, ours_cls=AdamWithoutBiasCorrection if run[0] is Adam else None
        ),
    )


# ---------------------------------------------------------------------------------------------
# Edge cases where an earlier version differed from PyTorch


def test_relu_of_minus_inf_is_zero():
    with np.errstate(invalid="ignore"):
        assert np.array_equal(ReLU().forward(np.array([-np.inf, 1.0])), [0.0, 1.0])


# ---------------------------------------------------------------------------------------------
# Arguments checked when a layer is built; configs that JSON can store


@pytest.mark.parametrize(
    "make,error,words",
    [
        (lambda: Conv2d(0, 4, 3), ValueError, "c_in must be >= 1"),
        (lambda: Conv2d(1, 0, 3), ValueError, "c_out must be >= 1"),
        (lambda: Conv2d(1.5, 4, 3), TypeError, "c_in must be an int"),
        (lambda: Conv2d(1, 4, 0), ValueError, "kernel"),
        (lambda: Conv2d(1, 4, 3, stride=0), ValueError, "stride"),
        (lambda: Conv2d(1, 4, 3, dilation=(1, 0)), ValueError, "dilation"),
        (lambda: Conv2d(1, 4, 3, padding=-1), ValueError, "padding"),
        (lambda: Conv2d(1, 4, 3, padding="full"), ValueError, "padding"),
        (lambda: Conv2d(1, 4, 3, stride=2, padding="same"), ValueError, "same"),
        (lambda: Conv2d(1, 4, 3, dtype=np.int64), TypeError, "dtype"),
        (lambda: Conv2d(1, 4, 3, input_grad=None), TypeError, "input_grad"),
        (lambda: Conv2d(1, 4, 3, rng=7), TypeError, "rng"),
        (lambda: Linear(0, 3), ValueError, "n_in must be >= 1"),
        (lambda: Linear(3, 0), ValueError, "n_out must be >= 1"),
        (lambda: Linear(3, True), TypeError, "n_out"),
        (lambda: Linear(3, 2, dtype="int8"), TypeError, "dtype"),
        (lambda: MaxPool2d(0), ValueError, "kernel"),
        (lambda: MaxPool2d(2, padding=2), ValueError, "padding must be at most half"),
        (lambda: MaxPool2d(2, stride=(1, 1, 1)), ValueError, "stride"),
        (lambda: MaxPool2d(2, dilation=0), ValueError, "dilation"),
        (lambda: MaxPool2d(2, ceil_mode="yes"), TypeError, "ceil_mode"),
        (lambda: Dropout("0.5"), TypeError, "p must be a number"),
        (lambda: Dropout(1), ValueError, "p must be in"),
        (lambda: Dropout(0.5, rng="seed"), TypeError, "rng"),
        (lambda: BatchNorm2d(0), ValueError, "channels must be >= 1"),
        (lambda: BatchNorm2d(2.0), TypeError, "channels must be an int"),
        (lambda: BatchNorm2d(4, eps=0), ValueError, "eps must be > 0"),
        (lambda: BatchNorm2d(4, eps="1e-5"), TypeError, "eps must be a number"),
        (
            lambda: BatchNorm2d(4, momentum=1.01),
            ValueError,
            r"momentum must be in \[0, 1\]",
        ),
        (lambda: BatchNorm1d(4, momentum=-0.1), ValueError, "momentum must be >= 0"),
        (lambda: BatchNorm1d(4, dtype=np.int32), TypeError, "dtype"),
        (lambda: Sequential(ReLU(), np.tanh), TypeError, "layer 1 must be a Layer"),
        (lambda: SGD({}, lr=-1), ValueError, "lr"),
        (lambda: SGD({}, momentum="0.9"), TypeError, "momentum"),
        (lambda: Adam({}, betas=(0.9, 1.0)), ValueError, "betas"),
        (lambda: Adam({}, eps=-1e-8), ValueError, "eps"),
    ],
)
def test_bad_arguments_raise_when_the_layer_is_built(make, error, words):
    """Before: Conv2d(0, ...) and Linear(0, ...) raised ZeroDivisionError, MaxPool2d's and
    Conv2d's geometry was only checked at the first forward pass."""
    with pytest.raises(error, match=words):
        make()


def test_linear_forward_names_a_wrong_input_shape():
    with pytest.raises(ValueError, match=r"x must have shape \(N, 4\)"):
        Linear(4, 2).forward(np.zeros((3, 5), np.float32))


def test_configs_are_plain_json_with_numpy_integers(tmp_path):
    """Hyperparameters given as NumPy integers: config() returns Python ints and lists, the
    model saves and loads (before, Conv2d.config raised and MaxPool2d's was not JSON)."""
    i = np.int64
    g = np.random.default_rng(0)
    net = Sequential(
        Conv2d(
            i(1),
            i(4),
            (i(3), i(3)),
            stride=i(1),
            padding=(i(1), i(1)),
            dilation=i(1),
            input_grad=np.bool_(False),
            rng=g,
        ),
        ReLU(),
        MaxPool2d(i(2), stride=(i(2),), padding=i(0)),
        Flatten(),
        Linear(i(14 * 14 * 4), np.int32(5), rng=g),
        Dropout(np.float32(0.25)),
    )
    configs = [layer.config() for layer in net.layers]
    text = json.dumps(configs)
    assert json.loads(text) == configs
    for cfg in configs:
        for v in cfg.values():
            assert v is None or type(v) in (int, float, bool, str, list), (cfg, type(v))
    model = Model(net, 0.5, 0.25, {k: str(k) for k in range(5)})
    loaded = load_model(model.save(tmp_path / "m.npz"))
    images = g.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    assert np.array_equal(loaded.logits(images), model.logits(images))


# ---------------------------------------------------------------------------------------------
# NaN through the loss, dropout and the optimizers, as in PyTorch


def test_softmax_cross_entropy_nan_and_inf_like_torch():
    z = np.array(
        [[1.0, 2.0, 3.0], [np.nan, 0.0, 1.0], [np.inf, 0.0, 1.0], [-np.inf, 0.0, 1.0]]
    )
    labels = np.array([0, 1, 2, 1])
    for rows in ([0], [1], [2], [3], [0, 3], [0, 1, 2, 3]):
        with np.errstate(invalid="ignore"):
            loss, grad = softmax_cross_entropy(z[rows], labels[rows])
        tz = to_t(z[rows]).requires_grad_()
        ref = F.cross_entropy(tz, torch.from_numpy(labels[rows]))
        ref.backward()
        assert (np.isnan(loss) and np.isnan(ref.item())) or abs(
            loss - ref.item()
        ) < 1e-12, rows
        assert np.array_equal(np.isnan(grad), np.isnan(tz.grad.numpy())), rows
        assert_close(np.nan_to_num(grad), np.nan_to_num(tz.grad.numpy()), np.float64)


def test_dropout_with_nan_and_inf_like_torch():
    x = np.tile(np.array([np.nan, np.inf, 1.0, -np.inf]), 8).reshape(4, 8)
    dy = np.tile(np.array([np.nan, 1.0, np.inf, 2.0]), 8).reshape(4, 8)
    keep = seeded_dropout(to_t(np.ones_like(x)), 0.5, 3).numpy() != 0
    layer = Dropout(0.5, rng=ReplayMask(keep))
    with np.errstate(invalid="ignore"):
        y, dx = layer.forward(x), layer.backward(dy)
    y_ref, dx_ref = autograd(lambda tx: seeded_dropout(tx, 0.5, 3), x, dy)
    assert np.array_equal(y, y_ref, equal_nan=True) and np.array_equal(
        dx, dx_ref, equal_nan=True
    )


def test_sgd_without_momentum_keeps_no_velocity():
    """An infinite gradient once: PyTorch keeps p = -inf; a velocity multiplied by 0 would turn
    into NaN at the next step (0 * inf)."""
    ours = {"w": np.zeros(3)}
    theirs = to_t(np.zeros(3)).requires_grad_()
    opt, topt = (
        SGD(ours, lr=0.1, momentum=0.0),
        torch.optim.SGD([theirs], lr=0.1, momentum=0.0),
    )
    for g in (np.array([np.inf, 1.0, 2.0]), np.array([1.0, 1.0, 1.0])):
        opt.step({"w": g})
        theirs.grad = to_t(g)
        topt.step()
        assert np.array_equal(ours["w"], theirs.detach().numpy(), equal_nan=True)


def test_optimizer_steps_allocate_no_parameter_sized_arrays():
    """In place: the parameters and the optimizers' own arrays are the same objects after a
    step, and tracemalloc sees no allocation of the size of a parameter."""
    import tracemalloc

    params = {"w": np.zeros((512, 512), np.float32)}
    grads = {"w": np.ones((512, 512), np.float32)}
    for opt in (SGD(params, lr=0.1), Adam(params)):
        opt.step(grads)
        tracemalloc.start()
        opt.step(grads)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < params["w"].nbytes / 4, (type(opt).__name__, peak)


def test_max_pool_layer_propagates_nan_like_torch():
    x = np.array([1.0, np.nan, 3.0, 2.0]).reshape(1, 2, 2, 1)
    assert np.isnan(max_pool2d(x, 2)).all()  # chapter 5b's function and torch give NaN
    assert np.isnan(MaxPool2d(2).forward(x)).all()


def test_nested_sequential_exposes_inner_parameters():
    g = np.random.default_rng(0)
    net = Sequential(Sequential(Linear(3, 4, rng=g), ReLU()), Linear(4, 2, rng=g))
    assert len(net.parameters()) == 4


def test_softmax_cross_entropy_rejects_negative_labels():
    with pytest.raises((ValueError, IndexError)):
        softmax_cross_entropy(np.zeros((2, 3)), np.array([-1, 0]))


def test_save_load_keeps_float64(tmp_path):
    from convbook.train import Model, load_model

    g = np.random.default_rng(3)
    net = Sequential(
        Conv2d(1, 2, 3, padding=1, rng=g, dtype=np.float64),
        ReLU(),
        Flatten(),
        Linear(28 * 28 * 2, 3, rng=g, dtype=np.float64),
    )
    model = Model(net, 0.1, 0.3, {0: "a", 1: "b", 2: "c"})
    path = model.save(tmp_path / "m.npz")
    back = load_model(path)
    assert all(a.dtype == np.float64 for a in back.net.parameters().values())
    images = g.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    assert np.array_equal(back.logits(images), model.logits(images))


# ---------------------------------------------------------------------------------------------
# Batch normalisation: forward, dx, dw, db and the running statistics against nn.BatchNorm2d/1d,
# through a sequence of training and evaluation steps


@st.composite
def batch_norm_runs(draw):
    """A layer class, its settings and a sequence of (input, dy, mode) steps."""
    cls = draw(st.sampled_from([BatchNorm2d, BatchNorm1d]))
    dtype, c = draw(DTYPES), draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kw = dict(
        eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
        momentum=draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
    )
    modes = draw(st.lists(st.sampled_from(["train", "eval"]), min_size=1, max_size=5))
    steps = []
    for mode in modes:
        if cls is BatchNorm2d:
            shape = (
                draw(st.integers(1, 4)),
                draw(st.integers(1, 6)),
                draw(st.integers(1, 6)),
                c,
            )
        else:
            shape = (draw(st.integers(1, 20)), c)
        if (
            mode == "train" and np.prod(shape) == c
        ):  # one value per channel: training refuses it
            shape = (2,) + shape[1:]
        x = (
            rng.uniform(-3, 3, c) + rng.uniform(0.1, 3, c) * rng.standard_normal(shape)
        ).astype(dtype)
        steps.append((x, rng.standard_normal(shape).astype(dtype), mode))
    gamma, beta = (rng.standard_normal(c).astype(dtype) for _ in range(2))
    return cls, dtype, kw, gamma, beta, steps


def check_batch_norm(run, cls=None):
    layer_cls, dtype, kw, gamma, beta, steps = run
    layer = (cls or layer_cls)(len(gamma), dtype=dtype, **kw)
    layer.params["w"][...], layer.params["b"][...] = gamma, beta
    module = (
        torch.nn.BatchNorm2d if layer_cls is BatchNorm2d else torch.nn.BatchNorm1d
    )(len(gamma), **kw).to(torch_dtype(dtype))
    with torch.no_grad():
        module.weight.copy_(to_t(gamma))
        module.bias.copy_(to_t(beta))
    nchw = (lambda a: nhwc_to_nchw(a)) if layer_cls is BatchNorm2d else (lambda a: a)
    nhwc = (lambda a: nchw_to_nhwc(a)) if layer_cls is BatchNorm2d else (lambda a: a)
    for x, dy, mode in steps:
        layer.training = mode == "train"
        module.train(layer.training)
        y, dx = layer.forward(x), layer.backward(dy)
        y_ref, dx_ref = autograd(module, nchw(x), nchw(dy))
        assert y.dtype == dtype and dx.dtype == dtype
        assert_close(y, nhwc(y_ref), dtype)
        assert_close(dx, nhwc(dx_ref), dtype)
        assert_close(layer.grads["w"], module.weight.grad.numpy(), dtype)
        assert_close(layer.grads["b"], module.bias.grad.numpy(), dtype)
        assert_close(layer.bufs["running_mean"], module.running_mean.numpy(), dtype)
        assert_close(layer.bufs["running_var"], module.running_var.numpy(), dtype)
        module.zero_grad()


@given(batch_norm_runs())
def test_batch_norm_equals_torch_in_training_and_evaluation(run):
    check_batch_norm(run)


def test_batch_norm_at_the_size_of_chapter_7s_network():
    """The outputs of both convolutions of emnist_cnn and of its first Linear, float32: sums of
    up to 50,176 terms per channel stay within the float32 tolerance."""
    rng = np.random.default_rng(0)
    for cls, shape in [
        (BatchNorm2d, (64, 28, 28, 32)),
        (BatchNorm2d, (64, 14, 14, 64)),
        (BatchNorm1d, (64, 128)),
    ]:
        c = shape[-1]
        steps = [
            (
                (2 + 3 * rng.standard_normal(shape)).astype(np.float32),
                rng.standard_normal(shape).astype(np.float32),
                mode,
            )
            for mode in ("train", "train", "eval")
        ]
        run = (
            cls,
            np.float32,
            dict(eps=1e-5, momentum=0.1),
            rng.standard_normal(c).astype(np.float32),
            rng.standard_normal(c).astype(np.float32),
            steps,
        )
        check_batch_norm(run)


class BatchNormMeanConstant(BatchNorm2d):
    """Wrong: the gradient does not flow through the batch mean (the -mean(dy) term is lost)."""

    def backward(self, dy):
        dx = super().backward(dy)
        if not self.training:
            return dx
        scale = self.params["w"] * self.inv_std
        return dx + (self.grads["b"] / (dx.size // len(scale)) * scale)


class BatchNorm1dBiasedRunningVar(BatchNorm1d):
    """Wrong: the running variance takes the biased batch variance (divided by m, not m - 1)."""

    def _update_running(self, mean, var, m):
        super()._update_running(mean, var * (m - 1) / m, m)


def test_property_catches_a_batch_norm_gradient_that_ignores_the_mean():
    assert_caught(
        batch_norm_runs(),
        lambda run: check_batch_norm(
            run, cls=BatchNormMeanConstant if run[0] is BatchNorm2d else None
        ),
    )


def test_property_catches_a_biased_running_variance():
    assert_caught(
        batch_norm_runs(),
        lambda run: check_batch_norm(
            run, cls=BatchNorm1dBiasedRunningVar if run[0] is BatchNorm1d else None
        ),
    )


def test_batch_norm_gradient_is_blind_to_shift_and_scale():
    """By construction, in training: each channel's dx sums to 0, and a bias added before the
    layer gets the gradient 0; in evaluation, dx = dy * w / sqrt(running_var + eps)."""
    rng = np.random.default_rng(1)
    layer = BatchNorm2d(3, dtype=np.float64)
    layer.params["w"][:] = [2.0, -1.0, 0.5]
    x, dy = 5 + rng.standard_normal((4, 3, 5, 3)), rng.standard_normal((4, 3, 5, 3))
    layer.forward(x)
    dx = layer.backward(dy)
    assert np.abs(dx.sum(axis=(0, 1, 2))).max() < 1e-12
    layer.training = False
    layer.forward(x)
    expected = dy * layer.params["w"] / np.sqrt(layer.bufs["running_var"] + layer.eps)
    assert np.abs(layer.backward(dy) - expected).max() < 1e-14


def test_batch_norm_nan_and_inf_like_torch():
    """A NaN or an infinity in one channel makes that channel (only) NaN, in the output, dx and
    the running statistics, as in PyTorch; the other channels are untouched."""
    x = np.random.default_rng(2).standard_normal((4, 3, 3, 3))
    x[1, 2, 0, 0], x[0, 0, 1, 2] = np.nan, np.inf
    dy = np.ones_like(x)
    layer, module = BatchNorm2d(3, dtype=np.float64), torch.nn.BatchNorm2d(3).double()
    with np.errstate(invalid="ignore"):
        y, dx = layer.forward(x), layer.backward(dy)
    y_ref, dx_ref = autograd(module, nhwc_to_nchw(x), nhwc_to_nchw(dy))
    for ours, ref in [
        (y, nchw_to_nhwc(y_ref)),
        (dx, nchw_to_nhwc(dx_ref)),
        (layer.bufs["running_mean"], module.running_mean.numpy()),
        (layer.bufs["running_var"], module.running_var.numpy()),
    ]:
        assert np.array_equal(np.isnan(ours), np.isnan(ref))
        assert_close(np.nan_to_num(ours), np.nan_to_num(ref), np.float64)
    assert np.isnan(y[..., [0, 2]]).all() and not np.isnan(y[..., 1]).any()


def test_batch_norm_refuses_one_value_per_channel_in_training_only():
    for layer, x in [
        (BatchNorm2d(2), np.ones((1, 1, 1, 2), np.float32)),
        (BatchNorm1d(2), np.ones((1, 2), np.float32)),
    ]:
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            layer.forward(x)
        layer.training = False
        assert np.array_equal(
            layer.forward(x), x / np.sqrt(1 + layer.eps, dtype=np.float32)
        )


@pytest.mark.parametrize(
    "make,x,words",
    [
        (
            lambda: BatchNorm2d(3),
            np.zeros((2, 4, 4, 2), np.float32),
            r"\(N, H, W, C\) with C = 3",
        ),
        (lambda: BatchNorm2d(3), np.zeros((2, 3), np.float32), r"\(N, H, W, C\)"),
        (
            lambda: BatchNorm1d(3),
            np.zeros((2, 1, 1, 3), np.float32),
            r"\(N, C\) with C = 3",
        ),
    ],
)
def test_batch_norm_names_a_wrong_input_shape(make, x, words):
    with pytest.raises(ValueError, match=words):
        make().forward(x)


def test_batch_norm_rejects_integer_input():
    with pytest.raises(TypeError, match="floating"):
        BatchNorm1d(3).forward(np.zeros((4, 3), np.int64))


def test_batch_norm_config_is_json_and_rebuilds_the_layer():
    layer = BatchNorm2d(
        np.int64(5), eps=np.float64(1e-3), momentum=np.float32(0.5), dtype="float64"
    )
    for _ in range(3):
        layer.forward(np.random.default_rng(3).standard_normal((4, 3, 3, 5)))
    cfg = layer.config()
    assert json.loads(json.dumps(cfg)) == cfg and all(
        type(v) in (int, float, str) for v in cfg.values()
    )
    rebuilt = BatchNorm2d(**json.loads(json.dumps(cfg)))
    for name in ("params", "bufs"):
        for k, v in getattr(layer, name).items():
            getattr(rebuilt, name)[k][...] = v
    layer.training = rebuilt.training = False
    x = np.random.default_rng(4).standard_normal((2, 3, 3, 5))
    assert np.array_equal(rebuilt.forward(x), layer.forward(x))


def test_sequential_collects_buffers_and_the_optimizer_leaves_them_alone():
    g = np.random.default_rng(0)
    net = Sequential(
        Conv2d(1, 2, 3, padding=1, rng=g),
        BatchNorm2d(2),
        ReLU(),
        Sequential(Flatten(), Linear(2 * 5 * 5, 3, rng=g), BatchNorm1d(3)),
    )
    assert sorted(net.buffers()) == [
        "1.running_mean",
        "1.running_var",
        "3.2.running_mean",
        "3.2.running_var",
    ]
    assert not set(net.buffers()) & set(net.parameters())
    opt = Adam(net.parameters(), lr=0.1)
    net.forward(g.standard_normal((4, 5, 5, 1)).astype(np.float32))
    before = {k: v.copy() for k, v in net.buffers().items()}
    net.backward(np.ones((4, 3), np.float32))
    opt.step(net.gradients())
    assert all(np.array_equal(v, before[k]) for k, v in net.buffers().items())
    assert (
        net.eval().layers[1].training is False
        and net.layers[3].layers[2].training is False
    )


# ---------------------------------------------------------------------------------------------
# Class weights in the loss


@given(
    st.integers(1, 30),
    st.integers(2, 20),
    st.sampled_from([1.0, 1e4]),
    DTYPES,
    st.integers(0, 2**32 - 1),
)
def test_weighted_cross_entropy_equals_torch(n, k, scale, dtype, seed):
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal((n, k))).astype(dtype)
    labels = rng.integers(0, k, size=n)
    weight = rng.random(k) * (rng.random(k) > 0.3)
    weight[labels[0]] += 0.5  # at least one image weighs something
    loss, grad = softmax_cross_entropy(logits, labels, weight)
    tz = to_t(logits).requires_grad_()
    ref = F.cross_entropy(
        tz, torch.from_numpy(labels), weight=to_t(weight.astype(dtype))
    )
    ref.backward()
    assert isinstance(loss, float) and grad.dtype == dtype
    assert abs(loss - ref.item()) <= (1e-10 if dtype == np.float64 else 2e-5) * (
        1 + abs(ref.item())
    )
    assert_close(grad, tz.grad.numpy(), dtype)


@pytest.mark.parametrize(
    "weight,words",
    [
        (np.ones(3), "weight must be 4 numbers"),
        (np.array([1.0, -1.0, 1.0, 1.0]), "finite and >= 0"),
        (np.array([1.0, np.nan, 1.0, 1.0]), "finite and >= 0"),
    ],
)
def test_weighted_cross_entropy_checks_the_weights(weight, words):
    with pytest.raises(ValueError, match=words):
        softmax_cross_entropy(np.zeros((2, 4)), np.array([0, 1]), weight)
