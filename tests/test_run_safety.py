"""Nothing lost when two processes meet (issue 42): one owner per run folder and per dataset, a full disk is a
message, bad data and mismatched or damaged checkpoints are refused before anything is built on them.

Real processes where the defect is between processes. The data is a tiny OGBench-format dataset that
prepare_ogbench.generate_dataset assembles from made-up episodes left in its parts folder (real sizes, the real
settings marker), so no planner runs here.

Run: python -m pytest -q tests/test_run_safety.py   (CPU, about a minute)
"""
import csv
import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import mvp  # noqa: E402
import onnx_policy  # noqa: E402
import prepare_ogbench  # noqa: E402
import prepare_robomimic  # noqa: E402
import run_benchmarks  # noqa: E402
import run_utils  # noqa: E402

NAME, TASK, FULL_TASK = "cube-single-play-v0", "cube-single-task1", "cube-single-play-singletask-task1-v0"
EPISODES, ROWS = 2, 200  # training episodes (and one validation episode) of ROWS rows each
TINY = ["--env", TASK, "--offline-steps", "40", "--online-steps", "0", "--hidden-dim", "32", "--num-layers", "1",
        "--batch-size", "16", "--num-candidates", "4", "--eval-episodes", "1", "--log-interval", "20",
        "--save-interval", "20", "--threads", "1", "--device", "cpu"]


