"""Training, labels, data splits, saving and loading, and the `convbook-train` command (chapter 7).

Training runs on small subsets of the shipped sample, for one or two epochs. The command is run
in a subprocess, both as `python -m convbook.train` and as the installed `convbook-train` script,
with the `convbook` package under test first on its path. PyTorch is the independent reference for
the numbers `evaluate` reports and for the network's layer order.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convbook
from convbook import load_sample, read_idx, train
from convbook.data import MAPPINGS, SPLITS
from convbook.layers import (
    Conv2d,
    Dropout,
    Flatten,
    Linear,
    MaxPool2d,
    ReLU,
    Sequential,
)
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
    return Model(
        emnist_cnn(len(mapping), seed=seed), xtr.mean() / 255, xtr.std() / 255, mapping
    )


def subset(x, y, n, seed=0):
    """n images drawn at random (all classes present), in a fixed order."""
    idx = np.sort(np.random.default_rng(seed).choice(len(x), size=n, replace=False))
    return x[idx], y[idx]


def torch_logits(model: Model, images: np.ndarray) -> torch.Tensor:
    """The logits of `model` computed by torch.nn.functional, layer by layer, in evaluation
    mode: an independent reference for `Model.logits` and `evaluate`."""
    x = torch.from_numpy(model.prepare(images)).permute(0, 3, 1, 2)  # NCHW
    for layer in model.net.layers:
        p = {k: torch.from_numpy(v) for k, v in layer.params.items()}
        if isinstance(layer, Conv2d):
            x = F.conv2d(
                x, p["w"].permute(3, 2, 0, 1), p["b"], padding=layer.geom["padding"]
            )
        elif isinstance(layer, MaxPool2d):
            x = F.max_pool2d(x, layer.kernel)
        elif isinstance(layer, ReLU):
            x = F.relu(x)
        elif isinstance(layer, Flatten):
            x = x.permute(0, 2, 3, 1).reshape(len(x), -1)  # our Flatten is NHWC order
        elif isinstance(layer, Linear):
            x = x @ p["w"] + p["b"]
        else:
            assert isinstance(layer, Dropout)  # the identity in evaluation mode
    return x


def letters_sample(x, y, per_class=None, seed=0):
    """The sample's letter images relabelled as EMNIST Letters labels them: 1 = `A`/`a` ...
    26 = `Z`/`z` (capitals and the sample's 11 lower-case classes)."""
    chars = MAPPINGS["bymerge"]
    letter = np.array(
        [ord(chars[k][0].upper()) - 64 if chars[k].isalpha() else 0 for k in range(47)]
    )
    keep = np.flatnonzero(letter[y] > 0)
    if per_class is not None:
        keep = np.sort(np.random.default_rng(seed).permutation(keep)[: per_class * 26])
    return x[keep], letter[y[keep]]


# --- the network


def test_emnist_cnn_pools_before_relu():
    kinds = [type(layer).__name__ for layer in emnist_cnn().layers]
    assert kinds == [
        "Conv2d",
        "MaxPool2d",
        "ReLU",
        "Conv2d",
        "MaxPool2d",
        "ReLU",
        "Flatten",
        "Linear",
        "ReLU",
        "Dropout",
        "Linear",
    ]


def _relu_pool(order, x, dy):
    block = Sequential(*[ReLU() if name == "relu" else MaxPool2d(2) for name in order])
    return block.forward(x), block.backward(dy)


def _special_values(rng, shape, dtype):
    """Rounded normals (ties) with NaN, +inf, -inf and zeros mixed in."""
    x = np.round(rng.standard_normal(shape), 1).astype(dtype)
    special = rng.choice(5, size=shape, p=[0.8, 0.05, 0.05, 0.05, 0.05])
    x[special == 1], x[special == 2], x[special == 3], x[special == 4] = (
        np.nan,
        np.inf,
        -np.inf,
        0,
    )
    return x


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", range(5))
def test_pooling_before_relu_is_relu_before_pooling(dtype, seed):
    """Both orders equal PyTorch's relu -> max_pool2d, forward and input gradient, bit for bit,
    with NaN (propagated forward; no gradient through it), infinities, zeros and ties."""
    rng = np.random.default_rng(seed)
    x = _special_values(rng, (4, 8, 10, 3), dtype)
    dy = rng.standard_normal((4, 4, 5, 3)).astype(dtype)
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_()
    ty = F.max_pool2d(F.relu(tx), 2)
    ty.backward(torch.from_numpy(dy.transpose(0, 3, 1, 2).copy()))
    y_ref, dx_ref = (
        ty.detach().numpy().transpose(0, 2, 3, 1),
        tx.grad.numpy().transpose(0, 2, 3, 1),
    )
    assert np.isnan(y_ref).any() and np.isinf(y_ref).any()
    for order in (["relu", "pool"], ["pool", "relu"]):
        y, dx = _relu_pool(order, x, dy)
        assert y.dtype == dx.dtype == dtype
        assert np.array_equal(y, y_ref, equal_nan=True), order
        assert np.array_equal(dx, dx_ref, equal_nan=True), order


def test_the_order_check_catches_a_pooling_that_does_not_commute():
    """The same comparison fails for average pooling, which does not commute with ReLU."""
    x = _special_values(np.random.default_rng(0), (2, 6, 6, 2), np.float64)
    x = np.nan_to_num(x, nan=0.5, posinf=3.0, neginf=-3.0)
    relu = lambda a: np.maximum(a, 0)  # noqa: E731
    assert not np.array_equal(
        relu(convbook.avg_pool2d(x, 2)), convbook.avg_pool2d(relu(x), 2)
    )


# --- labels: every split trains and predicts its own labels


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_every_split_has_a_model_whose_labels_are_its_mapping(split):
    mapping = MAPPINGS[split]
    assert len(mapping) == SPLITS[split]
    first = 1 if split == "letters" else 0
    assert sorted(mapping) == list(range(first, first + SPLITS[split]))
    model = Model(
        emnist_cnn(len(mapping)), 0.17, 0.33, mapping
    )  # as convbook-train builds it
    assert model.labels.tolist() == sorted(mapping)
    assert model.output_index(model.labels).tolist() == list(range(len(mapping)))
    images, _, _ = load_sample("test")
    pred = model.predict(images[:300])
    assert set(pred.tolist()) <= set(mapping) and pred.dtype == np.int64
    assert all(isinstance(mapping[int(k)], str) for k in pred)


@pytest.mark.parametrize("split", ["bymerge", "balanced", "mnist", "letters"])
def test_official_label_files_hold_exactly_their_mappings_labels(split, shared_emnist):
    labels = read_idx(shared_emnist / f"emnist-{split}-test-labels-idx1-ubyte.gz")
    assert set(np.unique(labels).tolist()) == set(MAPPINGS[split])


def test_predict_returns_labels_not_output_numbers():
    letters = MAPPINGS["letters"]
    model = Model(emnist_cnn(26), 0.17, 0.33, letters)
    last = model.net.layers[-1].params
    last["w"][:] = 0
    images, _, _ = load_sample("test")
    for output, label in [(0, 1), (25, 26), (7, 8)]:
        last["b"][:] = np.eye(26, dtype=np.float32)[output]
        assert set(model.predict(images[:4]).tolist()) == {label}
    assert letters[26] == "Zz"


def test_output_index_rejects_labels_outside_the_mapping():
    model = Model(emnist_cnn(26), 0.17, 0.33, MAPPINGS["letters"])
    for bad in ([0], [27], [1, 2, -1]):
        with pytest.raises(ValueError, match="labels"):
            model.output_index(np.array(bad))
    with pytest.raises(TypeError, match="labels"):
        model.output_index(np.array([1.0, 2.0]))


def test_model_needs_as_many_outputs_as_labels():
    with pytest.raises(ValueError, match="47 outputs but the mapping has 26"):
        Model(emnist_cnn(47), 0.17, 0.33, MAPPINGS["letters"])


def test_letters_train_and_predict_the_right_characters(sample):
    """A small Letters run end to end (the sample's letters, relabelled 1..26)."""
    xtr, ytr, xte, yte, _ = sample
    x, y = letters_sample(xtr, ytr, per_class=80)
    xt, yt = letters_sample(xte, yte)
    letters = MAPPINGS["letters"]
    model = Model(emnist_cnn(26), *train.pixel_stats(x), letters)
    hist = fit(model, x, y, epochs=2, batch_size=32, test=(xt, yt), progress=False)
    pred = model.predict(xt)
    assert set(pred.tolist()) <= set(range(1, 27))
    acc = float((pred == yt).mean())
    assert acc > 0.3, acc  # chance is 1/26
    assert acc == pytest.approx(hist["test_acc"][-1], abs=2 / len(yt))
    truth = [letters[int(k)] for k in yt]
    said = [letters[int(k)] for k in pred]
    assert np.mean([a == b for a, b in zip(said, truth)]) == acc
    assert 26 in set(yt.tolist()) and letters[26] == "Zz"  # old code failed on label 26


def test_cli_trains_letters(monkeypatch, tmp_path, sample, capsys):
    xtr, ytr, xte, yte, _ = sample
    x, y = letters_sample(xtr, ytr, per_class=40)
    xt, yt = letters_sample(xte, yte)
    data = train.TrainingData(
        x, y, xt, yt, dict(MAPPINGS["letters"]), "relabelled letters"
    )
    monkeypatch.setattr(train, "load_training_data", lambda *a, **k: data)
    out = tmp_path / "letters.npz"
    assert (
        train.main(
            ["--split", "letters", "--epochs", "1", "--quiet", "--out", str(out)]
        )
        == 0
    )
    loaded = load_model(out)
    assert loaded.labels.tolist() == list(range(1, 27))
    pred = loaded.predict(xt)
    m = re.search(r"test accuracy after 1 epoch: (0\.\d{4})", capsys.readouterr().out)
    assert m and abs(float((pred == yt).mean()) - float(m.group(1))) <= 1e-4 + 2 / len(
        yt
    )


# --- fit and evaluate


def test_fit_learns_on_a_small_subset(sample):
    xtr, ytr, xte, yte, mapping = sample
    x, y = subset(xtr, ytr, 2000)
    model = new_model(x, mapping)
    _, acc_before = evaluate(model, xte, yte)
    hist = fit(
        model, x, y, epochs=2, batch_size=16, seed=0, test=(xte, yte), progress=False
    )
    assert set(hist) == {"loss", "acc", "test_loss", "test_acc", "seconds"}
    assert all(len(v) == 2 for v in hist.values())
    assert hist["loss"][1] < hist["loss"][0]
    assert hist["test_loss"][1] < hist["test_loss"][0]
    assert acc_before < 0.1  # chance is 1/47
    assert hist["test_acc"][-1] > 0.30, hist["test_acc"]
    # fit's last numbers against PyTorch's loss and accuracy of the same weights; float32 logits
    # of the two libraries may swap a near tie, so accuracies may differ by an image or two
    logits = torch_logits(model, xte)
    loss_t = F.cross_entropy(logits, torch.from_numpy(yte)).item()
    acc_t = float((logits.argmax(1).numpy() == yte).mean())
    assert hist["test_loss"][-1] == pytest.approx(loss_t, rel=1e-5)
    assert abs(hist["test_acc"][-1] - acc_t) <= 2 / len(yte)


def test_evaluate_matches_pytorch_and_a_wrong_reference_is_caught(sample):
    xtr, _, xte, yte, mapping = sample
    model = new_model(xtr, mapping, seed=3)
    loss, acc = evaluate(model, xte[:500], yte[:500])
    logits = torch_logits(model, xte[:500])
    assert loss == pytest.approx(
        F.cross_entropy(logits, torch.from_numpy(yte[:500])).item(), rel=1e-5
    )
    assert abs(acc - float((logits.argmax(1).numpy() == yte[:500]).mean())) <= 2 / 500
    # the reference can fail: the same weights in the wrong flatten order give other logits
    model.net.layers[6] = type(
        "ChannelsFirst",
        (Flatten,),
        {"forward": lambda self, x: x.transpose(0, 3, 1, 2).reshape(len(x), -1)},
    )()
    assert F.cross_entropy(logits, torch.from_numpy(yte[:500])).item() != pytest.approx(
        evaluate(model, xte[:500], yte[:500])[0], rel=1e-3
    )


def test_fit_is_deterministic_for_a_seed(sample):
    xtr, ytr, _, _, mapping = sample
    x, y = subset(xtr, ytr, 300, seed=1)

    def trained(seed):
        model = new_model(x, mapping, seed=seed)
        fit(model, x, y, epochs=1, batch_size=32, seed=seed, progress=False)
        return model.net.parameters()

    a, b, c = trained(0), trained(0), trained(1)
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


def test_train_epochs_steps_one_epoch_at_a_time_like_fit(sample):
    xtr, ytr, xte, yte, mapping = sample
    x, y = subset(xtr, ytr, 256, seed=4)
    by_fit, by_steps = new_model(x, mapping, seed=2), new_model(x, mapping, seed=2)
    hist = fit(
        by_fit,
        x,
        y,
        epochs=2,
        batch_size=64,
        test=(xte[:200], yte[:200]),
        progress=False,
    )
    epochs = train.train_epochs(
        by_steps,
        x,
        y,
        epochs=2,
        batch_size=64,
        test=(xte[:200], yte[:200]),
        progress=False,
    )
    results = [next(epochs), next(epochs)]
    assert [r.epoch for r in results] == [1, 2]
    assert [r.test_acc for r in results] == hist["test_acc"]
    assert [r.loss for r in results] == hist["loss"]
    for k, v in by_fit.net.parameters().items():
        assert np.array_equal(v, by_steps.net.parameters()[k])
    with pytest.raises(StopIteration):
        next(epochs)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"optimizer": "rmsprop"}, ValueError),
        ({"epochs": -1}, ValueError),
        ({"batch_size": 0}, ValueError),
        ({"batch_size": 2.5}, TypeError),
        ({"lr": 0.0}, ValueError),
        ({"lr": float("inf")}, ValueError),
        ({"lr": float("nan")}, ValueError),
        ({"seed": -1}, ValueError),
        ({"test": (np.zeros((2, 28, 28), np.uint8), np.array([0]))}, ValueError),
    ],
)
def test_fit_rejects_bad_arguments_before_training(sample, kwargs, error):
    xtr, ytr, _, _, mapping = sample
    model = new_model(xtr, mapping)
    before = {k: v.copy() for k, v in model.net.parameters().items()}
    with pytest.raises(error):
        fit(model, xtr[:10], ytr[:10], progress=False, **kwargs)
    assert all(np.array_equal(v, before[k]) for k, v in model.net.parameters().items())


