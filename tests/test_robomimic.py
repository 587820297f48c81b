"""Robomimic: the HDF5 loader, the env rebuilt from the file's metadata, scripted demos, errors, and a real run.
No download: files are recorded here by the scripted demonstrators in the real robosuite env, or written by hand
with h5py.
"""
import json
import math
import os
import shutil

import numpy as np
import pytest

import mvp
import prepare_robomimic
from tests.helpers import main_error, read_csv, run_cli

NUM_DEMOS = 3
LIFT_OBS_DIM = 3 + 4 + 2 + 10  # eef pos, eef quat, gripper qpos, object-state (cube pos, quat, gripper-to-cube)


@pytest.fixture(scope="session")
def lift_file(tmp_path_factory):
    """A small scripted Lift file, recorded once for the whole session."""
    path = str(tmp_path_factory.mktemp("robomimic") / "lift_scripted.hdf5")
    prepare_robomimic.generate_scripted("lift", path, NUM_DEMOS, seed=0)
    return path


@pytest.fixture(scope="session")
def lift_loaded(lift_file):
    return prepare_robomimic.load_robomimic("lift", dataset_dir=lift_file)


def write_synthetic(path, env_name="Lift", demos=None, scripted=None, env_version="1.4.1"):
    """A hand-made robomimic-layout file: demos maps name -> (length, rewards)."""
    import h5py
    demos = demos or {"demo_0": (4, [0, 0, 1, 1]), "demo_2": (3, [0, 0, 1]), "demo_10": (2, [0, 1])}
    dims = dict(robot0_eef_pos=3, robot0_eef_quat=4, robot0_gripper_qpos=2, object=10)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        for name, (n, rew) in demos.items():
            g = data.create_group(name)
            idx = int(name[5:])
            for part, off in (("obs", 0), ("next_obs", 1)):
                sub = g.create_group(part)
                for k, d in dims.items():  # value encodes demo index and step, to check order and continuity
                    sub.create_dataset(k, data=np.full((n, d), 0.0) + 100 * idx + np.arange(off, n + off)[:, None])
            g.create_dataset("actions", data=np.zeros((n, 7)))
            g.create_dataset("rewards", data=np.asarray(rew, np.float64))
            dones = np.asarray(rew, np.int64)
            dones[-1] = 1  # robomimic's done_mode 2: success steps and the last step
            g.create_dataset("dones", data=dones)
            g.attrs["num_samples"] = n
        data.attrs["total"] = sum(n for n, _ in demos.values())
        data.attrs["env_args"] = json.dumps(dict(env_name=env_name, env_version=env_version, type=1, env_kwargs={}))
        if scripted:
            data.attrs["mvp_scripted"] = json.dumps(scripted)


# ---- loader ---------------------------------------------------------------------------------
def test_loader_on_generated_file(lift_loaded, lift_file):
    ds, make_env = lift_loaded
    n = len(ds["observations"])
    assert set(ds) == {"observations", "actions", "rewards", "masks", "terminals", "next_observations"}
    assert all(v.dtype == np.float32 for v in ds.values())
    assert ds["observations"].shape == ds["next_observations"].shape == (n, LIFT_OBS_DIM)
    assert ds["actions"].shape == (n, 7) and np.abs(ds["actions"]).max() <= 1.0
    assert ds["rewards"].shape == ds["masks"].shape == ds["terminals"].shape == (n,)
    assert set(np.unique(ds["rewards"])) <= {-1.0, 0.0}
    # scripted demos stop at the first success: one 0 reward per demo, on its last row
    ends = np.flatnonzero(ds["terminals"])
    assert len(ends) == NUM_DEMOS and ends[-1] == n - 1
    np.testing.assert_array_equal(np.flatnonzero(ds["rewards"] == 0.0), ends)
    np.testing.assert_array_equal(ds["masks"], (ds["rewards"] != 0.0).astype(np.float32))
    # within a demo s'_t = s_{t+1}; across a demo end it is not
    inner = np.flatnonzero(ds["terminals"][:-1] == 0)
    np.testing.assert_array_equal(ds["next_observations"][inner], ds["observations"][inner + 1])
    assert not np.allclose(ds["next_observations"][ends[0]], ds["observations"][ends[0] + 1])
    assert make_env.dataset_path == lift_file and make_env.scripted["task"] == "lift"
    import h5py
    with h5py.File(lift_file, "r") as f:  # robomimic's layout and the scripted marker
        data = f["data"]
        assert data.attrs["total"] == n and json.loads(data.attrs["env_args"])["env_name"] == "Lift"
        assert json.loads(data.attrs["mvp_scripted"])["success_rate"] > 0
        assert sum(int(data[d].attrs["num_samples"]) for d in data) == n
        assert data["demo_0/dones"][-1] == 1 and data["demo_0/rewards"][-1] == 1


