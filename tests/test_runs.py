"""Real runs of mvp.py: a whole run end to end, what the main command says before it spends anything, run folders,
checkpoints, and runs that survive interruption (SIGKILL, Ctrl-C, SIGTERM, a failed evaluation) and resume exactly.

Run: python -m pytest -q -n 2 tests/test_runs.py   (CPU, a few minutes)
"""
import gc
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
import torch

import mvp
import prepare_ogbench
import run_utils
from tests.helpers import HERE, RESUMABLE, SINGLE, TINY, QuadraticCritic, main_error, read_csv, run_cli


# ---------------------------------------------------------------------------------------------
# A whole run, and what the main command says before it spends anything
# ---------------------------------------------------------------------------------------------
def test_end_to_end_offline_online_eval(uninterrupted):
    run = uninterrupted
    offline, online, evals = (read_csv(run / f) for f in ("offline.csv", "online.csv", "eval.csv"))
    assert [int(r["step"]) for r in offline] == list(range(20, 201, 20))
    # the first online update comes at env step 20 [QC: i >= start_training]; the 200-step cap ends two episodes
    assert [int(r["step"]) for r in online] == list(range(20, 501, 20))
    assert online[0]["episode"] == "0" and online[-1]["episode"] == "2" and online[-1]["episode_length"] == "200"
    for row in offline + online:
        for k in ("critic_loss", "mf_loss", "ivc_loss", "q_mean", "updates_per_s"):
            assert np.isfinite(float(row[k]))
    assert [(r["phase"], int(r["step"])) for r in evals] == [("offline", 200), ("online", 300), ("online", 500)]
    assert 0.0 <= float(evals[-1]["success_rate"]) <= 1.0
    stats = ("success_rate", "return_mean", "length_mean", "q0_mean", "disc_return_mean", "contact_frac")
    assert list(evals[0]) == ["phase", "step", *stats, *("bc_" + k for k in stats)]
    for row, prefix in ((r, p) for r in evals for p in ("", "bc_")):
        length, ret, disc = (float(row[prefix + k]) for k in ("length_mean", "return_mean", "disc_return_mean"))
        assert np.isfinite(float(row[prefix + "q0_mean"])) and 0.0 <= float(row[prefix + "contact_frac"]) <= 1.0
        # rewards are in [-1, 0]: sum_k 0.99^k r_k lies between -sum_k 0.99^k and 0, and above the plain return
        assert -(1 - 0.99 ** length) / 0.01 - 1e-6 <= disc <= 0.0 and ret <= disc + 1e-6
    stdout = (run.parent / "stdout.txt").read_text()
    assert stdout.count("(N = 1: ") == 6 and "vs discounted return" in stdout  # the [eval] lines
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_eval"]["step"] == 500 and summary["env"] == SINGLE and summary["offline_updates_per_s"] > 0
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert set(ckpt) >= {"policy", "critic", "target_critic", "args"} and ckpt["args"]["hidden_dim"] == 32


def test_a_checkpoint_holds_the_online_rows_not_the_dataset(uninterrupted):
    """A slice of the replay buffer is a view of one tensor that also holds the dataset: torch.save would write
    all of it. A checkpoint's size follows the online rows (here 2,000 offline rows would be 512 kB more)."""
    path = sorted((uninterrupted / "checkpoints").glob("resume-*.pt"))[-1]
    state = torch.load(path, weights_only=True)
    rows = state["buffer_rows"]
    assert len(rows["obs"]) == state["pos"]["online"] > 0
    for k, v in rows.items():
        assert v.untyped_storage().nbytes() == v.numel() * 4, k
    tensors = [v for k in mvp.LEARNER_STATE for v in torch.utils._pytree.tree_leaves(state[k])
               if isinstance(v, torch.Tensor)]
    expected = sum(v.numel() * v.element_size() for v in tensors + list(rows.values()))
    assert expected < os.path.getsize(path) < expected + 100_000


