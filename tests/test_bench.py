"""convbook.bench: the report's structure and arithmetic on a tiny suite, PyTorch's two layouts (the
same problem in NCHW and channels_last, the faster one as the reference), the timing helpers against
known sleep durations, the training-step benchmark (its PyTorch twin computes what our network
computes), the command line (table, JSON, plot, output paths checked before any work, argument errors,
--version). Speed itself is never asserted here: the benchmark measures it and chapter 8 reports it."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_info

import convbook
from convbook import bench
from convbook.backward import conv2d_backward, conv2d_backward_methods
from convbook.conv import conv2d, conv2d_methods
from convbook.layers import (
    Conv2d,
    Dropout,
    Flatten,
    Linear,
    MaxPool2d,
    ReLU,
    Sequential,
)
from convbook.train import emnist_cnn
from conftest import assert_close, torch_conv2d

TINY = [
    bench.Layer("tiny 3x3", 2, 9, 9, 3, 4, 3, padding=1),
    bench.Layer(
        "tiny strided dilated", 1, 12, 10, 2, 3, 3, stride=2, padding=2, dilation=2
    ),
]


def thread_counts():
    return torch.get_num_threads(), [
        p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"
    ]


@pytest.fixture
def restore_threads():
    torch_threads, blas = thread_counts()
    yield
    torch.set_num_threads(torch_threads)
    from threadpoolctl import threadpool_limits

    if blas:
        threadpool_limits(limits=blas[0], user_api="blas")


def test_layer_arithmetic_matches_a_real_convolution():
    for layer in bench.SUITE + TINY:
        x = np.zeros((layer.n, layer.h, layer.w, layer.c_in), np.float32)
        w = np.zeros((layer.k, layer.k, layer.c_in, layer.c_out), np.float32)
        if layer.n * layer.h * layer.w > 300_000:
            x = x[:1]
        y = torch.nn.functional.conv2d(
            torch.from_numpy(x.transpose(0, 3, 1, 2)),
            torch.from_numpy(w.transpose(3, 2, 0, 1)),
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
        )
        assert tuple(y.shape[2:]) == layer.out_hw, layer
        ho, wo = layer.out_hw
        assert (
            layer.flops == 2 * layer.n * ho * wo * layer.k**2 * layer.c_in * layer.c_out
        )


def test_suite_covers_what_the_benchmark_promises():
    s = bench.SUITE
    assert {1, 3} <= {l.c_in for l in s}
    assert (
        any(l.stride == 2 for l in s)
        and any(l.dilation > 1 for l in s)
        and any(l.k == 1 for l in s)
    )
    assert any(l.k == 5 and l.padding == 2 for l in s)
    assert any(l.n == 1 for l in s) and any(l.n >= 64 for l in s)
    assert any(l.k == 3 and 32 <= l.c_in <= 128 and 14 <= l.h <= 56 for l in s)


@pytest.mark.parametrize("layer", TINY + [bench.SUITE[0]])
def test_pytorch_gets_the_same_problem_in_both_layouts(layer):
    """The tensors PyTorch is timed on hold our x, w, dy; channels_last ones really are channels_last
    (the same byte order as our NHWC arrays), NCHW ones contiguous; both give our convolution."""
    x, w, dy, geom, calls = bench._problem(layer, np.random.default_rng(0))
    assert set(calls) == set(bench.LAYOUTS) == {"nchw", "channels_last"}
    ref = torch_conv2d(x, w, **geom)
    for layout in bench.LAYOUTS:
        tx, tw, tdy = bench._torch_tensors(x, w, dy, layout)
        cl = layout == "channels_last"
        for t in (tx, tw, tdy):
            assert t.is_contiguous(
                memory_format=torch.channels_last if cl else torch.contiguous_format
            )
        if cl and layer.c_in > 1:
            assert not tx.is_contiguous()
        n, h, w_, c = x.shape
        if cl:  # channels_last bytes are NHWC: the strides of our array, in elements
            assert tx.stride() == (h * w_ * c, 1, w_ * c, c)
        y = F.conv2d(tx, tw, **geom).detach().permute(0, 2, 3, 1).numpy()
        assert_close(y, ref, np.float32)


def test_the_faster_layout_is_the_reference_and_both_are_kept():
    """_head_row takes PyTorch's faster layout per pass; a version that always took NCHW is caught."""
    layer = TINY[0]
    head = {
        "nchw": 2.0,
        "channels_last": 1.0,
        "auto": 3.0,
        "nchw_fb": 5.0,
        "channels_last_fb": 6.0,
        "auto_fb": 10.0,
    }

    def check(make_row):
        row = make_row(layer, head)
        assert row["torch_forward"] == 1.0 and row["torch_fwdbwd"] == 5.0
        assert row["torch_layout"] == {"forward": "channels_last", "fwdbwd": "nchw"}
        assert row["torch"]["nchw"] == {"forward": 2.0, "fwdbwd": 5.0}
        assert row["torch"]["channels_last"] == {"forward": 1.0, "fwdbwd": 6.0}
        s, n = bench._summary([row]), bench._summary([row], "nchw")
        assert math.isclose(s["forward_geomean"], 3.0) and math.isclose(
            n["forward_geomean"], 1.5
        )
        assert s["fwdbwd_worst"] == 2.0 and n["fwdbwd_worst"] == 2.0

    check(bench._head_row)

    def always_nchw(layer, head):
        row = bench._head_row(layer, head)
        row.update(
            torch_forward=head["nchw"],
            torch_layout={"forward": "nchw", "fwdbwd": "nchw"},
        )
        return row

    with pytest.raises(AssertionError):
        check(always_nchw)


