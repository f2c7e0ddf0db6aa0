"""PyTorch's own test inputs (the OpInfo database, `torch.testing._internal`) for
`nn.functional.conv2d` and `nn.functional.conv_transpose2d`, through every method of ours, forward
and gradients (input, weight, bias), in float64 and float32: every sample in scope, none
mismatched. (`tests/test_pool.py` runs the same database for `max_pool2d` and `avg_pool2d`.)

PyTorch also accepts unbatched inputs `(C, H, W)`; those samples get a batch axis of 1 at the
edge, like the NCHW -> NHWC conversion, and are compared the same way."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip(
    "expecttest"
)  # torch.testing._internal needs it (a test dependency)
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402

from convbook import conv2d, conv2d_backward, conv2d_backward_methods, conv2d_methods  # noqa: E402
from convbook import conv_transpose2d, conv_transpose2d_backward  # noqa: E402
from convbook.backward import CONV2D_BACKWARD_METHODS  # noqa: E402
from convbook.conv import CONV2D_METHODS, conv_spec  # noqa: E402
from conftest import assert_close  # noqa: E402

OPS = {
    op.name: op
    for op in op_db
    if op.name in ("nn.functional.conv2d", "nn.functional.conv_transpose2d")
}
assert len(OPS) == 2, sorted(OPS)
KEYS = {"stride", "padding", "dilation", "groups", "output_padding"}


def samples(name: str, dtype):
    """(x NHWC, w ours, b or None, kwargs, torch tensors) for every sample of the op."""
    out = []
    for s in OPS[name].sample_inputs("cpu", dtype, requires_grad=True):
        weight, bias = s.args
        assert set(s.kwargs) <= KEYS, f"a sample outside our scope: {s.kwargs}"
        inp = s.input if s.input.ndim == 4 else s.input.unsqueeze(0)
        x = inp.detach().numpy().transpose(0, 2, 3, 1)
        w = weight.detach().numpy().transpose(2, 3, 1, 0)
        b = None if bias is None else bias.detach().numpy()
        out.append((x, w, b, dict(s.kwargs), (s.input, weight, bias)))
    return out


def torch_grads(name, tensors, kwargs, seed):
    inp, weight, bias = tensors
    fn = getattr(torch.nn.functional, name.split(".")[-1])
    y = fn(inp, weight, bias, **kwargs)
    dy = torch.from_numpy(
        np.random.default_rng(seed).standard_normal(tuple(y.shape))
    ).to(y.dtype)
    leaves = [t for t in (inp, weight, bias) if t is not None]
    grads = torch.autograd.grad(y, leaves, dy)
    as_nhwc = lambda t: (
        (t if t.ndim == 4 else t.unsqueeze(0)).numpy().transpose(0, 2, 3, 1)
    )  # noqa
    ref = [as_nhwc(grads[0]), grads[1].numpy().transpose(2, 3, 1, 0)]
    ref.append(grads[2].numpy() if bias is not None else None)
    return as_nhwc(y.detach()), as_nhwc(dy), ref


def compare(got, ref, dtype, what):
    try:
        assert_close(got, ref, dtype)
    except AssertionError as e:
        raise AssertionError(f"{what}: {e}") from None


@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32], ids=["float64", "float32"]
)
def test_every_conv2d_sample_through_every_method(dtype):
    npd = np.float64 if dtype == torch.float64 else np.float32
    checked = 0
    for k, (x, w, b, kw, tensors) in enumerate(samples("nn.functional.conv2d", dtype)):
        y_ref, dy, (rx, rw, rb) = torch_grads("nn.functional.conv2d", tensors, kw, k)
        spec = conv_spec(x, w, **kw)[3]
        for m in ["auto", *conv2d_methods()]:
            if CONV2D_METHODS.supports(m, spec):
                compare(
                    conv2d(x, w, b, method=m, **kw),
                    y_ref,
                    npd,
                    f"sample {k} {kw} {m} y",
                )
                checked += 1
        for m in ["auto", *conv2d_backward_methods()]:
            if CONV2D_BACKWARD_METHODS.supports(m, spec):
                dx, dw, db = conv2d_backward(dy, x, w, method=m, **kw)
                compare(dx, rx, npd, f"sample {k} {kw} {m} dx")
                compare(dw, rw, npd, f"sample {k} {kw} {m} dw")
                if rb is not None:
                    compare(db, rb, npd, f"sample {k} {kw} {m} db")
                checked += 1
    assert checked >= 30 * 4  # every sample, several methods each


@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32], ids=["float64", "float32"]
)
def test_every_conv_transpose2d_sample(dtype):
    npd = np.float64 if dtype == torch.float64 else np.float32
    items = samples("nn.functional.conv_transpose2d", dtype)
    assert len(items) >= 12
    for k, (x, w, b, kw, tensors) in enumerate(items):
        z_ref, dz, (rx, rw, rb) = torch_grads(
            "nn.functional.conv_transpose2d", tensors, kw, k
        )
        compare(conv_transpose2d(x, w, b, **kw), z_ref, npd, f"sample {k} {kw} z")
        dx, dw, db = conv_transpose2d_backward(dz, x, w, **kw)
        compare(dx, rx, npd, f"sample {k} {kw} dx")
        compare(dw, rw, npd, f"sample {k} {kw} dw")
        if rb is not None:
            compare(db, rb, npd, f"sample {k} {kw} db")
