"""convbook.exercises: every check passes on an independent correct solution and
fails, with a message that names the mistake, on subtly wrong ones; the checks run where
PyTorch cannot be imported; the shipped fixtures are what the script produces; the NumPy
code that grades the random cases agrees with PyTorch.

The solutions below use NumPy only (loops, slicing, `sliding_window_view`), never the
package's functions, so a check that passes them is not comparing convbook with itself.
PyTorch is imported inside the tests that need it: the subprocess test imports this
module with torch blocked.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from convbook import exercises

ROOT = Path(__file__).resolve().parents[1]
NAMES = [
    "ch2.windows_nchw",
    "ch3.conv2d_einsum",
    "ch3a.depthwise",
    "ch4.im2col",
    "ch5.col2im",
    "ch5.conv2d_backward",
    "ch5b.max_pool2d_backward",
    "ch6.input_grad",
    "ch7.sgd",
    "ch7a.decode_idx",
    "ch7b.linear",
    "ch8.conv2d_banded",
    "ch8a.conv_cost",
    "ch9.winograd_tile",
]
as_strided = np.lib.stride_tricks.as_strided


# --- independent correct solutions ----------------------------------------------------
def pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def out_len(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def pad(x, padding, value=0.0):
    ph, pw = pair(padding)
    return np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)), constant_values=value)


def window(xp, i, j, kernel, stride, dilation):
    """Window (i, j) of a padded NHWC batch, (N, KH, KW, C), a view by slicing."""
    (kh, kw), (sh, sw), (dh, dw) = pair(kernel), pair(stride), pair(dilation)
    rows = slice(i * sh, i * sh + dh * (kh - 1) + 1, dh)
    return xp[:, rows, slice(j * sw, j * sw + dw * (kw - 1) + 1, dw), :]


def out_hw(hw, kernel, stride, padding, dilation):
    k, s, p, d = pair(kernel), pair(stride), pair(padding), pair(dilation)
    return tuple(out_len(hw[a], k[a], s[a], p[a], d[a]) for a in (0, 1))


def crop(xp, padding, hw):
    ph, pw = pair(padding)
    return xp[:, ph : ph + hw[0], pw : pw + hw[1], :]


def windows_nchw(x, kernel, *, stride=1, dilation=1):
    (kh, kw), (sh, sw), (dh, dw) = pair(kernel), pair(stride), pair(dilation)
    n, c, h, w = x.shape
    ho, wo = out_len(h, kh, sh, 0, dh), out_len(w, kw, sw, 0, dw)
    s = x.strides
    strides = (s[0], s[1], s[2] * sh, s[3] * sw, s[2] * dh, s[3] * dw)
    return as_strided(x, (n, c, ho, wo, kh, kw), strides, writeable=False)


def conv2d_einsum(x, w, b=None, *, stride=1, padding=0, dilation=1):
    (sh, sw), (dh, dw) = pair(stride), pair(dilation)
    kh, kw = w.shape[:2]
    span = (dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    v = np.lib.stride_tricks.sliding_window_view(pad(x, padding), span, axis=(1, 2))
    y = np.einsum("nijcab,abco->nijo", v[:, ::sh, ::sw, :, ::dh, ::dw], w)
    return y if b is None else y + b


def depthwise(x, w, *, stride=1, padding=0, dilation=1):
    """Output channel o from input channel o // m, window by window."""
    xp, m = pad(x, padding), w.shape[3] // x.shape[3]
    ho, wo = out_hw(x.shape[1:3], w.shape[:2], stride, padding, dilation)
    y = np.zeros((x.shape[0], ho, wo, w.shape[3]), x.dtype)
    for i in range(ho):
        for j in range(wo):
            win = window(xp, i, j, w.shape[:2], stride, dilation)  # (N, KH, KW, C_in)
            for o in range(w.shape[3]):
                y[:, i, j, o] = (win[..., o // m] * w[:, :, 0, o]).sum(axis=(1, 2))
    return y


def im2col(x, kernel, *, stride=1, padding=0, dilation=1):
    xp = pad(x, padding)
    ho, wo = out_hw(x.shape[1:3], kernel, stride, padding, dilation)
    rows = [
        window(xp, i, j, kernel, stride, dilation)[n].ravel()
        for n in range(x.shape[0])
        for i in range(ho)
        for j in range(wo)
    ]
    return np.stack(rows)


def col2im(cols, x_shape, kernel, *, stride=1, padding=0, dilation=1):
    n, h, w, c = x_shape
    (kh, kw), (ph, pw) = pair(kernel), pair(padding)
    ho, wo = out_hw((h, w), kernel, stride, padding, dilation)
    xp = np.zeros((n, h + 2 * ph, w + 2 * pw, c), cols.dtype)
    blocks = cols.reshape(n, ho, wo, kh, kw, c)
    for i in range(ho):
        for j in range(wo):
            window(xp, i, j, kernel, stride, dilation)[...] += blocks[:, i, j]
    return crop(xp, padding, (h, w))


def conv2d_backward(dy, x, w, *, stride=1, padding=0, dilation=1):
    xp = pad(x, padding)
    dxp, dw = np.zeros_like(xp), np.zeros_like(w)
    geometry = (w.shape[:2], stride, dilation)
    for i in range(dy.shape[1]):
        for j in range(dy.shape[2]):
            g = dy[:, i, j]  # (N, C_out)
            dw += np.einsum("nabc,no->abco", window(xp, i, j, *geometry), g)
            window(dxp, i, j, *geometry)[...] += np.einsum("no,abco->nabc", g, w)
    return crop(dxp, padding, x.shape[1:3]), dw, dy.sum(axis=(0, 1, 2))


def max_pool2d_backward(dy, x, kernel, *, stride=None, padding=0):
    (kh, kw), (sh, sw) = pair(kernel), pair(kernel if stride is None else stride)
    xp = pad(x, padding, -np.inf)
    dxp = np.zeros(xp.shape, x.dtype)
    n, ho, wo, c = dy.shape
    for b in range(n):
        for i in range(ho):
            for j in range(wo):
                for ch in range(c):
                    win = xp[b, i * sh : i * sh + kh, j * sw : j * sw + kw, ch]
                    a, q = np.unravel_index(np.argmax(win), win.shape)  # first maximum
                    dxp[b, i * sh + a, j * sw + q, ch] += dy[b, i, j, ch]
    return crop(dxp, padding, x.shape[1:3])


def pad_or_crop(d, top, bottom, left, right):
    """Zeros around H and W of d; negative amounts crop."""
    widths = ((0, 0), (max(top, 0), max(bottom, 0)), (max(left, 0), max(right, 0)))
    d = np.pad(d, widths + ((0, 0),))
    h, w = d.shape[1:3]
    return d[:, max(-top, 0) : h - max(-bottom, 0), max(-left, 0) : w - max(-right, 0)]


def dilated(dy, stride):
    (sh, sw), (n, ho, wo, c) = pair(stride), dy.shape
    d = np.zeros((n, (ho - 1) * sh + 1, (wo - 1) * sw + 1, c), dy.dtype)
    d[:, ::sh, ::sw] = dy
    return d


def input_grad(dy, w, x_hw, *, stride=1, padding=0, dilation=1):
    (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
    (kh, kw), (ho, wo) = w.shape[:2], dy.shape[1:3]
    top, left = dh * (kh - 1) - ph, dw * (kw - 1) - pw
    bottom, right = x_hw[0] + ph - (ho - 1) * sh - 1, x_hw[1] + pw - (wo - 1) * sw - 1
    d = pad_or_crop(dilated(dy, stride), top, bottom, left, right)
    return conv2d_einsum(d, w[::-1, ::-1].transpose(0, 1, 3, 2), dilation=dilation)


def sgd(p, grads, *, lr, momentum=0.0, weight_decay=0.0, **mistakes):
    """torch.optim.SGD's update, written out, step by step."""
    p, v, ps = p.copy(), None, []
    for grad in grads:
        g = grad + weight_decay * p if not mistakes.get("decay_after") else grad.copy()
        if momentum:
            keep = (1 - momentum) if mistakes.get("average") else 1
            v = g * keep if v is None else momentum * v + keep * g
            g = v
        if mistakes.get("decay_after"):
            g = g + weight_decay * p
        p = p - lr * g
        ps.append(p)
    return np.stack(ps)


IDX_TYPES = {8: "u1", 9: "i1", 11: "i2", 12: "i4", 13: "f4", 14: "f8"}


def decode_idx(data, *, sizes_from_last_byte=False, swap=True, native=True):
    """Header by int.from_bytes, values by np.frombuffer with a big-endian dtype."""
    assert data[:2] == b"\0\0"
    kind, ndim = IDX_TYPES[data[2]], data[3]
    if sizes_from_last_byte:
        sizes = tuple(data[7 + 4 * k] for k in range(ndim))
    else:
        sizes = tuple(
            int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim)
        )
    big = np.dtype((">" if swap else "<") + kind)
    a = np.frombuffer(data, big, offset=4 + 4 * ndim).reshape(sizes)
    return a.astype(kind) if native else a.copy()


class Linear:
    def __init__(self, n_in, n_out, *, rng=None):
        rng = np.random.default_rng(0) if rng is None else rng
        self.params = {"w": rng.standard_normal((n_in, n_out)), "b": np.zeros(n_out)}
        self.grads = {}

    def forward(self, x):
        self.x = x
        return x @ self.params["w"] + self.params["b"]

    def backward(self, dy):
        self.grads["w"] = self.x.T @ dy
        self.grads["b"] = dy.sum(axis=0)
        return dy @ self.params["w"].T


def conv2d_banded(x, w, *, stride=1, padding=0, dilation=1, rows, **mistakes):
    """Band by band of `rows` output rows, each from its own zero-padded input rows."""
    (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
    h, geometry = x.shape[1], dict(stride=(sh, sw), padding=(0, pw), dilation=(dh, dw))
    ho, wo = out_hw(x.shape[1:3], w.shape[:2], stride, padding, dilation)
    start = mistakes.get("start", lambda r0: r0 * sh)  # its first padded input row
    extra = mistakes.get("extra", 1)  # (r1 - r0 - 1)*sh + dh*(KH-1) + extra rows
    y = np.zeros((x.shape[0], ho, wo, w.shape[3]), x.dtype)
    for r0 in range(0, mistakes.get("end", ho), rows):
        r1 = min(r0 + rows, ho)
        top = start(r0) - ph  # in x's rows: negative above the image
        count = (r1 - r0 - 1) * sh + dh * (w.shape[0] - 1) + extra
        above = min(max(-top, 0), count)  # zero rows above the image
        lo = min(max(top, 0), h)
        hi = max(min(top + count, h), lo)  # rows [lo, hi) of x, maybe none
        below = count - above - (hi - lo)
        band = np.pad(x[:, lo:hi], ((0, 0), (above, below), (0, 0), (0, 0)))
        y[:, r0:r1] = conv2d_einsum(band, w, **geometry)
    return y


def conv_cost(x_shape, w_shape, *, stride=1, padding=0, dilation=1, itemsize=4, **bug):
    """Output positions counted by loops over the padded image, then the sums."""
    (n, h, w, c_in), (kh, kw, _, c_out) = x_shape, w_shape
    (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
    if bug.get("no_stride"):
        sh = sw = 1
    ho = sum(1 for i in range(0, h + 2 * ph, sh) if i + dh * (kh - 1) < h + 2 * ph)
    wo = sum(1 for j in range(0, w + 2 * pw, sw) if j + dw * (kw - 1) < w + 2 * pw)
    flops = (1 if bug.get("macs") else 2) * n * ho * wo * c_out * (kh * kw * c_in)
    x = (
        n * (h + 2 * ph) * (w + 2 * pw) * c_in
        if bug.get("padded")
        else n * h * w * c_in
    )
    size = 4 if bug.get("float32") else itemsize
    nbytes = size * (x + kh * kw * c_in * c_out + n * ho * wo * c_out)
    return flops, nbytes, (nbytes / flops if bug.get("inverted") else flops / nbytes)


# Lavin and Gray's matrices of F(2, 3), typed in (the package builds its own, from other
# points, by toom_cook): any correct set passes.
WINOGRAD_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], float)
WINOGRAD_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
WINOGRAD_BT = np.array(
    [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], float
)


def winograd_tile(
    d, g, *, flip=False, data=lambda bt, tile: bt @ tile @ bt.T, cast=True
):
    """Y = AT [sum_c (G g G^T) * (BT d B)] A, one channel pair at a time."""
    at, gm, bt = (
        m.astype(d.dtype) if cast else m for m in (WINOGRAD_AT, WINOGRAD_G, WINOGRAD_BT)
    )
    c_in, c_out = g.shape[2:]
    y = []
    for o in range(c_out):
        m = sum(
            (gm @ (g[::-1, ::-1] if flip else g)[:, :, c, o] @ gm.T)
            * data(bt, d[:, :, c])
            for c in range(c_in)
        )
        y.append(at @ m @ at.T)
    return np.stack(y, axis=-1)


SOLUTIONS = {
    "ch2.windows_nchw": windows_nchw,
    "ch3.conv2d_einsum": conv2d_einsum,
    "ch3a.depthwise": depthwise,
    "ch4.im2col": im2col,
    "ch5.col2im": col2im,
    "ch5.conv2d_backward": conv2d_backward,
    "ch5b.max_pool2d_backward": max_pool2d_backward,
    "ch6.input_grad": input_grad,
    "ch7.sgd": sgd,
    "ch7a.decode_idx": decode_idx,
    "ch7b.linear": Linear,
    "ch8.conv2d_banded": conv2d_banded,
    "ch8a.conv_cost": conv_cost,
    "ch9.winograd_tile": winograd_tile,
}


# --- subtly wrong variants ------------------------------------------------------------
def windows_copy(x, kernel, **kw):
    return np.array(windows_nchw(x, kernel, **kw))


def windows_writeable(x, kernel, **kw):
    v = windows_nchw(x, kernel, **kw)
    return as_strided(x, v.shape, v.strides, writeable=True)


def windows_strides_from_shape(x, kernel, *, stride=1, dilation=1):
    """Assumes x is C-contiguous: byte strides computed from the shape."""
    n, c, h, w = x.shape
    s = (c * h * w * x.itemsize, h * w * x.itemsize, w * x.itemsize, x.itemsize)
    v = windows_nchw(x, kernel, stride=stride, dilation=dilation)
    (sh, sw), (dh, dw) = pair(stride), pair(dilation)
    strides = (s[0], s[1], s[2] * sh, s[3] * sw, s[2] * dh, s[3] * dw)
    return as_strided(x, v.shape, strides, writeable=False)


def windows_kernel_swapped(x, kernel, **kw):
    kh, kw_ = pair(kernel)
    return windows_nchw(x, (kw_, kh), **kw)


def conv2d_flipped(x, w, b=None, **kw):
    return conv2d_einsum(x, w[::-1, ::-1], b, **kw)


def conv2d_stride_swapped(x, w, b=None, *, stride=1, **kw):
    return conv2d_einsum(x, w, b, stride=pair(stride)[::-1], **kw)


def conv2d_no_bias(x, w, b=None, **kw):
    return conv2d_einsum(x, w, None, **kw)


def conv2d_float64(x, w, b=None, **kw):
    return conv2d_einsum(x, w, b, **kw).astype(np.float64)


def conv2d_mutates(x, w, b=None, **kw):
    y = conv2d_einsum(x, w, b, **kw)
    x[0, 0, 0, 0] = 0.0  # "cleaning up" the caller's array
    return y


def depthwise_mixes_channels(x, w, **kw):
    """Every output channel reads every input channel, as a full convolution would."""
    full = np.broadcast_to(w, (*w.shape[:2], x.shape[3], w.shape[3]))
    return conv2d_einsum(x, full, **kw)


def depthwise_order_swapped(x, w, **kw):
    """Output channel o from input channel o % C_in: the (m, C_in) order, not PyTorch's
    (C_in, m)."""
    c, m = x.shape[3], w.shape[3] // x.shape[3]
    mine = w[:, :, 0].reshape(*w.shape[:2], m, c).transpose(0, 1, 3, 2)
    y = depthwise(x, mine.reshape(*w.shape[:2], 1, c * m), **kw)  # (C_in, m) order
    return y.reshape(*y.shape[:3], c, m).transpose(0, 1, 2, 4, 3).reshape(y.shape)


def im2col_channels_first(x, kernel, **kw):
    cols = im2col(x, kernel, **kw)
    kh, kw_ = pair(kernel)
    c = x.shape[3]
    return cols.reshape(-1, kh, kw_, c).transpose(0, 3, 1, 2).reshape(cols.shape)


def im2col_no_padding(x, kernel, *, padding=0, **kw):
    return im2col(x, kernel, **kw)


def im2col_no_dilation(x, kernel, *, dilation=1, **kw):
    return im2col(x, kernel, **kw)


def col2im_buffered(cols, x_shape, kernel, *, stride=1, padding=0, dilation=1):
    n, h, w, c = x_shape
    (kh, kw), (sh, sw), (dh, dw) = pair(kernel), pair(stride), pair(dilation)
    ph, pw = pair(padding)
    ho, wo = out_hw((h, w), kernel, stride, padding, dilation)
    r = (np.arange(ho) * sh)[:, None, None, None] + (np.arange(kh) * dh)[:, None]
    q = (np.arange(wo) * sw)[None, :, None, None] + np.arange(kw) * dw
    xp = np.zeros((n, h + 2 * ph, w + 2 * pw, c), cols.dtype)
    xp[:, r, q, :] += cols.reshape(n, ho, wo, kh, kw, c)  # buffered: repeats write once
    return crop(xp, padding, (h, w))


def col2im_uncropped(cols, x_shape, kernel, *, padding=0, **kw):
    n, h, w, c = x_shape
    ph, pw = pair(padding)
    padded = (n, h + 2 * ph, w + 2 * pw, c)
    return col2im(cols, padded, kernel, **kw)  # treats the padded image as the image


def backward_db_first_image(dy, x, w, **kw):
    dx, dw, _ = conv2d_backward(dy, x, w, **kw)
    return dx, dw, dy.sum(axis=(1, 2))[0]


def backward_db_per_image(dy, x, w, **kw):
    dx, dw, _ = conv2d_backward(dy, x, w, **kw)
    return dx, dw, dy.sum(axis=(1, 2))


def backward_dx_uncropped(dy, x, w, *, padding=0, **kw):
    xp = pad(x, padding)
    dx, dw, db = conv2d_backward(dy, xp, w, **kw)
    return dx, dw, db


def backward_dw_without_dilation(dy, x, w, *, stride=1, padding=0, dilation=1):
    geometry = dict(stride=stride, padding=padding, dilation=dilation)
    dx, _, db = conv2d_backward(dy, x, w, **geometry)
    xp, dw = pad(x, padding), np.zeros_like(w)
    for i in range(dy.shape[1]):
        for j in range(dy.shape[2]):
            win = window(xp, i, j, w.shape[:2], stride, 1)  # the dilation forgotten
            dw += np.einsum("nabc,no->abco", win, dy[:, i, j])
    return dx, dw, db


def backward_two_outputs(dy, x, w, **kw):
    return list(conv2d_backward(dy, x, w, **kw)[:2])


def pool_buffered(dy, x, kernel, *, stride=None, padding=0):
    (kh, kw), (sh, sw) = pair(kernel), pair(kernel if stride is None else stride)
    xp = pad(x, padding, -np.inf)
    n, ho, wo, c = dy.shape
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(1, 2))
    win = win[:, ::sh, ::sw][:, :ho, :wo].reshape(n, ho, wo, c, kh * kw)
    a, q = np.divmod(win.argmax(axis=-1), kw)  # (N, H_out, W_out, C)
    rows = np.arange(ho)[None, :, None, None] * sh + a
    cols = np.arange(wo)[None, None, :, None] * sw + q
    nn, cc = np.arange(n)[:, None, None, None], np.arange(c)
    dxp = np.zeros(xp.shape, x.dtype)
    dxp[nn, rows, cols, cc] += dy  # buffered
    return crop(dxp, padding, x.shape[1:3])


def pool_mask(dy, x, kernel, *, stride=None, padding=0):
    """dy to every entry equal to the window's maximum: ties get it twice."""
    (kh, kw), (sh, sw) = pair(kernel), pair(kernel if stride is None else stride)
    xp = pad(x, padding, -np.inf)
    dxp = np.zeros(xp.shape, x.dtype)
    for i in range(dy.shape[1]):
        for j in range(dy.shape[2]):
            win = xp[:, i * sh : i * sh + kh, j * sw : j * sw + kw, :]
            mask = win == win.max(axis=(1, 2), keepdims=True)
            dxp[:, i * sh : i * sh + kh, j * sw : j * sw + kw, :] += (
                mask * dy[:, i, j][:, None, None, :]
            )
    return crop(dxp, padding, x.shape[1:3])


def pool_stride_default_one(dy, x, kernel, *, stride=None, padding=0):
    return max_pool2d_backward(dy, x, kernel, stride=stride or 1, padding=padding)


def input_grad_symmetric(dy, w, x_hw, *, stride=1, padding=0, dilation=1):
    """The rule that pads d*(k-1) - p on both sides: rows after the last window lost."""
    (ph, pw), (dh, dw) = pair(padding), pair(dilation)
    top, left = dh * (w.shape[0] - 1) - ph, dw * (w.shape[1] - 1) - pw
    d = pad_or_crop(dilated(dy, stride), top, top, left, left)
    return conv2d_einsum(d, w[::-1, ::-1].transpose(0, 1, 3, 2), dilation=dilation)


def input_grad_not_rotated(dy, w, x_hw, **kw):
    return input_grad(dy, w[::-1, ::-1], x_hw, **kw)


def sgd_decay_after_momentum(p, grads, **kw):
    """Weight decay added after the velocity, so the velocity never carries it."""
    return sgd(p, grads, decay_after=True, **kw)


def sgd_average(p, grads, **kw):
    """v = momentum * v + (1 - momentum) * g: an exponential average, not PyTorch's."""
    return sgd(p, grads, average=True, **kw)


def sgd_decay_in_place(p, grads, *, lr, momentum=0.0, weight_decay=0.0):
    """The right steps, but the decay added into the caller's gradients (+=)."""
    p, v, ps = p.copy(), None, []
    for g in grads:
        g += weight_decay * p  # g is a view of grads: the caller's array changes
        v = g.copy() if v is None else momentum * v + g
        p = p - lr * (v if momentum else g)
        ps.append(p)
    return np.stack(ps)


def idx_little_endian(data):
    """The values read in the machine's (little-endian) order."""
    return decode_idx(data, swap=False)


def idx_big_endian_dtype(data):
    """The right values, left in a big-endian dtype ('>i2', not int16)."""
    return decode_idx(data, native=False)


def idx_sizes_one_byte(data):
    """Each size taken from its last byte: right until a size reaches 256."""
    return decode_idx(data, sizes_from_last_byte=True)


class LinearDbAxis1(Linear):
    def backward(self, dy):
        dx = super().backward(dy)
        self.grads["b"] = dy.sum(axis=1)
        return dx


class LinearDwTransposed(Linear):
    def backward(self, dy):
        dx = super().backward(dy)
        self.grads["w"] = dy.T @ self.x
        return dx


class LinearStepsInBackward(Linear):
    def backward(self, dy):
        dx = super().backward(dy)
        self.params["w"] -= 0.1 * self.grads["w"]  # an SGD step: not backward's job
        return dx


class LinearOwnWeights(Linear):
    def __init__(self, n_in, n_out, **kw):
        super().__init__(n_in, n_out, **kw)
        self.w = self.params["w"]  # a second reference: stale once params is replaced

    def forward(self, x):
        self.x = x
        return x @ self.w + self.params["b"]


def banded_one_row_short(x, w, **kw):
    """Each band's input slice one row short: consecutive bands overlap one row too few."""
    return conv2d_banded(x, w, extra=0, **kw)


def banded_stride_ignored(x, w, *, stride=1, rows, **kw):
    """Band r0 read from input row r0, as if the stride were 1."""
    return conv2d_banded(x, w, stride=stride, rows=rows, start=lambda r0: r0, **kw)


def banded_no_short_band(x, w, *, stride=1, padding=0, dilation=1, rows):
    """H_out // rows bands: a last, shorter band is never computed."""
    ho = out_len(
        x.shape[1], w.shape[0], pair(stride)[0], pair(padding)[0], pair(dilation)[0]
    )
    geometry = dict(stride=stride, padding=padding, dilation=dilation, rows=rows)
    return conv2d_banded(x, w, end=max(ho // rows, 1) * rows, **geometry)


def cost_macs(*shapes, **kw):
    return conv_cost(*shapes, macs=True, **kw)


def cost_stride_ignored(*shapes, **kw):
    return conv_cost(*shapes, no_stride=True, **kw)


def cost_padded_bytes(*shapes, **kw):
    return conv_cost(*shapes, padded=True, **kw)


def cost_bytes_per_flop(*shapes, **kw):
    return conv_cost(*shapes, inverted=True, **kw)


def cost_always_float32(*shapes, **kw):
    return conv_cost(*shapes, float32=True, **kw)


def cost_as_array(*shapes, **kw):
    return np.array(conv_cost(*shapes, **kw))  # one array, not three numbers


def winograd_rotated(d, g):
    """The kernel rotated by 180 degrees: a true convolution, not PyTorch's."""
    return winograd_tile(d, g, flip=True)


def winograd_data_transposed(d, g):
    """B d B^T in place of B^T d B: BT taken for B."""
    return winograd_tile(d, g, data=lambda bt, tile: bt.T @ tile @ bt)


def winograd_float64_matrices(d, g):
    return winograd_tile(d, g, cast=False)


# (exercise, wrong function, words the message must contain)
WRONG = [
    ("ch2.windows_nchw", windows_copy, ["is a copy", "view of x", "as_strided"]),
    ("ch2.windows_nchw", windows_writeable, ["writeable", "read-only"]),
    (
        "ch2.windows_nchw",
        windows_strides_from_shape,
        ["wrong values", "but fails", "with non-contiguous inputs", "x.strides"],
    ),
    (
        "ch2.windows_nchw",
        windows_kernel_swapped,
        ["wrong shape", "but fails", "with different values along height and width"],
    ),
    ("ch3.conv2d_einsum", conv2d_flipped, ["wrong values", "does not flip the kernel"]),
    (
        "ch3.conv2d_einsum",
        conv2d_stride_swapped,
        ["but fails", "with different values along height and width"],
    ),
    (
        "ch3.conv2d_einsum",
        conv2d_no_bias,
        ["passes the cases with no bias but fails", "with a bias"],
    ),
    (
        "ch3.conv2d_einsum",
        conv2d_float64,
        ["wrong dtype: expected float32", "got float64", "but fails", "with float32"],
    ),
    (
        "ch3.conv2d_einsum",
        conv2d_mutates,
        ["mutates its input x", "at index (0, 0, 0, 0)"],
    ),
    (
        "ch3a.depthwise",
        depthwise_mixes_channels,
        [
            "wrong values",
            "passes the cases with one input channel but fails",
            "never mixes channels",
        ],
    ),
    (
        "ch3a.depthwise",
        depthwise_order_swapped,
        [
            "wrong values",
            "but fails",
            "with several input channels and C_out = m*C_in with m >= 2",
            "w.reshape(KH, KW, C_in, m)",
        ],
    ),
    (
        "ch4.im2col",
        im2col_channels_first,
        ["wrong values", "passes the cases with one channel but fails", "(a, b, c)"],
    ),
    (
        "ch4.im2col",
        im2col_no_padding,
        ["wrong shape", "passes the cases with no padding but fails", "with padding"],
    ),
    ("ch4.im2col", im2col_no_dilation, ["no dilation but fails", "with dilation"]),
    (
        "ch5.col2im",
        col2im_buffered,
        [
            "wrong values",
            "passes the cases with windows that do not overlap but fails",
            "with overlapping windows",
            "np.add.at",
            "buffered",
        ],
    ),
    ("ch5.col2im", col2im_uncropped, ["wrong shape", "no padding but fails", "crop"]),
    (
        "ch5.conv2d_backward",
        backward_db_first_image,
        ["db has wrong values", "batch size 1 but fails", "batch size 2 or more"],
    ),
    (
        "ch5.conv2d_backward",
        backward_db_per_image,
        ["db has the wrong shape", "expected (1,)", "dy.sum(axis=(0, 1, 2))"],
    ),
    (
        "ch5.conv2d_backward",
        backward_dx_uncropped,
        ["dx has the wrong shape", "no padding but fails", "crop the padding"],
    ),
    (
        "ch5.conv2d_backward",
        backward_dw_without_dilation,
        ["dw has wrong values", "no dilation but fails"],
    ),
    (
        "ch5.conv2d_backward",
        backward_two_outputs,
        ["should return a tuple (dx, dw, db), got a list"],
    ),
    (
        "ch5b.max_pool2d_backward",
        pool_buffered,
        [
            "windows that do not overlap but fails",
            "with overlapping windows",
            "np.add.at",
        ],
    ),
    (
        "ch5b.max_pool2d_backward",
        pool_mask,
        ["passes the cases with no ties but fails", "ties (equal values", "argmax"],
    ),
    (
        "ch5b.max_pool2d_backward",
        pool_stride_default_one,
        ["wrong values", "but fails", "with stride = kernel (the default)"],
    ),
    (
        "ch6.input_grad",
        input_grad_symmetric,
        [
            "wrong shape",
            "passes the cases with windows that reach the last row and column but "
            "fails",
            "rows or columns after the last window",
        ],
    ),
    ("ch6.input_grad", input_grad_not_rotated, ["wrong values", "Rotate the kernel"]),
    (
        "ch7.sgd",
        sgd_decay_after_momentum,
        [
            "wrong values",
            "passes the cases with no momentum",
            "but fails",
            "Weight decay is part of the gradient, added before the momentum",
        ],
    ),
    (
        "ch7.sgd",
        sgd_average,
        [
            "wrong values",
            "passes the cases with no momentum but fails",
            "with momentum",
            "no (1 - momentum) factor",
        ],
    ),
    (
        "ch7.sgd",
        sgd_decay_in_place,
        [
            "mutates its input grads",
            "passes the cases with no weight decay",
            "in place",
        ],
    ),
    (
        "ch7a.decode_idx",
        idx_little_endian,
        [
            "(expected values from Python's struct module)",
            "wrong values",
            "passes the cases with one-byte values (0x08, 0x09) but fails",
            "big-endian",
        ],
    ),
    (
        "ch7a.decode_idx",
        idx_big_endian_dtype,
        [
            "wrong dtype: expected int16 (the dtype of the file's type code, in native",
            "got >i2",
            ".astype('i2')",
        ],
    ),
    (
        "ch7a.decode_idx",
        idx_sizes_one_byte,
        [
            "passes the cases with sizes below 256 but fails",
            "int.from_bytes",
        ],
    ),
    (
        "ch7b.linear",
        LinearDbAxis1,
        ["grads['b'] has the wrong shape", "dy.sum(axis=0)"],
    ),
    (
        "ch7b.linear",
        LinearDwTransposed,
        ["grads['w'] has the wrong shape", "x.T @ dy"],
    ),
    (
        "ch7b.linear",
        LinearStepsInBackward,
        ["mutates its input params['w']", "an optimizer"],
    ),
    (
        "ch7b.linear",
        LinearOwnWeights,
        ["y (from forward) has wrong values", "self.params"],
    ),
    (
        "ch8.conv2d_banded",
        banded_one_row_short,
        ["it raised ValueError", "(r1-r0-1)*sh + dh*(KH-1) + 1 padded input rows"],
    ),
    (
        "ch8.conv2d_banded",
        banded_stride_ignored,
        [
            "wrong values",
            "passes the cases with stride 1 but fails",
            "with stride 2 or more",
            "starts at input row r0*sh",
        ],
    ),
    (
        "ch8.conv2d_banded",
        banded_no_short_band,
        [
            "wrong values",
            "but fails",
            "with a last band shorter than the others",
            "range(0, H_out, rows)",
        ],
    ),
    (
        "ch8a.conv_cost",
        cost_macs,
        [
            "(expected values from PyTorch's FlopCounterMode)",
            "flops is wrong: expected 162, got 81",
            "a multiply and an add each",
        ],
    ),
    (
        "ch8a.conv_cost",
        cost_stride_ignored,
        ["flops is wrong", "passes the cases with stride 1 but fails", "// sh + 1"],
    ),
    (
        "ch8a.conv_cost",
        cost_padded_bytes,
        ["bytes is wrong", "passes the cases with no padding but fails", "without its"],
    ),
    ("ch8a.conv_cost", cost_bytes_per_flop, ["intensity is wrong", "flops / bytes"]),
    (
        "ch8a.conv_cost",
        cost_always_float32,
        ["passes the cases with 4-byte numbers but fails", "8 for float64"],
    ),
    (
        "ch8a.conv_cost",
        cost_as_array,
        ["should return a tuple (flops, bytes, intensity), got an array (3,)"],
    ),
    (
        "ch9.winograd_tile",
        winograd_rotated,
        [
            "wrong values",
            "passes the cases with kernels unchanged by a 180° rotation",
            "but fails",
            "with general kernels",
            "cross-correlation",
        ],
    ),
    (
        "ch9.winograd_tile",
        winograd_data_transposed,
        ["wrong values", "BT @ d @ BT.T"],
    ),
    (
        "ch9.winograd_tile",
        winograd_float64_matrices,
        ["wrong dtype: expected float32", "got float64", ".astype(d.dtype)"],
    ),
]


def message_of(name, fn, **kw) -> str:
    """The check's message, whitespace collapsed (it is wrapped at 88 columns)."""
    with pytest.raises(AssertionError) as info:
        exercises.check(name, fn, **kw)
    return " ".join(str(info.value).split())


# --- the checks -----------------------------------------------------------------------
def test_names_in_chapter_order():
    assert exercises.names() == NAMES
    assert set(SOLUTIONS) == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_check_passes_a_correct_solution(name, seed):
    assert exercises.check(name, SOLUTIONS[name], seed=seed, n_random=12) is True


@pytest.mark.parametrize(
    "name, fn, words", WRONG, ids=[f"{n}-{f.__name__}" for n, f, _ in WRONG]
)
def test_check_rejects_a_wrong_solution_and_says_why(name, fn, words):
    message = message_of(name, fn, seed=0)
    missing = [w for w in words if w not in message]
    assert not missing, f"{missing} not in: {message}"
    assert message.startswith(f"{name}: ") and "First failure:" in message
    # the fixed cases alone (PyTorch's results, no random case) catch it too
    message_of(name, fn, n_random=0)


def test_every_exercise_has_a_wrong_variant():
    assert {name for name, _, _ in WRONG} == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_describe_and_stub(name):
    ex = exercises.get(name)
    text = exercises.describe(name)
    assert "★" * ex.difficulty in text and 1 <= ex.difficulty <= 3
    assert ex.signature in text and "Tolerance:" in text
    assert f"check({name!r}" in text
    namespace = {"np": np}
    exec(exercises.stub(name), namespace)
    defined = ex.signature.split("(")[0]
    assert callable(namespace[defined])
    message = message_of(name, namespace[defined], seed=0)
    assert "raises NotImplementedError" in message


def test_unknown_name_lists_the_names():
    with pytest.raises(ValueError) as info:
        exercises.check("ch5.col2img", col2im)
    assert all(name in str(info.value) for name in NAMES)
    with pytest.raises(ValueError, match="ch2.windows_nchw"):
        exercises.describe("nope")


def test_bad_arguments():
    with pytest.raises(TypeError, match="fn must be"):
        exercises.check("ch4.im2col", "im2col")
    with pytest.raises(ValueError, match="n_random"):
        exercises.check("ch4.im2col", im2col, n_random=-1)


def test_exception_and_wrong_type_messages():
    def divides(x, kernel, **kw):
        return 1 / 0

    message = message_of("ch4.im2col", divides, seed=0)
    assert "it raised ZeroDivisionError: division by zero" in message
    assert "in divides, line" in message and "return 1 / 0" in message
    message = message_of(
        "ch4.im2col", lambda x, kernel, **kw: im2col(x, kernel).tolist()
    )
    assert "the result should be a NumPy array, got a list" in message


def test_a_missing_keyword_fails_only_the_cases_that_need_it():
    def no_dilation(x, kernel, *, stride=1, padding=0):
        return im2col(x, kernel, stride=stride, padding=padding)

    message = message_of("ch4.im2col", no_dilation, seed=0)
    assert "unexpected keyword argument 'dilation'" in message
    assert "no dilation but fails" in message


def test_seed_repeats_the_random_cases():
    first = message_of("ch5.col2im", col2im_buffered, seed=5)
    assert first == message_of("ch5.col2im", col2im_buffered, seed=5)
    assert "seed=5) repeats them" in first
    a = exercises.random_cases("ch5.col2im", 7, 4)
    b = exercises.random_cases("ch5.col2im", 7, 4)
    assert [c.setup for c in a] == [c.setup for c in b]


@pytest.mark.parametrize("name", NAMES)
def test_fixed_cases_cover_each_feature(name):
    """Every feature takes at least two values among the fixed cases (windows have no
    padding), so the contrasts work without random cases; the stored inputs match their
    setups."""
    ex = exercises.get(name)
    cases = exercises.fixed_cases(name)
    labels = [ex.features(c.setup) for c in cases]
    for key in labels[0]:
        values = {label[key] for label in labels}
        assert len(values) >= 2 or (name, key) == ("ch2.windows_nchw", "padding"), key
    for case in cases:
        rng = np.random.default_rng(0)
        made = ex.make(case.setup, rng)
        assert {k: (a.shape, a.dtype) for k, a in made.items()} == {
            k: (a.shape, a.dtype) for k, a in case.arrays.items()
        }


@pytest.mark.parametrize("name", NAMES)
def test_reference_agrees_with_the_stored_pytorch_results(name):
    assert exercises.reference_errors(name) <= exercises.get(name).tolerance[0]


def test_fixture_file_is_small_and_plain():
    path = ROOT / "convbook" / "assets" / exercises.FIXTURES
    assert path.stat().st_size < 1_000_000
    with np.load(path, allow_pickle=False) as data:
        assert all(data[k].dtype != object for k in data.files)


def load_script():
    spec = importlib.util.spec_from_file_location(
        "make_exercise_fixtures", ROOT / "scripts" / "make_exercise_fixtures.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_fixtures_are_what_the_script_writes():
    """Array for array: the same keys in the same order, dtypes, shapes and inputs
    exactly; PyTorch's outputs within 1e-13 of their scale (another CPU may add in
    another order)."""
    pytest.importorskip("torch")
    built = load_script().build()
    with np.load(ROOT / "convbook" / "assets" / exercises.FIXTURES) as data:
        shipped = {k: data[k] for k in data.files}
    assert list(shipped) == list(built)
    for key, a in built.items():
        b = shipped[key]
        assert (a.dtype, a.shape) == (b.dtype, b.shape), key
        if "/out/" in key:
            scale = max(1.0, float(np.abs(a).max(initial=0)))
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-13 * scale, err_msg=key)
        else:
            assert np.array_equal(a, b), key
    setup = json.loads(str(built["ch4.im2col/0/setup"]))
    assert setup["kernel"] == [3, 3]


@pytest.mark.parametrize("name", NAMES)
def test_random_references_agree_with_pytorch(name):
    """The package's code grades the random cases: on 25 random setups it equals the
    script's PyTorch reference within the exercise's float64 tolerance."""
    pytest.importorskip("torch")
    torch_reference = load_script().REFERENCES[name]
    ex = exercises.get(name)
    for case in exercises.random_cases(name, seed=11, count=25):
        arrays = exercises.as_float64(case.arrays)
        for got, want in zip(case.expected, torch_reference(arrays, case.setup)):
            scale = max(1.0, float(np.abs(want).max(initial=0)))
            assert np.abs(got - want).max(initial=0) <= ex.tolerance[0] * scale, case


NO_TORCH = """
import importlib.abc, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "matplotlib"):
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, NoTorch())
sys.path.insert(0, sys.argv[1])
import test_exercises as t
from convbook import exercises

for name in exercises.names():
    assert exercises.check(name, t.SOLUTIONS[name], seed=3), name
    try:
        exercises.check(name, t.WRONG[[n for n, _, _ in t.WRONG].index(name)][1])
    except AssertionError:
        pass
    else:
        raise SystemExit(f"{name}: a wrong variant passed")
try:
    import torch
except ImportError:
    print("checked without torch:", len(exercises.names()))
"""


def test_checks_run_without_pytorch():
    run = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(ROOT / "tests")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"checked without torch: {len(NAMES)}"