def test_loader_semantics_on_handmade_file(tmp_path):
    path = str(tmp_path / "lift.hdf5")
    write_synthetic(path)
    ds, _ = prepare_robomimic.load_robomimic("lift", dataset_dir=path)
    # numeric demo order (demo_0, demo_2, demo_10), rows concatenated
    np.testing.assert_array_equal(ds["observations"][:, 0], [0, 1, 2, 3, 200, 201, 202, 1000, 1001])
    np.testing.assert_array_equal(ds["rewards"], [-1, -1, 0, 0, -1, -1, 0, -1, 0])
    np.testing.assert_array_equal(ds["masks"], [1, 1, 0, 0, 1, 1, 0, 1, 0])  # 0 at every success step
    np.testing.assert_array_equal(ds["terminals"], [0, 0, 0, 1, 0, 0, 1, 0, 1])  # demo ends only
    ds2, _ = prepare_robomimic.load_robomimic("lift", dataset_dir=path, num_demos=2)
    assert len(ds2["observations"]) == 7


def test_chunks_never_cross_demo_ends(lift_loaded):
    """mvp's sequence sampler rule (valid until the first terminal) keeps every chunk inside one demo."""
    ds, _ = lift_loaded
    term = ds["terminals"]
    demo_id = np.concatenate([[0], np.cumsum(term)[:-1]])
    h = 5
    for start in range(len(term) - h + 1):
        t = term[start:start + h]
        ended = np.maximum.accumulate(t)
        valid = np.concatenate([[1.0], 1.0 - ended[:-1]])
        rows = start + np.flatnonzero(valid)
        assert len(set(demo_id[rows])) == 1


# ---- environment from the file's metadata ---------------------------------------------------
def replay_first_demo(ds, make_env):
    """Replay demo 0 of a loaded file from its seed: every observation must equal the recorded one bit for bit.

    The demonstrator executes float32 actions, the dtype the loader returns, so the replay is exact on any CPU;
    a 3e-8 rounding gap once ended a Can replay 1.95 apart after the grasp. Returns the last step's results."""
    env = make_env()
    env_seed = int(np.random.SeedSequence([0, 0]).generate_state(2)[0])  # the generator's seed for attempt 0
    obs, info = env.reset(seed=env_seed)
    assert obs.dtype == np.float32 and info["success"] is False
    np.testing.assert_array_equal(obs, ds["observations"][0])
    end = int(np.flatnonzero(ds["terminals"])[0])
    for t in range(end + 1):
        obs, reward, terminated, truncated, info = env.step(ds["actions"][t])
        np.testing.assert_array_equal(obs, ds["next_observations"][t], err_msg=f"step {t} of {end}")
        assert isinstance(info["success"], bool) and not truncated
        assert reward == (0.0 if terminated else -1.0) and terminated == info["success"]
        assert terminated == (t == end)
    env.close()
    return env, reward, terminated, info