def test_timing_helpers_measure_what_they_run():
    """Sleeps are never shorter than asked, so lower bounds are certain; a 1 ms sleep timed as slower
    than a 20 ms one would need a twenty-fold disturbance."""
    fast, slow = (lambda: time.sleep(0.001)), (lambda: time.sleep(0.02))
    t = bench._interleaved({"fast": fast, "slow": slow}, repeat=6, budget=5.0)
    assert list(t) == ["fast", "slow"]
    assert t["fast"] >= 0.001 and t["slow"] >= 0.02 and t["fast"] < t["slow"]
    m = bench._median_time(slow, repeat=3, budget=5.0)
    assert 0.02 <= m < 1.0
    med = bench.interleaved_medians(
        {"slow": slow, "fast": fast}, repeat=4, rounds=2, threads=1
    )
    assert list(med) == ["slow", "fast"] and med["slow"] >= 0.02


def test_timing_helpers_reject_bad_arguments():
    with pytest.raises(ValueError, match="fns"):
        bench.interleaved_medians({})
    with pytest.raises(ValueError, match="repeat"):
        bench.interleaved_medians({"a": lambda: None}, repeat=0)
    for bad in (0, 1.5, True, "2"):
        with pytest.raises(ValueError, match="threads"):
            with bench.pinned_threads(bad):
                pass


def test_pinned_threads_pins_both_libraries_and_restores_them(restore_threads):
    before = thread_counts()
    with bench.pinned_threads(1) as note:
        assert thread_counts()[0] == 1 and set(thread_counts()[1]) == {1}
        assert "1 threads" in note
    assert thread_counts() == before