@pytest.mark.parametrize(
    "images, labels, match",
    [
        (np.zeros((3, 28, 28), np.uint8), np.array([0, 1]), "disagree"),
        (np.zeros((0, 28, 28), np.uint8), np.array([], np.int64), "at least one"),
        (np.zeros((2, 28, 28), np.uint8), np.array([0, 47]), "labels"),
        (np.zeros((2, 28, 28), np.float32), np.array([0, 1]), "uint8"),
    ],
)
def test_evaluate_and_fit_reject_images_and_labels_that_do_not_fit(
    sample, images, labels, match
):
    xtr, _, _, _, mapping = sample
    model = new_model(xtr, mapping)
    for call in (
        lambda: evaluate(model, images, labels),
        lambda: fit(model, images, labels, progress=False),
    ):
        with pytest.raises((ValueError, TypeError), match=match):
            call()


# --- a diverging run stops


def test_fit_stops_when_the_loss_is_not_finite(sample):
    xtr, ytr, _, _, mapping = sample
    model = new_model(xtr, mapping)
    with pytest.raises(train.TrainingDiverged, match="diverged"):
        fit(model, xtr[:256], ytr[:256], lr=1e30, progress=False)


def test_fit_stops_when_a_weight_is_not_finite_even_if_the_loss_is(sample, monkeypatch):
    """A ReLU that turns NaN into 0 would hide a NaN weight from the loss: the weights are
    checked at the end of every epoch."""
    xtr, ytr, _, _, mapping = sample
    model = new_model(xtr, mapping)
    model.net.layers[0].params["w"][0, 0, 0, 0] = np.nan
    monkeypatch.setattr(
        ReLU,
        "forward",
        lambda self, x: (
            setattr(self, "mask", x > 0) or np.where(self.mask, x, 0).astype(x.dtype)
        ),
    )
    monkeypatch.setattr(
        ReLU, "backward", lambda self, dy: np.where(self.mask, dy, 0).astype(dy.dtype)
    )
    with pytest.raises(
        train.TrainingDiverged, match="weight 0.w is not finite after epoch 1"
    ):
        fit(model, xtr[:64], ytr[:64], epochs=2, progress=False)


