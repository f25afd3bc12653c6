"""Tests of q3_mnistm_dann.py on tiny synthetic data in the real on-disk formats."""
import io
import json
import math
import os
import runpy
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

import q3_mnistm_dann as q3
from common import UserError, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------
# Fixtures: a fake BSDS500 folder (JPEGs) and a fake official MNIST-M archive
# ---------------------------------------------------------------------------------------
def write_fake_bsds(root, n=3, seed=0):
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        os.makedirs(os.path.join(root, "images", split), exist_ok=True)
        for i in range(n):
            photo = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
            Image.fromarray(photo).save(os.path.join(root, "images", split, f"{i}.jpg"))
    return root


@pytest.fixture(scope="module")
def fake_bsds_dir(tmp_path_factory):
    return write_fake_bsds(str(tmp_path_factory.mktemp("bsds") / "BSDS500"))


def png_bytes(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_official_archive(path, labels_text=None, n=4):
    """mnist_m.tar.gz in the authors' layout: constant-colour 32x32 RGB PNGs."""
    with tarfile.open(path, "w:gz") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for split in ("train", "test"):
            lines = []
            for i in range(n):
                colour = np.array([10 * i, 100, 200], dtype=np.uint8)
                add(f"mnist_m/mnist_m_{split}/{i:08d}.png",
                    png_bytes(np.broadcast_to(colour, (32, 32, 3)).copy()))
                lines.append(f"{i:08d}.png {i % 10}")
            text = labels_text if (labels_text is not None and split == "train") else "\n".join(lines) + "\n"
            add(f"mnist_m/mnist_m_{split}_labels.txt", text.encode())


# ---------------------------------------------------------------------------------------
# MNIST-M construction
# ---------------------------------------------------------------------------------------
def test_blending_is_abs_difference_on_exact_pixels():
    rng = np.random.default_rng(0)
    digits = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    photo = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)  # the only possible crop
    out = q3.build_mnistm(digits, [photo], seed=3)
    expected = np.abs(photo[None].astype(int) - digits[..., None].astype(int))
    assert out.dtype == np.uint8 and out.shape == (5, 28, 28, 3)
    np.testing.assert_array_equal(out, expected)
    # a hand-checked pixel: digit 200 over patch (10, 250, 200) -> (190, 50, 0)
    d = np.zeros((1, 28, 28), np.uint8)
    d[0, 3, 4] = 200
    p = np.zeros((28, 28, 3), np.uint8)
    p[3, 4] = (10, 250, 200)
    assert q3.build_mnistm(d, [p])[0, 3, 4].tolist() == [190, 50, 0]


