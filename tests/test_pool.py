"""Max and average pooling, forward and backward, against PyTorch and finite differences."""
from __future__ import annotations

import numpy as np
import pytest
import torch.nn.functional as F
from hypothesis import given, settings

from convbook import avg_pool2d, avg_pool2d_backward, max_pool2d, max_pool2d_backward
from conftest import assert_close, numerical_grad, pool_cases, to_t


def torch_pool(kind, x, kernel, stride, padding, dy_seed):
    tx = to_t(x.transpose(0, 3, 1, 2)).requires_grad_()
    fn = F.max_pool2d if kind == "max" else F.avg_pool2d
    y = fn(tx, kernel, stride=stride, padding=padding)
    dy = np.random.default_rng(dy_seed).standard_normal(y.shape).astype(x.dtype)
    y.backward(to_t(dy))
    return y.detach().numpy().transpose(0, 2, 3, 1), dy.transpose(0, 2, 3, 1), tx.grad.numpy().transpose(0, 2, 3, 1)


def check_pool(kind, fwd, bwd, case):
    x, kernel, stride, padding = case
    y_ref, dy, dx_ref = torch_pool(kind, x, kernel, stride, padding, 0)
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
    flipped = max_pool2d_backward(dy[:, ::-1, ::-1], x[:, ::-1, ::-1], kernel, stride=stride, padding=padding)
    return flipped[:, ::-1, ::-1]


def test_property_catches_wrong_tie_breaking():
    prop = settings(max_examples=300, report_multiple_bugs=False)(given(pool_cases())(
        lambda case: check_pool("max", max_pool2d, max_pool_backward_last_tie, case)))
    with pytest.raises((AssertionError, ValueError)):
        prop()


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("kernel,stride,padding", [(2, None, 0), (3, 2, 1), ((3, 2), 1, (1, 0))])
def test_pool_finite_differences(kind, kernel, stride, padding):
    """Independent of torch. Distinct values keep the max away from ties, where it is not differentiable."""
    rng = np.random.default_rng(5)
    x = rng.permutation(2 * 6 * 5 * 2).reshape(2, 6, 5, 2) / 10.0
    fwd, bwd = (max_pool2d, max_pool2d_backward) if kind == "max" else (avg_pool2d, avg_pool2d_backward)
    g = rng.standard_normal(fwd(x, kernel, stride=stride, padding=padding).shape)
    loss = lambda: float(np.sum(fwd(x, kernel, stride=stride, padding=padding) * g))  # noqa: E731
    # h = 1e-6 is far below the 0.1 gap between values, so no window changes its arg-max
    np.testing.assert_allclose(bwd(g, x, kernel, stride=stride, padding=padding), numerical_grad(loss, x),
                               rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("kernel,stride,padding", [(2, 2, 1), (3, 1, 1), ((3, 2), 2, (1, 1))])
def test_max_pool_infinite_inputs(kernel, stride, padding):
    """-inf pixels (e.g. from masking): the gradient never goes to the padding, as in PyTorch."""
    rng = np.random.default_rng(2)
    x = np.where(rng.random((2, 5, 4, 2)) < 0.6, -np.inf, rng.standard_normal((2, 5, 4, 2)))
    x[0] = -np.inf
    y_ref, dy, dx_ref = torch_pool("max", x, kernel, stride, padding, 1)
    assert np.array_equal(max_pool2d(x, kernel, stride=stride, padding=padding), y_ref)
    assert np.array_equal(max_pool2d_backward(dy, x, kernel, stride=stride, padding=padding), dx_ref)
