"""OGBench: task names, data generated with OGBench's planner (byte-identical, resumable, reused) and loaded through
OGBench's own loader, prepare_ogbench.py's command line, and seeded resets.
"""
import json
import os
import zipfile

import numpy as np
import pytest

import mvp
import prepare_ogbench
from tests.helpers import ENV


def test_env_names():
    assert mvp.resolve_env_name("cube-double") == "cube-double-play-singletask-v0"
    assert mvp.resolve_env_name("cube-triple-task4") == "cube-triple-play-singletask-task4-v0"
    assert mvp.resolve_env_name(ENV) == ENV
    assert prepare_ogbench.dataset_name(ENV) == "cube-double-play-v0"
    assert mvp.resolve_env_name("cube-single") == "cube-single-play-singletask-v0"
    for k in range(1, 6):
        full = f"cube-single-play-singletask-task{k}-v0"
        assert mvp.resolve_env_name(f"cube-single-task{k}") == full and mvp.resolve_env_name(full) == full
        assert prepare_ogbench.dataset_name(full) == "cube-single-play-v0"
    assert prepare_ogbench.PUBLIC_EPISODES["cube-single-play-v0"] == 1000  # OGBench's data_gen_scripts/commands.sh
    with pytest.raises(ValueError, match=r"cube-single-task5.*cube-triple-task4.*cube-\{single,double,triple\}"):
        mvp.resolve_env_name("cube-quadruple")
    with pytest.raises(ValueError):
        mvp.resolve_env_name("cube-single-play-singletask-task6-v0")


def test_generated_files_load_through_ogbench_with_single_task_rewards(data_dir):
    train = prepare_ogbench.load_dataset(ENV, data_dir)
    _, _, val = prepare_ogbench.import_ogbench().make_env_and_datasets(ENV, dataset_dir=data_dir)
    n = 2 * (prepare_ogbench.EPISODE_STEPS - 1)  # OGBench drops the last state of each episode
    assert train["observations"].shape == (n, prepare_ogbench.make_env(ENV).observation_space.shape[0])
    assert train["actions"].shape == (n, 5) and np.abs(train["actions"]).max() <= 1
    assert len(val["observations"]) == prepare_ogbench.EPISODE_STEPS - 1
    assert train["terminals"].sum() == 2
    assert set(np.unique(train["rewards"])) <= {-2.0, -1.0, 0.0}  # (#cubes at goal) - #cubes
    assert np.array_equal(train["masks"], (train["rewards"] != 0).astype(np.float32))
    with np.load(os.path.join(data_dir, "cube-double-play-v0.npz"), allow_pickle=False) as f:
        settings = json.loads(str(f[prepare_ogbench.GENERATED_KEY]))
    assert settings["episodes"] == 2 and settings["split"] == "train" and settings["noise"] == 0.1


def test_cube_single_files_load_through_ogbench_with_single_task_rewards(single_dir):
    """cube-single: 2 + 1 generated episodes read by OGBench's own loader; the planner really moves the cube."""
    env, train, val = prepare_ogbench.import_ogbench().make_env_and_datasets("cube-single-play-singletask-task1-v0",
                                                                             dataset_dir=single_dir)
    n = 2 * (prepare_ogbench.EPISODE_STEPS - 1)
    assert env.observation_space.shape == (28,) and train["observations"].shape == (n, 28)  # one cube: 28 dims
    assert train["actions"].shape == (n, 5) and len(val["observations"]) == prepare_ogbench.EPISODE_STEPS - 1
    assert train["terminals"].sum() == 2
    assert set(np.unique(train["rewards"])) == {-1.0, 0.0}  # (#cubes at goal) - 1; these episodes reach task 1's goal
    assert np.array_equal(train["masks"], (train["rewards"] != 0).astype(np.float32))
    with np.load(os.path.join(single_dir, "cube-single-play-v0.npz"), allow_pickle=False) as f:
        settings, qpos = json.loads(str(f[prepare_ogbench.GENERATED_KEY])), f["qpos"]
    # 14 robot joint values, then the cube's position and quaternion
    assert qpos.shape == (2 * prepare_ogbench.EPISODE_STEPS, 21)
    assert (qpos[:, 16] > 0.05).mean() > 0.2  # the cube rests at z = 0.02; the planner lifts it again and again
    assert settings["p_stack_range"] == [0.0, 0.0] and settings["noise"] == 0.1 and settings["episodes"] == 2


