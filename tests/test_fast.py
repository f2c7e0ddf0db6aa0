"""convbook.fast: the tiled conv2d and backward against PyTorch with workspaces small enough to force
every tiling (several images per tile, blocks of rows, one row), both im2col layouts (tap-major for
C_in <= SMALL_C, pixel-major above), the pointwise shortcut and the stride-1 input gradient by
convolution; the workspace cap measured with tracemalloc; a deliberately wrong tiling is caught;
tiles shared out to several threads (results, determinism, BLAS at one thread inside, the cap, fork).

Tolerances as everywhere: float64 within 1e-10 of the reference's scale, float32 within 2e-5."""

from __future__ import annotations

import threading
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from threadpoolctl import threadpool_info, threadpool_limits

from convbook import fast
from convbook.conv import conv_spec
from convbook.fast import (
    SMALL_C,
    WORKSPACE_BYTES,
    conv2d_backward_fast,
    conv2d_fast,
    plan_tiles,
)
from conftest import (
    assert_close,
    conv_cases,
    make_layout,
    torch_conv2d,
    torch_conv2d_grads,
)


@st.composite
def fast_cases(draw, dtype=np.float64):
    """A conv_cases problem with C_in from 1 to 9 (both im2col layouts) and a workspace cap from a
    few hundred bytes (a tile of one row) to the default (whole batches)."""
    case = draw(conv_cases(dtype))
    c_in = draw(st.integers(1, 9))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n, h, w_ = case.x.shape[:3]
    x = make_layout(rng, (n, h, w_, c_in), dtype, case.layout)
    w = rng.standard_normal((*case.w.shape[:2], c_in, case.w.shape[3])).astype(dtype)
    cap = draw(st.sampled_from([1, 300, 2_000, 20_000, WORKSPACE_BYTES]))
    input_grad = draw(st.booleans())
    return (
        x,
        w,
        dict(stride=case.stride, padding=case.padding, dilation=case.dilation),
        cap,
        input_grad,
    )


def check_fast(x, w, kwargs, cap, input_grad, dtype, forward=None, backward=None):
    forward, backward = forward or conv2d_fast, backward or conv2d_backward_fast
    x, w, _, spec = conv_spec(x, w, **kwargs)
    y = forward(x, w, spec, cap)
    assert y.dtype == dtype and y.shape == spec.out_shape
    assert_close(y, torch_conv2d(x, w, **kwargs), dtype)
    dy = np.random.default_rng(1).standard_normal(spec.out_shape).astype(dtype)
    dx, dw = backward(dy, x, w, spec, input_grad, cap)
    rx, rw, _ = torch_conv2d_grads(x, w, None, dy, **kwargs)
    assert dw.dtype == dtype
    assert_close(dw, rw, dtype)
    if input_grad:
        assert dx.dtype == dtype
        assert_close(dx, rx, dtype)
    else:
        assert dx is None


@settings(max_examples=300)
@given(case=fast_cases(np.float64))
def test_fast_float64_every_tiling(case):
    check_fast(*case, np.float64)


@given(case=fast_cases(np.float32))
def test_fast_float32_every_tiling(case):
    check_fast(*case, np.float32)


@pytest.mark.parametrize("c_in", [1, SMALL_C, SMALL_C + 1, 16])
@pytest.mark.parametrize("stride", [1, 2])
def test_fast_on_layer_sized_problems(c_in, stride, rng):
    """Bigger than the property tests (several tiles at the default cap, rows split at a small one)."""
    x = rng.standard_normal((5, 23, 19, c_in))
    w = rng.standard_normal((3, 3, c_in, 7))
    for cap in (WORKSPACE_BYTES, 40_000):
        check_fast(x, w, dict(stride=stride, padding=1), cap, True, np.float64)


def test_pointwise_shortcut_and_its_fallbacks(rng):
    """1x1 stride 1 unpadded on C-contiguous arrays is one matmul; padded, strided or non-contiguous
    inputs take the tiled path. All must agree with PyTorch."""
    w = rng.standard_normal((1, 1, 6, 5))
    x = rng.standard_normal((3, 7, 8, 6))
    for xx, kw in [
        (x, {}),
        (x, dict(padding=1)),
        (x, dict(stride=2)),
        (x[:, ::-1], {}),
        (np.asfortranarray(x), {}),
    ]:
        check_fast(xx, w, kw, WORKSPACE_BYTES, True, np.float64)