def test_the_first_online_log_row_counts_only_the_steps_since_updates_began(single_dir, tmp_path, monkeypatch):
    """Online updates begin at --start-training: the first log row's rates cover the steps from there on, not the
    update-free steps before (made slow here: 10 ms each), so they match the next row's."""
    made, make_env = [], prepare_ogbench.make_env

    def make_slow_before_training(name):
        env = make_env(name)
        if not made:  # the first env built is the training env
            step = env.step
            env.step = lambda action: (time.sleep(0.02) if len(made) < 100 else None, made.append(1), step(action))[-1]
            made.append(1)
        return env

    monkeypatch.setattr(prepare_ogbench, "make_env", make_slow_before_training)
    run = tmp_path / "run"
    gc.collect()  # what earlier tests left is not collected inside the rows timed here (it once took 0.5 s there)
    mvp.main([*TINY, "--dataset-dir", single_dir, "--offline-steps", "0", "--online-steps", "200",
              "--start-training", "101", "--eval-interval", "0", "--run-dir", str(run), "--threads", "1"])
    first, second = read_csv(run / "online.csv")
    assert (first["step"], second["step"]) == ("150", "200")
    for k in ("updates_per_s", "env_steps_per_s"):  # before: the first row's about 1 / 20 of the second's
        assert float(first[k]) > 0.3 * float(second[k]), (k, first[k], second[k])


def test_the_main_command_states_its_cost_before_it_makes_any_data(tmp_path, monkeypatch, capsys):
    """python mvp.py --env cube-double on a CPU: before the first generated episode, one plan line with the data to
    make and its time, the updates with theirs (timed here on the run's sizes), and, as that is days on a CPU, the
    README's CPU recipe to run instead."""
    def first_episode(*a, **k):
        raise KeyboardInterrupt  # where the data's making would begin: the user stops here
    monkeypatch.setattr(prepare_ogbench, "find_dataset", first_episode)
    with pytest.raises(KeyboardInterrupt):
        mvp.main(["--env", "cube-double", "--device", "cpu", "--dataset-dir", str(tmp_path / "none"), "--run-dir",
                  str(tmp_path / "run")])
    out = capsys.readouterr().out
    plan = [line for line in out.splitlines() if line.startswith("[mvp] plan:")]
    assert len(plan) == 1 and "cube-double-play-singletask-v0 on cpu, 4x512, batch 256, N = 32" in plan[0]
    procs = min(os.cpu_count() or 1, 1100)
    data_s = 1100 * 1001 / prepare_ogbench.PLANNER_STEPS_PER_S / procs
    assert (f"if OGBench's download fails, 1,000 + 100 episodes of 1,001 steps generated with OGBench's planner on "
            f"{procs} processes, about {run_utils.duration_text(data_s)}") in plan[0]
    rate = float(re.search(r"at ([0-9.e+]+) updates/s", plan[0])[1])
    updates = 1_000_000 + 1_000_000 - 4_999  # online updates begin at env step 5,000
    assert f"Training: {updates:,} updates, about {run_utils.duration_text(updates / rate)}" in plan[0]
    assert updates / rate > 86400 and f"the README's CPU recipe takes about an hour and a half: {mvp.CPU_RECIPE}" in out
    assert mvp.CPU_RECIPE in open(os.path.join(HERE, "README.md")).read().replace(" \\\n   ", "")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Run folders
# ---------------------------------------------------------------------------------------------
def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path, monkeypatch):
    """The default folder is made with os.mkdir, which only one process can win: the other gets -2."""
    monkeypatch.chdir(tmp_path)
    made = []
    threads = [threading.Thread(target=lambda: made.append(run_utils.new_run_dir(os.path.join("runs", "x"))))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(made) == [os.path.join("runs", n) for n in ("x", "x-2", "x-3")]


def test_two_runs_started_together_keep_their_folders_and_evaluation_draws_no_training_numbers(single_dir,
                                                                                                tmp_path):
    """Two runs launched at once with the default folder (runs/<env>_s<seed>_<time>) write separate logs; they
    differ only in how many episodes they evaluate, and train identically: evaluation draws none of training's
    random numbers."""
    argv = [*TINY, "--dataset-dir", single_dir, "--offline-steps", "100", "--online-steps", "40",
            "--start-training", "20", "--eval-interval", "100", "--log-interval", "20", "--seed", "3",
            "--threads", "1"]
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "mvp.py"), *argv, "--eval-episodes", n],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for n in ("1", "2")]
    for proc in procs:
        assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all(r.name.startswith("cube-single-task1_s3_") for r in runs)
    losses = {}
    for run in runs:
        episodes = json.loads((run / "args.json").read_text())["eval_episodes"]
        assert [(r["phase"], r["step"]) for r in read_csv(run / "eval.csv")] == [("offline", "100"), ("online", "40")]
        rows = read_csv(run / "offline.csv") + read_csv(run / "online.csv")
        losses[episodes] = [(r["critic_loss"], r["mf_loss"], r["ivc_loss"], r["q_mean"]) for r in rows]
    assert set(losses) == {1, 2} and losses[1] == losses[2] and len(losses[1]) == 7  # offline 20..100; online 20, 40