def test_crops_cover_the_photo_and_are_seeded():
    photo = np.arange(40 * 50, dtype=np.int64).reshape(40, 50)
    photo = np.stack([photo % 256, photo // 256, np.zeros_like(photo)], -1).astype(np.uint8)
    digits = np.zeros((300, 28, 28), np.uint8)
    a = q3.build_mnistm(digits, [photo], seed=1)
    np.testing.assert_array_equal(a, q3.build_mnistm(digits, [photo], seed=1))
    assert not np.array_equal(a, q3.build_mnistm(digits, [photo], seed=2))
    index = a[:, 0, 0, 0].astype(int) + 256 * a[:, 0, 0, 1].astype(int)  # top-left pixel
    tops, lefts = index // 50, index % 50
    assert tops.min() == 0 and tops.max() == 40 - 28 and lefts.min() == 0 and lefts.max() == 50 - 28
    for i in range(0, 300, 37):  # every image is an exact crop
        np.testing.assert_array_equal(a[i], photo[tops[i]:tops[i] + 28, lefts[i]:lefts[i] + 28])


def test_train_and_test_backgrounds_are_disjoint():
    train_colours, test_colours = [10, 20, 30], [200, 210, 220]
    photos = {"train": [np.full((30, 40, 3), c, np.uint8) for c in train_colours],
              "test": [np.full((30, 40, 3), c, np.uint8) for c in test_colours]}
    digits = np.zeros((50, 28, 28), np.uint8)
    digits[:, 10:18, 12:15] = 255
    train, test = q3.make_mnistm(digits, digits[:20], photos, seed=0)
    background = digits == 0
    assert set(np.unique(train[background])) <= set(train_colours)
    assert set(np.unique(test[background[:20]])) <= set(test_colours)
    assert len(set(np.unique(train[background]))) > 1  # several photos are used


# ---------------------------------------------------------------------------------------
# Official MNIST-M layout
# ---------------------------------------------------------------------------------------
def test_official_loader_reads_the_archive_and_resizes_to_28(tmp_path):
    write_official_archive(str(tmp_path / "mnist_m.tar.gz"))
    arrays, info = q3.load_official_mnistm(str(tmp_path), str(tmp_path / "cache"))
    assert arrays["train_images"].shape == (4, 28, 28, 3) and arrays["test_images"].shape == (4, 28, 28, 3)
    assert arrays["train_labels"].tolist() == [0, 1, 2, 3]
    assert arrays["train_images"][2, 5, 7].tolist() == [20, 100, 200]  # constant colour kept
    assert os.path.isfile(info["cache"])


def test_official_loader_names_a_malformed_label_line(tmp_path):
    write_official_archive(str(tmp_path / "mnist_m.tar.gz"),
                           labels_text="00000000.png 0\n00000001.png seven\n")
    with pytest.raises(UserError, match=r"mnist_m_train_labels\.txt line 2"):
        q3.load_official_mnistm(str(tmp_path), str(tmp_path / "cache"))


def test_official_loader_names_a_corrupt_archive(tmp_path):
    write_official_archive(str(tmp_path / "good.tar.gz"))
    data = open(tmp_path / "good.tar.gz", "rb").read()
    open(tmp_path / "mnist_m.tar.gz", "wb").write(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"mnist_m\.tar\.gz is corrupt"):
        q3.load_official_mnistm(str(tmp_path), str(tmp_path / "cache"))


# ---------------------------------------------------------------------------------------
# Model, schedules, gradient reversal
# ---------------------------------------------------------------------------------------
def test_model_shapes_and_load_model(tmp_path):
    torch.manual_seed(0)
    model = q3.DANNNet([0.1, 0.2, 0.3])
    x = torch.rand(5, 3, 28, 28)
    assert model.features(x).shape == (5, 768)
    assert model(x).shape == (5, 10)
    assert model.last_hidden(x).shape == (5, 100)
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.Dropout)) for m in model.modules())
    path = str(tmp_path / "dann.pt")
    save_checkpoint(path, q3.KINDS["dann"], {"model": "dann", "seed": 0, "mean": [0.1, 0.2, 0.3]}, model)
    loaded = q3.load_model(path)
    assert not loaded.training
    assert torch.allclose(loaded.mean.flatten(), torch.tensor([0.1, 0.2, 0.3]))
    assert torch.allclose(loaded(x), model(x))
    # the model subtracts its mean itself
    assert torch.allclose(model.features(x), model.feature_extractor(x - model.mean))


def test_wrong_weights_are_one_sentence(tmp_path):
    other = str(tmp_path / "other.pt")
    save_checkpoint(other, "q1_vae", {}, torch.nn.Linear(2, 2))
    with pytest.raises(UserError, match="holds a 'q1_vae' model"):
        q3.load_model(other)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="truncated or not a PyTorch checkpoint"):
        q3.load_model(str(garbage))
    bad = str(tmp_path / "bad.pt")
    save_checkpoint(bad, q3.KINDS["dann"], {"model": "dann", "seed": 0, "mean": [0, 0, 0]},
                    torch.nn.Linear(2, 2))
    with pytest.raises(UserError, match="does not fit this architecture"):
        q3.load_model(bad)


