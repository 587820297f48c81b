"""OGBench for mvp.py: the cube tasks, their dataset files and environments, and the play data made here.

mvp.py reads a task's dataset and builds its env through this file (which never imports mvp.py). Where
OGBench's download fails, the play data is made here with OGBench's own scripted planner, as the public
cube-{single,double,triple}-play-v0 files were: the planner (CubePlanOracle, noise 0.1, smoothing 0.5)
drives the data-collection env and picks a new target whenever it is done. The files have OGBench's
format, so OGBench's own loader reads them:
    python prepare_ogbench.py --env cube-double               # 1000 + 100 episodes, about an hour on 2 cores
    python mvp.py --env cube-double-task1 --dataset-dir <the folder it prints>

Finished episodes are kept as they come, in <out_dir>/<name>.parts/: Ctrl-C loses only the ones under way,
and a rerun with the same settings makes only the missing ones. Every episode depends on (seed, index)
alone and the files carry no timestamps, so the same settings give the same bytes: in one go, resumed,
or with any number of workers.
"""
import argparse
import functools
import json
import os
import re
import shutil
import sys
import time
import zipfile

import numpy as np

# OGBench's data_gen_scripts: episodes per public file, and p_stack ~ U(lo, hi) per episode, the chance that a new
# target is on top of another cube (0 for one cube, where set_new_target cannot stack anyway)
PUBLIC_EPISODES = {"cube-single-play-v0": 1000, "cube-double-play-v0": 1000, "cube-triple-play-v0": 3000}
P_STACK_RANGE = {"cube-single-play-v0": (0.0, 0.0), "cube-double-play-v0": (0.0, 0.25),
                 "cube-triple-play-v0": (0.05, 0.35)}
EPISODE_STEPS = 1001  # the public files' episode length
GENERATED_KEY = "mvp_generated"  # a string array inside each generated npz: its settings as JSON
KEYS = ("observations", "actions", "terminals", "qpos", "qvel")
GENERATOR = "prepare_ogbench.py (actions stored as executed, float32)"  # a new recipe gets a new name


class DataError(Exception):
    """A file in the way is not one of ours, or cannot be read."""


ACTION_SLACK = 1e-3  # actions further than this outside [-1, 1] are not rounding: the protocol's clip would hide them


def check_values(x: np.ndarray, what: str, fix: str, bounded: bool = False):
    """A DataError naming `what` and the first bad row if the float array x holds NaN or inf, or (bounded: actions)
    values further than ACTION_SLACK outside [-1, 1], with their count; nothing for other dtypes."""
    if x.dtype.kind != "f" or not len(x):
        return
    finite = np.isfinite(x).reshape(len(x), -1).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise DataError(f"{what} has NaN or inf values in {len(bad)} row(s), the first in row {bad[0]}; {fix}")
    beyond = np.abs(x) > 1 + ACTION_SLACK if bounded else None
    if beyond is not None and beyond.any():
        first = np.flatnonzero(beyond.reshape(len(x), -1).any(axis=1))[0]
        raise DataError(f"{what} has {np.count_nonzero(beyond)} value(s) outside [-1, 1] by more than {ACTION_SLACK} "
                        f"(up to {np.abs(x).max():.4g}, the first in row {first}), which the protocol's clip to "
                        f"[-1, 1] would hide: the actions need scaling to [-1, 1]; {fix}")


def default_generated_dir(dataset_name: str, episodes: int, seed: int) -> str:
    return os.path.expanduser(f"~/.ogbench/generated/{dataset_name}_{episodes}ep_seed{seed}")


def import_ogbench():
    """Import OGBench (which registers its environments with gymnasium), quiet and with a clear error."""
    import warnings
    warnings.filterwarnings("ignore", message=".*precision lowered by casting.*")  # gymnasium, on OGBench's spaces
    warnings.filterwarnings("ignore", module="glfw")  # no display: MuJoCo rendering is never used here
    try:
        import ogbench
    except ImportError as e:
        raise SystemExit(f"error: OGBench is not installed ({e}). Run: pip install -r requirements.txt")
    return ogbench


