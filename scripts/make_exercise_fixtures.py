"""Write convbook/assets/exercises.npz: the fixed cases of convbook.exercises, with
expected results computed by PyTorch (for the IDX files of chapter 7a, which PyTorch
does not read, by Python's struct module).

    python scripts/make_exercise_fixtures.py [--out PATH]

Each exercise gets the hand-picked setups listed below (a baseline, then one feature
changed at a time: stride, padding, dilation, different height and width values,
channels, batch, layout, float32, then combinations), so that a check can say "passes
the cases with stride 1 but fails those with stride 2". The inputs are drawn by the
exercise's own `make` with a seed fixed per exercise and case; PyTorch computes the
expected outputs in float64 (float32 inputs are upcast), single-threaded with
deterministic algorithms. The file stores, for case k of exercise `name`:
`name/k/setup` (JSON), `name/k/in/<array>` and `name/k/out/<i>`. It holds only plain
arrays, so it loads with `allow_pickle=False`. tests/test_exercises.py checks that the
shipped file equals what this script produces.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from convbook import exercises
from convbook.conv import hwio_to_oihw, nchw_to_nhwc, nhwc_to_nchw, oihw_to_hwio

SEED = 2026
OUT = Path(__file__).resolve().parents[1] / "convbook" / "assets" / "exercises.npz"

CONV = dict(
    n=1,
    hw=(5, 5),
    c_in=1,
    c_out=1,
    kernel=(3, 3),
    stride=(1, 1),
    padding=(0, 0),
    dilation=(1, 1),
    dtype="float64",
    contiguous=True,
    bias=False,
)
POOL = dict(
    n=1,
    hw=(4, 4),
    c_in=1,
    kernel=(2, 2),
    stride=None,
    padding=(0, 0),
    dtype="float64",
    contiguous=True,
    ties=False,
)
LINEAR = dict(n=1, n_in=3, n_out=2, dtype="float64", contiguous=True)


def conv(**changes) -> dict:
    return {**CONV, **changes}


def pool(**changes) -> dict:
    return {**POOL, **changes}


# Everything at once: a batch, channels, and a different value for H and W everywhere.
MIXED = dict(
    n=2, hw=(7, 8), c_in=3, c_out=2, kernel=(3, 2), stride=(2, 3), dilation=(2, 1)
)
# One feature at a time from the baseline, then combinations. No padding: windows.
UNPADDED = [
    conv(),
    conv(hw=(4, 4), kernel=(1, 1)),
    conv(hw=(7, 7), stride=(2, 2)),
    conv(hw=(8, 8), stride=(2, 2)),  # the last row and column are read by no window
    conv(hw=(7, 7), dilation=(2, 2)),
    conv(hw=(6, 5), kernel=(3, 2), stride=(2, 1)),
    conv(c_in=3, c_out=2),
    conv(n=3),
    conv(contiguous=False),
    conv(dtype="float32"),
    conv(**MIXED, contiguous=False),
]
PADDED = [
    conv(padding=(1, 1)),
    conv(hw=(6, 5), kernel=(3, 2), stride=(2, 1), padding=(1, 0)),
    conv(**MIXED, padding=(1, 2), dtype="float32"),
]
# Windows that share no pixel: a scatter without np.add.at passes these.
APART = [
    conv(hw=(6, 6), kernel=(2, 2), stride=(2, 2)),
    conv(hw=(8, 8), kernel=(2, 2), stride=(3, 3), padding=(1, 1)),
    conv(hw=(7, 7), kernel=(2, 2), stride=(4, 4), dilation=(2, 2)),
    conv(n=2, hw=(6, 4), c_in=3, kernel=(2, 2), stride=(2, 2), dtype="float32"),
]
POOLS = [
    pool(),
    pool(stride=(1, 1)),
    pool(hw=(7, 7), kernel=(3, 3), stride=(2, 2)),
    pool(hw=(9, 9), kernel=(3, 3)),
    pool(hw=(5, 5), padding=(1, 1)),
    pool(hw=(6, 5), kernel=(3, 2), stride=(2, 1), padding=(1, 0)),
    pool(c_in=3),
    pool(n=2),
    pool(hw=(6, 4), contiguous=False),
    pool(dtype="float32"),
    pool(hw=(6, 6), ties=True),
    pool(hw=(5, 5), stride=(1, 1), ties=True),
    pool(n=2, hw=(7, 8), c_in=3, kernel=(3, 3), stride=(2, 2), padding=(1, 1)),
]
# Depthwise: C_out = m*C_in, one feature at a time, then everything at once.
DEPTHWISE = [
    {k: v for k, v in conv(**changes).items() if k != "bias"}
    for changes in [
        dict(),
        dict(c_in=3, c_out=3),
        dict(c_out=2),
        dict(c_in=3, c_out=6),
        dict(hw=(4, 4), kernel=(1, 1), c_in=2, c_out=2),
        dict(hw=(7, 7), stride=(2, 2), c_in=2, c_out=6),
        dict(hw=(7, 7), dilation=(2, 2), c_in=2, c_out=4),
        dict(padding=(1, 1), c_in=3, c_out=3),
        dict(hw=(6, 5), kernel=(3, 2), stride=(2, 1), padding=(1, 0), c_in=2, c_out=4),
        dict(n=3, c_in=2, c_out=2),
        dict(c_in=2, c_out=4, contiguous=False),
        dict(c_in=3, c_out=6, dtype="float32"),
        dict(MIXED, c_out=6, padding=(1, 2), contiguous=False),
    ]
]
LINEARS = [
    LINEAR,
    {**LINEAR, "n": 4},
    {**LINEAR, "n": 2, "n_out": 3},
    {**LINEAR, "n": 3, "contiguous": False},
    {**LINEAR, "n": 2, "dtype": "float32"},
    {**LINEAR, "n": 5, "n_in": 6, "n_out": 4},
]
SGD_STEPS = dict(
    shape=(3,),
    steps=1,
    lr=0.1,
    momentum=0.0,
    weight_decay=0.0,
    dtype="float64",
    contiguous=True,
)
SGDS = [
    SGD_STEPS | changes
    for changes in [
        dict(),
        dict(steps=3),
        dict(momentum=0.9),
        dict(steps=4, momentum=0.9),
        dict(steps=3, weight_decay=0.05),
        dict(momentum=0.9, weight_decay=0.05),
        dict(steps=4, momentum=0.9, weight_decay=0.05),
        dict(shape=(3, 4), steps=3, momentum=0.5, weight_decay=0.1, contiguous=False),
        dict(shape=(2, 3), steps=3, momentum=0.9, weight_decay=0.01, dtype="float32"),
        dict(
            shape=(4, 2),
            steps=6,
            lr=0.5,
            momentum=0.99,
            weight_decay=0.2,
            dtype="float32",
            contiguous=False,
        ),
    ]
]
# IDX files: each type code, one and several dimensions, sizes of 256 and more.
IDXS = [
    dict(shape=shape, dtype=dtype, contiguous=True)
    for shape, dtype in [
        ((5,), "uint8"),
        ((2, 3, 4), "uint8"),
        ((300,), "uint8"),
        ((6,), "int8"),
        ((2, 3), "int16"),
        ((4,), "int32"),
        ((3, 2), "float32"),
        ((2, 2, 2), "float64"),
        ((2, 260), "int16"),
        ((3,), "float64"),
    ]
]
# Bands of `rows` output rows: one band, bands of equal height, a shorter last band,
# with each feature of a convolution (H_out is 3 unless said).
BANDS = [
    conv(rows=1),
    conv(rows=2),
    conv(rows=3),
    conv(rows=5),
    conv(hw=(4, 4), kernel=(1, 1), rows=3),  # H_out 4
    conv(hw=(7, 7), stride=(2, 2), rows=2),
    conv(hw=(8, 8), stride=(2, 2), rows=1),
    conv(hw=(9, 9), stride=(2, 2), rows=2),  # H_out 4
    conv(hw=(9, 9), dilation=(2, 2), rows=2),  # H_out 5
    conv(padding=(1, 1), rows=2),  # H_out 5
    conv(hw=(6, 5), kernel=(3, 2), stride=(2, 1), padding=(1, 0), rows=2),
    conv(c_in=3, c_out=2, rows=2),
    conv(n=3, rows=1),
    conv(contiguous=False, rows=2),
    conv(dtype="float32", rows=1),
    conv(**MIXED, padding=(1, 2), dtype="float32", contiguous=False, rows=2),
]
# The cost of a layer: shapes only, float32 (4-byte) or float64 (8-byte) numbers.
COSTS = [
    conv(**changes) | {"itemsize": itemsize}
    for changes, itemsize in [
        (dict(), 4),
        (dict(hw=(4, 4), kernel=(1, 1)), 4),
        (dict(hw=(7, 7), stride=(2, 2)), 4),
        (dict(hw=(8, 8), stride=(2, 2)), 8),
        (dict(hw=(7, 7), dilation=(2, 2)), 4),
        (dict(hw=(6, 5), kernel=(3, 2), stride=(2, 1)), 4),
        (dict(c_in=3, c_out=2), 8),
        (dict(n=3), 4),
        (dict(padding=(1, 1)), 4),
        (dict(hw=(6, 5), kernel=(3, 2), stride=(2, 1), padding=(1, 0)), 8),
        (dict(MIXED, padding=(1, 2)), 4),
        (dict(n=8, hw=(28, 28), c_in=32, c_out=32, padding=(1, 1)), 4),
    ]
]
TILE = dict(c_in=1, c_out=1, symmetric=False, dtype="float64", contiguous=True)
TILES = [
    TILE | changes
    for changes in [
        dict(),
        dict(symmetric=True),
        dict(c_in=3),
        dict(c_out=2),
        dict(c_in=3, c_out=2),
        dict(c_in=2, c_out=3, symmetric=True),
        dict(c_in=3, c_out=2, contiguous=False),
        dict(c_in=3, c_out=2, dtype="float32"),
        dict(c_in=4, c_out=3, symmetric=True, dtype="float32", contiguous=False),
    ]
]
SETUPS = {
    "ch2.windows_nchw": UNPADDED,
    "ch3.conv2d_einsum": UNPADDED
    + PADDED
    + [conv(bias=True), PADDED[-1] | {"bias": True}],
    "ch3a.depthwise": DEPTHWISE,
    "ch4.im2col": UNPADDED + PADDED,
    "ch5.col2im": UNPADDED + PADDED + APART,
    "ch5.conv2d_backward": UNPADDED + PADDED,
    "ch5b.max_pool2d_backward": POOLS,
    "ch6.input_grad": UNPADDED + PADDED,
    "ch7.sgd": SGDS,
    "ch7a.decode_idx": IDXS,
    "ch7b.linear": LINEARS,
    "ch8.conv2d_banded": BANDS,
    "ch8a.conv_cost": COSTS,
    "ch9.winograd_tile": TILES,
}


def t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def t_nchw(a: np.ndarray, grad: bool = False) -> torch.Tensor:
    return t(nhwc_to_nchw(a)).requires_grad_(grad)


def nhwc(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(nchw_to_nhwc(x.detach().numpy()))


def geometry(s: dict) -> dict:
    return dict(stride=s["stride"], padding=s["padding"], dilation=s["dilation"])


def torch_windows_nchw(a: dict, s: dict) -> tuple:
    (kh, kw), (sh, sw), (dh, dw) = s["kernel"], s["stride"], s["dilation"]
    x = t(a["x"])
    win = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)
    return (np.ascontiguousarray(win[..., ::dh, ::dw].numpy()),)


def torch_conv2d(a: dict, s: dict) -> tuple:
    b = t(a["b"]) if "b" in a else None
    y = F.conv2d(t_nchw(a["x"]), t(hwio_to_oihw(a["w"])), b, **geometry(s))
    return (nhwc(y),)


def torch_depthwise(a: dict, s: dict) -> tuple:
    w = t(hwio_to_oihw(a["w"]))  # (C_out, 1, KH, KW)
    return (nhwc(F.conv2d(t_nchw(a["x"]), w, groups=s["c_in"], **geometry(s))),)


def torch_im2col(a: dict, s: dict) -> tuple:
    (kh, kw), c = s["kernel"], s["c_in"]
    cols = F.unfold(t_nchw(a["x"]), s["kernel"], **geometry(s))  # (N, C*KH*KW, L)
    n, _, length = cols.shape
    cols = cols.reshape(n, c, kh, kw, length).permute(0, 4, 2, 3, 1)
    return (cols.reshape(n * length, kh * kw * c).numpy(),)


def torch_col2im(a: dict, s: dict) -> tuple:
    (kh, kw), c, n = s["kernel"], s["c_in"], s["n"]
    cols = t(a["cols"]).reshape(n, -1, kh, kw, c).permute(0, 4, 2, 3, 1)
    cols = cols.reshape(n, c * kh * kw, -1)
    return (nhwc(F.fold(cols, s["hw"], s["kernel"], **geometry(s))),)


def torch_conv2d_grads(a: dict, s: dict) -> tuple:
    x, w = t_nchw(a["x"], grad=True), t(hwio_to_oihw(a["w"])).requires_grad_()
    b = torch.zeros(s["c_out"], dtype=torch.float64, requires_grad=True)
    F.conv2d(x, w, b, **geometry(s)).backward(t_nchw(a["dy"]))
    dw = np.ascontiguousarray(oihw_to_hwio(w.grad.numpy()))
    return nhwc(x.grad), dw, b.grad.numpy()


def torch_max_pool2d_grad(a: dict, s: dict) -> tuple:
    x = t_nchw(a["x"], grad=True)
    F.max_pool2d(x, s["kernel"], s["stride"], s["padding"]).backward(t_nchw(a["dy"]))
    return (nhwc(x.grad),)


def torch_input_grad(a: dict, s: dict) -> tuple:
    x = torch.zeros(
        (s["n"], s["c_in"], *s["hw"]), dtype=torch.float64, requires_grad=True
    )
    F.conv2d(x, t(hwio_to_oihw(a["w"])), **geometry(s)).backward(t_nchw(a["dy"]))
    return (nhwc(x.grad),)


def torch_linear(a: dict, s: dict) -> tuple:
    x, w = t(a["x"]).requires_grad_(), t(a["w"]).requires_grad_()
    b = t(a["b"]).requires_grad_()
    y = F.linear(x, w.T, b)
    y.backward(t(a["dy"]))
    return y.detach().numpy(), x.grad.numpy(), w.grad.numpy(), b.grad.numpy()


def torch_conv_cost(a: dict, s: dict) -> tuple:
    """FLOPs counted by FlopCounterMode; bytes from the tensors' numbers of elements."""
    x = torch.zeros((s["n"], s["c_in"], *s["hw"]), dtype=torch.float64)
    w = torch.zeros((s["c_out"], s["c_in"], *s["kernel"]), dtype=torch.float64)
    with FlopCounterMode(display=False) as counter:
        y = F.conv2d(x, w, **geometry(s))
    flops = counter.get_total_flops()
    nbytes = s["itemsize"] * (x.numel() + w.numel() + y.numel())
    return np.float64(flops), np.float64(nbytes), np.float64(flops / nbytes)


