"""Session fixtures shared by test_mvp.py's neighbours in tests/: tiny generated OGBench datasets and one real run
that the end-to-end, resume, evaluation and plot tests all read. Helpers shared by the test files are in
tests/helpers.py."""
import submitit  # noqa: F401  (its import runs logging.config.dictConfig, which closes every logging handler there
# is: absl's, once an in-process run made one, then closes the stream it holds, pytest's capture, unless this import
# came first)
import os

import pytest
import torch

import prepare_ogbench
from tests.helpers import RESUMABLE, run_cli

# pytest -n 2 runs two workers on two cores: one thread each, and for the mvp.py processes they start (torch reads
# OMP_NUM_THREADS), as tiny networks on more threads than free cores spend their time waiting for each other
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A tiny generated cube-double dataset: 2 training episodes and 1 validation episode."""
    d = str(tmp_path_factory.mktemp("data"))
    prepare_ogbench.generate_dataset("cube-double-play-v0", d, num_episodes=2, seed=0, workers=2)
    return d


@pytest.fixture(scope="session")
def single_dir(tmp_path_factory):
    """The same for cube-single, whose episodes last at most 200 steps: the training runs' data."""
    d = str(tmp_path_factory.mktemp("single"))
    prepare_ogbench.generate_dataset("cube-single-play-v0", d, num_episodes=2, seed=0, workers=2)
    return d


@pytest.fixture(scope="session")
def uninterrupted(single_dir, tmp_path_factory):
    """RESUMABLE run start to end; its output is in stdout.txt beside it."""
    run = tmp_path_factory.mktemp("whole") / "run"
    proc = run_cli(*RESUMABLE, "--dataset-dir", single_dir, "--run-dir", str(run))
    (run.parent / "stdout.txt").write_text(proc.stdout)
    return run