# ---- one episode, in a worker process ------------------------------------------------------------
_worker = {}


def _init_worker(collection_env: str):
    import gymnasium
    import_ogbench()
    from ogbench.manipspace.oracles.plan.cube_plan import CubePlanOracle
    env = gymnasium.make(collection_env, terminate_at_goal=False, mode="data_collection",
                         max_episode_steps=EPISODE_STEPS)
    _worker.update(env=env, oracle=CubePlanOracle(env=env, noise=0.1, noise_smoothing=0.5))


def _episode(job) -> tuple[int, dict]:
    """One play episode. The planner draws from numpy's global RNG, so it is seeded per episode, and a
    data-collection reset clears MuJoCo's state: an episode depends only on (seed, index), whatever
    the number of workers, the episodes a worker made before, or interruptions."""
    seed, index, p_lo, p_hi = job
    env, oracle = _worker["env"], _worker["oracle"]
    np.random.seed([seed, index])
    ob, info = env.reset(seed=int(np.random.randint(2**31)))
    p_stack = np.random.uniform(p_lo, p_hi)
    oracle.reset(ob, info)
    rows, done = {k: [] for k in KEYS}, False
    while not done:
        # rounded to the stored dtype before the step: the file holds exactly what was executed
        action = np.clip(np.asarray(oracle.select_action(ob, info)), -1, 1).astype(np.float32)
        next_ob, _, terminated, truncated, info = env.step(action)
        done = terminated or truncated
        if oracle.done:  # the planner reached its target: pick a new one, as the public data did
            oracle.reset(*env.unwrapped.set_new_target(p_stack=p_stack))
        for k, v in zip(KEYS, (ob, action, done, info["prev_qpos"], info["prev_qvel"])):
            rows[k].append(v)
        ob = next_ob
    return index, {k: np.asarray(v, dtype=bool if k == "terminals" else np.float32) for k, v in rows.items()}


# ---- files ----------------------------------------------------------------------------------------
def write_npz(path: str, arrays: dict):
    """np.savez_compressed's format, but every member dated 1980-01-01 (savez stamps the current time), so
    the same arrays give the same bytes. Written to path.<pid>.tmp, flushed to disk, then renamed: a file
    with the final name is always whole."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            with zipfile.ZipFile(f, "w") as z:
                for name, array in arrays.items():
                    member = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
                    member.compress_type = zipfile.ZIP_DEFLATED  # a ZipInfo ignores the ZipFile's compression
                    with z.open(member, "w", force_zip64=True) as out:
                        np.lib.format.write_array(out, np.asanyarray(array), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_settings(path: str):
    """Settings recorded in a generated file, or None if this project did not make it."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return json.loads(str(f[GENERATED_KEY])) if GENERATED_KEY in f.files else None
    except Exception as e:
        raise DataError(f"cannot read {path} ({type(e).__name__}: {e}). Delete it and rerun to regenerate it.")