def test_env_from_metadata_replays_a_demo_step_for_step(lift_loaded):
    """The env rebuilt from env_args, reset with demo 0's seed, reproduces demo 0 exactly and reports success."""
    ds, make_env = lift_loaded
    env, reward, terminated, info = replay_first_demo(ds, make_env)
    assert env.env_name == "Lift" and env.max_episode_steps == 300
    assert env.observation_space.shape == (LIFT_OBS_DIM,) and env.action_space.shape == (7,)
    assert terminated and info["success"] and reward == 0.0


def test_env_scripted_rollout_succeeds_and_seeding(lift_loaded):
    _, make_env = lift_loaded
    env = make_env()
    state = np.random.get_state()
    push = np.array([0.5, 0.2, -0.3, 0.1, 0.0, 0.0, 1.0])
    a, _ = env.reset(seed=123)
    moved = [env.step(push)[0] for _ in range(20)]
    b, _ = env.reset(seed=123)  # the same scene and dynamics after an episode in between
    np.testing.assert_array_equal(moved, [env.step(push)[0] for _ in range(20)])
    c, _ = env.reset(seed=124)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert all(np.array_equal(x, y) for x, y in zip(state[1:3], np.random.get_state()[1:3]))  # global RNG untouched
    policy = prepare_robomimic.ScriptedLift(np.random.default_rng(0))
    env.reset(seed=7)
    rewards = []
    for _ in range(env.max_episode_steps):
        _, r, terminated, truncated, info = env.step(policy(env.raw_obs))
        rewards.append(r)
        if terminated or truncated:
            break
    assert terminated and info["success"] and rewards[-1] == 0.0 and set(rewards[:-1]) == {-1.0}
    env.close()


def test_env_rng_is_saved_and_restored_as_checkpoints_do(lift_loaded):
    """run_state saves env.unwrapped.np_random's state and restore_run sets a generator from it: the next
    reset then gives the scene the uninterrupted run would have had."""
    _, make_env = lift_loaded
    env = make_env()
    env.reset(seed=3)
    saved = dict(env.unwrapped.np_random.bit_generator.state)
    expected, _ = env.reset()
    env.reset()
    rng = np.random.Generator(np.random.PCG64())
    rng.bit_generator.state = saved
    env.unwrapped.np_random = rng
    np.testing.assert_array_equal(env.reset()[0], expected)
    env.close()


def test_env_resets_keep_no_files_open(lift_loaded):
    """Resets restore the compiled model (hard_reset False): with a recompile per reset, MuJoCo 3.1.6 kept about
    50 mesh files open per episode, and a Lift run died after some 400 episodes ('resource not found')."""
    _, make_env = lift_loaded
    env = make_env()
    env.reset(seed=0)
    before = len(os.listdir("/proc/self/fd"))
    for i in range(5):
        env.reset(seed=i)
    assert len(os.listdir("/proc/self/fd")) <= before + 5  # was + 250
    env.close()


def test_env_truncates_at_cap(lift_loaded):
    _, make_env = lift_loaded
    env = make_env()
    env.max_episode_steps = 4  # the cap logic, without running 300 steps
    env.reset(seed=0)
    outs = [env.step(np.zeros(7)) for _ in range(4)]
    assert [o[3] for o in outs] == [False, False, False, True] and not any(o[2] for o in outs)
    assert outs[-1][4]["success"] is False
    env.close()


# ---- generation -----------------------------------------------------------------------------
def test_generation_is_deterministic_and_reused(lift_file, tmp_path):
    import h5py
    other = str(tmp_path / "again.hdf5")
    prepare_robomimic.generate_scripted("lift", other, NUM_DEMOS, seed=0)
    with h5py.File(lift_file, "r") as f, h5py.File(other, "r") as g:
        for d in f["data"]:
            np.testing.assert_array_equal(f["data"][d]["actions"][()], g["data"][d]["actions"][()])
            np.testing.assert_array_equal(f["data"][d]["obs/object"][()], g["data"][d]["obs/object"][()])
    mtime = os.path.getmtime(other)
    prepare_robomimic.generate_scripted("lift", other, NUM_DEMOS, seed=0)  # same settings: reused, not rewritten
    assert os.path.getmtime(other) == mtime
    assert not os.path.exists(other + ".tmp")


