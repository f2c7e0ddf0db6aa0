"""Bad input raises TypeError/ValueError naming the argument, before any memory is touched."""

from __future__ import annotations

import numpy as np
import pytest

from convbook import (
    avg_pool2d,
    avg_pool2d_backward,
    col2im,
    conv2d,
    conv2d_backward,
    conv_transpose2d,
    dilate,
    im2col,
    max_pool2d,
    max_pool2d_backward,
    pad2d,
    rot180,
    windows,
)

x = np.zeros((2, 8, 8, 3))
w = np.zeros((3, 3, 3, 4))

CASES = [
    # (call, exception, word the message must contain)
    (lambda: windows(x[0], 3), ValueError, "x must be 4-D"),
    (lambda: windows(x, 9), ValueError, "larger than the input x"),
    (lambda: windows(x, 3, dilation=4), ValueError, "larger than the input x"),
    (lambda: windows(x, 0), ValueError, "kernel must be >= 1"),
    (lambda: windows(x, 3, stride=0), ValueError, "stride must be >= 1"),
    (lambda: windows(x, 3, stride=-1), ValueError, "stride"),
    (lambda: windows(x, 3, dilation=0), ValueError, "dilation must be >= 1"),
    (lambda: windows(x, 2.0), TypeError, "kernel must be an int"),
    (lambda: windows(x, (2, 2.5)), TypeError, "kernel"),
    (lambda: windows(x, 3, stride=True), TypeError, "stride"),
    (lambda: windows(x, (1, 2, 3)), ValueError, "kernel"),
    (lambda: windows(x.astype(str), 3), TypeError, "x must have a real numeric dtype"),
    (
        lambda: windows(x.astype(object), 3),
        TypeError,
        "x must have a real numeric dtype",
    ),
    (lambda: windows(x.astype(bool), 3), TypeError, "x"),
    (lambda: pad2d(x, -1), ValueError, "padding must be >= 0"),
    (lambda: pad2d(x, 1.5), TypeError, "padding"),
    (lambda: pad2d(x, ((1, 2), (3, -1))), ValueError, "padding"),
    (lambda: pad2d(x[0], 1), ValueError, "x must be 4-D"),
    (lambda: conv2d(x[0], w), ValueError, "x must be 4-D"),
    (lambda: conv2d(x, w[0]), ValueError, "w must be 4-D"),
    (lambda: conv2d(x, w[:, :, :2]), ValueError, "channel mismatch"),
    (lambda: conv2d(x[:, :2, :2], w), ValueError, "larger than the padded input x"),
    (
        lambda: conv2d(x[:, :2, :2], w, dilation=2, padding=1),
        ValueError,
        "larger than the padded input x",
    ),
    (lambda: conv2d(x, w, stride=0), ValueError, "stride"),
    (lambda: conv2d(x, w, stride=(1, 0)), ValueError, "stride"),
    (lambda: conv2d(x, w, dilation=0), ValueError, "dilation"),
    (lambda: conv2d(x, w, stride=1.0), TypeError, "stride"),
    (lambda: conv2d(x, w, dilation=np.float64(2)), TypeError, "dilation"),
    (lambda: conv2d(x, w, padding=1.5), TypeError, "padding"),
    (lambda: conv2d(x, w, padding=-2), ValueError, "padding"),
    (lambda: conv2d(x, w, padding="full"), ValueError, "padding"),
    (lambda: conv2d(x, w, stride=2, padding="same"), ValueError, "same"),
    (lambda: conv2d(x, w, np.zeros(3)), ValueError, "b must have shape"),
    (lambda: conv2d(x, w, np.zeros((4, 1))), ValueError, "b must be 1-D"),
    (
        lambda: conv2d(x.astype(complex), w),
        TypeError,
        "x must have a real numeric dtype",
    ),
    (lambda: conv2d(x, w.astype(str)), TypeError, "w must have a real numeric dtype"),
    (
        lambda: conv2d(x, w, np.array(["a"] * 4)),
        TypeError,
        "b must have a real numeric dtype",
    ),
    (lambda: conv2d(x, np.zeros((3, 3, 3, 0))), ValueError, "w"),
    (lambda: conv2d(x, w, method="fourier"), ValueError, "method"),
    (lambda: conv2d(x, w, method=None), ValueError, "method"),
    # im2col / col2im
    (lambda: im2col(x[0], 3), ValueError, "x must be 4-D"),
    (lambda: im2col(x, 3, stride=0), ValueError, "stride"),
    (lambda: im2col(x, 9), ValueError, "larger than the padded input x"),
    (
        lambda: im2col(x, 5, padding=1, dilation=3),
        ValueError,
        "larger than the padded input x",
    ),
    (lambda: im2col(x, 3, padding=-1), ValueError, "padding"),
    (lambda: im2col(x, 3, stride=2, padding="same"), ValueError, "same"),
    (lambda: col2im(np.zeros((2 * 36, 27)), (2, 8, 8, 3), 3), None, None),
    (
        lambda: col2im(np.zeros((10, 27)), (2, 8, 8, 3), 3),
        ValueError,
        "cols must have shape",
    ),
    (lambda: col2im(np.zeros(27), (2, 8, 8, 3), 3), ValueError, "cols must be 2-D"),
    (lambda: col2im(np.zeros((72, 27)), (2, 8, 8), 3), ValueError, "x_shape"),
    (lambda: col2im(np.zeros((72, 27)), (2, 8, 8.0, 3), 3), TypeError, "x_shape"),
    (lambda: col2im(np.zeros((72, 27)), 5, 3), TypeError, "x_shape"),
    (
        lambda: col2im(np.zeros((72, 27)), (2, 8, 8, 3), 3, dilation=0),
        ValueError,
        "dilation",
    ),
    (
        lambda: col2im(np.zeros((72, 27), dtype=complex), (2, 8, 8, 3), 3),
        TypeError,
        "cols",
    ),
    # conv2d_backward
    (lambda: conv2d_backward(np.zeros((2, 6, 6, 4)), x, w), None, None),
    (
        lambda: conv2d_backward(np.zeros((2, 6, 6, 3)), x, w),
        ValueError,
        "dy must have the shape",
    ),
    (lambda: conv2d_backward(np.zeros((2, 6, 6)), x, w), ValueError, "dy must be 4-D"),
    (
        lambda: conv2d_backward(np.zeros((2, 6, 6, 4)), x, w[:, :, :2]),
        ValueError,
        "channel mismatch",
    ),
    (
        lambda: conv2d_backward(np.zeros((2, 6, 6, 4)), x, w, stride=0),
        ValueError,
        "stride",
    ),
    (
        lambda: conv2d_backward(np.zeros((2, 6, 6, 4)), x, w, method="magic"),
        ValueError,
        "method",
    ),
    (
        lambda: conv2d_backward(np.zeros((2, 6, 6, 4)).astype(str), x, w),
        TypeError,
        "dy",
    ),
    # dilate, rot180, conv_transpose2d
    (lambda: dilate(x, 0), ValueError, "stride"),
    (lambda: dilate(x[0], 2), ValueError, "x must be 4-D"),
    (lambda: rot180(w[0]), ValueError, "w must be 4-D"),
    (lambda: conv_transpose2d(x, np.zeros((3, 3, 4, 3))), None, None),
    (
        lambda: conv_transpose2d(x, np.zeros((3, 3, 4, 2))),
        ValueError,
        "channel mismatch",
    ),
    (
        lambda: conv_transpose2d(x, np.zeros((3, 3, 4, 3)), output_padding=1),
        ValueError,
        "output_padding",
    ),
    (
        lambda: conv_transpose2d(x, np.zeros((3, 3, 4, 3)), stride=2, output_padding=2),
        ValueError,
        "output_padding",
    ),
    (
        lambda: conv_transpose2d(x, np.zeros((3, 3, 4, 3)), padding=9),
        ValueError,
        "padding",
    ),
    (
        lambda: conv_transpose2d(x, np.zeros((3, 3, 4, 3)), padding="same"),
        TypeError,
        "padding",
    ),
    (
        lambda: conv_transpose2d(x, np.zeros((3, 3, 4, 3)), dilation=1.5),
        TypeError,
        "dilation",
    ),
    # pooling
    (lambda: max_pool2d(x, 2), None, None),
    (lambda: max_pool2d(x, 2, padding=2), ValueError, "padding must be at most half"),
    (lambda: max_pool2d(x, 9), ValueError, "kernel"),
    (lambda: max_pool2d(x, 0), ValueError, "kernel"),
    (lambda: avg_pool2d(x, 2, stride=0), ValueError, "stride"),
    (lambda: avg_pool2d(x, 2.0), TypeError, "kernel"),
    (lambda: avg_pool2d(x.astype(str), 2), TypeError, "x"),
    (
        lambda: max_pool2d_backward(np.zeros((2, 3, 3, 3)), x, 2),
        ValueError,
        "dy must have the shape",
    ),
    (
        lambda: avg_pool2d_backward(np.zeros((2, 4, 4)), x, 2),
        ValueError,
        "dy must be 4-D",
    ),
    # sizes beyond any possible array (an OverflowError deep inside NumPy before the bound)
    (lambda: windows(x, 3, stride=10**30), ValueError, "stride must be at most"),
    (lambda: windows(x, 1, dilation=2**63), ValueError, "dilation must be at most"),
    (lambda: windows(x, 10**30), ValueError, "kernel must be at most"),
    (lambda: conv2d(x, w, stride=2**63), ValueError, "stride must be at most"),
    (lambda: conv2d(x, w, padding=10**30), ValueError, "padding must be at most"),
    (
        lambda: conv2d(x, w, padding=((0, 0), (0, 2**40))),
        ValueError,
        "padding must be at most",
    ),
    (
        lambda: conv2d(x, w, dilation=(1, 10**30)),
        ValueError,
        "dilation must be at most",
    ),
    (lambda: im2col(x, 3, stride=10**30), ValueError, "stride must be at most"),
    (
        lambda: col2im(np.zeros((72, 27)), (2, 8, 8, 3), 3, padding=10**30),
        ValueError,
        "padding",
    ),
    (
        lambda: conv2d_backward(np.zeros((2, 6, 6, 4)), x, w, stride=10**30),
        ValueError,
        "stride",
    ),
    (
        lambda: conv_transpose2d(x, np.zeros((3, 3, 4, 3)), stride=10**30),
        ValueError,
        "stride",
    ),
    (lambda: dilate(x, 10**30), ValueError, "stride must be at most"),
    (lambda: max_pool2d(x, 2, stride=10**30), ValueError, "stride must be at most"),
    (lambda: avg_pool2d(x, 2, stride=2**63), ValueError, "stride must be at most"),
    (
        lambda: windows(x, 3, stride=2**31 - 1),
        None,
        None,
    ),  # the bound itself is accepted
    # dtypes that NumPy calls integers but are not numbers of pixels
    (
        lambda: conv2d(x.astype("m8[s]"), w),
        TypeError,
        "x must have a real numeric dtype",
    ),
    (
        lambda: conv2d(x, w.astype("m8[ns]")),
        TypeError,
        "w must have a real numeric dtype",
    ),
    (
        lambda: windows(x.astype("m8[s]"), 3),
        TypeError,
        "x must have a real numeric dtype",
    ),
    (
        lambda: conv2d(x.astype("M8[s]"), w),
        TypeError,
        "x must have a real numeric dtype",
    ),
    # fill values that an integer image cannot hold (they used to wrap silently)
    (
        lambda: pad2d(x.astype(np.uint8), 1, value=-1),
        ValueError,
        "value must fit uint8",
    ),
    (
        lambda: pad2d(x.astype(np.uint8), 1, value=300),
        ValueError,
        "value must fit uint8",
    ),
    (
        lambda: pad2d(x.astype(np.int16), 1, value=1.5),
        ValueError,
        "value must be an integer",
    ),
    (
        lambda: pad2d(x.astype(np.int32), 1, value=float("nan")),
        ValueError,
        "value must be an integer",
    ),
    (lambda: pad2d(x, 1, value="0"), TypeError, "value must be a real number"),
    (lambda: pad2d(x.astype(np.uint8), 1, value=255), None, None),
    (lambda: pad2d(x, 1, value=-np.inf), None, None),
]


