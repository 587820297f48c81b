"""Bad input: a bad flag, a setting this machine cannot run, a dataset that is corrupt, of another task or unsafe,
a loss that stops being finite: each is one clear error naming the fix, no library traceback.
"""
import os

import numpy as np
import pytest
import torch

import mvp
import prepare_ogbench
from tests.helpers import ENV, TINY, main_error, run_cli


# ---------------------------------------------------------------------------------------------
# Bad flags: argparse's usage error, naming the value and the rule
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--env", "cube-quadruple"], "unknown --env 'cube-quadruple'. Accepted: cube-single"),
    (["--num-candidates", "0"], "--num-candidates must be >= 1"),
    (["--chunk-len", "0"], "--chunk-len must be >= 1"),
    (["--offline-steps", "-5"], "--offline-steps must be >= 0"),
    (["--save-minutes", "-1"], "--save-minutes must be >= 0"),
    (["--ivc-coef", "-1"], "--ivc-coef must be >= 0"),
    (["--eval-only"], "--eval-only needs --checkpoint"),
    (["--device", "tpu"], "--device must be auto, cpu or cuda"),
    (["--cuda-graph", "yes"], "argument --cuda-graph: invalid choice: 'yes'"),
    (["--cuda-graph", "on", "--device", "cpu"], "--cuda-graph on needs a CUDA device"),
    (["--time-sampler", "beta"], "argument --time-sampler: invalid choice: 'beta'"),
    (["--one-step-frac", "1.5"], "--one-step-frac must be in [0, 1] (got 1.5)"),
    (["--matmul-precision", "medium"], "argument --matmul-precision: invalid choice: 'medium'"),
    (["--select-dtype", "float16"], "argument --select-dtype: invalid choice: 'float16'"),
    (["--eval-workers", "-3"], "--eval-workers must be >= -1 (got -3)"),
    (["--lr", "0"], "--lr must be > 0 (got 0.0)"),
    (["--discount", "1.5"], "--discount must be in (0, 1] (got 1.5)"),
    (["--threads", "100000"], "--threads 100000 is more than this machine's"),
])
def test_bad_arguments(argv, message, capsys):
    """argparse's usage error (exit 2) naming the value and the rule; in this process, as the CLI parses them."""
    with pytest.raises(SystemExit) as e:
        mvp.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_bad_argument_on_the_command_line_is_one_usage_error():
    proc = run_cli("--env", "cube-quadruple", "--num-candidates", "0", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unknown --env 'cube-quadruple'" in proc.stderr and "--num-candidates must be >= 1" in proc.stderr


def test_cuda_graph_on_without_cuda_is_refused(capsys):
    with pytest.raises(SystemExit):
        mvp.parse_args(["--cuda-graph", "on", "--device", "cpu"])
    assert "--cuda-graph on needs a CUDA device" in capsys.readouterr().err


def test_bfloat16_selection_is_refused_on_a_cpu_without_native_bfloat16(tmp_path, monkeypatch):
    """Emulated bfloat16 made MVP's update 25x slower on an AVX2 CPU (7.66 against 0.30 updates/s): a training run
    there is refused before it loads anything; run_benchmarks.py speed can still measure it."""
    monkeypatch.setattr(mvp, "cpu_has_bfloat16", lambda: False)
    run = tmp_path / "run"
    with pytest.raises(SystemExit, match="needs a CPU with native bfloat16.*--select-dtype float32"):
        mvp.main([*TINY, "--select-dtype", "bfloat16", "--device", "cpu", "--run-dir", str(run)])
    assert not run.exists()
    args = mvp.Args(hidden_dim=8, num_layers=1, select_dtype="bfloat16")
    assert mvp.make_learner(4, 10, args, torch.device("cpu")).select_dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# Bad runs and bad data: one line naming the fix
# ---------------------------------------------------------------------------------------------
def test_out_of_memory_names_the_flags_to_lower(single_dir, tmp_path):
    # 32 states x 10^9 candidates: terabytes for the first tensor of best-of-N, refused by the allocator at once
    message = main_error(*TINY, "--dataset-dir", single_dir, "--offline-steps", "1", "--online-steps", "0",
                         "--num-candidates", str(10 ** 9), "--run-dir", str(tmp_path / "r"))
    assert "error: out of memory" in message and "--num-candidates" in message


def test_chunks_longer_than_the_dataset_are_refused(single_dir, tmp_path):
    message = main_error(*TINY, "--dataset-dir", single_dir, "--chunk-len", "2500", "--offline-steps", "1",
                         "--online-steps", "0", "--run-dir", str(tmp_path / "r"))
    assert "--chunk-len 2500 is longer than the dataset (2000 rows)" in message


def _copy_dataset(src_dir, dst_dir, edit=lambda arrays: None, name="cube-single-play-v0"):
    for split in ("", "-val"):
        with np.load(os.path.join(src_dir, f"{name}{split}.npz")) as f:
            arrays = {k: f[k].copy() for k in f.files}
        edit(arrays)
        np.savez(os.path.join(dst_dir, f"{name}{split}.npz"), **arrays)


def test_corrupt_dataset_file_is_named(single_dir, tmp_path):
    _copy_dataset(single_dir, tmp_path)
    path = tmp_path / "cube-single-play-v0.npz"
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    message = main_error(*TINY, "--dataset-dir", str(tmp_path), "--offline-steps", "5", "--run-dir",
                         str(tmp_path / "r"))
    assert str(path) in message and "--generate-data" in message


def test_mismatched_dataset_is_refused(single_dir, tmp_path):
    def widen(arrays):  # 3 extra observation dims: a file made for another task
        arrays["observations"] = np.concatenate([arrays["observations"], arrays["observations"][:, :3]], axis=1)

    _copy_dataset(single_dir, tmp_path, widen)
    message = main_error(*TINY, "--dataset-dir", str(tmp_path), "--offline-steps", "5", "--run-dir",
                         str(tmp_path / "r"))
    assert "another task" in message


def test_dataset_with_pickled_objects_is_refused(data_dir, tmp_path):
    _copy_dataset(data_dir, tmp_path, lambda arrays: arrays.update(actions=np.array([object()] * 3, dtype=object)),
                  name="cube-double-play-v0")
    with pytest.raises(mvp.DATA_ERRORS, match="cube-double-play-v0.npz"):
        prepare_ogbench.load_dataset(ENV, str(tmp_path))


def test_non_finite_loss_stops_naming_step_and_terms(single_dir, tmp_path):
    # finite, so the dataset checks pass, but far past float32 once squared: the losses overflow at once
    _copy_dataset(single_dir, tmp_path, lambda arrays: arrays["observations"].fill(1e30))
    message = main_error(*TINY, "--dataset-dir", str(tmp_path), "--offline-steps", "60", "--run-dir",
                         str(tmp_path / "r"))
    assert "non-finite loss in the offline phase, first at update 1" in message and "mf_loss=" in message
