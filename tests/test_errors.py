"""Bad input raises TypeError/ValueError naming the argument, before any memory is touched."""
from __future__ import annotations

import numpy as np
import pytest

from convbook import (avg_pool2d, avg_pool2d_backward, col2im, conv2d, conv2d_backward, conv_transpose2d,
                      dilate, im2col, max_pool2d, max_pool2d_backward, pad2d, rot180, windows)

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
    (lambda: windows(x.astype(object), 3), TypeError, "x must have a real numeric dtype"),
    (lambda: windows(x.astype(bool), 3), TypeError, "x"),
    (lambda: pad2d(x, -1), ValueError, "padding must be >= 0"),
    (lambda: pad2d(x, 1.5), TypeError, "padding"),
    (lambda: pad2d(x, ((1, 2), (3, -1))), ValueError, "padding"),
    (lambda: pad2d(x[0], 1), ValueError, "x must be 4-D"),
    (lambda: conv2d(x[0], w), ValueError, "x must be 4-D"),
    (lambda: conv2d(x, w[0]), ValueError, "w must be 4-D"),
    (lambda: conv2d(x, w[:, :, :2]), ValueError, "channel mismatch"),
    (lambda: conv2d(x[:, :2, :2], w), ValueError, "larger than the padded input x"),
    (lambda: conv2d(x[:, :2, :2], w, dilation=2, padding=1), ValueError, "larger than the padded input x"),
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
    (lambda: conv2d(x.astype(complex), w), TypeError, "x must have a real numeric dtype"),
    (lambda: conv2d(x, w.astype(str)), TypeError, "w must have a real numeric dtype"),
    (lambda: conv2d(x, w, np.array(["a"] * 4)), TypeError, "b must have a real numeric dtype"),
    (lambda: conv2d(x, np.zeros((3, 3, 3, 0))), ValueError, "w"),
    (lambda: conv2d(x, w, method="fft"), ValueError, "method"),
    (lambda: conv2d(x, w, method=None), ValueError, "method"),
    # im2col / col2im
    (lambda: im2col(x[0], 3), ValueError, "x must be 4-D"),
    (lambda: im2col(x, 3, stride=0), ValueError, "stride"),
    (lambda: im2col(x, 9), ValueError, "larger than the padded input x"),
    (lambda: im2col(x, 5, padding=1, dilation=3), ValueError, "larger than the padded input x"),
    (lambda: im2col(x, 3, padding=-1), ValueError, "padding"),
    (lambda: im2col(x, 3, stride=2, padding="same"), ValueError, "same"),
    (lambda: col2im(np.zeros((2 * 36, 27)), (2, 8, 8, 3), 3), None, None),
    (lambda: col2im(np.zeros((10, 27)), (2, 8, 8, 3), 3), ValueError, "cols must have shape"),
    (lambda: col2im(np.zeros(27), (2, 8, 8, 3), 3), ValueError, "cols must be 2-D"),
    (lambda: col2im(np.zeros((72, 27)), (2, 8, 8), 3), ValueError, "x_shape"),
    (lambda: col2im(np.zeros((72, 27)), (2, 8, 8.0, 3), 3), TypeError, "x_shape"),
    (lambda: col2im(np.zeros((72, 27)), 5, 3), TypeError, "x_shape"),
    (lambda: col2im(np.zeros((72, 27)), (2, 8, 8, 3), 3, dilation=0), ValueError, "dilation"),
    (lambda: col2im(np.zeros((72, 27), dtype=complex), (2, 8, 8, 3), 3), TypeError, "cols"),
    # conv2d_backward
    (lambda: conv2d_backward(np.zeros((2, 6, 6, 4)), x, w), None, None),
    (lambda: conv2d_backward(np.zeros((2, 6, 6, 3)), x, w), ValueError, "dy must have the shape"),
    (lambda: conv2d_backward(np.zeros((2, 6, 6)), x, w), ValueError, "dy must be 4-D"),
    (lambda: conv2d_backward(np.zeros((2, 6, 6, 4)), x, w[:, :, :2]), ValueError, "channel mismatch"),
    (lambda: conv2d_backward(np.zeros((2, 6, 6, 4)), x, w, stride=0), ValueError, "stride"),
    (lambda: conv2d_backward(np.zeros((2, 6, 6, 4)), x, w, method="magic"), ValueError, "method"),
    (lambda: conv2d_backward(np.zeros((2, 6, 6, 4)).astype(str), x, w), TypeError, "dy"),
    # dilate, rot180, conv_transpose2d
    (lambda: dilate(x, 0), ValueError, "stride"),
    (lambda: dilate(x[0], 2), ValueError, "x must be 4-D"),
    (lambda: rot180(w[0]), ValueError, "w must be 4-D"),
    (lambda: conv_transpose2d(x, np.zeros((3, 3, 4, 3))), None, None),
    (lambda: conv_transpose2d(x, np.zeros((3, 3, 4, 2))), ValueError, "channel mismatch"),
    (lambda: conv_transpose2d(x, np.zeros((3, 3, 4, 3)), output_padding=1), ValueError, "output_padding"),
    (lambda: conv_transpose2d(x, np.zeros((3, 3, 4, 3)), stride=2, output_padding=2), ValueError,
     "output_padding"),
    (lambda: conv_transpose2d(x, np.zeros((3, 3, 4, 3)), padding=9), ValueError, "padding"),
    (lambda: conv_transpose2d(x, np.zeros((3, 3, 4, 3)), padding="same"), TypeError, "padding"),
    (lambda: conv_transpose2d(x, np.zeros((3, 3, 4, 3)), dilation=1.5), TypeError, "dilation"),
    # pooling
    (lambda: max_pool2d(x, 2), None, None),
    (lambda: max_pool2d(x, 2, padding=2), ValueError, "padding must be at most half"),
    (lambda: max_pool2d(x, 9), ValueError, "kernel"),
    (lambda: max_pool2d(x, 0), ValueError, "kernel"),
    (lambda: avg_pool2d(x, 2, stride=0), ValueError, "stride"),
    (lambda: avg_pool2d(x, 2.0), TypeError, "kernel"),
    (lambda: avg_pool2d(x.astype(str), 2), TypeError, "x"),
    (lambda: max_pool2d_backward(np.zeros((2, 3, 3, 3)), x, 2), ValueError, "dy must have the shape"),
    (lambda: avg_pool2d_backward(np.zeros((2, 4, 4)), x, 2), ValueError, "dy must be 4-D"),
]


@pytest.mark.parametrize("call,exc,word", CASES, ids=[f"{i}-{c[2] or 'valid'}" for i, c in enumerate(CASES)])
def test_bad_input_raises_clear_error(call, exc, word):
    if exc is None:  # a valid call next to the invalid ones: the checks do not reject good input
        call()
        return
    with pytest.raises(exc, match=word):
        call()