def test_a_fresh_run_never_writes_over_another_run(uninterrupted, tmp_path, capsys):
    """A fresh run into a finished or resumable run's directory is refused (appended eval rows would
    silently mix two runs); logs of a run that died before its first checkpoint are started over."""
    assert "already holds a finished run" in main_error(*RESUMABLE, "--run-dir", str(uninterrupted))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "resume-0000000100.pt").write_bytes(b"x")
    with pytest.raises(SystemExit, match=f"resumable run; continue it with `python mvp.py --resume {tmp_path}`"):
        mvp.check_run_dir(str(tmp_path), fresh=True)
    mvp.check_run_dir(str(tmp_path), fresh=False)  # what --resume does
    dead = tmp_path / "dead"
    dead.mkdir()
    (dead / "eval.csv").write_text("phase,step,success_rate\noffline,100,0.5\n")
    mvp.check_run_dir(str(dead), fresh=False)
    assert (dead / "eval.csv").exists()
    mvp.check_run_dir(str(dead), fresh=True)
    assert not (dead / "eval.csv").exists() and "starting it over" in capsys.readouterr().out


def test_unwritable_run_dir_and_full_disk_are_reported_before_training(data_dir, single_dir, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert "cannot write to the run directory" in main_error(*TINY, "--run-dir", str(blocker / "run"),
                                                             "--offline-steps", "5")
    # the paper's settings: 4 checkpoints (the kept two, one being written, the final) of 0.36 GB each, float32:
    # 10^6 online rows of 2 * 37 + 5 + 3 numbers, and the networks with Adam's two moments
    monkeypatch.setattr(shutil, "disk_usage", lambda p: type("U", (), dict(free=10**9))())
    with pytest.raises(SystemExit, match=r"1.00 GB free, but this run's checkpoints need about 1.46 GB"):
        mvp.Run(mvp.parse_args(["--env", "cube-double-task1", "--dataset-dir", data_dir, "--device", "cpu",
                                "--run-dir", str(tmp_path / "full")]), resume=None)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: type("U", (), dict(free=10**10))())
    run = mvp.Run(mvp.parse_args([*TINY, "--dataset-dir", single_dir, "--device", "cpu", "--run-dir",
                                  str(tmp_path / "ok")]), resume=None)  # small networks fit
    run.stop.restore()
    # [QC] the dataset's actions are clipped to +-(1 - 1e-5) as they are loaded; the checksum is the file's
    actions = prepare_ogbench.load_dataset(SINGLE, single_dir)["actions"]
    assert np.abs(actions).max() == 1.0 and run.task["dataset"]["crc32"] == zlib.crc32(actions.tobytes())
    loaded = run.buffer.store["actions"][:len(actions)].numpy()
    assert np.abs(loaded).max() == np.float32(1 - 1e-5)
    assert np.array_equal(loaded, np.clip(actions, -1 + 1e-5, 1 - 1e-5))


# ---------------------------------------------------------------------------------------------
# Runs survive interruption and bad checkpoints, and resume exactly
# ---------------------------------------------------------------------------------------------
LOSS_COLUMNS = ("step", "critic_loss", "mf_loss", "ivc_loss", "q_mean", "target_mean", "bon_gain")