def test_run_report_on_a_tiny_suite(restore_threads):
    lines = []
    before = thread_counts()
    report = bench.run(
        TINY, threads=1, repeat=2, budget=0.5, methods="all", progress=lines.append
    )
    assert thread_counts() == before, "run must restore the thread counts it pinned"
    assert json.loads(json.dumps(report)) == report  # JSON-ready
    assert report["threads"]["torch"] == 1 and "1 threads" in report["threads"]["blas"]
    assert report["peak_gflops"] > 0 and report["bandwidth_gbs"] > 0
    assert len(report["layers"]) == len(TINY) == len(lines)
    for row, layer in zip(report["layers"], TINY):
        assert row["layer"]["name"] == layer.name and row["flops"] == layer.flops
        assert set(row["forward"]) == {"auto", *conv2d_methods()}
        assert set(row["fwdbwd"]) == {"auto", *conv2d_backward_methods()}
        for kind in ("forward", "fwdbwd"):
            both = {lay: row["torch"][lay][kind] for lay in bench.LAYOUTS}
            assert row[f"torch_{kind}"] == min(both.values())
            assert both[row["torch_layout"][kind]] == min(both.values())
        assert row["forward"]["auto"] > 0 and row["fwdbwd"]["auto"] > 0
        assert row["torch_forward"] > 0 and row["torch_fwdbwd"] > 0
        x, w, dy, geom, _ = bench._problem(layer, np.random.default_rng(0))
        for m, t in row[
            "forward"
        ].items():  # None only where the method refuses the layer
            if t is None:
                with pytest.raises(ValueError):
                    conv2d(x, w, **geom, method=m)
            else:
                assert t > 0
        for m, t in row["fwdbwd"].items():
            if t is None:
                with pytest.raises(ValueError):
                    conv2d_backward(dy, x, w, **geom, method=m)
            else:
                assert t > 0
    for key, against in (("summary", None), ("summary_nchw", "nchw")):
        ref = [
            r["torch_forward"] if against is None else r["torch"]["nchw"]["forward"]
            for r in report["layers"]
        ]
        ratios = [r["forward"]["auto"] / t for r, t in zip(report["layers"], ref)]
        assert math.isclose(
            report[key]["forward_geomean"], math.exp(np.mean(np.log(ratios)))
        )
        assert math.isclose(report[key]["forward_worst"], max(ratios))
    text = bench.table(report)
    for name in (
        [layer.name for layer in TINY] + conv2d_methods() + conv2d_backward_methods()
    ):
        assert name in text
    assert "geometric mean" in text and "threads: PyTorch 1" in text and "NCHW" in text
    assert "ch-last" in text and "against NCHW only" in text
    assert max(len(line) for line in text.splitlines()) <= 88


def test_plot_draws_both_panels(restore_threads):
    import matplotlib

    matplotlib.use("Agg")
    report = bench.run(
        TINY, threads=1, repeat=1, budget=0.2, methods="auto", progress=lambda s: None
    )
    fig = bench.plot(report)
    ratio_ax, roof_ax = fig.axes
    labels = [t.get_text() for t in ratio_ax.get_yticklabels()]
    assert labels == [f"{k + 1}. {layer.name}" for k, layer in enumerate(TINY)]
    numbers = {t.get_text() for t in roof_ax.texts}
    assert numbers == {str(k + 1) for k in range(len(TINY))}, (
        "every roofline point is numbered"
    )
    for ax in fig.axes:  # legends sit above the axes, not over the data
        box = ax.get_legend().get_window_extent(fig.canvas.get_renderer())
        assert box.y0 >= ax.get_window_extent(fig.canvas.get_renderer()).y1 - 1


