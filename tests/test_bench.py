"""convbook.bench: the report's structure and arithmetic on a tiny suite, the timing helpers against
known sleep durations, the command line (table, JSON, plot, argument errors). Speed itself is never
asserted here: the benchmark measures it and chapter 8 reports it."""
from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info

from convbook import bench
from convbook.backward import conv2d_backward_methods
from convbook.conv import conv2d_methods

TINY = [bench.Layer("tiny 3x3", 2, 9, 9, 3, 4, 3, padding=1),
        bench.Layer("tiny strided dilated", 1, 12, 10, 2, 3, 3, stride=2, padding=2, dilation=2)]


@pytest.fixture
def restore_threads():
    torch_threads = torch.get_num_threads()
    blas = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
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
        y = torch.nn.functional.conv2d(torch.from_numpy(x.transpose(0, 3, 1, 2)),
                                       torch.from_numpy(w.transpose(3, 2, 0, 1)),
                                       stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
        assert tuple(y.shape[2:]) == layer.out_hw, layer
        ho, wo = layer.out_hw
        assert layer.flops == 2 * layer.n * ho * wo * layer.k**2 * layer.c_in * layer.c_out


def test_suite_covers_what_the_benchmark_promises():
    s = bench.SUITE
    assert {1, 3} <= {l.c_in for l in s}
    assert any(l.stride == 2 for l in s) and any(l.dilation > 1 for l in s) and any(l.k == 1 for l in s)
    assert any(l.k == 5 and l.padding == 2 for l in s)
    assert any(l.n == 1 for l in s) and any(l.n >= 64 for l in s)
    assert any(l.k == 3 and 32 <= l.c_in <= 128 and 14 <= l.h <= 56 for l in s)


def test_timing_helpers_measure_what_they_run():
    fast, slow = (lambda: time.sleep(0.002)), (lambda: time.sleep(0.006))
    t = bench._interleaved({"fast": fast, "slow": slow}, repeat=6, budget=5.0)
    assert 2.0 < t["slow"] / t["fast"] < 4.5, t
    m = bench._median_time(slow, repeat=3, budget=5.0)
    assert 0.005 < m < 0.05


def test_run_report_on_a_tiny_suite(restore_threads):
    lines = []
    before = torch.get_num_threads(), [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    report = bench.run(TINY, threads=1, repeat=2, budget=0.5, methods="all", progress=lines.append)
    after = torch.get_num_threads(), [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    assert after == before, "run must restore the thread counts it pinned"
    assert json.loads(json.dumps(report)) == report  # JSON-ready
    assert report["threads"]["torch"] == 1 and "1 threads" in report["threads"]["blas"]
    assert report["peak_gflops"] > 0 and report["bandwidth_gbs"] > 0
    assert len(report["layers"]) == len(TINY) == len(lines)
    for row, layer in zip(report["layers"], TINY):
        assert row["layer"]["name"] == layer.name and row["flops"] == layer.flops
        assert set(row["forward"]) == {"auto", *conv2d_methods()}
        assert set(row["fwdbwd"]) == {"auto", *conv2d_backward_methods()}
        assert all(v > 0 for v in [*row["forward"].values(), *row["fwdbwd"].values(),
                                   row["torch_forward"], row["torch_fwdbwd"]])
    ratios = [r["forward"]["auto"] / r["torch_forward"] for r in report["layers"]]
    assert math.isclose(report["summary"]["forward_geomean"], math.exp(np.mean(np.log(ratios))))
    assert math.isclose(report["summary"]["forward_worst"], max(ratios))
    text = bench.table(report)
    for name in [layer.name for layer in TINY] + conv2d_methods() + conv2d_backward_methods():
        assert name in text
    assert "geometric mean" in text and "threads: PyTorch 1" in text


def test_command_line_writes_table_json_and_plot(monkeypatch, tmp_path, capsys, restore_threads):
    monkeypatch.setattr(bench, "SUITE", TINY[:1])
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    assert bench.main(["--methods", "auto", "--threads", "1", "--repeat", "2", "--json", str(out_json),
                       "--plot", str(out_png)]) == 0
    printed = capsys.readouterr().out
    assert "tiny 3x3" in printed and str(out_json) in printed
    report = json.loads(out_json.read_text())
    assert set(report["layers"][0]["forward"]) == {"auto"}
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args", [["--threads", "0"], ["--repeat", "0"], ["--methods", "some"]])
def test_command_line_rejects_bad_arguments(args, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(args)
    assert e.value.code == 2 and args[0] in capsys.readouterr().err