def test_schedules_at_p_0_half_1():
    assert q3.learning_rate(0.0) == pytest.approx(0.01)
    assert q3.learning_rate(0.5) == pytest.approx(0.01 / 6 ** 0.75)
    assert q3.learning_rate(1.0) == pytest.approx(0.01 / 11 ** 0.75)
    assert q3.adaptation_lambda(0.0) == pytest.approx(0.0)
    assert q3.adaptation_lambda(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert q3.adaptation_lambda(0.5) == pytest.approx(0.98661, abs=1e-5)
    assert q3.adaptation_lambda(1.0) == pytest.approx(0.9999092, abs=1e-6)


def test_domain_gradient_reaches_features_reversed_and_scaled():
    torch.manual_seed(0)
    model = q3.DANNNet([0.5, 0.5, 0.5])
    xs, xt = torch.rand(8, 3, 28, 28), torch.rand(8, 3, 28, 28)
    ys = torch.randint(0, 10, (8,))
    lam = 0.37

    _, domain_loss, _ = q3.dann_losses(model, xs, ys, xt, lam)
    reversed_grads = torch.autograd.grad(domain_loss, [model.feature_extractor[0].weight,
                                                        model.domain_classifier[0].weight])
    # the same loss without the reversal layer
    logits = model.domain_classifier(model.features(torch.cat([xs, xt]))).squeeze(1)
    plain = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, torch.cat([torch.zeros(8), torch.ones(8)]))
    plain_grads = torch.autograd.grad(plain, [model.feature_extractor[0].weight,
                                              model.domain_classifier[0].weight])
    assert plain_grads[0].abs().max() > 0
    torch.testing.assert_close(reversed_grads[0], -lam * plain_grads[0], rtol=1e-4, atol=1e-8)
    # the domain classifier itself minimises its loss (weight 1, no reversal)
    torch.testing.assert_close(reversed_grads[1], plain_grads[1])


# ---------------------------------------------------------------------------------------
# Command line: bad input, end to end, eval-only, resume
# ---------------------------------------------------------------------------------------
def base_args(data_dir, bsds_dir, tmp_path, *extra):
    return ["--data-dir", data_dir, "--bsds-dir", bsds_dir, "--cache-dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "out"), "--epochs", "1", "--tsne-points", "30",
            "--device", "cpu", *extra]


def test_bad_arguments_are_argparse_errors():
    for bad in (["--epochs", "0"], ["--lr", "-1"], ["--seeds", "x"], ["--mnistm", "official"]):
        with pytest.raises(SystemExit) as error:
            q3.parse_args(bad)
        assert error.value.code == 2