def test_generation_is_byte_identical_across_workers_and_resumes_after_an_interruption(data_dir, tmp_path,
                                                                                        monkeypatch):
    """Every finished episode is kept at once: interrupted after one, a rerun makes only the missing ones and
    writes the very bytes of an uninterrupted run with another worker count, then removes its parts."""
    write, parts = prepare_ogbench.write_npz, tmp_path / "cube-double-play-v0.parts"

    def interrupted_after_one_episode(path, arrays):
        write(path, arrays)
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_ogbench, "write_npz", interrupted_after_one_episode)
    with pytest.raises(KeyboardInterrupt):
        prepare_ogbench.generate_dataset("cube-double-play-v0", str(tmp_path), num_episodes=2, seed=0, workers=1)
    assert len(list(parts.glob("episode_*.npz"))) == 1 and not (tmp_path / "cube-double-play-v0.npz").exists()
    monkeypatch.undo()
    written = []
    monkeypatch.setattr(prepare_ogbench, "write_npz", lambda path, arrays: written.append(path) or write(path, arrays))
    prepare_ogbench.generate_dataset("cube-double-play-v0", str(tmp_path), num_episodes=2, seed=0, workers=1)
    for name in ("cube-double-play-v0.npz", "cube-double-play-v0-val.npz"):
        assert (tmp_path / name).read_bytes() == open(os.path.join(data_dir, name), "rb").read(), name
    assert [os.path.basename(p) for p in written[:2]] == ["episode_000001.npz", "episode_000002.npz"]  # not 0 again
    assert not parts.exists()
    with zipfile.ZipFile(tmp_path / "cube-double-play-v0.npz") as z:  # savez_compressed's format, minus the clock
        assert {(m.compress_type, m.date_time) for m in z.infolist()} == {(zipfile.ZIP_DEFLATED, (1980, 1, 1, 0, 0, 0))}


def test_prepare_ogbench_command(data_dir, capsys):
    """Bad values are argparse errors naming the fix; a run prints the mvp.py command that trains on its files
    (here the session's files, reused as they have the same settings)."""
    for argv, message in ((["--env", "cube-quadruple"], "unknown --env 'cube-quadruple'; use one of cube-single, "
                                                        "cube-double, cube-triple"),
                          (["--env", "cube-single", "--episodes", "0"], "--episodes must be >= 1"),
                          (["--env", "cube-single", "--workers", "-1"], "--workers must be >= 0")):
        with pytest.raises(SystemExit) as e:
            prepare_ogbench.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert prepare_ogbench.dataset_name("cube-double") == prepare_ogbench.dataset_name("cube-double-play-v0") \
        == "cube-double-play-v0"
    prepare_ogbench.main(["--env", "cube-double", "--episodes", "2", "--workers", "1", "--dataset-dir", data_dir])
    out = capsys.readouterr().out
    assert "reusing" in out and f"python mvp.py --env cube-double-task1 --dataset-dir {data_dir}" in out
    command = out.strip().splitlines()[-1].split("python mvp.py ")[1].split()
    assert mvp.build_parser().parse_args(command).dataset_dir == data_dir


def test_generation_reuses_its_own_files_and_refuses_foreign_ones(data_dir, tmp_path, capsys):
    prepare_ogbench.generate_dataset("cube-double-play-v0", data_dir, num_episodes=2, seed=0, workers=1)
    assert "reusing" in capsys.readouterr().out
    foreign = tmp_path / "cube-double-play-v0.npz"
    np.savez(foreign, observations=np.zeros((3, 2)))
    before = foreign.read_bytes()
    with pytest.raises(prepare_ogbench.DataError, match="not generated by this project"):
        prepare_ogbench.generate_dataset("cube-double-play-v0", str(tmp_path), num_episodes=1, seed=0, workers=1)
    assert foreign.read_bytes() == before
    assert not (tmp_path / "cube-double-play-v0.npz.tmp").exists()


def test_an_ogbench_reset_is_a_function_of_its_seed():
    """OGBench's task reset leaves controls and the solver's warm start from unseeded random steps;
    make_env's reset clears them, so every MuJoCo input of the next step depends on the seed alone."""
    env = prepare_ogbench.make_env(mvp.resolve_env_name("cube-single-task1"))
    data = env.unwrapped.data
    inputs = ("qpos", "qvel", "act", "ctrl", "qacc_warmstart", "mocap_pos", "mocap_quat", "xfrc_applied",
              "qfrc_applied")
    states = []
    for seed in (3, 4, 3):
        obs, _ = env.reset(seed=seed)
        states.append([np.array(getattr(data, k)) for k in inputs] + [obs])
    assert all(np.array_equal(a, b) for a, b in zip(states[0], states[2]))
    assert not np.array_equal(states[0][0], states[1][0])  # another seed, another start
    first = [env.step(np.full(5, 0.3))[0] for _ in range(3)]
    env.reset(seed=3)
    assert all(np.array_equal(a, env.step(np.full(5, 0.3))[0]) for a in first)
