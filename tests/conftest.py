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


def interrupt_on_call(monkeypatch, module, name, call):
    """Make module.name raise KeyboardInterrupt (as Ctrl-C does) on its `call`-th call."""
    real, calls = getattr(module, name), []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, interrupted)


class LocalServer:
    """A real HTTP server on 127.0.0.1 serving the folder `root`. url(name) is a good source;
    url(name, fail="404") answers 404; url(name, fail="drop") announces the full size, sends
    half of the file and closes the connection."""

    def __init__(self, root):
        import functools
        import http.server
        import threading

        self.root = str(root)
        self.requests = []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def _route(self):
                server.requests.append(self.path)
                kind, _, rest = self.path.lstrip("/").partition("/")
                return kind, "/" + rest

            def do_HEAD(self):
                kind, self.path = self._route()
                if kind == "404":
                    return self.send_error(404)
                return super().do_HEAD()

            def do_GET(self):
                kind, self.path = self._route()
                if kind == "404":
                    return self.send_error(404)
                if kind == "drop":
                    data = open(os.path.join(server.root, self.path.lstrip("/")), "rb").read()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                return super().do_GET()

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # a client that hangs up early (as a failing download does) is expected

        handler = functools.partial(Handler, directory=self.root)
        self.httpd = Server(("127.0.0.1", 0), handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name, fail="ok"):
        return f"http://127.0.0.1:{self.port}/{fail}/{name}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def http_server(tmp_path):
    """A local HTTP server for download tests (no network needed); see LocalServer."""
    root = tmp_path / "served"
    root.mkdir()
    server = LocalServer(root)
    yield server
    server.close()