@pytest.mark.parametrize(
    "call,exc,word", CASES, ids=[f"{i}-{c[2] or 'valid'}" for i, c in enumerate(CASES)]
)
def test_bad_input_raises_clear_error(call, exc, word):
    if (
        exc is None
    ):  # a valid call next to the invalid ones: the checks do not reject good input
        call()
        return
    with pytest.raises(exc, match=word):
        call()


def test_integer_fill_values_are_kept_exactly():
    """The fill value lands unchanged, at the edge of the dtype's range too."""
    img = np.arange(4, dtype=np.uint8).reshape(1, 2, 2, 1)
    out = pad2d(img, 1, value=255)
    assert (
        out.dtype == np.uint8
        and out[0, 0, 0, 0] == 255
        and np.array_equal(out[:, 1:3, 1:3], img)
    )
    assert pad2d(img.astype(np.int8), 1, value=-128)[0, 0, 0, 0] == -128


def test_col2im_rejects_a_huge_shape_before_allocating():
    """A mismatched `cols` for an enormous `x_shape` is refused without allocating its index arrays
    (computing them first took gigabytes)."""
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="cols must have shape"):
            col2im(np.zeros((4, 9)), (1, 20_000, 20_000, 1), 3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, f"{peak / 1e6:.1f} MB allocated before the error"


@pytest.mark.parametrize("method", ["auto", "naive", "col2im", "dilate", "fast"])
def test_backward_of_an_empty_batch_is_zero(method):
    """Every backward method returns zero gradients of the right shapes for a batch of 0 images
    (the dilate method used to fail), like PyTorch's autograd."""
    import torch
    import torch.nn.functional as F

    xe, dye = np.zeros((0, 6, 5, 3)), np.zeros((0, 3, 3, 4))
    we = np.random.default_rng(0).standard_normal((3, 3, 3, 4))
    dx, dw, db = conv2d_backward(dye, xe, we, stride=2, padding=1, method=method)
    tx = torch.zeros((0, 3, 6, 5), dtype=torch.float64, requires_grad=True)
    tw = torch.from_numpy(we.transpose(3, 2, 0, 1).copy()).requires_grad_()
    F.conv2d(tx, tw, stride=2, padding=1).sum().backward()
    assert dx.shape == xe.shape and dw.shape == we.shape and db.shape == (4,)
    assert np.array_equal(dw, tw.grad.numpy().transpose(2, 3, 1, 0)) and not dw.any()
    assert not dx.any() and not db.any()


def test_one_element_tuples_mean_the_value_twice_as_in_pytorch():
    """PyTorch accepts padding=(1,) and stride=[2] for (1, 1) and (2, 2); so do we."""
    x = np.random.default_rng(0).standard_normal((1, 7, 7, 2))
    w = np.random.default_rng(1).standard_normal((3, 3, 2, 2))
    assert np.array_equal(
        conv2d(x, w, padding=(1,), stride=[2], dilation=(1,)),
        conv2d(x, w, padding=1, stride=2),
    )
    assert np.array_equal(windows(x, (3,), stride=(2,)), windows(x, 3, stride=2))