# --- split_holdout and load_training_data


@pytest.mark.parametrize(
    "n, fraction", [(116_323, 0.1), (1000, 0.25), (7, 0.5), (10, 0.1)]
)
def test_split_holdout_is_a_disjoint_cover_of_the_right_size(n, fraction):
    train_part, held = split_holdout(n, fraction)
    assert len(np.intersect1d(train_part, held)) == 0
    assert np.array_equal(np.sort(np.concatenate([train_part, held])), np.arange(n))
    assert len(held) == round(n * fraction)
    assert np.all(np.diff(train_part) > 0) and np.all(
        np.diff(held) > 0
    )  # sorted, no repeats


def test_split_holdout_depends_only_on_its_own_seed():
    ref = split_holdout(5000, 0.1)
    np.random.seed(123)  # the global generator plays no part
    again = split_holdout(5000, 0.1)
    assert all(np.array_equal(a, b) for a, b in zip(ref, again))
    assert all(
        np.array_equal(a, b)
        for a, b in zip(ref, split_holdout(5000, 0.1, HOLDOUT_SEED))
    )
    other = split_holdout(5000, 0.1, seed=HOLDOUT_SEED + 1)
    assert not np.array_equal(ref[1], other[1])  # the seed is really used


@pytest.mark.parametrize(
    "n, fraction, error",
    [
        (100, 0, ValueError),
        (100, 1, ValueError),
        (100, -0.1, ValueError),
        (100, 1.5, ValueError),
        (100, float("nan"), ValueError),
        (100, "0.1", TypeError),
        (10, 0.01, ValueError),
        (10, 0.99, ValueError),
        (1, 0.5, ValueError),
        (10.0, 0.5, TypeError),
    ],
)
def test_split_holdout_rejects_bad_arguments_and_empty_parts(n, fraction, error):
    with pytest.raises(error):
        split_holdout(n, fraction)


