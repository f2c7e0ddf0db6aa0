"""Training, data splits, saving and the `convbook-train` command (chapter 7).

Training runs on small subsets of the shipped sample, for one or two epochs. The command is run
in a subprocess, both as `python -m convbook.train` and as the installed `convbook-train` script,
with the `convbook` package under test first on its path.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import convbook
from convbook import load_sample, read_idx, train
from convbook.train import (
    DEFAULTS,
    HOLDOUT_SEED,
    Model,
    emnist_cnn,
    evaluate,
    fit,
    load_model,
    load_training_data,
    split_holdout,
)

PACKAGE_ROOT = Path(convbook.__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).with_name(
    "convbook-train.exe" if os.name == "nt" else "convbook-train"
)


@pytest.fixture
def shared_emnist(emnist_dir) -> Path:
    """The official EMNIST files (conftest's `emnist_dir`: skipped where absent, required in CI)."""
    return emnist_dir


@pytest.fixture(scope="module")
def sample():
    xtr, ytr, _ = load_sample("train")
    xte, yte, mapping = load_sample("test")
    return xtr, ytr, xte, yte, mapping


def new_model(xtr, mapping, seed=0) -> Model:
    return Model(emnist_cnn(len(mapping), seed=seed), xtr.mean() / 255, xtr.std() / 255, mapping)


def subset(x, y, n, seed=0):
    """n images drawn at random (all classes present), in a fixed order."""
    idx = np.sort(np.random.default_rng(seed).choice(len(x), size=n, replace=False))
    return x[idx], y[idx]


# --- fit


def test_fit_learns_on_a_small_subset(sample):
    xtr, ytr, xte, yte, mapping = sample
    x, y = subset(xtr, ytr, 2000)
    model = new_model(x, mapping)
    _, acc_before = evaluate(model, xte, yte)
    hist = fit(model, x, y, epochs=2, batch_size=16, seed=0, test=(xte, yte), progress=False)
    assert set(hist) == {"loss", "acc", "test_loss", "test_acc", "seconds"}
    assert all(len(v) == 2 for v in hist.values())
    assert hist["loss"][1] < hist["loss"][0]
    assert hist["test_loss"][1] < hist["test_loss"][0]
    assert acc_before < 0.1  # chance is 1/47
    assert hist["test_acc"][-1] > 0.30, hist["test_acc"]
    assert hist["test_acc"][-1] == evaluate(model, xte, yte)[1]


def test_fit_is_deterministic_for_a_seed(sample):
    xtr, ytr, _, _, mapping = sample
    x, y = subset(xtr, ytr, 300, seed=1)

    def train(seed):
        model = new_model(x, mapping, seed=seed)
        fit(model, x, y, epochs=1, batch_size=32, seed=seed, progress=False)
        return model.net.parameters()

    a, b, c = train(0), train(0), train(1)
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), f"same seed, different {k}"
    assert any(not np.array_equal(a[k], c[k]) for k in a if k.endswith(".w"))


def test_fit_shuffle_seed_alone_changes_the_result(sample):
    xtr, ytr, _, _, mapping = sample
    x, y = subset(xtr, ytr, 200, seed=2)
    ws = []
    for shuffle_seed in (0, 1):
        model = new_model(x, mapping, seed=0)
        fit(model, x, y, epochs=1, batch_size=32, seed=shuffle_seed, progress=False)
        ws.append(model.net.parameters()["0.w"].copy())
    assert not np.array_equal(*ws)


@pytest.mark.parametrize(
    "kwargs",
    [{"optimizer": "rmsprop"}, {"epochs": -1}, {"batch_size": 0}, {"lr": 0.0}],
)
def test_fit_rejects_bad_arguments(sample, kwargs):
    xtr, ytr, _, _, mapping = sample
    with pytest.raises(ValueError):
        fit(new_model(xtr, mapping), xtr[:10], ytr[:10], progress=False, **kwargs)


# --- split_holdout and load_training_data


@pytest.mark.parametrize("n, fraction", [(116_323, 0.1), (1000, 0.25), (7, 0.5), (10, 0.01)])
def test_split_holdout_is_a_disjoint_cover_of_the_right_size(n, fraction):
    train, held = split_holdout(n, fraction)
    assert len(np.intersect1d(train, held)) == 0
    assert np.array_equal(np.sort(np.concatenate([train, held])), np.arange(n))
    assert len(held) == round(n * fraction)
    assert np.all(np.diff(train) > 0) and np.all(np.diff(held) > 0)  # sorted, no repeats


def test_split_holdout_depends_only_on_its_own_seed():
    ref = split_holdout(5000, 0.1)
    np.random.seed(123)  # the global generator plays no part
    again = split_holdout(5000, 0.1)
    assert all(np.array_equal(a, b) for a, b in zip(ref, again))
    assert all(np.array_equal(a, b) for a, b in zip(ref, split_holdout(5000, 0.1, HOLDOUT_SEED)))
    other = split_holdout(5000, 0.1, seed=HOLDOUT_SEED + 1)
    assert not np.array_equal(ref[1], other[1])  # the seed is really used


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5])
def test_split_holdout_rejects_bad_fractions(fraction):
    with pytest.raises(ValueError, match="fraction"):
        split_holdout(100, fraction)


