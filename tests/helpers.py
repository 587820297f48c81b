"""What several test files share: the repository's root, the tiny run settings, running mvp.py from the command line
or in this process, and a critic with a known answer. The session fixtures (generated datasets, one shared run)
are in the root's conftest.py."""
import csv
import os
import signal
import subprocess
import sys

import pytest
import torch

import mvp
import run_utils

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository's root
ENV = "cube-double-play-singletask-task1-v0"
SINGLE = "cube-single-play-singletask-task1-v0"  # the training runs' task: 200-step episodes
# tiny networks and budgets for real runs of mvp.py on a CPU
TINY = ["--env", "cube-single-task1", "--hidden-dim", "32", "--num-layers", "2", "--batch-size", "32",
        "--num-candidates", "4", "--eval-episodes", "1", "--log-interval", "50", "--data-workers", "1"]
# one run shared by the end-to-end checks and the resume tests: 200 offline updates, then 500 online steps (episodes
# of 200 steps: two end, the third is cut), evaluated at offline 200 and online 300 and 500; seed 1, not the default
RESUMABLE = [*TINY, "--seed", "1", "--offline-steps", "200", "--online-steps", "500", "--start-training", "20",
             "--eval-interval", "300", "--save-interval", "100", "--log-interval", "20", "--threads", "1"]


def run_cli(*argv, check=True, cwd=HERE):
    proc = subprocess.run([sys.executable, os.path.join(HERE, "mvp.py"), *argv], capture_output=True, text=True,
                          cwd=cwd, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def main_error(*argv) -> str:
    """The one-line error mvp.main stops with (a SystemExit carrying a message, which Python prints without a
    traceback), the signal handlers of the run it began put back."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit) as e:
            mvp.main(list(argv))
    finally:
        run_utils.set_stop_handlers(handlers)
    assert isinstance(e.value.code, str) and e.value.code.startswith("error: "), e.value.code
    return e.value.code


class QuadraticCritic(torch.nn.Module):
    """A critic with a known answer: Q_k(s, a) = -k * ||a - goal||^2 (members differ by scale)."""

    def __init__(self, goal, members=2):
        super().__init__()
        self.goal, self.scales = goal, torch.arange(1, members + 1, dtype=torch.float32)[:, None]

    def forward(self, obs, a):
        return -self.scales * (a - self.goal).square().sum(-1)[None]  # (K, B)