def test_load_training_data_sample():
    xtr, ytr, xte, yte, mapping, description = load_training_data("sample")
    assert xtr.shape == (11_280, 28, 28) and xte.shape == (2_820, 28, 28)
    assert xtr.dtype == xte.dtype == np.uint8
    assert ytr.shape == (11_280,) and yte.shape == (2_820,)
    assert ytr.dtype == yte.dtype == np.int64
    assert set(np.unique(ytr)) == set(np.unique(yte)) == set(range(47)) == set(mapping)
    assert (
        "sample" in description and "11,280" in description and "2,820" in description
    )
    assert "47 balanced classes" in description


def test_load_training_data_rejects_unknown_split():
    with pytest.raises(ValueError, match="split"):
        load_training_data("bymerg")


@pytest.mark.parametrize("holdout", [0, 1.5, float("nan")])
def test_load_training_data_checks_holdout_before_reading(holdout, tmp_path):
    with pytest.raises(
        ValueError, match="holdout"
    ):  # the folder is empty: nothing was read
        load_training_data(
            "mnist", tmp_path, from_test_file=True, holdout=holdout, download=False
        )


def test_pixel_stats_against_float64_and_bad_input(sample):
    xtr = sample[0]
    mean, std = train.pixel_stats(xtr, chunk=1000)
    assert mean == pytest.approx(xtr.mean() / 255, rel=1e-12)
    assert std == pytest.approx(xtr.astype(np.float64).std() / 255, rel=1e-9)
    for bad in (xtr[:2] / 255, xtr[:0]):
        with pytest.raises(ValueError, match="uint8"):
            train.pixel_stats(bad)


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
    assert (
        f"{len(xtr):,} training" in description
        and f"{len(xte):,} held-out" in description
    )
    # the parts are split_holdout's indices into the file, in the file's order
    labels = read_idx(folder / "emnist-bymerge-test-labels-idx1-ubyte.gz")
    train_part, held = split_holdout(n, 0.1)
    assert np.array_equal(ytr, labels[train_part]) and np.array_equal(yte, labels[held])