def test_load_training_data_sample():
    xtr, ytr, xte, yte, mapping, description = load_training_data("sample")
    assert xtr.shape == (11_280, 28, 28) and xte.shape == (2_820, 28, 28)
    assert xtr.dtype == xte.dtype == np.uint8
    assert ytr.shape == (11_280,) and yte.shape == (2_820,)
    assert ytr.dtype == yte.dtype == np.int64
    assert set(np.unique(ytr)) == set(np.unique(yte)) == set(range(47)) == set(mapping)
    assert "sample" in description and "11,280" in description and "2,820" in description


def test_load_training_data_rejects_unknown_split():
    with pytest.raises(ValueError, match="split"):
        load_training_data("bymerg")


def test_load_training_data_from_test_file_splits_the_real_test_file(shared_emnist):
    folder = shared_emnist
    xtr, ytr, xte, yte, mapping, description = load_training_data(
        "bymerge", folder, from_test_file=True, download=False
    )
    n = 116_323  # images in the official ByMerge test file
    assert len(xtr) + len(xte) == n and len(xte) == round(0.1 * n)
    assert len(ytr) == len(xtr) and len(yte) == len(xte)
    assert xtr.shape[1:] == xte.shape[1:] == (28, 28) and len(mapping) == 47
    assert "test* file split" in description and f"seed {HOLDOUT_SEED}" in description
    assert f"{len(xtr):,} training" in description and f"{len(xte):,} held-out" in description
    # the parts are split_holdout's indices into the file, in the file's order
    labels = read_idx(folder / "emnist-bymerge-test-labels-idx1-ubyte.gz")
    train, held = split_holdout(n, 0.1)
    assert np.array_equal(ytr, labels[train]) and np.array_equal(yte, labels[held])


def test_cli_seed_never_changes_the_held_out_split(monkeypatch, tmp_path, capsys, shared_emnist):
    """`--from-test-file` with two training seeds: same training and held-out images."""
    folder = shared_emnist
    seen = []

    def fake_fit(model, images, labels, *, test, seed, **kwargs):  # records, does not train
        seen.append((images, labels, *test, seed))
        return {"test_acc": [0.5], "seconds": [0.0]}

    monkeypatch.setattr(train, "fit", fake_fit)
    for seed in (0, 7):
        args = ["--data", str(folder), "--split", "mnist", "--from-test-file", "--no-download",
                "--seed", str(seed), "--out", str(tmp_path / f"seed{seed}.npz")]
        assert train.main(args) == 0
    (x0, y0, xh0, yh0, s0), (x7, y7, xh7, yh7, s7) = seen
    assert (s0, s7) == (0, 7)
    assert len(xh0) == 1000 and len(x0) == 9000  # 10% of the 10,000 MNIST test images
    for a, b in [(x0, x7), (y0, y7), (xh0, xh7), (yh0, yh7)]:
        assert np.array_equal(a, b)
    out = capsys.readouterr().out
    assert out.count("data: the official EMNIST mnist *test* file split") == 2
    assert out.count("held-out accuracy after 6 epochs: 0.5000 (1,000 images;") == 2


# --- save / load


def test_save_load_round_trip(tmp_path, sample):
    xtr, ytr, xte, _, mapping = sample
    model = new_model(xtr, mapping, seed=5)
    fit(model, xtr[:128], ytr[:128], epochs=1, batch_size=64, progress=False)
    path = model.save(tmp_path / "model")
    assert path == tmp_path / "model.npz" and path.is_file()
    loaded = load_model(path)
    assert [type(l) for l in loaded.net.layers] == [type(l) for l in model.net.layers]
    assert loaded.net.layers[9].p == model.net.layers[9].p  # dropout probability
    params, loaded_params = model.net.parameters(), loaded.net.parameters()
    assert params.keys() == loaded_params.keys()
    for k in params:
        assert loaded_params[k].dtype == params[k].dtype
        assert np.array_equal(loaded_params[k], params[k]), k
    assert (loaded.mean, loaded.std, loaded.mapping) == (model.mean, model.std, model.mapping)
    assert np.array_equal(loaded.predict(xte[:300]), model.predict(xte[:300]))
    assert np.array_equal(loaded.logits(xte[:50]), model.logits(xte[:50]))


def test_model_prepare_rejects_wrong_shapes(sample):
    xtr, _, _, _, mapping = sample
    model = new_model(xtr, mapping)
    with pytest.raises(ValueError, match="shape"):
        model.predict(xtr[:2, :, :27])
    with pytest.raises(ValueError, match="shape"):
        model.predict(xtr[0])
    assert model.predict(xtr[:0]).shape == (0,)