def _start(argv, log_path):
    """A training process whose output goes to a file (a pipe nobody reads would fill up and block it)."""
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "mvp.py"), *argv], cwd=HERE, stdout=log,
                            stderr=subprocess.STDOUT, text=True)
    proc.log_path = log_path
    return proc


def _wait_for(predicate, proc, timeout=600):
    start = time.time()
    while not predicate():
        assert proc.poll() is None, "the run ended before it could be interrupted:\n" + \
            open(proc.log_path).read()[-3000:]
        assert time.time() - start < timeout, open(proc.log_path).read()[-3000:]
        time.sleep(0.02)


def _losses(run):
    return {name: [tuple(r[c] for c in LOSS_COLUMNS) for r in read_csv(run / name)] for name in ("offline.csv",
                                                                                                 "online.csv")}


def _evals(run):
    return [(r["phase"], r["step"], r["success_rate"], r["return_mean"]) for r in read_csv(run / "eval.csv")]


def test_sigkill_then_resume_matches_an_uninterrupted_run(single_dir, uninterrupted, tmp_path):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    # kill once in the offline phase, once in the online phase (its checkpoint waits for the episode's end at 200)
    for wanted in ("resume-0000000100.pt", "resume-0000000400.pt"):
        argv = (["--resume", str(run)] if ckpts.exists() else [*RESUMABLE, "--dataset-dir", single_dir, "--run-dir",
                                                               str(run)])
        proc = _start(argv, tmp_path / f"{wanted}.log")
        _wait_for(lambda: (ckpts / wanted).exists(), proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc = run_cli("--resume", str(run))
    assert "resuming from" in proc.stdout
    whole, resumed = _losses(uninterrupted), _losses(run)
    assert resumed == whole  # same losses, no duplicate or missing rows
    assert [int(r[0]) for r in resumed["online.csv"]] == list(range(20, 501, 20))
    assert _evals(run) == _evals(uninterrupted)
    summaries = [json.loads((r / "summary.json").read_text()) for r in (run, uninterrupted)]
    assert summaries[0]["evals"] == summaries[1]["evals"]


def test_checkpoints_by_the_clock_resume_exactly(single_dir, uninterrupted, tmp_path):
    """--save-minutes bounds what a crash loses by wall time; online, such a checkpoint also waits for an
    episode's end, so a run killed after one resumes to the uninterrupted run's losses and evaluations."""
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    proc = _start([*RESUMABLE, "--save-interval", "0", "--save-minutes", "0.002", "--dataset-dir", single_dir,
                   "--run-dir", str(run)], tmp_path / "log")
    _wait_for(lambda: any(int(p.name[7:17]) > 200 for p in ckpts.glob("resume-*.pt")), proc)  # one online
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_cli("--resume", str(run))
    assert _losses(run) == _losses(uninterrupted)
    assert _evals(run) == _evals(uninterrupted)


def test_ctrl_c_saves_and_says_how_to_resume(single_dir, uninterrupted, tmp_path):
    run = tmp_path / "run"
    proc = _start([*RESUMABLE, "--dataset-dir", single_dir, "--run-dir", str(run)], tmp_path / "log")
    _wait_for(lambda: (run / "offline.csv").exists(), proc)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=600)
    out = open(proc.log_path).read()
    assert proc.returncode == 130, out[-3000:]
    assert f"Resume with: python mvp.py --resume {run}" in out and "Traceback" not in out
    assert list((run / "checkpoints").glob("resume-*.pt"))
    run_cli("--resume", str(run))
    assert _losses(run) == _losses(uninterrupted)  # an interruption in the offline phase resumes exactly


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_during_an_evaluation_in_worker_processes_saves_after_it(single_dir, tmp_path, signum,
                                                                                   code):
    """A terminal's Ctrl-C, or Slurm's SIGTERM at a time limit, reaches the whole process group: the
    evaluation workers ignore it, the evaluation finishes and is logged, then the run saves and stops
    as it does without workers."""
    run, log_path = tmp_path / "run", tmp_path / "log"
    argv = [*TINY, "--dataset-dir", single_dir, "--offline-steps", "300", "--online-steps", "0",
            "--eval-interval", "100", "--eval-episodes", "2", "--eval-workers", "2", "--threads", "1",
            "--run-dir", str(run)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "mvp.py"), *argv], cwd=HERE, stdout=log,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    proc.log_path = log_path
    _wait_for(lambda: "(2 processes)" in open(log_path).read(), proc)
    time.sleep(0.5)
    os.killpg(proc.pid, signum)
    proc.wait(timeout=600)
    out = open(log_path).read()
    assert proc.returncode == code and "Traceback" not in out, out[-3000:]
    assert f"Resume with: python mvp.py --resume {run}" in out
    assert [r["step"] for r in read_csv(run / "eval.csv")] == ["100"]
    assert [p.name for p in (run / "checkpoints").glob("resume-*.pt")] == ["resume-0000000100.pt"]