def test_missing_bsds_is_one_sentence_and_fast(fake_mnist_dir, tmp_path, capsys):
    argv = ["--data-dir", fake_mnist_dir, "--cache-dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "out")]
    start = time.perf_counter()
    with pytest.raises(SystemExit) as error:
        q3.run_cli(lambda: q3.main(argv))  # tries the download, which cannot succeed here
    assert time.perf_counter() - start < 30
    assert error.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "BSDS500 is missing" in err and "images/train" in err
    with pytest.raises(UserError, match="does not hold images/train"):
        q3.main(["--data-dir", fake_mnist_dir, "--bsds-dir", str(tmp_path), "--out", str(tmp_path / "o")])


def test_missing_mnist_is_one_sentence(fake_bsds_dir, tmp_path):
    with pytest.raises(UserError, match="MNIST is missing"):
        q3.main(base_args(str(tmp_path / "nothing"), fake_bsds_dir, tmp_path, "--no-download"))


def test_end_to_end_writes_every_output(fake_mnist_dir, fake_bsds_dir, tmp_path):
    q3.main(base_args(fake_mnist_dir, fake_bsds_dir, tmp_path, "--svm-retrain"))
    out = tmp_path / "out"
    for name in ("source_only.pt", "dann.pt", "target_only.pt", "table2.md", "metrics.json",
                 "report.md", "mnistm_samples.png", "figure5_tsne_domain.png",
                 "figure5_tsne_digits.png", "training_curves.png",
                 "confusion_mnistm_dann.png"):
        assert (out / name).is_file(), name
    assert len(list((tmp_path / "cache" / "MNIST-M").glob("mnistm_built_*.npz"))) == 1
    report = (out / "report.md").read_text()
    for png in out.glob("*.png"):
        assert f"]({png.name})" in report, png.name
    table = (out / "table2.md").read_text()
    for row in ("Source only", "DANN", "Train on target", "0.7666", "0.5225", "0.9596"):
        assert row in table
    metrics = json.loads((out / "metrics.json").read_text())
    assert {r["model"] for r in metrics["runs"]} == set(q3.MODELS)
    dann = next(r for r in metrics["runs"] if r["model"] == "dann")
    assert 0 <= dann["mnistm_test_accuracy"] <= 1 and "svm_mnistm_test_accuracy" in dann
    assert dann["training"]["images_per_step"] == 128
    history = torch.load(out / "dann.pt", weights_only=False)["history"]
    assert set(history[0]) >= {"label_loss", "domain_loss", "domain_accuracy", "target_accuracy"}
    assert metrics["machine"]["cpu_cores"] >= 1 and "command" in metrics

    # --eval-only recomputes the same numbers from the weights alone
    before = {(r["model"], r["seed"]): r["mnistm_test_accuracy"] for r in metrics["runs"]}
    (out / "figure5_tsne_domain.png").unlink()
    q3.main(base_args(fake_mnist_dir, fake_bsds_dir, tmp_path, "--eval-only"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_only"]
    assert {(r["model"], r["seed"]): r["mnistm_test_accuracy"] for r in metrics["runs"]} == before
    assert (out / "figure5_tsne_domain.png").is_file()

    # --weights may name a single file (that model only) or a folder (every model and seed)
    assert q3.find_weights(str(out / "dann.pt")) == {"dann": [(0, str(out / "dann.pt"))]}
    assert set(q3.find_weights(str(out))) == set(q3.MODELS)
    with pytest.raises(UserError, match="no weights"):
        q3.main(base_args(fake_mnist_dir, fake_bsds_dir, tmp_path, "--eval-only", "--weights",
                          str(tmp_path / "cache")))


def test_same_seed_same_numbers_and_resume_after_interrupt(fake_mnist_dir, fake_bsds_dir,
                                                           tmp_path, monkeypatch):
    def train(out, *extra):
        args = q3.parse_args(base_args(fake_mnist_dir, fake_bsds_dir, tmp_path, "--epochs", "2",
                                       "--out", str(out), *extra))
        data, info = q3.load_data(args, torch.device("cpu"))
        return q3.train_model("dann", 0, data, args, torch.device("cpu"), q3.pixel_mean(data), info)

    reference, _, history = train(tmp_path / "a")
    assert len(history) == 2
    again, _, _ = train(tmp_path / "b")
    for key, value in reference.state_dict().items():  # same seed, same numbers
        torch.testing.assert_close(again.state_dict()[key], value, rtol=0, atol=0)

    # Ctrl-C at the end of the first epoch saves a checkpoint; --resume finishes identically
    real_accuracy = q3.accuracy

    def interrupt(*a, **k):
        monkeypatch.setattr(q3, "accuracy", real_accuracy)
        raise KeyboardInterrupt

    monkeypatch.setattr(q3, "accuracy", interrupt)
    with pytest.raises(UserError, match="--resume"):
        train(tmp_path / "c")
    assert (tmp_path / "c" / "checkpoints" / "dann_seed0.pt").is_file()
    assert not (tmp_path / "c" / "dann.pt").exists()
    resumed, _, _ = train(tmp_path / "c", "--resume")
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0)
    # finished weights are reused, not retrained, by --resume
    stamp = os.path.getmtime(tmp_path / "c" / "dann.pt")
    train(tmp_path / "c", "--resume")
    assert os.path.getmtime(tmp_path / "c" / "dann.pt") == stamp


def test_import_does_not_train_or_read_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["x", "--bogus"])
    namespace = runpy.run_path(os.path.join(ROOT, "q3_mnistm_dann.py"), run_name="imported")
    assert callable(namespace["main"]) and callable(namespace["build_mnistm"])
    assert callable(namespace["load_model"])