def generation_settings(dataset_name: str, num_episodes: int, seed: int) -> dict:
    """What a generated file records of its making (GENERATED_KEY), and its parts folder (settings.json)."""
    return dict(generator=GENERATOR, oracle="CubePlanOracle", noise=0.1, noise_smoothing=0.5,
                p_stack_range=list(P_STACK_RANGE[dataset_name]), episodes=num_episodes,
                val_episodes=max(1, num_episodes // 10), episode_steps=EPISODE_STEPS, seed=seed)


def generate_dataset(dataset_name: str, out_dir: str, num_episodes: int, seed: int = 0, workers: int = 0) -> str:
    """Write <out_dir>/<dataset_name>.npz and -val.npz (a further 10% of episodes) in OGBench's format.

    Reuses files made with the same settings; refuses to overwrite files it did not make. Each finished
    episode goes to <out_dir>/<dataset_name>.parts/ at once, so an interrupted run continues from there;
    the two files are assembled from the parts at the end, which are then deleted. One process at a time:
    another one making the same files (a second generator, or runs of two seeds started together) waits for
    it, says so, and then uses its files."""
    from run_utils import producing  # here: the episode workers import this module, and need no torch
    os.makedirs(out_dir, exist_ok=True)
    with producing(os.path.join(out_dir, f"{dataset_name}.lock"),
                   f"[data] another process (pid {{pid}}) is making {dataset_name} in {out_dir}: waiting for it, "
                   f"then using its files"):
        return _generate_dataset(dataset_name, out_dir, num_episodes, seed, workers)


def _generate_dataset(dataset_name: str, out_dir: str, num_episodes: int, seed: int, workers: int) -> str:
    from concurrent.futures import ProcessPoolExecutor, as_completed
    import multiprocessing as mp
    from tqdm import tqdm
    from run_utils import start_parts
    train_path, val_path = (os.path.join(out_dir, f"{dataset_name}{s}.npz") for s in ("", "-val"))
    parts = os.path.join(out_dir, f"{dataset_name}.parts")
    settings = generation_settings(dataset_name, num_episodes, seed)
    num_val = settings["val_episodes"]
    existing = {p: read_settings(p) for p in (train_path, val_path) if os.path.exists(p)}
    for p, made in existing.items():
        if made is None:
            raise DataError(f"{p} exists and was not generated by this project (an official OGBench file?); "
                            f"refusing to overwrite it. Pass another --dataset-dir to generate elsewhere.")
    if existing == {train_path: {**settings, "split": "train"}, val_path: {**settings, "split": "val"}}:
        shutil.rmtree(parts, ignore_errors=True)  # left over if a run stopped after writing both files
        print(f"[data] reusing generated {train_path}")
        return out_dir

    start_parts(parts, settings)
    total = num_episodes + num_val
    part = (lambda i: os.path.join(parts, f"episode_{i:06d}.npz"))
    todo = [i for i in range(total) if not os.path.exists(part(i))]
    workers = min(workers or os.cpu_count() or 1, max(len(todo), 1))
    resumed = f" ({total - len(todo)} already done)" if len(todo) < total else ""
    print(f"[data] generating {num_episodes} + {num_val} episodes of {dataset_name} with OGBench's scripted planner "
          f"on {workers} worker(s) into {out_dir}{resumed}")
    start = time.time()
    if todo:
        import_ogbench()  # here, for a clear error: a worker's failure would only break the pool
        jobs = [(seed, i, *P_STACK_RANGE[dataset_name]) for i in todo]
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),  # fresh interpreters, no forked state
                                   initializer=_init_worker, initargs=(dataset_name.replace("-play", ""),))
        try:
            futures = [pool.submit(_episode, job) for job in jobs]
            with tqdm(total=total, initial=total - len(todo), desc="generating episodes", unit="ep",
                      dynamic_ncols=True) as bar:
                for future in as_completed(futures):
                    index, episode = future.result()
                    write_npz(part(index), episode)  # kept at once, in whatever order episodes finish
                    bar.update()
        except KeyboardInterrupt:
            done = sum(os.path.exists(part(i)) for i in range(total))
            print(f"\n[data] interrupted: {done} of {total} episodes kept in {parts}; rerun to continue")
            raise
        finally:
            pool.shutdown(cancel_futures=True)  # waits only for the episodes under way
    for split, indices, path in (("val", range(num_episodes, total), val_path),
                                 ("train", range(num_episodes), train_path)):  # train last: it means both are whole
        episodes = []
        for i in indices:
            with np.load(part(i)) as f:
                episodes.append({k: f[k] for k in KEYS})
        arrays = {k: np.concatenate([e[k] for e in episodes]) for k in KEYS}
        arrays[GENERATED_KEY] = np.array(json.dumps({**settings, "split": split}))
        write_npz(path, arrays)
    shutil.rmtree(parts)
    print(f"[data] wrote {total * EPISODE_STEPS:,} steps in {time.time() - start:.0f}s")
    return out_dir