def test_scripted_generation_resumes_after_an_interruption_to_the_same_bytes(lift_file, tmp_path, monkeypatch):
    """Each attempt's outcome is kept as it finishes; a rerun continues from the next attempt and writes the file
    an uninterrupted run writes, byte for byte (no timestamps, no wall-clock figures inside)."""
    attempt, started = prepare_robomimic._attempt, []

    def interrupted_at_the_third(*a, **k):
        if len(started) == 2:
            raise KeyboardInterrupt
        started.append(1)
        return attempt(*a, **k)

    monkeypatch.setattr(prepare_robomimic, "_attempt", interrupted_at_the_third)
    path = tmp_path / "again.hdf5"
    with pytest.raises(KeyboardInterrupt):
        prepare_robomimic.generate_scripted("lift", str(path), NUM_DEMOS, seed=0)
    assert len(list((tmp_path / "again.hdf5.parts").glob("attempt_*.npz"))) == 2 and not path.exists()
    monkeypatch.undo()
    prepare_robomimic.generate_scripted("lift", str(path), NUM_DEMOS, seed=0)
    assert path.read_bytes() == open(lift_file, "rb").read() and not (tmp_path / "again.hdf5.parts").exists()


def test_scripted_file_holds_the_executed_float32_actions_and_no_clock(lift_loaded, lift_file):
    import h5py
    _, make_env = lift_loaded
    assert make_env.scripted["actions"] == "float32, as executed" and "seconds" not in make_env.scripted
    with h5py.File(lift_file) as f:
        actions = f["data/demo_0/actions"][()]
    assert np.array_equal(actions, actions.astype(np.float32))  # the very float32 actions that were executed
    assert os.listdir(os.path.dirname(lift_file)) == [os.path.basename(lift_file)]  # no parts, no .tmp


def test_prepare_robomimic_command(lift_file, tmp_path, monkeypatch, capsys):
    """Errors name the fix (square: the human file's URL and path; offline: the same); a run prints the mvp.py
    command that trains on its file (here a copy of the reference file, reused as it has the same settings)."""
    root, url = str(tmp_path), prepare_robomimic.dataset_url("square")
    human = prepare_robomimic.default_dataset_path("square", root)
    for argv, message in ((["cube"], "invalid choice: 'cube'"), (["lift", "--demos", "0"], "--demos must be >= 1"),
                          (["square", "--dataset-dir", root], f"--download (fetches {url} to {human})")):
        with pytest.raises(SystemExit) as e:
            prepare_robomimic.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(mvp.DATA_ERRORS, match=f"no scripted demonstrator for square.*{url}"):
        prepare_robomimic.generate_scripted("square", str(tmp_path / "square.hdf5"), 1)

    def offline(url, path, timeout=30.0):
        raise OSError("network unreachable")

    monkeypatch.setattr(prepare_robomimic, "download", offline)
    with pytest.raises(SystemExit, match=f"downloading {url} failed .*network unreachable.*put it at {human}"):
        prepare_robomimic.main(["square", "--download", "--dataset-dir", root])
    path = prepare_robomimic.scripted_dataset_path("lift", NUM_DEMOS, 0, root)
    os.makedirs(os.path.dirname(path))
    shutil.copy(lift_file, path)
    prepare_robomimic.main(["lift", "--demos", str(NUM_DEMOS), "--dataset-dir", root])
    assert f"python mvp.py --env lift --dataset-dir {path}" in capsys.readouterr().out


def test_generation_never_overwrites_a_human_file(tmp_path):
    path = str(tmp_path / "human.hdf5")
    write_synthetic(path)
    with pytest.raises(mvp.DATA_ERRORS, match="not generated by this project"):
        prepare_robomimic.generate_scripted("lift", path, 1, seed=0)