# --- the command line


def run_cli(launcher: str, *args: str, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    if launcher == "module":
        cmd = [sys.executable, "-m", "convbook.train"]
    else:
        assert SCRIPT.is_file(), f"console script not installed next to {sys.executable}"
        cmd = [str(SCRIPT)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(PACKAGE_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    return subprocess.run(
        cmd + list(args), check=False, capture_output=True, text=True, cwd=cwd, env=env,
        timeout=timeout,
    )


LAUNCHERS = ["module", "script"]


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_cli_help(launcher):
    r = run_cli(launcher, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: convbook-train")
    for option in ("--data", "--split", "--from-test-file", "--epochs", "--out", "--no-download"):
        assert option in r.stdout


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "/nonexistent/emnist", "--split", "bymerge"], "no such folder"),
        (["--split", "bymerg"], "--split must be"),
        (["--epochs", "-1"], "--epochs"),
        (["--epochs", "0"], "--epochs"),
        (["--batch-size", "0"], "--batch-size"),
        (["--lr", "-0.1"], "--lr"),
        (["--split", "bymerge", "--from-test-file", "--holdout", "1.5"], "--holdout"),
        (["--optimizer", "rmsprop"], "--optimizer"),
    ],
)
def test_cli_rejects_bad_options(launcher, args, message, tmp_path):
    r = run_cli(launcher, *args, cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert message in r.stderr and "usage: convbook-train" in r.stderr
    assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing trained, nothing saved


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_cli_rejects_data_with_the_sample(launcher, tmp_path):
    r = run_cli(launcher, "--data", str(tmp_path), cwd=tmp_path)  # --split defaults to sample
    assert r.returncode == 2
    assert "--data needs --split" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_cli_reports_missing_files(launcher, tmp_path):
    r = run_cli(
        launcher, "--data", str(tmp_path), "--split", "mnist", "--no-download", cwd=tmp_path
    )
    assert r.returncode == 1
    assert "convbook-train: error:" in r.stderr and "emnist-mnist-train-images" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_cli_reports_a_corrupt_file(launcher, tmp_path, shared_emnist):
    src = shared_emnist
    data = tmp_path / "emnist"
    data.mkdir()
    for kind in ("images-idx3", "labels-idx1"):
        name = f"emnist-mnist-test-{kind}-ubyte.gz"
        shutil.copyfile(src / name, data / name)
    images = data / "emnist-mnist-test-images-idx3-ubyte.gz"
    raw = bytearray(images.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one byte changed
    images.write_bytes(bytes(raw))
    r = run_cli(
        launcher,
        "--split", "mnist", "--from-test-file", "--data", str(data), "--no-download",
        cwd=tmp_path,
    )
    assert r.returncode != 0
    assert "convbook-train: error:" in r.stderr and images.name in r.stderr
    assert "checksum" in r.stderr and "Traceback" not in r.stderr
    assert not list(tmp_path.glob("*.npz"))


def test_cli_trains_saves_and_the_model_loads(tmp_path, sample):
    out = tmp_path / "model.npz"
    r = run_cli("module", "--epochs", "1", "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("data: the EMNIST ByMerge sample shipped with convbook")
    m = re.fullmatch(
        r"test accuracy after 1 epoch: (0\.\d{4}) \(2,820 images; [\d.]+ s per epoch\)",
        lines[1],
    )
    assert m, lines[1]
    assert lines[2] == f"model saved to {out.resolve()}"
    assert "epoch 1/1" in r.stderr  # the progress bar
    model = load_model(out)
    _, _, xte, yte, mapping = sample
    assert model.mapping == mapping
    pred = model.predict(xte)
    assert pred.shape == (len(xte),) and pred.dtype.kind == "i"
    acc = float((pred == yte).mean())
    assert acc > 0.3  # one epoch on the sample: well above chance (1/47)
    assert abs(acc - float(m.group(1))) <= 2e-3  # the saved model is the one that was measured


def test_defaults_are_the_chapters():
    assert DEFAULTS == {"epochs": 6, "batch_size": 64, "lr": 1e-3, "seed": 0}


@pytest.mark.parametrize("args,word", [
    (["--from-test-file"], "--from-test-file needs --split"),
    (["--split", "mnist", "--holdout", "0.2"], "--holdout only applies with --from-test-file"),
])
def test_cli_rejects_options_that_would_be_ignored(args, word, capsys):
    from convbook import train
    with pytest.raises(SystemExit) as e:
        train.main(args)
    assert e.value.code == 2 and word in capsys.readouterr().err


def test_predict_rejects_float_images():
    from convbook.train import Model, emnist_cnn
    model = Model(emnist_cnn(47, seed=0), 0.17, 0.33, {k: str(k) for k in range(47)})
    with pytest.raises(TypeError, match="uint8"):
        model.predict(np.zeros((2, 28, 28), np.float32))