# ---- the tasks mvp.py trains on: names, dataset files, environments ---------------------------------
CUBES = ("single", "double", "triple")
TASK_ALIASES = {f"cube-{n}{f'-task{k}' if k else ''}": f"cube-{n}-play-singletask{f'-task{k}' if k else ''}-v0"
                for n in CUBES for k in range(6)}
FULL_NAME = re.compile(rf"^cube-({'|'.join(CUBES)})-play-singletask(-task[1-5])?-v0$")


def resolve_env_name(name: str) -> str | None:
    """Alias or full name -> OGBench's full task name (cube-double-task3 -> cube-double-play-singletask-task3-v0);
    None if it is neither."""
    return name if FULL_NAME.match(name) else TASK_ALIASES.get(name)


def dataset_name(env: str) -> str | None:
    """The dataset a task or alias loads: cube-double, cube-double-task3, cube-double-play-v0 or
    cube-double-play-singletask-task3-v0 -> cube-double-play-v0; None if unknown."""
    name = re.sub(r"-singletask(-task\d)?", "", env)
    name = name if name.endswith("-play-v0") else name.split("-task")[0] + "-play-v0"
    return name if name in PUBLIC_EPISODES else None


PLANNER_STEPS_PER_S = 300  # one process of OGBench's scripted planner: 300-450 steps/s on this project's CPUs


def generation_plan(env_name: str, dataset_dir: str | None, generate: bool, episodes: int | None, seed: int,
                    workers: int) -> tuple[str, float] | None:
    """What find_dataset would generate, said before it starts: (what, estimated seconds), or None where the
    files are on disk (OGBench's, or generated ones: reused when their settings match)."""
    name = dataset_name(env_name)
    official_dir = os.path.expanduser(dataset_dir or "~/.ogbench/data")
    episodes = episodes or PUBLIC_EPISODES[name]
    out_dir = official_dir if dataset_dir and generate else default_generated_dir(name, episodes, seed)
    on_disk = [d for d in ([] if generate else [official_dir]) + [out_dir]
               if all(os.path.exists(os.path.join(d, f"{name}{s}.npz")) for s in ("", "-val"))]
    if on_disk:
        return None
    total = episodes + generation_settings(name, episodes, seed)["val_episodes"]
    procs, when = min(workers or os.cpu_count() or 1, total), "" if generate else "if OGBench's download fails, "
    return (f"{when}{episodes:,} + {total - episodes:,} episodes of {EPISODE_STEPS:,} steps generated with OGBench's "
            f"planner on {procs} processes", total * EPISODE_STEPS / PLANNER_STEPS_PER_S / procs)


def find_dataset(env_name: str, dataset_dir: str | None, generate: bool, episodes: int | None, seed: int,
                 workers: int) -> str:
    """Directory holding <dataset>.npz: OGBench's files if present, else its download, else the files
    generate_dataset makes with OGBench's own scripted planner (the public files' recipe), saying so."""
    ogbench, name = import_ogbench(), dataset_name(env_name)
    official_dir = os.path.expanduser(dataset_dir or "~/.ogbench/data")
    if not generate:
        if all(os.path.exists(os.path.join(official_dir, f"{name}{s}.npz")) for s in ("", "-val")):
            return official_dir
        try:
            print(f"[data] {name} not in {official_dir}; trying OGBench's download")
            ogbench.download_datasets([name], official_dir)
            return official_dir
        except Exception as e:
            print(f"[data] download failed ({type(e).__name__}: {e}); generating the data with OGBench's planner "
                  f"instead (prepare_ogbench.py; Ctrl-C keeps the finished episodes, a rerun continues)")
    episodes = episodes or PUBLIC_EPISODES[name]
    out_dir = official_dir if dataset_dir and generate else default_generated_dir(name, episodes, seed)
    return generate_dataset(name, out_dir, episodes, seed, workers)


