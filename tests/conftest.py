"""Shared test helpers: PyTorch references and hypothesis strategies for convolution problems.

PyTorch is the independent reference. NHWC/HWIO arrays are converted at the edge with the package's
named converters, whose index mapping is itself checked in test_conv2d.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from convbook import hwio_to_oihw, nchw_to_nhwc, nhwc_to_nchw

settings.register_profile(
    "default",
    max_examples=150,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    parent=settings.get_profile("default"),
    max_examples=2000,
    derandomize=False,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
torch.set_num_threads(1)

# Tolerances. float64: both libraries add the same O(100) products of O(1) numbers in different orders,
# so they agree to ~1e-14; 1e-10 leaves room and still catches any real bug. float32: rounding grows with
# the number of terms; we bound the error relative to the output's scale.
F64_TOL = 1e-10
F32_REL = 2e-5


def assert_close(actual: np.ndarray, expected: np.ndarray, dtype) -> None:
    """Shapes equal and max |actual - expected| within the dtype's tolerance (see above)."""
    assert actual.shape == expected.shape, (
        f"shape {actual.shape} != expected {expected.shape}"
    )
    scale = 1.0 + float(np.abs(expected).max(initial=0.0))
    tol = F64_TOL * scale if np.dtype(dtype) == np.float64 else F32_REL * scale
    err = float(
        np.abs(actual.astype(np.float64) - expected.astype(np.float64)).max(initial=0.0)
    )
    assert err <= tol, f"max abs error {err:.3g} > tolerance {tol:.3g}"


def to_t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(
        np.array(a, order="C", copy=True)
    )  # fresh strides: torch refuses negative ones


def torch_pad_conv_input(x: np.ndarray, padding) -> tuple[torch.Tensor, object]:
    """NCHW tensor of x, and the padding argument to give F.conv2d (explicit pads applied with F.pad)."""
    tx = to_t(nhwc_to_nchw(x))
    if isinstance(padding, tuple) and isinstance(padding[0], tuple):
        (t, b), (l, r) = padding
        return F.pad(tx, (l, r, t, b)), 0
    return tx, padding


def torch_conv2d(x, w, b=None, *, stride=1, padding=0, dilation=1) -> np.ndarray:
    """torch.nn.functional.conv2d on NHWC x and HWIO w; NHWC NumPy output."""
    tx, pad = torch_pad_conv_input(x, padding)
    y = F.conv2d(
        tx,
        to_t(hwio_to_oihw(w)),
        None if b is None else to_t(b),
        stride=stride,
        padding=pad,
        dilation=dilation,
    )
    return nchw_to_nhwc(y.numpy())


@dataclass
class ConvCase:
    """One random convolution problem."""

    x: np.ndarray
    w: np.ndarray
    b: np.ndarray | None
    stride: object
    padding: object
    dilation: object
    layout: str

    @property
    def kwargs(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation)


def make_layout(rng: np.random.Generator, shape, dtype, layout: str) -> np.ndarray:
    """A standard-normal NHWC array of `shape` and `dtype` with the requested memory layout."""
    n, h, w, c = shape
    normal = lambda s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    a = {
        "contiguous": lambda: normal(shape),
        "nchw": lambda: normal((n, c, h, w)).transpose(
            0, 2, 3, 1
        ),  # NCHW buffer seen as NHWC
        "strided": lambda: normal((n, 2 * h, 2 * w + 1, c))[
            :, ::2, 1::2, :
        ],  # every other row/column
        "flipped": lambda: normal(shape)[:, ::-1, ::-1, :],  # negative strides
        "fortran": lambda: np.asfortranarray(normal(shape)),
    }[layout]()
    assert a.shape == tuple(shape) and a.dtype == dtype
    return a


LAYOUTS = ["contiguous", "nchw", "strided", "flipped", "fortran"]