# ---- errors ---------------------------------------------------------------------------------
def test_missing_file_names_the_download_and_the_scripted_alternative(tmp_path, monkeypatch):
    """mvp.py needs no network: a missing robomimic file is an error naming the download command, the URL and the
    path to put it at, and the scripted demos (not the paper's data); the download command names them when offline."""
    with pytest.raises(mvp.DATA_ERRORS) as e:
        prepare_robomimic.load_robomimic("lift", dataset_dir=str(tmp_path))
    msg, path = str(e.value), str(tmp_path / "lift/mh/low_dim_v141.hdf5")
    assert prepare_robomimic.dataset_url("lift") in msg and path in msg
    assert "python prepare_robomimic.py lift --download" in msg
    assert "python prepare_robomimic.py lift, then --dataset-dir" in msg and "not the paper's data" in msg
    assert prepare_robomimic.dataset_url("square") == ("http://downloads.cs.stanford.edu/downloads/rt_benchmark/"
                                                       "square/mh/low_dim_v141.hdf5")

    def offline(url, path, timeout=30.0):
        raise OSError("network unreachable")

    monkeypatch.setattr(prepare_robomimic, "download", offline)
    lift_url = prepare_robomimic.dataset_url("lift")
    with pytest.raises(SystemExit, match=f"downloading {lift_url} failed.*put it at {path}"):
        prepare_robomimic.main(["lift", "--download", "--dataset-dir", str(tmp_path)])


def test_corrupt_file_says_delete_and_regenerate(tmp_path):
    path = tmp_path / "lift/mh/low_dim_v141.hdf5"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not an HDF5 file" * 10)
    with pytest.raises(mvp.DATA_ERRORS) as e:
        prepare_robomimic.load_robomimic("lift", dataset_dir=str(tmp_path))
    msg = str(e.value)
    assert str(path) in msg and "python prepare_robomimic.py lift" in msg and "re-download" in msg


def test_file_of_another_task_is_named(tmp_path, lift_file):
    path = tmp_path / "can/mh/low_dim_v141.hdf5"
    path.parent.mkdir(parents=True)
    shutil.copy(lift_file, path)
    with pytest.raises(mvp.DATA_ERRORS) as e:
        prepare_robomimic.load_robomimic("can", dataset_dir=str(tmp_path))
    msg = str(e.value)
    assert str(path) in msg and "'Lift'" in msg and "task 'lift'" in msg and "PickPlaceCan" in msg


def test_task_table():
    caps = {t: s["max_episode_steps"] for t, s in prepare_robomimic.ROBOMIMIC_TASKS.items()}
    assert caps == dict(lift=300, can=300, square=400)
    assert prepare_robomimic.ROBOMIMIC_TASKS["square"]["env_name"] == "NutAssemblySquare"


def test_can_scripted_file_and_env(tmp_path):
    """Can is scripted too: one demo, loaded, and replayed step for step to success in the env from its metadata."""
    path = str(tmp_path / "can.hdf5")
    prepare_robomimic.generate_scripted("can", path, 1, seed=0)
    ds, make_env = prepare_robomimic.load_robomimic("can", dataset_dir=path)
    assert ds["observations"].shape[1] == 3 + 4 + 2 + 14 and ds["terminals"][-1] == 1
    env, reward, terminated, info = replay_first_demo(ds, make_env)
    assert env.env_name == "PickPlaceCan" and env.max_episode_steps == 300
    assert terminated and info["success"] and reward == 0.0