@pytest.mark.parametrize(
    "layer",
    [
        (64, 28, 28, 32, 3, 1, 1),
        (2, 200, 300, 64, 3, 1, 1),
        (8, 30, 30, 3, 5, 2, 2),
        (1, 9, 4000, 16, 3, 1, 1),
    ],
)
def test_tiles_cover_the_output_once_and_fit_the_cap(layer):
    n, h, w, c, k, stride, pad = layer
    x = np.zeros((n, h, w, c), np.float32)
    wt = np.zeros((k, k, c, 8), np.float32)
    _, _, _, spec = conv_spec(x, wt, stride=stride, padding=pad)
    for cap in (10_000, 1_000_000, WORKSPACE_BYTES):
        covered = np.zeros(spec.out_shape[:2], int)
        for i0, i1, r0, r1 in fast._tiles(spec, cap):
            covered[i0:i1, r0:r1] += 1
        assert (covered == 1).all()
        tile, cols = fast._buffers(spec, cap)
        nb, rb = plan_tiles(spec, cap)
        t1, c1 = fast._buffers(spec, 1)  # a tile of one row
        if (
            2 * t1.nbytes + c1.nbytes <= cap
        ):  # the documented condition (input, its gradient, cols)
            assert tile.nbytes * 2 + cols.nbytes <= cap, (cap, nb, rb)
        else:
            assert (nb, rb) == (1, 1)


def _peak_extra(fn, *result_bytes):
    """Peak bytes traced by tracemalloc during fn() beyond the arrays it returns, after one untimed
    call (which may make the thread pool once: not part of a call's workspace)."""
    fn()
    tracemalloc.start()
    tracemalloc.reset_peak()
    out = fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    returned = sum(
        a.nbytes for a in (out if isinstance(out, tuple) else (out,)) if a is not None
    )
    return peak - returned