@st.composite
def conv_cases(
    draw,
    dtype=np.float64,
    allow_same=True,
    max_hw=11,
    kernel=None,
    stride=None,
    dilation=None,
):
    """Random valid conv2d problems: shapes, stride, padding (all forms), dilation, layouts.
    `kernel`, `stride`, `dilation` fix those (a method's domain, see DOMAINS)."""
    n, c_in, c_out = (
        draw(st.integers(1, 3)),
        draw(st.integers(1, 4)),
        draw(st.integers(1, 4)),
    )
    kh, kw = (
        (kernel, kernel)
        if kernel
        else (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    )
    if stride is None:
        stride = draw(
            st.one_of(
                st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3))
            )
        )
    if dilation is None:
        dilation = draw(
            st.one_of(
                st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3))
            )
        )
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    forms = ["int", "pair", "explicit", "valid"] + (
        ["same"] if allow_same and (sh, sw) == (1, 1) else []
    )
    form = draw(st.sampled_from(forms))
    if form == "int":
        p = draw(st.integers(0, 3))
        padding, pads = p, ((p, p), (p, p))
    elif form == "pair":
        ph, pw = draw(st.integers(0, 3)), draw(st.integers(0, 3))
        padding, pads = (ph, pw), ((ph, ph), (pw, pw))
    elif form == "explicit":
        pads = tuple(tuple(draw(st.integers(0, 3)) for _ in range(2)) for _ in range(2))
        padding = pads
    elif form == "valid":
        padding, pads = "valid", ((0, 0), (0, 0))
    else:
        padding = "same"
        pads = tuple((t // 2, t - t // 2) for t in (dh * (kh - 1), dw * (kw - 1)))
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    h = draw(
        st.integers(
            max(1, span_h - sum(pads[0])), max(1, span_h - sum(pads[0])) + max_hw
        )
    )
    w_ = draw(
        st.integers(
            max(1, span_w - sum(pads[1])), max(1, span_w - sum(pads[1])) + max_hw
        )
    )
    layout = draw(st.sampled_from(LAYOUTS))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = make_layout(rng, (n, h, w_, c_in), dtype, layout)
    wt = rng.standard_normal((kh, kw, c_in, c_out)).astype(dtype)
    b = rng.standard_normal(c_out).astype(dtype) if draw(st.booleans()) else None
    return ConvCase(x, wt, b, stride, padding, dilation, layout)


@st.composite
def pool_cases(draw, infinities: bool = False):
    """Random pooling problems `(x, kernel, stride, padding)` with PyTorch's rules: stride None or
    not, padding at most half the kernel, ties (rounded values) and, if asked, -inf inputs."""
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = draw(
        st.one_of(
            st.none(),
            st.integers(1, 3),
            st.tuples(st.integers(1, 3), st.integers(1, 3)),
        )
    )
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    h = draw(st.integers(max(1, kh - 2 * ph), max(1, kh - 2 * ph) + 8))
    w = draw(st.integers(max(1, kw - 2 * pw), max(1, kw - 2 * pw) + 8))
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = make_layout(rng, (n, h, w, c), dtype, draw(st.sampled_from(LAYOUTS)))
    kind = draw(
        st.sampled_from(
            ["random", "ties", "-inf"] if infinities else ["random", "ties"]
        )
    )
    if kind == "ties":
        x = np.round(x * 2) / 2  # many ties: the first maximum must win
    elif kind == "-inf":
        x = np.where(rng.random(x.shape) < 0.6, -np.inf, x).astype(dtype)
        x[0, : h // 2] = -np.inf  # whole windows of -inf next to the padding
    padding = (ph, pw) if draw(st.booleans()) or ph != pw else ph
    return x, (kh, kw), stride, padding


# ---------------------------------------------------------------------------------------------------
# The real EMNIST files. A few tests read the official files (checksums, orientation, the sample's
# provenance). They find them the way the package does, in an explicit folder: `--emnist-data DIR`, else
# `$CONVBOOK_DATA`. Where the files are absent those tests are skipped with a reason that says how to get
# them; `--require-emnist` (what CI passes) turns the absence into a failure, so CI runs every one.

EMNIST_FILES = (
    "emnist-bymerge-test-images-idx3-ubyte.gz",
    "emnist-bymerge-test-labels-idx1-ubyte.gz",
    "emnist-mnist-test-images-idx3-ubyte.gz",
    "emnist-mnist-test-labels-idx1-ubyte.gz",
    "emnist-balanced-test-labels-idx1-ubyte.gz",
    "emnist-letters-test-labels-idx1-ubyte.gz",
    "emnist-byclass-test-labels-idx1-ubyte.gz",
)
EMNIST_HOWTO = (
    "download the official archive https://biometrics.nist.gov/cs_links/EMNIST/gzip.zip, unzip it, and "
    "run pytest with --emnist-data DIR (or set $CONVBOOK_DATA=DIR), DIR holding the gzip/ files"
)


def pytest_addoption(parser):
    group = parser.getgroup("convbook")
    group.addoption(
        "--emnist-data",
        metavar="DIR",
        default=None,
        help="folder with the official EMNIST files (default: $CONVBOOK_DATA)",
    )
    group.addoption(
        "--require-emnist",
        action="store_true",
        default=False,
        help="fail, instead of skipping, the tests that need the official EMNIST files "
        "when they are not found (CI sets this)",
    )


def _emnist_folder(config) -> tuple[Path | None, str]:
    """The folder with every file in EMNIST_FILES (flat or under gzip/), or None and why not."""
    given = config.getoption("--emnist-data") or os.environ.get("CONVBOOK_DATA")
    if not given:
        return None, "no folder given (--emnist-data or $CONVBOOK_DATA)"
    folder = Path(given).expanduser().resolve()
    for candidate in (folder, folder / "gzip"):
        if all((candidate / name).is_file() for name in EMNIST_FILES):
            return candidate, ""
    missing = [
        n
        for n in EMNIST_FILES
        if not (folder / n).is_file() and not (folder / "gzip" / n).is_file()
    ]
    return None, f"{folder} lacks {', '.join(missing)}"


@pytest.fixture(scope="session")
def emnist_dir(request) -> Path:
    """The folder of official EMNIST files; skipped (or, with --require-emnist, failed) when absent."""
    folder, why = _emnist_folder(request.config)
    if folder is None:
        message = f"needs the official EMNIST files: {why}; to run it, {EMNIST_HOWTO}"
        if request.config.getoption("--require-emnist"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return folder


# The domains of the methods that do not solve every problem (chapter 9's), as fixed parameters of
# conv_cases, so that their property tests draw only problems they solve.
# test_domains_match_the_registry checks that this table and the registry agree.
DOMAINS = {
    "winograd": dict(kernel=3, stride=1, dilation=1),
    "winograd4": dict(kernel=3, stride=1, dilation=1),
    "fft": dict(stride=1),
    "dilated": dict(stride=1),
}


def cases_for(method: str, dtype=np.float64, **kw):
    """conv_cases restricted to `method`'s domain."""
    return conv_cases(dtype, **kw, **DOMAINS.get(method, {}))


def general_methods(registry) -> list[str]:
    """The registered methods that solve every problem (no `supports` test)."""
    return [m for m in registry.names() if m not in registry._supports]


def require_support(registry, method: str, x, w, **kw) -> None:
    """Leave out a (method, problem) pair that the method declares outside its domain
    (`supports(spec)` of its registration, e.g. Winograd takes only 3x3 stride-1 kernels):
    `hypothesis.assume` inside a property test, a skip with the reason elsewhere. Its own
    tests cover that method on its domain; "auto" solves every problem."""
    from hypothesis import assume
    from hypothesis.control import currently_in_test_context

    from convbook.conv import conv_spec

    kw = {
        k: v for k, v in kw.items() if k in ("stride", "padding", "dilation", "groups")
    }
    if registry.supports(method, conv_spec(x, w, **kw)[3]):
        return
    if currently_in_test_context():
        assume(False)
    pytest.skip(
        f"method {method!r} does not solve this problem (its own tests cover its domain)"
    )


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def torch_conv2d_grads(x, w, b, dy, *, stride=1, padding=0, dilation=1):
    """(dx, dw, db) of conv2d by PyTorch autograd, for NHWC x, HWIO w, NHWC dy (float64 or float32)."""
    tx = to_t(nhwc_to_nchw(x)).requires_grad_()
    tw = to_t(hwio_to_oihw(w)).requires_grad_()
    tb = to_t(np.zeros(w.shape[3], dtype=x.dtype) if b is None else b).requires_grad_()
    if isinstance(padding, tuple) and isinstance(padding[0], tuple):
        (t, bo), (l, r) = padding
        inp, pad = F.pad(tx, (l, r, t, bo)), 0
    else:
        inp, pad = tx, padding
    y = F.conv2d(inp, tw, tb, stride=stride, padding=pad, dilation=dilation)
    y.backward(to_t(nhwc_to_nchw(dy)))
    return (
        nchw_to_nhwc(tx.grad.numpy()),
        tw.grad.numpy().transpose(2, 3, 1, 0),
        tb.grad.numpy(),
    )


def numerical_grad(f, a: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central finite differences of the scalar function f at every entry of float64 `a`."""
    g = np.zeros_like(a)
    it = np.nditer(a, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = a[i]
        a[i] = old + h
        fp = f()
        a[i] = old - h
        fm = f()
        a[i] = old
        g[i] = (fp - fm) / (2 * h)
    return g