def test_square_has_no_demonstrator(tmp_path, monkeypatch):
    with pytest.raises(mvp.DATA_ERRORS, match="no scripted demonstrator for square"):
        prepare_robomimic.load_robomimic("square", dataset_dir=str(tmp_path))
    with pytest.raises(mvp.DATA_ERRORS, match="no scripted demonstrator"):
        prepare_robomimic.generate_scripted("square", str(tmp_path / "sq.hdf5"), 1, seed=0)
    assert "python prepare_robomimic.py lift" in main_error("--env", "lift", "--generate-data", "--dataset-dir",
                                                            str(tmp_path), "--run-dir", str(tmp_path / "runs" / "lift"))
    assert not (tmp_path / "runs").exists()  # a run that stops before training leaves no stub directory behind


def test_download_is_atomic_and_checks_the_format(tmp_path, lift_file):
    """download() through a file:// URL: an HDF5 file arrives whole; anything else leaves nothing behind."""
    import pathlib
    dest = tmp_path / "root/lift/mh/low_dim_v141.hdf5"
    prepare_robomimic.download(pathlib.Path(lift_file).as_uri(), str(dest))
    assert dest.read_bytes() == pathlib.Path(lift_file).read_bytes()
    page = tmp_path / "error.html"
    page.write_text("<html>404</html>")
    bad = tmp_path / "other/lift/mh/low_dim_v141.hdf5"
    with pytest.raises(OSError, match="did not return an HDF5 file"):
        prepare_robomimic.download(page.as_uri(), str(bad))
    assert not (tmp_path / "other").exists()


def test_file_of_another_robosuite_version_is_refused(tmp_path):
    path = str(tmp_path / "lift_v15.hdf5")
    write_synthetic(path, env_version="1.5.1")
    with pytest.raises(mvp.DATA_ERRORS, match="recorded with robosuite 1.5.1.*low_dim_v141"):
        prepare_robomimic.load_robomimic("lift", dataset_dir=path)


# ---- a real run -----------------------------------------------------------------------------
def test_end_to_end_lift_on_scripted_demos(lift_file, tmp_path, capsys):
    """The same CLI and loops as OGBench, on the session's 3 scripted demos: offline + online + eval, then
    --eval-only (prepare_robomimic.py's command line is test_prepare_robomimic_command's)."""
    run = tmp_path / "run"
    proc = run_cli("--env", "lift", "--dataset-dir", lift_file,
                   "--hidden-dim", "32", "--num-layers", "2", "--batch-size", "32", "--num-candidates", "4",
                   "--offline-steps", "60", "--online-steps", "80", "--start-training", "20", "--eval-interval", "0",
                   "--eval-episodes", "1", "--log-interval", "20", "--run-dir", str(run), "--threads", "1",
                   "--save-interval", "30")
    assert "SCRIPTED demos" in proc.stderr
    import h5py
    with h5py.File(lift_file) as f:  # the demonstrator's noise
        steps = np.concatenate([np.diff(f["data"][k]["actions"][:, :3], axis=0) for k in f["data"]])
    assert steps.std(axis=0).min() > 0.3  # iid noise of std 0.3 per step: about 0.42 (with 0.05: 0.07 to 0.2)
    # every 30 steps and at each phase's end; the online one (60 + 80) truncates the unfinished episode
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt")) == ["resume-0000000060.pt",
                                                                          "resume-0000000140.pt"]
    evals = read_csv(run / "eval.csv")
    assert [(r["phase"], r["step"]) for r in evals] == [("offline", "60"), ("online", "80")]
    # no contact info
    assert math.isnan(float(evals[-1]["contact_frac"])) and np.isfinite(float(evals[-1]["bc_q0_mean"]))
    assert [int(r["step"]) for r in read_csv(run / "online.csv")] == [20, 40, 60, 80]
    for ckpt in (run / "checkpoint.pt", run / "checkpoints" / "resume-0000000060.pt"):  # a snapshot too; the CLI
        mvp.main(["--eval-only", "--checkpoint", str(ckpt), "--threads", "1"])  # path is the OGBench test's
        res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert res["env"] == "lift" and res["episodes"] == 1
    assert res["success_rate"] == float(read_csv(run / "eval.csv")[0]["success_rate"])  # the offline evaluation's
