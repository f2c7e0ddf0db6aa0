"""Bad input raises TypeError/ValueError naming the argument, before any memory is touched."""
from __future__ import annotations

import numpy as np
import pytest

from convbook import conv2d, pad2d, windows

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
]


@pytest.mark.parametrize("call,exc,word", CASES, ids=[c[2] + f"-{i}" for i, c in enumerate(CASES)])
def test_bad_input_raises_clear_error(call, exc, word):
    with pytest.raises(exc, match=word):
        call()
