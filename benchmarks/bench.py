"""Training speed of each question beside what this machine's matrix multiply can do.

    python benchmarks/bench.py            # about a minute on 2 CPU cores
    python benchmarks/bench.py --device cuda

For each script it builds the default model, runs a few warm-up steps, then times training
steps on random inputs of the real shapes (the step functions the scripts' own training loops
call), and prints images per second. The matrix-multiply rate (2048 x 2048, fp32 and, where the
CPU or GPU has it, bf16) is measured in the same run, so numbers from different machines can
be set against their ceiling.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


def timed(step, seconds, warmup=3, sync=lambda: None):
    """Run step() `warmup` times, then as often as fits in `seconds`; return calls per second."""
    for _ in range(warmup):
        step()
    sync()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        calls += 1
    sync()
    return calls / (time.perf_counter() - start)


def matmul_gflops(device, dtype, seconds, sync, n=2048):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return timed(lambda: a @ b, seconds, sync=sync) * 2 * n**3 / 1e9


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--seconds", type=common.positive_float, default=4.0,
                        help="timing per measurement (default %(default)s)")
    parser.add_argument("--only", nargs="+", choices=list(STEPS), default=list(STEPS),
                        help="which scripts (default: all)")
    args = parser.parse_args(argv)
    device = common.choose_device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    print(f"machine: {common.machine_info(device)['description']}, PyTorch {torch.__version__}")
    print(f"matmul 2048x2048 fp32: {matmul_gflops(device, torch.float32, args.seconds, sync):8.1f} "
          f"GFLOP/s")
    from q2_cyclevae import native_bf16

    if device.type == "cuda" or native_bf16():
        print(f"matmul 2048x2048 bf16: "
              f"{matmul_gflops(device, torch.bfloat16, args.seconds, sync):8.1f} GFLOP/s")
    else:
        print("matmul 2048x2048 bf16: not timed (this CPU has no native bf16)")
    for name in args.only:
        label, make_step = STEPS[name]
        per_step, unit, step = make_step(device)
        rate = timed(step, args.seconds, sync=sync)
        print(f"{label:<28} {rate * per_step:10,.0f} {unit}/s ({per_step} {unit} a step)")


# ---------------------------------------------------------------------------------------
# One training step of each script at its defaults: (items a step, their name, the step).
# ---------------------------------------------------------------------------------------
def q1_vae_step(device):
    """Question 1: one Adam step of the VAE on a batch of 128 digits."""
    import q1_vae

    args = q1_vae.build_parser().parse_args([])
    model = q1_vae.VAE(args.latent, args.hidden).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=q1_vae.LR)
    x = torch.rand(q1_vae.BATCH_SIZE, 1, 28, 28, device=device)
    return q1_vae.BATCH_SIZE, "images", lambda: q1_vae.train_step(model, optimizer, x, args.beta)


def q2_cyclevae_step(device):
    """Question 2: one step of both cycles (64 pairs + 2 x 64 arbitrary frames, 60x60x3)."""
    import q2_cyclevae

    args = q2_cyclevae.parse_args(q2_cyclevae.build_parser(), [])
    args.precision = q2_cyclevae.resolve_precision(args.precision, device)
    model = q2_cyclevae.build_model(q2_cyclevae.model_hparams(args)).to(device)
    model = model.to(memory_format=torch.channels_last)
    optimizers = q2_cyclevae.make_optimizers(model, args.lr)
    batch = [torch.rand(args.batch_size, 3, 60, 60, device=device)
             .contiguous(memory_format=torch.channels_last) for _ in range(4)]
    return 4 * args.batch_size, "images", lambda: q2_cyclevae.training_step(model, optimizers, batch, args)


def q3_toy_dann_epoch(device):
    """Question 3.1: one epoch of Algorithm 1 (per-sample SGD, 300 source points paired with
    random target points) for the standard NN and the DANN at once; counts source points."""
    import numpy as np

    import q3_toy_dann as toy

    args = toy.parse_args(["--lambda", "6"])
    rng = np.random.RandomState(0)
    W, V = (np.stack(w * 2) for w in zip(toy.initial_weights(rng, toy.HIDDEN_UNITS)))
    M, D = W.shape[:2]
    net = toy.Networks(W, np.zeros((M, D)), V, np.zeros((M, 2)), np.zeros((M, D)),
                       np.zeros(M), [False, True])
    n = 2 * args.n_per_class
    source = toy.with_ones(rng.normal(size=(M, n, 2)))
    target = toy.with_ones(rng.normal(size=(M, n, 2)))
    e_y = np.eye(2)[rng.randint(2, size=(M, n))].transpose(1, 0, 2)[..., None]
    j = rng.randint(n, size=(M, n))
    return n, "points", lambda: toy.train_epoch(net, source, e_y, target, j, toy.LR, args.lambda_)


def q3_mnistm_dann_step(device):
    """Question 3.2: one SGD step of DANN, 64 MNIST + 64 MNIST-M images (Figure 4(a) network)."""
    import q3_mnistm_dann as q3

    args = q3.parse_args([])
    model = q3.DANNNet([0.5, 0.5, 0.5]).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=q3.LR, momentum=q3.MOMENTUM)
    n = args.batch_size
    source = q3.as_input(torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8)).to(device)
    target = q3.as_input(torch.randint(0, 256, (n, 3, 28, 28), dtype=torch.uint8)).to(device)
    labels = torch.randint(0, 10, (n,), device=device)
    return 2 * n, "images", lambda: q3.dann_step(model, optimizer, source, labels, target, 0.5)


STEPS = {"q1": ("q1_vae.train_step", q1_vae_step),
         "q2": ("q2_cyclevae.training_step", q2_cyclevae_step),
         "q3toy": ("q3_toy_dann.train_epoch", q3_toy_dann_epoch),
         "q3mnistm": ("q3_mnistm_dann.dann_step", q3_mnistm_dann_step)}


if __name__ == "__main__":
    main()
