import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_runs_every_training_step_of_the_four_scripts():
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench.py"),
                           "--seconds", "0.05", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[1].startswith("matmul 2048x2048 fp32:") and "GFLOP/s" in lines[1]
    for name in ("q1_vae.train_step", "q2_cyclevae.training_step",
                 "q3_toy_dann.train_epoch", "q3_mnistm_dann.dann_step"):
        line = next(line for line in lines if line.startswith(name))
        assert float(line.split()[1].replace(",", "")) > 0
