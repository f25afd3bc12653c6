import os

import numpy as np
import pytest
import torch

import common


def test_gradient_reversal_is_identity_forward_and_minus_lambda_backward():
    x = torch.randn(5, 3, requires_grad=True)
    incoming = torch.randn(5, 3)
    for lambda_ in (0.0, 0.3, 6.0):
        x.grad = None
        y = common.grad_reverse(x, lambda_)
        assert torch.equal(y, x)
        y.backward(incoming)
        assert torch.equal(x.grad, -lambda_ * incoming)


def test_gradient_reversal_inside_a_network_reverses_only_below_it():
    layer = torch.nn.Linear(2, 2)
    head = torch.nn.Linear(2, 1)
    x = torch.randn(4, 2)
    head(common.grad_reverse(layer(x), 2.0)).sum().backward()
    reversed_grad = layer.weight.grad.clone()
    head_grad = head.weight.grad.clone()
    layer.zero_grad(), head.zero_grad()
    head(layer(x)).sum().backward()
    assert torch.allclose(reversed_grad, -2.0 * layer.weight.grad)
    assert torch.allclose(head_grad, head.weight.grad)


def test_classification_metrics_match_hand_computed_values():
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 1, 1, 1, 2, 0]
    m = common.classification_metrics(y_true, y_pred, class_names=["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # precision: a 1/2, b 2/3, c 1/1; recall: a 1/2, b 2/2, c 1/2
    assert m["per_class"]["a"]["precision"] == pytest.approx(0.5)
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["c"]["recall"] == pytest.approx(0.5)
    assert m["per_class"]["b"]["f1"] == pytest.approx(2 * (2 / 3) / (2 / 3 + 1))
    assert m["per_class"]["a"]["support"] == 2
    assert m["macro_precision"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    assert m["macro_recall"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    table = common.metrics_table(m)
    assert "| b | 0.6667 | 1.0000 | 0.8000 | 2 |" in table


def test_confusion_matrix_figure_and_tsne_plot(tmp_path):
    m = common.classification_metrics([0, 1, 1], [0, 1, 0])
    common.plot_confusion_matrix(m, str(tmp_path / "cm.png"))
    rng = np.random.default_rng(0)
    features = np.concatenate([rng.normal(0, 1, (40, 5)), rng.normal(8, 1, (40, 5))])
    labels = np.repeat([0, 1], 40)
    embedding, index = common.plot_tsne(features, labels, str(tmp_path / "tsne.png"),
                                        names=["source", "target"], colors=["blue", "red"],
                                        n_points=60)
    assert embedding.shape == (60, 2) and len(set(index)) == 60
    assert (tmp_path / "cm.png").stat().st_size > 1000
    assert (tmp_path / "tsne.png").stat().st_size > 1000


def test_argparse_types_reject_bad_values():
    assert common.positive_int("3") == 3
    for parse, bad in ((common.positive_int, "0"), (common.positive_int, "x"),
                       (common.positive_float, "-1"), (common.nonnegative_float, "-0.1"),
                       (common.finite_float, "nan")):
        with pytest.raises(ValueError):
            parse(bad)


def test_checkpoint_round_trip_and_every_bad_file(tmp_path):
    model = torch.nn.Linear(3, 2)
    path = str(tmp_path / "model.pt")
    common.save_checkpoint(path, "kind_a", {"width": 3}, model, epoch=4)
    state = common.load_checkpoint(path, "kind_a")
    assert state["hparams"] == {"width": 3} and state["epoch"] == 4
    fresh = common.load_weights(torch.nn.Linear(3, 2), state, path)
    assert torch.equal(fresh.weight, model.weight)
    assert [f for f in os.listdir(tmp_path)] == ["model.pt"]  # no temporary file left

    with pytest.raises(common.UserError, match="does not exist"):
        common.load_checkpoint(str(tmp_path / "missing.pt"), "kind_a")
    with pytest.raises(common.UserError, match="holds a 'kind_a' model"):
        common.load_checkpoint(path, "kind_b")
    with pytest.raises(common.UserError, match="does not fit this architecture"):
        common.load_weights(torch.nn.Linear(4, 2), state, path)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(path, "rb").read()[:100])
    with pytest.raises(common.UserError, match="truncated"):
        common.load_checkpoint(str(truncated), "kind_a")


def test_interrupted_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    common.write_json(str(path), {"a": 1})

    def broken_write(tmp):
        open(tmp, "w").write("{half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        common.atomic_write(str(path), broken_write)
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_check_finite_stops_on_nan():
    assert common.check_finite(torch.tensor(2.5)) == 2.5
    with pytest.raises(common.UserError, match="became nan"):
        common.check_finite(torch.tensor(float("nan")), "training loss")


def test_missing_mnist_names_the_four_files(tmp_path, monkeypatch):
    import torchvision.datasets.mnist as tv_mnist

    def no_network(self):
        raise OSError("no network")

    monkeypatch.setattr(tv_mnist.MNIST, "download", no_network)
    with pytest.raises(common.UserError) as error:
        common.load_mnist(str(tmp_path), download=True)
    message = str(error.value)
    for name in common.MNIST_FILES:
        assert name in message
    assert os.path.join(str(tmp_path), "MNIST", "raw") in message


def test_load_mnist_reads_idx_files(fake_mnist_dir):
    (train_x, train_y), (test_x, test_y) = common.load_mnist(fake_mnist_dir, download=False)
    assert train_x.shape == (300, 28, 28) and train_x.dtype == torch.uint8
    assert test_x.shape == (100, 28, 28) and set(test_y.tolist()) == set(range(10))


def test_choose_device():
    assert common.choose_device("cpu").type == "cpu"
    assert common.choose_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(common.UserError, match="no CUDA"):
            common.choose_device("cuda")