def test_a_signal_after_the_episode_cut_still_ends_the_episode_at_the_seam(single_dir, tmp_path):
    """A stop signal that arrives after the online loop's cut check and before the save leaves the saved episode's
    last row open; the resumed run starts a new episode, so it ends the old one there: no chunk spans the seam.
    The signal is sent from a trace hook at the line after the check, mid-episode (online step 50 of 200)."""
    run = tmp_path / "run"
    lines, first = inspect.getsourcelines(mvp.train)
    target = first + next(i for i, line in enumerate(lines) if "if save_due and obs is None" in line)

    def on_line(frame, event, arg):
        if event == "line" and frame.f_lineno == target and frame.f_locals["step"] == 50:
            os.kill(os.getpid(), signal.SIGINT)
        return on_line

    sys.settrace(lambda frame, event, arg: on_line if frame.f_code is mvp.train.__code__ else None)
    try:
        with pytest.raises(SystemExit) as e:
            mvp.main([*TINY, "--dataset-dir", single_dir, "--offline-steps", "0", "--online-steps", "100",
                      "--start-training", "1000", "--run-dir", str(run)])
    finally:
        sys.settrace(None)
    assert e.value.code == 130
    _, state = mvp.newest_checkpoint(str(run))
    assert state["pos"]["online"] == 50 and state["buffer_rows"]["terminals"][-1] == 0  # saved mid-episode
    resumed = mvp.Run(*mvp.resume_args(mvp.parse_args(["--resume", str(run)])))
    resumed.stop.restore()
    assert resumed.buffer.size == 2000 + 50 and resumed.buffer.store["terminals"][2000 + 49] == 1.0


def test_a_failed_evaluation_saves_and_the_resumed_run_redoes_it(single_dir, uninterrupted, tmp_path, monkeypatch,
                                                                 capsys):
    """An env or worker crash in an evaluation (here the offline phase's last one) saves the run at that
    step and re-raises; the resumed run evaluates again first and continues exactly as if nothing failed."""
    def crash(*a, **k):
        raise RuntimeError("resource not found (a crashed env)")
    monkeypatch.setattr(mvp, "evaluate", crash)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="a crashed env"):
        mvp.main([*RESUMABLE, "--dataset-dir", single_dir, "--run-dir", str(run)])
    assert f"Once its cause is fixed: python mvp.py --resume {run}" in capsys.readouterr().out
    assert max(p.name for p in (run / "checkpoints").glob("resume-*.pt")) == "resume-0000000200.pt"
    monkeypatch.undo()
    run_cli("--resume", str(run))
    assert _losses(run) == _losses(uninterrupted)
    assert _evals(run) == _evals(uninterrupted)