def load_dataset(env_name: str, dataset_dir: str, env=None) -> dict:
    """The training split through OGBench's own loader, which relabels single-task rewards from qpos with `env`
    (the task's env, made here if not given: building one compiles the MuJoCo model, about 1.5 s). Both files are
    checked first: readable, rows of one length, no NaN or inf, actions within [-1, 1] (check_values)."""
    name, fix = dataset_name(env_name), "delete it and rerun with --generate-data to regenerate it"
    for path in [os.path.join(dataset_dir, f"{name}{s}.npz") for s in ("", "-val")]:  # name the broken file
        try:
            with np.load(path, allow_pickle=False) as f:
                lengths = {}
                for k in ("observations", "actions", "terminals", "qpos", "rewards"):  # rewards: OGBench relabels
                    if k in f.files or k != "rewards":  # them from qpos, so play files have none
                        x = f[k]  # one array at a time: a big file's arrays are hundreds of MB each
                        lengths[k] = x.shape[0]
                        check_values(x, f"{path}: {k}", fix, bounded=k == "actions")
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"cannot read dataset file {path} ({type(e).__name__}: {e}); it is missing, corrupt "
                            f"or lacks a key: {fix}") from None
        if len(set(lengths.values())) != 1:
            raise DataError(f"{path} has arrays of different lengths {lengths}; {fix}")
    env = env or make_env(env_name)
    train, _ = import_ogbench().make_env_and_datasets(env_name, dataset_dir=dataset_dir, dataset_only=True,
                                                      cur_env=env)
    (obs_dim,), (act_dim,) = env.observation_space.shape, env.action_space.shape
    if train["observations"].shape[1] != obs_dim or train["actions"].shape[1] != act_dim:
        raise DataError(f"{dataset_dir}/{name}.npz holds observations/actions of size "
                        f"{train['observations'].shape[1]}/{train['actions'].shape[1]}, but {env_name} has "
                        f"{obs_dim}/{act_dim}: a file of another task; {fix}")
    return train


def make_env(env_name: str):
    """The single-task env with its episode cap (200 single, 500 double, 1000 triple), reset clean."""
    env = import_ogbench().make_env_and_datasets(env_name, env_only=True)
    env.reset = functools.partial(reset_clean, env, env.reset)
    return env


def reset_clean(env, reset, **kwargs):
    """OGBench's reset, then MuJoCo's controls and solver warm start zeroed (as mj_resetData leaves them). A task
    reset settles the scene with two steps of an unseeded random action and keeps both; the first step reads
    the warm start, so the same seed and actions could give another episode (docs/results.md, deviation 18)."""
    out = reset(**kwargs)
    env.unwrapped.data.ctrl[:] = 0.0
    env.unwrapped.data.qacc_warmstart[:] = 0.0
    return out


# ---- command line ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Make OGBench cube play data with OGBench's scripted planner.")
    parser.add_argument("--env", required=True, help="cube-single | cube-double | cube-triple (or cube-X-play-v0)")
    parser.add_argument("--episodes", type=int, help="training episodes (default: the public file's size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset-dir", help="output folder (default ~/.ogbench/generated/<name>_<N>ep_seed<S>)")
    parser.add_argument("--workers", type=int, default=0, help="processes (0: all cores)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    name = dataset_name(args.env)
    if name is None:
        parser.error(f"unknown --env {args.env!r}; use one of {', '.join(n[:-8] for n in PUBLIC_EPISODES)}")
    if args.episodes is not None and args.episodes < 1:
        parser.error(f"--episodes must be >= 1 (got {args.episodes}); leave it out for the public size "
                     f"({PUBLIC_EPISODES[name]})")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0 (got {args.seed})")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0 (got {args.workers}); 0 uses all cores")
    episodes = args.episodes or PUBLIC_EPISODES[name]
    out = os.path.expanduser(args.dataset_dir) if args.dataset_dir else default_generated_dir(name, episodes, args.seed)
    try:
        generate_dataset(name, out, episodes, args.seed, args.workers)
    except DataError as e:
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt:  # what was kept is already said
        raise SystemExit(130)
    print(f"train on it: python mvp.py --env {name[:-8]}-task1 --dataset-dir {out}")


if __name__ == "__main__":
    sys.exit(main())