def test_cli_seed_never_changes_the_held_out_split(
    monkeypatch, tmp_path, capsys, shared_emnist
):
    """`--from-test-file` with two training seeds: same training and held-out images."""
    folder = shared_emnist
    seen = []

    def fake_fit(
        model, images, labels, *, test, seed, **kwargs
    ):  # records, does not train
        seen.append((images, labels, *test, seed))
        return {"test_acc": [0.5], "seconds": [0.0]}

    monkeypatch.setattr(train, "fit", fake_fit)
    for seed in (0, 7):
        args = [
            "--data",
            str(folder),
            "--split",
            "mnist",
            "--from-test-file",
            "--no-download",
            "--seed",
            str(seed),
            "--out",
            str(tmp_path / f"seed{seed}.npz"),
        ]
        assert train.main(args) == 0
    (x0, y0, xh0, yh0, s0), (x7, y7, xh7, yh7, s7) = seen
    assert (s0, s7) == (0, 7)
    assert len(xh0) == 1000 and len(x0) == 9000  # 10% of the 10,000 MNIST test images
    for a, b in [(x0, x7), (y0, y7), (xh0, xh7), (yh0, yh7)]:
        assert np.array_equal(a, b)
    out = capsys.readouterr().out
    assert out.count("data: the official EMNIST mnist *test* file split") == 2
    assert out.count("held-out accuracy after 6 epochs: 0.5000 (1,000 images;") == 2


# --- predict


def test_model_prepare_rejects_wrong_shapes(sample):
    xtr, _, _, _, mapping = sample
    model = new_model(xtr, mapping)
    with pytest.raises(ValueError, match="shape"):
        model.predict(xtr[:2, :, :27])
    with pytest.raises(ValueError, match="shape"):
        model.predict(xtr[0])
    assert model.predict(xtr[:0]).shape == (0,)


def test_predict_rejects_float_images():
    model = Model(emnist_cnn(47, seed=0), 0.17, 0.33, {k: str(k) for k in range(47)})
    with pytest.raises(TypeError, match="uint8"):
        model.predict(np.zeros((2, 28, 28), np.float32))


@pytest.mark.parametrize(
    "batch_size, error",
    [
        (0, ValueError),
        (-1, ValueError),
        (2.5, TypeError),
        (True, TypeError),
        ("8", TypeError),
    ],
)
def test_predict_rejects_bad_batch_sizes(sample, batch_size, error):
    model = new_model(sample[0], sample[4])
    with pytest.raises(error, match="batch_size"):
        model.predict(sample[2][:3], batch_size=batch_size)


def test_predict_is_the_same_in_any_batch_size(sample):
    model = new_model(sample[0], sample[4], seed=1)
    ref = model.logits(sample[2][:100])
    for batch_size in (
        1,
        7,
        np.int64(64),
        1000,
    ):  # other batch shapes round differently
        got = model.logits(sample[2][:100], batch_size)
        assert np.allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"std": 0.0}, "std"),
        ({"std": float("nan")}, "std"),
        ({"mean": float("inf")}, "mean"),
        ({"mapping": {}}, "mapping"),
        ({"mapping": {k: "" for k in range(47)}}, "mapping"),
        ({"mapping": {-1: "a", **{k: str(k) for k in range(46)}}}, "label"),
    ],
)
def test_model_rejects_bad_normalisation_and_mappings(kwargs, match):
    args = dict(mean=0.17, std=0.33, mapping={k: str(k) for k in range(47)}) | kwargs
    with pytest.raises((ValueError, TypeError), match=match):
        Model(emnist_cnn(47), **args)


# --- save / load


def test_save_load_round_trip(tmp_path, sample):
    xtr, ytr, xte, _, mapping = sample
    model = new_model(xtr, mapping, seed=5)
    fit(model, xtr[:128], ytr[:128], epochs=1, batch_size=64, progress=False)
    path = model.save(tmp_path / "model")
    assert path == tmp_path / "model.npz" and path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == [
        "model.npz"
    ]  # no temporary file left
    loaded = load_model(path)
    assert [type(l) for l in loaded.net.layers] == [type(l) for l in model.net.layers]
    assert loaded.net.layers[9].p == model.net.layers[9].p  # dropout probability
    params, loaded_params = model.net.parameters(), loaded.net.parameters()
    assert params.keys() == loaded_params.keys()
    for k in params:
        assert loaded_params[k].dtype == params[k].dtype
        assert np.array_equal(loaded_params[k], params[k]), k
    assert (loaded.mean, loaded.std, loaded.mapping) == (
        model.mean,
        model.std,
        model.mapping,
    )
    assert np.array_equal(loaded.predict(xte[:300]), model.predict(xte[:300]))
    assert np.array_equal(loaded.logits(xte[:50]), model.logits(xte[:50]))


def save_old_format(model: Model, path: Path, layers=None) -> None:
    """`model` written as the first version of `Model.save` wrote it (no "format" entry)."""
    meta = dict(
        layers=[[type(l).__name__, l.config()] for l in (layers or model.net.layers)],
        mean=model.mean,
        std=model.std,
        mapping={str(k): v for k, v in model.mapping.items()},
    )
    np.savez(path, __meta__=np.array(json.dumps(meta)), **model.net.parameters())


