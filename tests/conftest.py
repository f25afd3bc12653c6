"""Shared fixtures: tiny synthetic datasets written in the real on-disk formats, so the
scripts' real loading code runs in every test."""
import os
import struct
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def write_idx(path, array):
    """Write a uint8 array as an IDX file (the MNIST format): magic, dims, raw bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x08, array.ndim))
        f.write(struct.pack(">" + "I" * array.ndim, *array.shape))
        f.write(array.tobytes())


def fake_digits(n, seed):
    """n 28x28 'digits': class k is a bright bar in a class-specific place plus noise, so a
    model can learn something in one epoch."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = (rng.random((n, 28, 28)) * 40).astype(np.uint8)
    for i, k in enumerate(labels):
        row = 4 + 2 * k
        images[i, row:row + 3, 5:23] = 255
        images[i, 5:23, 4 + 2 * k:6 + 2 * k] = 200
    return images, labels.astype(np.uint8)


def write_fake_mnist(root, n_train=300, n_test=100):
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = fake_digits(n, seed)
        write_idx(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), images)
        write_idx(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), labels)
    return root


@pytest.fixture(scope="session")
def fake_mnist_dir(tmp_path_factory):
    """A data folder holding 300 train and 100 test fake digits in torchvision's MNIST layout."""
    return write_fake_mnist(str(tmp_path_factory.mktemp("data")))