def test_workspace_stays_under_the_cap_at_batch_256():
    """The issue's layer: 256 x 56 x 56 x 64 -> 64, 3x3, padding 1, float32. Plain im2col would
    need 256*56*56*9*64*4 bytes = 1.85 GB; the fast forward and backward stay under the cap."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 56, 56, 64), dtype=np.float32)
    w = rng.standard_normal((3, 3, 64, 64), dtype=np.float32)
    _, _, _, spec = conv_spec(x, w, padding=1)
    assert 256 * 56 * 56 * 9 * 64 * 4 > 1.8e9
    fwd = _peak_extra(lambda: conv2d_fast(x, w, spec))
    dy = rng.standard_normal(spec.out_shape, dtype=np.float32)
    bwd = _peak_extra(lambda: conv2d_backward_fast(dy, x, w, spec))
    assert 0 < fwd <= WORKSPACE_BYTES, fwd
    assert 0 < bwd <= WORKSPACE_BYTES, bwd


def test_im2col_memory_grows_with_the_batch_and_fast_does_not():
    """The same measurement is able to see a batch-sized workspace: conv2d(method="im2col")."""
    from convbook import conv2d

    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 3, 16, 16), dtype=np.float32)
    peaks = {}
    for n in (4, 16):
        x = rng.standard_normal((n, 32, 32, 16), dtype=np.float32)
        _, _, _, spec = conv_spec(x, w, padding=1)
        peaks[n] = (
            _peak_extra(lambda: conv2d(x, w, padding=1, method="im2col")),
            _peak_extra(lambda: conv2d_fast(x, w, spec, 100_000)),
        )
    cols16 = 16 * 32 * 32 * 9 * 16 * 4
    assert peaks[16][0] >= cols16 and peaks[16][0] > 3.5 * peaks[4][0]
    assert peaks[16][1] <= 100_000 and peaks[4][1] <= 100_000


def test_a_wrong_tiling_is_caught(monkeypatch):
    """Forget the dilation when computing which input rows a block of output rows reads: right
    for undilated kernels and for whole images, wrong when rows are split. The checks must fail."""

    def input_rows_without_dilation(spec, r0, r1):
        return r0 * spec.stride[0] - spec.padding[0][0], (r1 - r0 - 1) * spec.stride[
            0
        ] + spec.w_shape[0]

    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 12, 9, 3)), rng.standard_normal((3, 3, 3, 2))
    check_fast(
        x, w, dict(dilation=2, padding=2), 2_000, True, np.float64
    )  # the real one passes
    monkeypatch.setattr(fast, "_input_rows", input_rows_without_dilation)
    check_fast(
        x, w, dict(dilation=1, padding=1), 2_000, True, np.float64
    )  # undetectable here
    with pytest.raises((AssertionError, ValueError)):
        check_fast(x, w, dict(dilation=2, padding=2), 2_000, True, np.float64)


# --- tiles on several threads -------------------------------------------------------------------


def _blas_threads():
    return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("c_in", [1, SMALL_C + 1])
@pytest.mark.parametrize("stride", [1, 2])
def test_tiles_on_several_threads_agree_with_pytorch(threads, c_in, stride):
    """Every path (forward, dw, dx by col2im and by convolution) with the tiles shared out to 1, 2 or
    3 threads, on problems big enough for several tiles per thread, rows split or whole images."""
    rng = np.random.default_rng(threads)
    with threadpool_limits(limits=threads, user_api="blas"):
        assert fast.tile_threads() == min(
            threads, fast._cores()
        )  # one per core at most
        for shape in [
            (13, 17, 15, c_in),
            (1, 60, 23, c_in),
        ]:  # whole images; one image in row blocks
            x = rng.standard_normal(shape)
            w = rng.standard_normal((3, 3, c_in, 6))
            for cap in (60_000, WORKSPACE_BYTES):
                check_fast(x, w, dict(stride=stride, padding=1), cap, True, np.float64)
    assert fast.tile_threads() == min(max(_blas_threads()), fast._cores())


def test_parallel_tiles_really_run_on_threads_with_one_blas_thread_each(monkeypatch):
    """The steps run on two threads (the caller and a worker), with BLAS at one thread inside them, and the
    BLAS thread count is restored afterwards; MIN_PARALLEL_BYTES keeps tiny problems in one thread."""
    seen = []
    real = fast._im2col_tile

    def spy(*args):
        seen.append((threading.get_ident(), max(_blas_threads())))
        return real(*args)

    monkeypatch.setattr(fast, "_im2col_tile", spy)
    x = np.random.default_rng(0).standard_normal((32, 20, 20, 8)).astype(np.float32)
    w = np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)
    _, _, _, spec = conv_spec(x, w, padding=1)
    with threadpool_limits(limits=2, user_api="blas"):
        fast.conv2d_fast(x, w, spec)
        assert max(_blas_threads()) == 2
        workers = {ident for ident, _ in seen}
        assert (
            threading.get_ident() in workers and len(workers) == 2
        )  # the caller and one more
        assert {blas for _, blas in seen} == {1}
        seen.clear()
        fast.conv2d_fast(
            x[:1, :4], w, conv_spec(x[:1, :4], w, padding=1)[3]
        )  # tiny: here
        assert {ident for ident, _ in seen} == {threading.get_ident()}
        seen.clear()
        monkeypatch.setattr(fast, "PARALLEL_TILES", False)
        assert fast.tile_threads() == 1
        fast.conv2d_fast(x, w, spec)
        assert {ident for ident, _ in seen} == {threading.get_ident()}


def test_parallel_backward_is_deterministic_and_equals_one_thread():
    """dw sums per-thread partial sums in a fixed order: the same bits on every run (training
    reproducibility depends on it); equal to the one-thread result up to rounding."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((48, 14, 14, 8)).astype(np.float32)
    w = rng.standard_normal((3, 3, 8, 16)).astype(np.float32)
    _, _, _, spec = conv_spec(x, w, padding=1)
    dy = rng.standard_normal(spec.out_shape).astype(np.float32)
    with threadpool_limits(limits=2, user_api="blas"):
        runs = [conv2d_backward_fast(dy, x, w, spec) for _ in range(4)]
    for dx, dw in runs[1:]:
        assert np.array_equal(dx, runs[0][0]) and np.array_equal(dw, runs[0][1])
    with threadpool_limits(limits=1, user_api="blas"):
        dx1, dw1 = conv2d_backward_fast(dy, x, w, spec)
    assert_close(runs[0][1], dw1, np.float32) and assert_close(
        runs[0][0], dx1, np.float32
    )