def test_files_of_the_first_format_and_layer_order_still_load(tmp_path, sample):
    xtr, ytr, xte, _, mapping = sample
    model = new_model(xtr, mapping, seed=6)
    fit(model, xtr[:128], ytr[:128], epochs=1, progress=False)
    relu_first = [model.net.layers[i] for i in (0, 2, 1, 3, 5, 4, 6, 7, 8, 9, 10)]
    save_old_format(model, tmp_path / "old.npz", relu_first)
    old = load_model(tmp_path / "old.npz")
    assert [type(l).__name__ for l in old.net.layers[:3]] == [
        "Conv2d",
        "ReLU",
        "MaxPool2d",
    ]
    assert np.array_equal(old.logits(xte[:300]), model.logits(xte[:300]))


def test_nested_sequential_saves_and_loads(tmp_path, sample):
    xtr, _, xte, _, _ = sample
    rng = np.random.default_rng(0)
    block = Sequential(Conv2d(1, 4, 3, padding=1, rng=rng), MaxPool2d(2), ReLU())
    net = Sequential(
        block, Sequential(Flatten(), Sequential(Linear(14 * 14 * 4, 10, rng=rng)))
    )
    model = Model(net, 0.17, 0.33, MAPPINGS["digits"])
    assert set(net.parameters()) == {"0.0.w", "0.0.b", "1.1.0.w", "1.1.0.b"}
    loaded = load_model(model.save(tmp_path / "nested.npz"))
    assert isinstance(loaded.net.layers[1].layers[1], Sequential)
    assert np.array_equal(loaded.logits(xte[:20]), model.logits(xte[:20]))


def test_numpy_integer_hyperparameters_save_and_load(tmp_path, sample):
    i = np.int64
    rng = np.random.default_rng(0)
    net = Sequential(
        Conv2d(i(1), i(4), i(3), stride=i(1), padding=i(1), rng=rng),
        MaxPool2d(i(2)),
        ReLU(),
        Flatten(),
        Linear(i(14 * 14 * 4), i(10), rng=rng),
        Dropout(np.float64(0.5)),
    )
    model = Model(
        net, np.float32(0.17), np.float64(0.33), {i(k): str(k) for k in range(10)}
    )
    loaded = load_model(model.save(tmp_path / "numpy-ints.npz"))
    assert np.array_equal(loaded.logits(sample[2][:20]), model.logits(sample[2][:20]))
    assert loaded.mapping == {k: str(k) for k in range(10)}


def test_save_writes_numpy_scalars_in_a_config_as_json_numbers(
    tmp_path, sample, monkeypatch
):
    """Whatever a layer's config() holds in NumPy scalars (as layers did before they were
    fixed to return Python ints), `Model.save` writes plain JSON numbers."""
    monkeypatch.setattr(
        MaxPool2d,
        "config",
        lambda self: dict(kernel=np.int64(2), stride=None, padding=np.array([0, 0])),
    )
    model = new_model(sample[0], sample[4], seed=4)
    path = model.save(tmp_path / "m.npz")
    assert _meta(path)["layers"][1] == [
        "MaxPool2d",
        {"kernel": 2, "stride": None, "padding": [0, 0]},
    ]
    monkeypatch.undo()
    assert np.array_equal(
        load_model(path).logits(sample[2][:20]), model.logits(sample[2][:20])
    )