def test_a_finished_run_continues_online_exactly_as_the_longer_run(single_dir, uninterrupted, tmp_path):
    """A phase's end writes a checkpoint, so --resume with a larger --online-steps extends a finished
    offline-only run; it logs what the run with those steps from the start logs. Phases cannot shrink,
    and the offline one cannot change once the online one has begun. How each stretch ran is recorded; what it
    was not told anew (here --threads 1) it keeps."""
    run = tmp_path / "run"
    proc = run_cli(*RESUMABLE, "--online-steps", "0", "--save-interval", "150", "--dataset-dir", single_dir,
                   "--run-dir", str(run))
    assert "offline: 100%" in proc.stderr and "online:" not in proc.stderr  # no progress bar for an empty phase
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt")) == ["resume-0000000150.pt",
                                                                          "resume-0000000200.pt"]
    assert _evals(run) == _evals(uninterrupted)[:1]
    run_cli("--resume", str(run), "--online-steps", "500", "--matmul-precision", "highest")  # CUDA-only: same here
    assert _losses(run) == _losses(uninterrupted)
    assert _evals(run) == _evals(uninterrupted)
    saved = json.loads((run / "args.json").read_text())
    assert saved["online_steps"] == 500  # what the suite's plots read
    segments = [(g["from_offline_step"], g["from_online_step"], g["matmul_precision"], g["threads"])
                for g in saved["segments"]]
    assert segments == [(0, 0, "high", 1), (200, 0, "highest", 1)]  # not only the newest value; --threads kept
    assert torch.load(run / "checkpoint.pt", weights_only=True)["segments"] == saved["segments"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["offline_updates_per_s"] is None and summary["online_env_steps_per_s"] > 0  # not a 0.0 speed
    for flags in (["--online-steps", "400"], ["--offline-steps", "300"]):
        assert "a phase can only grow" in main_error("--resume", str(run), *flags)


def test_corrupt_or_unsafe_checkpoint_falls_back_to_the_previous_good_one(uninterrupted, tmp_path, capsys):
    import shutil as sh
    run = tmp_path / "run"
    sh.copytree(uninterrupted, run)
    paths = sorted((run / "checkpoints").glob("resume-*.pt"))
    assert len(paths) == 2  # only the newest two are kept
    paths[1].write_bytes(paths[1].read_bytes()[:5000])  # truncated by a crash
    path, state = mvp.newest_checkpoint(str(run))
    assert path == str(paths[0]) and "truncated or corrupt" in capsys.readouterr().out
    # an arbitrary pickled object
    torch.save({"format": run_utils.CHECKPOINT_FORMAT, "payload": QuadraticCritic(torch.zeros(1))}, paths[1])
    path, _ = mvp.newest_checkpoint(str(run))
    assert path == str(paths[0]) and "truncated or corrupt" in capsys.readouterr().out  # weights_only refused it
    for p in paths:
        p.write_bytes(b"garbage")
    with pytest.raises(SystemExit, match="every checkpoint"):
        mvp.newest_checkpoint(str(run))


def test_resume_refuses_other_settings_and_missing_checkpoints(uninterrupted, tmp_path):
    assert f"trained with --env {SINGLE}" in main_error("--resume", str(uninterrupted), "--env", "cube-double-task2")
    assert "--ivc-coef 1.0, not 0.5" in main_error("--resume", str(uninterrupted), "--ivc-coef", "0.5")
    assert "nothing to resume" in main_error("--resume", str(tmp_path))


def test_resume_refuses_another_device_type_or_dataset(uninterrupted, tmp_path):
    """A run's random streams live on its device (a CPU generator state is 5,056 bytes, a CUDA one 16), and its
    offline rows come from the dataset it trained on: a resume that would change either is refused, by name."""
    for key, value, message in (("device_type", "cuda", "resume with --device cuda"),
                                ("dataset", dict(source="elsewhere.npz", rows=2000, crc32=1), "dataset (rows")):
        run = tmp_path / key
        shutil.copytree(uninterrupted, run)
        path, state = mvp.newest_checkpoint(str(run))
        mvp.save_checkpoint(path, {**state, key: value})
        assert message in main_error("--resume", str(run))


def test_loaded_optimizers_take_this_runs_capturable_setting():
    """Optimizer.load_state_dict restores the saved param groups' capturable flag: a run saved without CUDA graphs
    and resumed with them would fail at capture. load_learner sets it from the learner being loaded."""
    args = mvp.Args(hidden_dim=8, num_layers=1)
    state = mvp.checkpoint_state(mvp.make_learner(37, 25, args, torch.device("cpu")), args, {})
    learner = mvp.make_learner(37, 25, args, torch.device("cpu"))
    mvp.load_learner(learner, state, cuda_graph=True)  # as a CUDA run with graphs loads it
    assert all(g["capturable"] for g in learner.policy_opt.param_groups + learner.critic_opt.param_groups)