def torch_winograd_tile(a: dict, s: dict) -> tuple:
    d = t(a["d"].transpose(2, 0, 1)[None])  # (1, C_in, 4, 4)
    y = F.conv2d(d, t(hwio_to_oihw(a["g"])))  # (1, C_out, 2, 2)
    return (y[0].permute(1, 2, 0).numpy(),)


def torch_sgd(a: dict, s: dict) -> tuple:
    p = torch.nn.Parameter(t(a["p"]).clone())
    opt = torch.optim.SGD(
        [p], lr=s["lr"], momentum=s["momentum"], weight_decay=s["weight_decay"]
    )
    after = []
    for g in a["grads"]:
        p.grad = t(g).clone()
        opt.step()
        after.append(p.detach().numpy().copy())
    return (np.stack(after),)


STRUCT_FORMATS = {0x08: "B", 0x09: "b", 0x0B: "h", 0x0C: "i", 0x0D: "f", 0x0E: "d"}


def struct_idx(a: dict, s: dict) -> tuple:
    """PyTorch reads no IDX files: the bytes decoded by Python's struct module."""
    data = a["data"].astype(np.uint8).tobytes()
    zeros, code, ndim = struct.unpack_from(">HBB", data)
    assert zeros == 0
    sizes = struct.unpack_from(f">{ndim}I", data, 4)
    fmt = f">{math.prod(sizes)}{STRUCT_FORMATS[code]}"
    assert struct.calcsize(fmt) == len(data) - 4 - 4 * ndim
    values = struct.unpack_from(fmt, data, 4 + 4 * ndim)
    return (np.array(values, np.float64).reshape(sizes),)