def test_row_blocks_of_one_image_stay_in_one_thread_when_they_add_into_shared_rows(
    monkeypatch,
):
    """col2im adds each tile's rows into dx, and neighbouring row blocks share halo rows: with
    by_image the threads' shares are cut between images, so no two threads add into the same rows;
    without it, between any tiles. Every tile is run exactly once either way."""
    x = np.zeros((5, 50, 9, 2), np.float32)
    w = np.zeros((3, 3, 2, 4), np.float32)
    _, _, _, spec = conv_spec(x, w, padding=1)
    cap = 3_000  # several row blocks per image
    nb, rb = plan_tiles(spec, cap)
    assert rb < spec.out_shape[1]
    assert fast._group_count(spec, cap, True) == (-(-5 // nb), -(-50 // rb))
    for by_image in (True, False):
        for threads in (2, 3):
            seen = []
            fast._in_threads(
                spec,
                cap,
                threads,
                by_image,
                lambda: [],
                lambda state, tile: (state.append(tile), seen.append(tile)),
            )
            assert sorted(seen) == sorted(fast._tiles(spec, cap))  # each tile once
            states = fast._in_threads(
                spec,
                cap,
                threads,
                by_image,
                lambda: [],
                lambda state, tile: state.append(tile),
            )
            images = [{t[0] for t in state} for state in states]
            if by_image:
                assert all(
                    not (a & b) for k, a in enumerate(images) for b in images[k + 1 :]
                )
    rows_split = [
        {t[0] for t in s}
        for s in fast._in_threads(
            spec, cap, 2, False, lambda: [], lambda st, t: st.append(t)
        )
    ]
    assert rows_split[0] & rows_split[1], (
        "without by_image an image is split: the check can fail"
    )


def test_workspace_with_two_threads_stays_under_the_cap():
    """Each of T threads gets cap / T bytes, so the total stays under the cap (tracemalloc sees the
    workers' arrays too)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 56, 56, 64), dtype=np.float32)
    w = rng.standard_normal((3, 3, 64, 64), dtype=np.float32)
    _, _, _, spec = conv_spec(x, w, padding=1)
    dy = rng.standard_normal(spec.out_shape, dtype=np.float32)
    with threadpool_limits(limits=2, user_api="blas"):
        assert fast.tile_threads() == 2
        fwd = _peak_extra(lambda: conv2d_fast(x, w, spec))
        bwd = _peak_extra(lambda: conv2d_backward_fast(dy, x, w, spec))
    assert WORKSPACE_BYTES / 4 < fwd <= WORKSPACE_BYTES, fwd
    assert 0 < bwd <= WORKSPACE_BYTES, bwd


def _conv_in_child(queue):
    x = np.ones((16, 20, 20, 8), np.float32)
    w = np.ones((3, 3, 8, 4), np.float32)
    queue.put(float(fast.conv2d_fast(x, w, conv_spec(x, w)[3]).sum()))


def test_a_forked_child_can_use_the_tiles_after_the_parent_did():
    """The parent's worker threads do not exist in a forked child: the pool is made afresh there
    instead of waiting forever for threads that are gone."""
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    with threadpool_limits(limits=2, user_api="blas"):
        x = np.ones((16, 20, 20, 8), np.float32)
        w = np.ones((3, 3, 8, 4), np.float32)
        expected = float(
            fast.conv2d_fast(x, w, conv_spec(x, w)[3]).sum()
        )  # the pool now exists
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_conv_in_child, args=(queue,))
        child.start()
        child.join(60)
        assert child.exitcode == 0, "the child hung or failed"
        assert queue.get(timeout=5) == expected