def test_command_line_writes_table_json_and_plot(
    monkeypatch, tmp_path, capsys, restore_threads
):
    monkeypatch.setattr(bench, "SUITE", TINY[:1])
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    assert (
        bench.main(
            [
                "--methods",
                "auto",
                "--threads",
                "1",
                "--repeat",
                "2",
                "--json",
                str(out_json),
                "--plot",
                str(out_png),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "tiny 3x3" in printed and str(out_json) in printed
    report = json.loads(out_json.read_text())
    assert set(report["layers"][0]["forward"]) == {"auto"}
    assert set(report["layers"][0]["torch"]) == {"nchw", "channels_last"}
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args", [["--threads", "0"], ["--repeat", "0"], ["--methods", "some"]]
)
def test_command_line_rejects_bad_arguments(args, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(args)
    assert e.value.code == 2 and args[0] in capsys.readouterr().err


def _fail_if_run(*args, **kwargs):
    raise AssertionError("the benchmark started although an output path was bad")


@pytest.mark.parametrize("option", ["--json", "--plot"])
@pytest.mark.parametrize(
    "where,why",
    [
        ("missing/out.file", "does not exist"),  # a folder that is not there
        ("a-file/out.file", "does not exist"),  # the 'folder' is a file
        ("a-folder", "is a folder"),  # the path is a folder
    ],
)
def test_output_paths_are_checked_before_any_work(
    option, where, why, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(bench, "run", _fail_if_run)
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-folder").mkdir()
    other = "--plot" if option == "--json" else "--json"
    with pytest.raises(SystemExit) as e:
        bench.main([option, str(tmp_path / where), other, str(tmp_path / "fine.out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and option in err and why in err, err
    assert not (tmp_path / "fine.out").exists(), "the check must not leave files behind"


def test_an_unwritable_output_is_reported_before_any_work(
    tmp_path, monkeypatch, capsys
):
    """Permissions cannot be taken away from root, so the probe's open() is made to fail as it would
    for a read-only folder; the check, not the writing at the end, must report it."""
    monkeypatch.setattr(bench, "run", _fail_if_run)

    def read_only(path, mode="r", *args, **kwargs):
        if "a" in mode or "w" in mode:
            raise PermissionError(13, "Permission denied", str(path))
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(bench, "open", read_only, raising=False)
    with pytest.raises(SystemExit) as e:
        bench.main(["--json", str(tmp_path / "out.json"), "--plot", ""])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--json" in err and "Permission denied" in err


def test_an_empty_json_path_is_rejected_and_an_empty_plot_path_means_no_plot(
    monkeypatch, tmp_path, capsys, restore_threads
):
    monkeypatch.setattr(bench, "run", _fail_if_run)
    with pytest.raises(SystemExit) as e:
        bench.main(["--json", ""])
    assert e.value.code == 2 and "--json" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setattr(bench, "SUITE", TINY[:1])
    monkeypatch.chdir(tmp_path)
    assert (
        bench.main(
            ["--methods", "auto", "--threads", "1", "--repeat", "1", "--plot", ""]
        )
        == 0
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["convbook-bench.json"]


def test_version_option_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.split() == [
        "python",
        "-m",
        "convbook.bench",
        convbook.__version__,
    ]


def _small_net(rng):
    return Sequential(
        Conv2d(2, 4, 3, padding=1, input_grad=False, rng=rng),
        MaxPool2d(2),
        ReLU(),
        Conv2d(4, 6, 3, stride=2, padding=1, rng=rng),
        Flatten(),
        Linear(6 * 2 * 3, 5, rng=rng),
        ReLU(),
        Dropout(0.3, rng=rng),
        Linear(5, 3, rng=rng),
    )


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_torch_twin_computes_what_our_network_computes(layout):
    """Logits (evaluation mode) and every parameter gradient of the twin equal ours; the Linear after
    Flatten needs its rows permuted from our (H, W, C) order to PyTorch's (C, H, W)."""
    rng = np.random.default_rng(0)
    for net, x in [
        (_small_net(rng), rng.standard_normal((3, 8, 12, 2), dtype=np.float32)),
        (emnist_cnn(47, seed=1), rng.standard_normal((2, 28, 28, 1), dtype=np.float32)),
    ]:
        twin = bench.torch_twin(net, x, layout)
        if layout == "channels_last":
            assert twin[0].weight.is_contiguous(memory_format=torch.channels_last)
        bench._check_twin(net, twin, x, layout)  # raises if the logits differ
        net.eval(), twin.eval()
        dlogits = rng.standard_normal(net.forward(x).shape, dtype=np.float32)
        net.backward(dlogits)
        tx = bench._to_torch(x, layout)
        twin(tx).backward(torch.from_numpy(dlogits))
        ours = net.gradients()
        for k, (layer, module) in enumerate(zip(net.layers, twin)):
            if not layer.params:
                continue
            tw, tb = module.weight.grad.numpy(), module.bias.grad.numpy()
            assert_close(ours[f"{k}.b"], tb, np.float32)
            if isinstance(layer, Conv2d):
                assert_close(ours[f"{k}.w"], tw.transpose(2, 3, 1, 0), np.float32)
            elif k > 0 and isinstance(net.layers[k - 1], Flatten):
                hwc = bench._layer_inputs(net, x)[k - 1].shape[1:]
                to_torch = bench._twin_weighted(torch, "Linear", layer.config(), hwc)[1]
                assert_close(to_torch(ours[f"{k}.w"]), tw, np.float32)
            else:
                assert_close(ours[f"{k}.w"], tw.T, np.float32)


def test_a_twin_without_the_flatten_permutation_is_caught(monkeypatch):
    rng = np.random.default_rng(0)
    net, x = _small_net(rng), rng.standard_normal((3, 8, 12, 2), dtype=np.float32)
    bench._check_twin(net, bench.torch_twin(net, x), x, "nchw")
    real = bench._twin_layer
    monkeypatch.setattr(bench, "_twin_layer", lambda layer, flat: real(layer, None))
    with pytest.raises(RuntimeError, match="differs"):
        bench._check_twin(net, bench.torch_twin(net, x), x, "nchw")


def test_torch_twin_refuses_layers_it_does_not_know():
    class Odd(ReLU):
        pass

    net = Sequential(Odd())
    with pytest.raises(TypeError, match="Odd"):
        bench.torch_twin(net, np.zeros((1, 2, 2, 1), np.float32))


def test_run_train_step_report(restore_threads):
    lines = []
    before = thread_counts()
    report = bench.run_train_step(
        threads=(1,), batch=4, repeat=1, rounds=1, budget=5.0, progress=lines.append
    )
    assert thread_counts() == before
    assert json.loads(json.dumps(report)) == report
    (run,) = report["runs"]
    assert run["threads"] == run["torch_threads"] == 1 and "1 threads" in run["blas"]
    assert set(run["step"]) == {"numpy", "nchw", "channels_last"}
    for side in run["step"].values():
        assert set(side) == {"forward", "backward", "optimizer", "total"}
        assert all(v > 0 for v in side.values())
    net = emnist_cnn(47)
    assert [r["name"].split()[1] for r in run["layers"]] == [
        type(l).__name__ for l in net.layers
    ]
    for row in run["layers"]:
        assert set(row) == {"name", "numpy", "nchw", "channels_last"}
    best = min(bench.LAYOUTS, key=lambda k: run["step"][k]["total"])
    assert run["step_layout"] == best
    assert math.isclose(
        run["ratio"], run["step"]["numpy"]["total"] / run["step"][best]["total"]
    )
    assert len(lines) == 1 and "ratio" in lines[0]
    text = bench.train_step_table(report)
    assert "whole step" in text and " 0 Conv2d 1->32 3x3" in text
    assert max(len(line) for line in text.splitlines()) <= 88
    with pytest.raises(ValueError, match="batch"):
        bench.run_train_step(batch=0)


def _blas_threads() -> list[int]:
    return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]


def test_a_pin_holds_after_another_thread_pinned_or_tiled():
    """OpenBLAS's thread pool is shared by the process, and threadpoolctl lets one thread
    at a time set its size. nbdev-test runs each notebook's cells in a thread of its own,
    which stays alive: a pin or a tiled conv2d in one of them must hand control back, or
    a later `pinned_threads(1)` from another thread silently leaves BLAS on every core
    (the chapter-8 workspace measurement then saw two threads' tiles)."""
    import threading

    import convbook.fast as fast

    if fast._cores() < 2 or max(_blas_threads(), default=1) < 2:
        pytest.skip("needs 2 cores and an OpenBLAS that may use 2 threads")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 16, 16, 16)).astype(np.float32)
    w = rng.standard_normal((3, 3, 16, 16)).astype(np.float32)
    ran, finish = threading.Event(), threading.Event()

    def other_notebook():
        with bench.pinned_threads(2):
            assert fast.tile_threads() == 2  # the tiles are shared out to 2 threads
            conv2d(x, w, padding=1, method="fast")
        conv2d(x, w, padding=1, method="fast")
        ran.set()
        finish.wait(60)

    thread = threading.Thread(target=other_notebook, daemon=True)
    thread.start()
    try:
        assert ran.wait(60)
        with bench.pinned_threads(1) as note:
            assert _blas_threads() == [1] * len(_blas_threads()), note
            assert fast.tile_threads() == 1
    finally:
        finish.set()
        thread.join()