def test_save_never_destroys_the_previous_model(tmp_path, sample, monkeypatch):
    xtr, _, xte, _, mapping = sample
    path = new_model(xtr, mapping, seed=1).save(tmp_path / "model.npz")
    before = path.read_bytes()
    calls = []
    write_array = np.lib.format.write_array

    def interrupted(*args, **kwargs):  # the second array fails half-way
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return write_array(*args, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", interrupted)
    with pytest.raises(KeyboardInterrupt):
        new_model(xtr, mapping, seed=2).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.npz"]
    monkeypatch.undo()
    assert np.array_equal(
        load_model(path).predict(xte[:50]),
        new_model(xtr, mapping, seed=1).predict(xte[:50]),
    )


def test_save_refuses_non_finite_weights_and_missing_folders(tmp_path, sample):
    model = new_model(sample[0], sample[4])
    model.net.layers[3].params["b"][0] = np.inf
    with pytest.raises(ValueError, match="3.b is not finite"):
        model.save(tmp_path / "inf.npz")
    model.net.layers[3].params["b"][0] = 0
    with pytest.raises(FileNotFoundError):
        model.save(tmp_path / "no" / "such" / "model.npz")
    assert list(tmp_path.iterdir()) == []


def _saved(tmp_path, sample) -> Path:
    return new_model(sample[0], sample[4], seed=3).save(tmp_path / "good.npz")


def _rewrite(path: Path, out: Path, *, meta=None, arrays=None, drop=()):
    """A copy of a model file with `meta` and some `arrays` replaced, some dropped."""
    with np.load(path) as f:
        content = {k: f[k] for k in f.files if k not in drop}
    if meta is not None:
        content["__meta__"] = np.array(json.dumps(meta))
    content |= arrays or {}
    np.savez(out, **content)
    return out


def _meta(path: Path) -> dict:
    with np.load(path) as f:
        return json.loads(str(f["__meta__"]))


@pytest.mark.parametrize(
    "damage",
    [
        "empty",
        "truncated at 10%",
        "truncated at 50%",
        "truncated at 99%",
        "one byte changed",
        "text",
        "npy",
        "zip of other things",
        "no such file",
        "a folder",
    ],
)
def test_load_model_rejects_damaged_and_foreign_files(tmp_path, sample, damage):
    raw = _saved(tmp_path, sample).read_bytes()
    path = tmp_path / "bad.npz"
    if damage == "empty":
        path.write_bytes(b"")
    elif damage.startswith("truncated"):
        path.write_bytes(raw[: len(raw) * int(damage.split()[-1][:-1]) // 100])
    elif damage == "one byte changed":
        flipped = bytearray(raw)
        flipped[len(raw) // 2] ^= 0xFF
        path.write_bytes(bytes(flipped))
    elif damage == "text":
        path.write_text("layers: Conv2d, ReLU\n")
    elif damage == "npy":
        np.save(path, np.zeros(3))
    elif damage == "zip of other things":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("readme.txt", "hello")
    elif damage == "a folder":
        path.mkdir()
    with pytest.raises(train.ModelFileError, match=re.escape(str(path))):
        load_model(path)
    assert issubclass(train.ModelFileError, ValueError)


@pytest.mark.parametrize(
    "change, match",
    [
        (
            {"arrays": {"10.b": np.zeros(1, np.float32)}},
            r"10\.b has shape \(1,\)",
        ),  # broadcasts
        (
            {"arrays": {"7.w": np.zeros((128, 3136), np.float32)}},
            r"7\.w has shape \(128, 3136\)",
        ),
        ({"arrays": {"0.w": np.zeros((3, 3, 1, 32), np.float64)}}, "dtype float64"),
        ({"arrays": {"0.w": np.zeros((3, 3, 1, 32), ">f4")}}, "dtype >f4"),
        ({"arrays": {"0.w": np.full((3, 3, 1, 32), np.nan, np.float32)}}, "NaN"),
        ({"arrays": {"extra": np.zeros(3, np.float32)}}, "unexpected"),
        ({"drop": ["3.b"]}, "missing"),
        ({"arrays": {"0.w": np.zeros((3, 3, 1, 32), object)}}, "0.w"),
    ],
)
def test_load_model_checks_every_array_against_its_layer(
    tmp_path, sample, change, match
):
    bad = _rewrite(_saved(tmp_path, sample), tmp_path / "bad.npz", **change)
    with pytest.raises(train.ModelFileError, match=match):
        load_model(bad)


def _meta_edits():
    def layer(i, **config):
        return lambda m: m["layers"][i][1].update(config)

    return [
        ("unknown layer", lambda m: m["layers"].insert(0, ["Softmax", {}]), "Softmax"),
        ("unknown option", layer(0, colour="red"), "colour"),
        ("rng in config", layer(9, rng=1), "does not know"),
        ("not a list", lambda m: m.update(layers={"a": 1}), "list"),
        ("float channels", layer(0, c_out=32.0), "c_out"),
        ("zero channels", layer(0, c_out=0), "c_out"),
        ("bad dtype", layer(0, dtype="int8"), "dtype"),
        ("std zero", lambda m: m.update(std=0), "std"),
        ("mapping keys", lambda m: m.update(mapping={"x": "a"}), "mapping"),
        ("mapping size", lambda m: m.update(mapping={"0": "a"}), "47 outputs"),
        ("future format", lambda m: m.update(format=99), "format 99"),
        ("no layers", lambda m: m.pop("layers"), "lacks"),
        ("too deep", lambda m: m.update(layers=_deep(20)), "nest too deeply"),
        (
            "very deep",
            None,
            "RecursionError",
        ),  # JSON nested deeper than Python recurses
    ]


def _deep(n):
    spec = []
    for _ in range(n):
        spec = [["Sequential", {"layers": spec}]]
    return spec


@pytest.mark.parametrize(
    "name, edit, match", _meta_edits(), ids=[e[0] for e in _meta_edits()]
)
def test_load_model_checks_the_metadata(tmp_path, sample, name, edit, match):
    good = _saved(tmp_path, sample)
    meta = _meta(good)
    if edit is None:
        deep = '[["Sequential", {"layers": ' * 20_000 + "[]" + "}]]" * 20_000
        text = json.dumps(meta).replace('"layers": [', f'"layers": {deep}, "x": [', 1)
    else:
        edit(meta)
        text = json.dumps(meta)
    with np.load(good) as f:
        arrays = {k: f[k] for k in f.files if k != "__meta__"}
    np.savez(tmp_path / "bad.npz", __meta__=np.array(text), **arrays)
    with pytest.raises(train.ModelFileError, match=match) as e:
        load_model(tmp_path / "bad.npz")
    assert str(tmp_path / "bad.npz") in str(e.value)


def test_load_model_does_not_allocate_what_a_crafted_config_asks_for(tmp_path, sample):
    """A dense layer of 10^12 weights in the config: refused before anything is built."""
    good = _saved(tmp_path, sample)
    meta = _meta(good)
    meta["layers"][7][1].update(n_in=10**6, n_out=10**6)
    bad = _rewrite(good, tmp_path / "huge.npz", meta=meta)
    tracemalloc.start()
    try:
        with pytest.raises(train.ModelFileError, match="max_bytes"):
            load_model(bad)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20e6, peak
    # and with a limit below the real model's size, the real model is refused too
    with pytest.raises(train.ModelFileError, match="max_bytes"):
        load_model(good, max_bytes=1000)


def test_load_model_reads_the_headers_before_the_data(tmp_path, sample, monkeypatch):
    """A wrong shape is found without reading any weight."""
    bad = _rewrite(
        _saved(tmp_path, sample),
        tmp_path / "bad.npz",
        arrays={"10.b": np.zeros(1, np.float32)},
    )
    read_array = np.lib.format.read_array

    def only_the_meta(fp, **kwargs):
        assert fp.name == "__meta__.npy", f"{fp.name} was read"
        return read_array(fp, **kwargs)

    monkeypatch.setattr(np.lib.format, "read_array", only_the_meta)
    with pytest.raises(train.ModelFileError, match="10.b"):
        load_model(bad)


# --- the command line


def run_cli(
    launcher: str, *args: str, cwd=None, timeout=300
) -> subprocess.CompletedProcess:
    if launcher == "module":
        cmd = [sys.executable, "-m", "convbook.train"]
    else:
        assert SCRIPT.is_file(), (
            f"console script not installed next to {sys.executable}"
        )
        cmd = [str(SCRIPT)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(PACKAGE_ROOT)]
        + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    return subprocess.run(
        cmd + list(args),
        check=False,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


LAUNCHERS = ["module", "script"]


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_cli_help(launcher):
    r = run_cli(launcher, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: convbook-train")
    for option in (
        "--data",
        "--split",
        "--from-test-file",
        "--epochs",
        "--out",
        "--no-download",
        "--version",
    ):
        assert option in r.stdout


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_cli_version(launcher):
    r = run_cli(launcher, "--version")
    assert (
        r.returncode == 0
        and r.stdout.strip() == f"convbook-train {convbook.__version__}"
    )


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
        (["--lr", "inf"], "--lr must be a finite number"),
        (["--lr", "nan"], "--lr must be a finite number"),
        (["--seed", "-1"], "--seed must be >= 0"),
        (["--split", "bymerge", "--from-test-file", "--holdout", "1.5"], "--holdout"),
        (["--optimizer", "rmsprop"], "--optimizer"),
        (["--out", "missing/folder/model.npz"], "--out: no such folder"),
        (["--out", "."], "--out"),
    ],
)
def test_cli_rejects_bad_options(launcher, args, message, tmp_path):
    r = run_cli(launcher, *args, cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert message in r.stderr and "usage: convbook-train" in r.stderr
    assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing trained, nothing saved


def test_cli_checks_the_output_path_before_loading_anything(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(
        train, "load_training_data", lambda *a, **k: pytest.fail("data loaded")
    )
    (tmp_path / "a-file").write_text("")
    (tmp_path / "a-folder.npz").mkdir()
    cases = [
        tmp_path / "missing" / "m.npz",
        tmp_path / "a-file" / "m.npz",
        tmp_path / "a-folder",
    ]
    if os.name == "posix" and os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases.append(locked / "m.npz")
    elif Path("/proc/self").is_dir():
        cases.append(Path("/proc/m.npz"))  # not writable, even for root
    left = {p.name for p in tmp_path.iterdir()}
    for out in cases:
        with pytest.raises(SystemExit) as e:
            train.main(["--out", str(out)])
        assert e.value.code == 2, out
        assert "--out:" in capsys.readouterr().err
    assert {p.name for p in tmp_path.iterdir()} == left  # no probe file left behind


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_cli_rejects_data_with_the_sample(launcher, tmp_path):
    r = run_cli(
        launcher, "--data", str(tmp_path), cwd=tmp_path
    )  # --split defaults to sample
    assert r.returncode == 2
    assert "--data needs --split" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_cli_reports_missing_files(launcher, tmp_path):
    r = run_cli(
        launcher,
        "--data",
        str(tmp_path),
        "--split",
        "mnist",
        "--no-download",
        cwd=tmp_path,
    )
    assert r.returncode == 1
    assert (
        "convbook-train: error:" in r.stderr and "emnist-mnist-train-images" in r.stderr
    )
    assert "Traceback" not in r.stderr


def test_cli_stops_a_diverging_run_and_saves_nothing(tmp_path):
    r = run_cli("module", "--epochs", "1", "--lr", "1e30", "--quiet", cwd=tmp_path)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "convbook-train: error:" in r.stderr and "diverged" in r.stderr
    assert "no model was saved" in r.stderr and "Traceback" not in r.stderr
    assert "accuracy" not in r.stdout and list(tmp_path.iterdir()) == []


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
        "--split",
        "mnist",
        "--from-test-file",
        "--data",
        str(data),
        "--no-download",
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
    assert (
        abs(acc - float(m.group(1))) <= 2e-3
    )  # the saved model is the one that was measured


def test_defaults_are_the_chapters():
    assert DEFAULTS == {"epochs": 6, "batch_size": 64, "lr": 1e-3, "seed": 0}


@pytest.mark.parametrize(
    "args,word",
    [
        (["--from-test-file"], "--from-test-file needs --split"),
        (
            ["--split", "mnist", "--holdout", "0.2"],
            "--holdout only applies with --from-test-file",
        ),
    ],
)
def test_cli_rejects_options_that_would_be_ignored(args, word, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(args)
    assert e.value.code == 2 and word in capsys.readouterr().err