REFERENCES = {
    "ch2.windows_nchw": torch_windows_nchw,
    "ch3.conv2d_einsum": torch_conv2d,
    "ch3a.depthwise": torch_depthwise,
    "ch4.im2col": torch_im2col,
    "ch5.col2im": torch_col2im,
    "ch5.conv2d_backward": torch_conv2d_grads,
    "ch5b.max_pool2d_backward": torch_max_pool2d_grad,
    "ch6.input_grad": torch_input_grad,
    "ch7.sgd": torch_sgd,
    "ch7a.decode_idx": struct_idx,
    "ch7b.linear": torch_linear,
    "ch8.conv2d_banded": torch_conv2d,
    "ch8a.conv_cost": torch_conv_cost,
    "ch9.winograd_tile": torch_winograd_tile,
}


def _cases() -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name in exercises.names():
        ex = exercises.get(name)
        for k, setup in enumerate(SETUPS[name]):
            rng = np.random.default_rng([SEED, zlib.crc32(name.encode()), k])
            arrays = ex.make(setup, rng)
            expected = REFERENCES[name](exercises.as_float64(arrays), setup)
            out[f"{name}/{k}/setup"] = np.array(json.dumps(setup, sort_keys=True))
            out.update({f"{name}/{k}/in/{key}": a for key, a in arrays.items()})
            for i, e in enumerate(expected):
                e = np.ascontiguousarray(e, dtype=np.float64).reshape(np.shape(e))
                out[f"{name}/{k}/out/{i}"] = e  # a number stays 0-d
    return out


def build() -> dict[str, np.ndarray]:
    """Every stored array by key, in a fixed order; PyTorch single-threaded and
    deterministic meanwhile (its settings are restored afterwards)."""
    assert set(SETUPS) == set(REFERENCES) == set(exercises.names())
    threads, deterministic = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
    )
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        return _cases()
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"default: {OUT}")
    args = parser.parse_args()
    arrays = build()
    np.savez_compressed(args.out, **arrays)
    size = args.out.stat().st_size
    print(f"wrote {len(arrays)} arrays to {args.out} ({size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