def write_parts(out_dir):
    """What an interrupted generation of EPISODES episodes leaves in <out_dir>/<NAME>.parts/, every episode done:
    made-up episodes with cube-single's sizes (observation 28, action 5, qpos 21, qvel 20)."""
    settings = prepare_ogbench.generation_settings(NAME, EPISODES, 0)
    parts = os.path.join(out_dir, f"{NAME}.parts")
    os.makedirs(parts)
    with open(os.path.join(parts, "settings.json"), "w") as f:
        json.dump(settings, f)
    rng = np.random.default_rng(0)
    for i in range(EPISODES + settings["val_episodes"]):
        prepare_ogbench.write_npz(os.path.join(parts, f"episode_{i:06d}.npz"), dict(
            observations=rng.normal(size=(ROWS, 28)).astype(np.float32),
            actions=rng.uniform(-1, 1, (ROWS, 5)).astype(np.float32), terminals=np.arange(ROWS) == ROWS - 1,
            qpos=rng.normal(size=(ROWS, 21)).astype(np.float32), qvel=rng.normal(size=(ROWS, 20)).astype(np.float32)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """One generation's files (generate_dataset in this process, assembling the parts)."""
    out = str(tmp_path_factory.mktemp("data"))
    write_parts(out)
    prepare_ogbench.generate_dataset(NAME, out, EPISODES, seed=0, workers=1)
    return out


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def files(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def mvp_cli(*argv, cwd):
    return subprocess.Popen([sys.executable, str(ROOT / "mvp.py"), *argv], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture
def keep_signal_handlers():
    """An in-process run that stops with an error leaves its Ctrl-C handler behind; put pytest's back."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, h in handlers.items():
        signal.signal(s, h)


class FullDisk:
    """run_utils's open() on a disk that is full while `full` is set: a write there writes half its bytes, then
    fails with ENOSPC, as a real one does."""

    def __init__(self):
        self.full = False

    def open(self, *args, **kwargs):
        disk, f = self, open(*args, **kwargs)

        class File:
            def write(self, data):
                if disk.full:
                    f.write(data[:len(data) // 2])
                    f.flush()
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return f.write(data)

            def __getattr__(self, name):
                return getattr(f, name)

            def __iter__(self):
                return iter(f)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

        return File()


@pytest.fixture(scope="module")
def contested_run(data_dir, tmp_path_factory):
    """A run (seed 0, in this process) into whose folder a second one (seed 1, `python mvp.py`) is started while it
    runs; the first one's disk then fills as it writes its second checkpoint (after step 40's logs), and it is
    resumed once space is freed. What the second process said, what the first said and left, and the folder."""
    run, disk, rival = tmp_path_factory.mktemp("contested") / "run", FullDisk(), {}
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    load_task, append = mvp.load_task, mvp.append_csv

    def load_task_with_a_rival(env_name, args):  # the run holds its folder by now, and has changed nothing in it
        if not rival:
            before = files(run)
            proc = mvp_cli(*TINY, "--dataset-dir", data_dir, "--seed", "1", "--run-dir", str(run), cwd=run.parent)
            rival.update(zip(("out", "err"), proc.communicate(timeout=600)), code=proc.returncode,
                         changed=files(run) != before)
        return load_task(env_name, args)

    def append_then_fill(path, row):
        append(path, row)
        disk.full = disk.full or path.endswith("eval.csv")  # step 40's evaluation: the checkpoint comes next

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mvp, "load_task", load_task_with_a_rival)
        patch.setattr(run_utils, "open", disk.open, raising=False)
        patch.setattr(mvp, "append_csv", append_then_fill)
        try:
            mvp.main([*TINY, "--dataset-dir", data_dir, "--seed", "0", "--run-dir", str(run)])
            stop = None
        except BaseException as e:  # a SystemExit with its message, if all goes well
            stop = e
    left = files(run)
    mvp.main(["--resume", str(run)])
    for s, h in handlers.items():
        signal.signal(s, h)
    return SimpleNamespace(run=run, rival=SimpleNamespace(**rival), stop=stop, left=left)


# ---- one owner per run folder -------------------------------------------------------------------------------------
def test_a_second_run_into_a_folder_in_use_refuses_in_one_line_and_changes_nothing(contested_run):
    """Before: both ran and exited 0, their rows interleaved in offline.csv, seed 1's run silently lost."""
    run, rival = contested_run.run, contested_run.rival
    assert rival.code == 1 and "Traceback" not in rival.err and not rival.out and not rival.changed, rival
    assert [line for line in rival.err.splitlines() if line.strip()] == [
        f"error: the run directory {run} is in use by another process (pid {os.getpid()}); one folder holds one run: "
        f"wait for that one to end, or pass another --run-dir"]
    assert [int(r["step"]) for r in read_csv(run / "offline.csv")] == [20, 40]  # one run's rows, steps increasing
    assert [int(r["step"]) for r in read_csv(run / "eval.csv")] == [40]
    assert json.loads((run / "args.json").read_text())["seed"] == 0
    assert json.loads((run / "summary.json").read_text())["seed"] == 0
    assert not list(run.rglob("*.tmp")) and not (run / run_utils.RUN_LOCK).exists()  # the lock goes with its run


HOLD = ("import fcntl, os, sys, time\n"
        "f = open(sys.argv[1], 'a+')\n"
        "fcntl.flock(f, fcntl.LOCK_EX)\n"
        "f.write(str(os.getpid()))\n"
        "f.flush()\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n")


def test_a_held_run_folder_is_refused_unchanged_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    """A fresh run or a --resume of a folder another process holds stops at once, naming the holder, and changes
    nothing there (a fresh run would have removed the logs, a resume trimmed them); kill -9 frees the folder."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "offline.csv").write_text("step,critic_loss\n20,1.0\n40,0.5\n")
    (run / "checkpoints" / "resume-0000000020.pt").write_bytes(b"the holder's checkpoint")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run / run_utils.RUN_LOCK)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        before = files(run)
        for argv in (["--resume", str(run)], ["--env", TASK, "--device", "cpu", "--run-dir", str(run)]):
            with pytest.raises(SystemExit) as stop:
                mvp.main(argv)
            assert str(stop.value.code).startswith(f"error: the run directory {run} is in use by another process "
                                                   f"(pid {holder.pid});")
        assert files(run) == before
    finally:
        holder.kill()  # SIGKILL: the process cannot release anything itself
        holder.wait()
    run_utils.lock_run_dir(str(run))  # the OS dropped the dead holder's lock
    run_utils.release_run_dirs()
    assert not (run / run_utils.RUN_LOCK).exists()


# ---- one producer per dataset ---------------------------------------------------------------------------------------
def test_two_generators_into_one_folder_make_one_generations_bytes(data_dir, tmp_path, capsys):
    """One generator (here, in this process) is assembling the files when `python prepare_ogbench.py` is started
    into the same folder: it waits, then uses them. Before: the second one died with a FileNotFoundError traceback
    (the first removed the parts folder it was reading)."""
    out, rival = tmp_path / "data", []
    write_parts(str(out))
    argv = ["--env", "cube-single", "--episodes", str(EPISODES), "--workers", "1", "--dataset-dir", str(out)]
    write = prepare_ogbench.write_npz

    def write_with_a_rival(path, arrays):  # the first file: the generator holds the folder by now
        if not rival:
            proc = subprocess.Popen([sys.executable, str(ROOT / "prepare_ogbench.py"), *argv], cwd=tmp_path,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            rival.append(proc)
            rival.append(proc.stdout.readline())  # its first line: that it waits (or, unlocked, what it does)
        write(path, arrays)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(prepare_ogbench, "write_npz", write_with_a_rival)
        prepare_ogbench.main(argv)
    proc, first = rival
    rest, err = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert first == (f"[data] another process (pid {os.getpid()}) is making {NAME} in {out}: waiting for it, then "
                     f"using its files\n")
    assert rest.startswith(f"[data] reusing generated {out / NAME}.npz\n")
    assert files(out) == files(data_dir)  # no parts, no .tmp, no lock left: one generation's two files, byte for byte
    assert "[data] wrote" in capsys.readouterr().out


def test_a_suite_of_two_seeds_makes_the_data_once_before_launching(tmp_path, monkeypatch):
    """Side by side (local --workers 2) or on Slurm, the runs of a task would each find its data missing."""
    made = []
    generate = prepare_ogbench.generate_dataset
    monkeypatch.setattr(prepare_ogbench, "generate_dataset", lambda *a: made.append(a) or generate(*a))
    out = tmp_path / "data"
    write_parts(str(out))

    def launch(opts, todo):
        assert len(todo) == 2 and len(made) == 1 and (out / f"{NAME}.npz").exists()
        return [0, 0]

    monkeypatch.setattr(run_benchmarks, "launch", launch)
    for launcher in (["--workers", "2"], ["--launcher", "slurm"]):
        made.clear()
        run_benchmarks.main(["suite", "--tasks", TASK, "--seeds", "0", "1", "--methods", "mvp", *launcher,
                             "--out-dir", str(tmp_path / "suite"), "--extra",
                             f"--dataset-dir {out} --dataset-episodes {EPISODES}"])
        assert len(made) == 1


# ---- a full disk ----------------------------------------------------------------------------------------------------
def test_a_full_disk_leaves_no_temporary_file_no_half_row_and_one_line(tmp_path, monkeypatch):
    """Every write of a run, on a full disk: the file as it was, no .tmp (a paper-scale one is gigabytes), a line
    saying how much is free where. Before: torch's 'unexpected pos' RuntimeError traceback, a resume-*.pt.tmp left."""
    disk = FullDisk()
    monkeypatch.setattr(run_utils, "open", disk.open, raising=False)
    log = tmp_path / "offline.csv"
    run_utils.append_csv(str(log), {"step": 20, "loss": 1.0})
    before = log.read_bytes()
    disk.full = True
    for write in (lambda: run_utils.append_csv(str(log), {"step": 40, "loss": 0.5}),
                  lambda: run_utils.truncate_csv(str(log), lambda row: True),
                  lambda: run_utils.write_json(str(tmp_path / "summary.json"), {"seed": 0}),
                  lambda: run_utils.save_checkpoint(str(tmp_path / "checkpoints" / "resume-0000000040.pt"),
                                                    {"w": torch.zeros(10_000)}, keep=2)):
        with pytest.raises(SystemExit) as stop:
            write()
        message = str(stop.value.code)
        assert message.startswith(f"error: no space left on the device writing {tmp_path}") and "\n" not in message
        assert " MB free in " in message or " GB free in " in message
        assert message.endswith("no checkpoint was written yet: free space, then start the run again")
    assert log.read_bytes() == before  # no half row
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["checkpoints", "offline.csv"]
    # the start-up check speaks in the unit that fits
    for free, size, expected in ((5e6, 10e6, "has 5.0 MB free, but this run's checkpoints need about 40.0 MB"),
                                 (3.2e9, 1e9, "has 3.20 GB free, but this run's checkpoints need about 4.00 GB")):
        monkeypatch.setattr(run_utils.shutil, "disk_usage", lambda path: SimpleNamespace(free=free))
        with pytest.raises(SystemExit, match=expected):
            run_utils.check_disk_space(str(tmp_path), int(size))


def test_a_run_whose_disk_fills_stops_in_one_line_and_resumes_after_space_is_freed(contested_run):
    run, stop = contested_run.run, contested_run.stop
    assert isinstance(stop, SystemExit), stop
    message = str(stop.code)
    assert message.startswith(f"error: no space left on the device writing {run}/checkpoints/resume-0000000040.pt (")
    assert message.endswith(f" free in {run}); the newest good checkpoint is {run}/checkpoints/resume-0000000020.pt: "
                            f"free space, then python mvp.py --resume {run}") and "\n" not in message
    assert not [p for p in contested_run.left if p.endswith(".tmp")]
    assert sorted(p for p in contested_run.left if p.endswith(".pt")) == ["checkpoints/resume-0000000020.pt"]
    assert (run / "summary.json").exists()  # the resumed run finished
    assert [int(r["step"]) for r in read_csv(run / "offline.csv")] == [20, 40]
    assert [int(r["step"]) for r in read_csv(run / "eval.csv")] == [40]


# ---- data checked when loaded ---------------------------------------------------------------------------------------
def spoilt_copy(data_dir, folder, key, rows, value) -> str:
    """A copy of the dataset whose training file has `value` at key[rows]; its path."""
    folder.mkdir()
    for suffix in ("", "-val"):
        with np.load(os.path.join(data_dir, f"{NAME}{suffix}.npz")) as f:
            arrays = {k: f[k] for k in f.files}
        if suffix == "":
            arrays[key] = arrays[key].copy()
            arrays[key][rows] = value
        np.savez(folder / f"{NAME}{suffix}.npz", **arrays)
    return str(folder / f"{NAME}.npz")


def test_bad_values_in_a_dataset_are_refused_naming_the_file_the_key_and_the_first_row(data_dir, tmp_path):
    """Before: inf and 1e6 actions trained to exit 0 (clipped silently); NaN was caught at the first log row as a
    'non-finite loss' ('try a lower --lr')."""
    for key, rows, value, expected in (
            ("observations", 7, np.nan, "observations has NaN or inf values in 1 row(s), the first in row 7"),
            ("actions", [11, 30], np.inf, "actions has NaN or inf values in 2 row(s), the first in row 11"),
            ("qpos", 3, -np.inf, "qpos has NaN or inf values in 1 row(s), the first in row 3"),
            ("actions", slice(5, 8), 1e6, "actions has 15 value(s) outside [-1, 1] by more than 0.001 (up to 1e+06, "
                                          "the first in row 5)")):
        path = spoilt_copy(data_dir, tmp_path / f"{key}{value}", key, rows, value)
        with pytest.raises(prepare_ogbench.DataError) as error:
            prepare_ogbench.load_dataset(FULL_TASK, os.path.dirname(path))
        assert str(error.value).startswith(f"{path}: {expected}")
    # within the protocol's clip (1 - 1e-5) up to rounding: accepted
    prepare_ogbench.check_values(np.full((3, 5), 1.0009, np.float32), "actions", "", bounded=True)


def test_a_run_on_bad_data_stops_before_training_and_leaves_no_run_folder(data_dir, tmp_path, keep_signal_handlers):
    path = spoilt_copy(data_dir, tmp_path / "data", "actions", 100, np.nan)
    with pytest.raises(SystemExit) as stop:
        mvp.main([*TINY, "--dataset-dir", os.path.dirname(path), "--run-dir", str(tmp_path / "runs" / "run")])
    assert str(stop.value.code).startswith(f"error: {path}: actions has NaN or inf values in 1 row(s), the first in "
                                           f"row 100")
    assert not (tmp_path / "runs").exists()


def write_robomimic(path, demos: dict):
    """A robomimic-layout Lift file: demos maps a name to (rows, the size of its 'object' observation)."""
    import h5py
    sizes = dict(robot0_eef_pos=3, robot0_eef_quat=4, robot0_gripper_qpos=2)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        for name, (n, object_size) in demos.items():
            g = data.create_group(name)
            for part in ("obs", "next_obs"):
                for k, d in {**sizes, "object": object_size}.items():
                    g.create_dataset(f"{part}/{k}", data=np.zeros((n, d)))
            g.create_dataset("actions", data=np.zeros((n, 7)))
            g.create_dataset("rewards", data=np.arange(n) == n - 1)
            g.create_dataset("dones", data=np.arange(n) == n - 1)
        data.attrs["env_args"] = json.dumps(dict(env_name="Lift", env_version="1.4.1", type=1, env_kwargs={}))


def test_robomimic_files_are_checked_for_values_and_sizes(tmp_path, monkeypatch):
    """Before: a demo of another observation size was a raw np.concatenate error, a file of another size than the
    env's died inside torch ('mat1 and mat2 shapes cannot be multiplied'), NaN actions went into training."""
    path = str(tmp_path / "lift.hdf5")
    write_robomimic(path, {"demo_0": (4, 10), "demo_1": (5, 12)})
    with pytest.raises(prepare_robomimic.DataError, match="demo_1 has observations of size 21 .next_obs 21., demo_0 "
                                                          "of size 19"):
        prepare_robomimic.load_robomimic("lift", path)
    import h5py
    write_robomimic(path, {"demo_0": (4, 10), "demo_1": (5, 10)})
    with h5py.File(path, "r+") as f:
        f["data/demo_1/actions"][2, 0] = np.nan
    with pytest.raises(prepare_robomimic.DataError, match=f"{path}: demo_1's actions has NaN or inf values in 1 "
                                                          f"row.s., the first in row 2 of demo_1"):
        prepare_robomimic.load_robomimic("lift", path)
    with h5py.File(path, "r+") as f:
        f["data/demo_1/actions"][2, 0] = 0.0
        f["data/demo_1/actions"][1:3, :] = 3.0
    with pytest.raises(prepare_robomimic.DataError, match=r"actions has 14 value.s. outside \[-1, 1\] by more than "
                                                          r"0.001, the first in row 1 of demo_1"):
        prepare_robomimic.load_robomimic("lift", path)
    write_robomimic(path, {"demo_0": (4, 10), "demo_1": (5, 10)})
    built = []

    class Env:  # an env its env_args build, of the given observation size (a real one takes seconds to build)
        def __init__(self, env_args, max_steps, source):
            self.observation_space, self.action_space = (SimpleNamespace(shape=(Env.obs_dim,)),
                                                         SimpleNamespace(shape=(7,)))
            built.append(self)

    monkeypatch.setattr(prepare_robomimic, "RobomimicEnv", Env)
    Env.obs_dim = 23
    with pytest.raises(prepare_robomimic.DataError, match="holds observations/actions of size 19/7, but the lift env "
                                                          "its env_args build has 23/7"):
        prepare_robomimic.load_robomimic("lift", path, check_env=True)
    Env.obs_dim, built[:] = 19, []
    dataset, make_env = prepare_robomimic.load_robomimic("lift", path, check_env=True)
    assert make_env() is built[0] and make_env() is built[1]  # the checked env is the first handed out


def test_scripted_robomimic_generation_waits_for_the_process_making_the_same_file(tmp_path, monkeypatch, capsys):
    """Another holder of <file>.lock (here another open file in this process: flock does not tell them apart) is
    waited for, and generation begins only once it lets go."""
    path, started, released = str(tmp_path / "lift.hdf5"), [], []
    lock = open(path + ".lock", "a+")
    fcntl.flock(lock, fcntl.LOCK_EX)
    lock.write(str(os.getpid()))
    lock.flush()

    def let_go():
        released.append(time.time())
        os.remove(path + ".lock")  # as run_utils.producing does: while still holding it
        lock.close()

    class Started(Exception):
        pass

    def env_args(task):  # the first step of a generation; stop there
        started.append(time.time())
        raise Started

    monkeypatch.setattr(prepare_robomimic, "robomimic_env_args", env_args)
    threading.Timer(1.0, let_go).start()
    with pytest.raises(Started):
        prepare_robomimic.generate_scripted("lift", path, 1, seed=0)
    assert released and started[0] >= released[0]
    out = capsys.readouterr().out
    assert f"[robomimic] another process (pid {os.getpid()}) is making {path}: waiting for it" in out
    assert not os.path.exists(path + ".lock")


# ---- checkpoints ----------------------------------------------------------------------------------------------------
def flip_a_tensor_byte(path):
    """Flips one byte in the middle of the checkpoint's largest tensor record (its data, not the zip's structure)."""
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    raw = bytearray(Path(path).read_bytes())
    name_len, extra_len = int.from_bytes(raw[info.header_offset + 26:][:2], "little"), \
        int.from_bytes(raw[info.header_offset + 28:][:2], "little")
    at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    raw[at] ^= 0x40
    Path(path).write_bytes(bytes(raw))


def test_a_flipped_byte_is_refused_and_the_older_checkpoint_used(contested_run, tmp_path, capsys):
    """Before: torch.load read the flipped byte without a word."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for p in (contested_run.run / "checkpoints").glob("resume-*.pt"):
        (folder / p.name).write_bytes(p.read_bytes())
    older, newer = sorted(str(p) for p in folder.glob("resume-*.pt"))
    flip_a_tensor_byte(newer)
    path, state = run_utils.newest_checkpoint(str(tmp_path))
    assert path == older and state["pos"]["offline"] == 20
    assert "fails its CRC check" in capsys.readouterr().out


def test_a_checkpoint_of_another_structure_is_one_line_saying_what_differs(contested_run, tmp_path,
                                                                          keep_signal_handlers):
    """Current format number, other keys or shapes. Before: a raw KeyError or load_state_dict traceback."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    state = torch.load(contested_run.run / "checkpoint.pt", weights_only=True)
    no_rng = run / "checkpoints" / "resume-0000000040.pt"
    torch.save({k: v for k, v in state.items() if k != "rng"}, no_rng)
    with pytest.raises(SystemExit) as stop:
        mvp.main(["--resume", str(run)])
    assert str(stop.value.code) == (
        f"error: {no_rng} is a format-2 checkpoint without rng, which this version of mvp.py writes in every "
        f"checkpoint (it has: {', '.join(sorted(set(state) - {'rng'}))}); use the version that wrote it, or start a "
        f"new run")
    name = next(k for k, v in state["policy"].items() if v.ndim == 2)
    other = run / "other.pt"
    torch.save(dict(state, policy={**state["policy"], name: torch.zeros(3, 3)}), other)
    with pytest.raises(SystemExit) as stop:
        mvp.main(["--eval-only", "--checkpoint", str(other), "--device", "cpu"])
    want = tuple(state["policy"][name].shape)
    assert str(stop.value.code) == (
        f"error: {other} is a format-2 checkpoint that does not match what this version of mvp.py writes (its policy "
        f"has {name} (3, 3), this version's {want}); use the version that wrote it, or start a new run")


# ---- the ONNX runner ------------------------------------------------------------------------------------------------
def test_onnx_policy_refuses_a_file_exported_for_another_task(tmp_path):
    """Before: a policy exported for task2 ran task1's observations without a word."""
    import onnx
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("Identity", ["obs"], ["chunk"])], "policy",
                              [helper.make_tensor_value_info("obs", TensorProto.FLOAT, [1, 28])],
                              [helper.make_tensor_value_info("chunk", TensorProto.FLOAT, [1, 28])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = dict(task="cube-single-play-singletask-task2-v0", obs_dim=28, action_dim=5, chunk_len=5, num_candidates=4,
                method="mvp")
    helper.set_model_props(model, {k: str(v) for k, v in meta.items()})
    path = str(tmp_path / "policy.onnx")
    onnx.save(model, path)
    assert onnx_policy.OnnxPolicy(path, expect_task="cube-single-play-singletask-task2-v0").obs_dim == 28
    with pytest.raises(ValueError, match=f"{path} is a policy for cube-single-play-singletask-task2-v0, not "
                                         f"cube-single-play-singletask-task1-v0"):
        onnx_policy.OnnxPolicy(path, expect_task="cube-single-play-singletask-task1-v0")
