"""Make OGBench's cube play datasets without a download, with OGBench's own scripted planner.

The public cube-{single,double,triple}-play-v0 files were recorded this way: the planner
(CubePlanOracle, noise 0.1, smoothing 0.5) drives the data-collection env and picks a new target
whenever it is done. The files written here have OGBench's format, so OGBench's own loader reads them:
    python prepare_ogbench.py --env cube-double               # 1000 + 100 episodes, about an hour on 2 cores
    python mvp.py --env cube-double-task1 --dataset-dir <the folder it prints>
mvp.py calls generate_dataset itself when OGBench's download fails. Finished episodes are kept as they
come (Ctrl-C loses only the ones under way); a rerun with the same settings continues where it stopped
and writes the same bytes as an uninterrupted run.
"""
import argparse
import json
import os
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


class DataError(Exception):
    """A file in the way is not one of ours, or cannot be read."""


def default_generated_dir(dataset_name: str, episodes: int, seed: int) -> str:
    return os.path.expanduser(f"~/.ogbench/generated/{dataset_name}_{episodes}ep_seed{seed}")


_worker = {}


def _init_worker(collection_env: str):
    import warnings
    warnings.filterwarnings("ignore", message=".*precision lowered by casting.*")
    warnings.filterwarnings("ignore", module="glfw")
    import gymnasium
    try:
        import ogbench  # noqa: F401  (registers the environments)
        from ogbench.manipspace.oracles.plan.cube_plan import CubePlanOracle
    except ImportError as e:
        raise SystemExit(f"error: OGBench is not installed ({e}). Run: pip install -r requirements.txt")
    env = gymnasium.make(collection_env, terminate_at_goal=False, mode="data_collection",
                         max_episode_steps=EPISODE_STEPS)
    _worker.update(env=env, oracle=CubePlanOracle(env=env, noise=0.1, noise_smoothing=0.5))


def _episode(job) -> tuple[int, dict]:
    """One play episode. The planner draws from numpy's global RNG, so it is seeded per episode: an episode
    depends only on (seed, index), whatever the number of workers or interruptions."""
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


def write_npz(path: str, arrays: dict):
    """np.savez_compressed's format with a fixed timestamp on every member, so the same arrays give the same
    bytes; written to path.tmp, flushed to disk, then renamed (a half-written file never has the final name)."""
    with open(path + ".tmp", "wb") as f:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as z:
            for name, array in arrays.items():
                with z.open(zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0)), "w",
                            force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def read_settings(path: str):
    """Settings recorded in a generated file, or None if this project did not make it."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return json.loads(str(f[GENERATED_KEY])) if GENERATED_KEY in f.files else None
    except Exception as e:
        raise DataError(f"cannot read {path} ({type(e).__name__}: {e}). Delete it and rerun to regenerate it.")


def generate_dataset(dataset_name: str, out_dir: str, num_episodes: int, seed: int = 0, workers: int = 0) -> str:
    """Write <out_dir>/<dataset_name>.npz and -val.npz (a further 10% of episodes) in OGBench's format.

    Reuses files made with the same settings; refuses to overwrite files it did not make. Each finished
    episode goes to <out_dir>/<dataset_name>.parts/ at once, so an interrupted run continues from there."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp
    from tqdm import tqdm
    os.makedirs(out_dir, exist_ok=True)
    train_path, val_path = (os.path.join(out_dir, f"{dataset_name}{s}.npz") for s in ("", "-val"))
    num_val = max(1, num_episodes // 10)
    settings = dict(generator="prepare_ogbench.py (actions stored as executed, float32)", oracle="CubePlanOracle",
                    noise=0.1, noise_smoothing=0.5, p_stack_range=list(P_STACK_RANGE[dataset_name]),
                    episodes=num_episodes, val_episodes=num_val, episode_steps=EPISODE_STEPS, seed=seed)
    existing = [p for p in (train_path, val_path) if os.path.exists(p)]
    if any(read_settings(p) is None for p in existing):
        raise DataError(f"{existing[0]} exists and was not generated by this project (an official OGBench file?); "
                        f"refusing to overwrite it. Pass another --dataset-dir to generate elsewhere.")
    if len(existing) == 2 and [read_settings(p) for p in (train_path, val_path)] == \
            [{**settings, "split": s} for s in ("train", "val")]:
        print(f"[data] reusing generated {train_path}")
        return out_dir

    parts = os.path.join(out_dir, f"{dataset_name}.parts")
    marker = os.path.join(parts, "settings.json")
    if os.path.exists(marker) and json.load(open(marker)) != settings:
        shutil.rmtree(parts)  # parts of another generation: start over
    os.makedirs(parts, exist_ok=True)
    with open(marker, "w") as f:
        json.dump(settings, f)
    total = num_episodes + num_val
    part = (lambda i: os.path.join(parts, f"episode_{i:06d}.npz"))
    todo = [i for i in range(total) if not os.path.exists(part(i))]
    workers = min(workers or os.cpu_count() or 1, max(len(todo), 1))
    print(f"[data] generating {num_episodes} + {num_val} episodes of {dataset_name} with OGBench's scripted planner "
          f"on {workers} worker(s) into {out_dir}" + (f", {total - len(todo)} done" if len(todo) < total else ""))
    start = time.time()
    if todo:
        jobs = [(seed, i, *P_STACK_RANGE[dataset_name]) for i in todo]
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                 initargs=(dataset_name.replace("-play", ""),)) as pool:  # cube-double-v0
            for index, episode in tqdm(pool.map(_episode, jobs, chunksize=1), total=total, initial=total - len(todo),
                                       desc="generating episodes", unit="ep", dynamic_ncols=True):
                write_npz(part(index), episode)  # kept at once: Ctrl-C loses only the episodes under way
    splits = (("val", range(num_episodes, total), val_path), ("train", range(num_episodes), train_path))
    for split, indices, path in splits:
        episodes = []
        for i in indices:
            with np.load(part(i)) as f:
                episodes.append({k: f[k] for k in KEYS})
        arrays = {k: np.concatenate([e[k] for e in episodes]) for k in KEYS}
        arrays[GENERATED_KEY] = np.array(json.dumps({**settings, "split": split}))
        write_npz(path, arrays)  # train last: its presence means both are complete
    shutil.rmtree(parts)
    print(f"[data] wrote {total * EPISODE_STEPS:,} steps in {time.time() - start:.0f}s")
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description="Make OGBench cube play data with OGBench's scripted planner.")
    parser.add_argument("--env", required=True, help="cube-single | cube-double | cube-triple (or cube-X-play-v0)")
    parser.add_argument("--episodes", type=int, help="training episodes (default: the public file's size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset-dir", help="output folder (default ~/.ogbench/generated/<name>_<N>ep_seed<S>)")
    parser.add_argument("--workers", type=int, default=0, help="processes (0: all cores)")
    args = parser.parse_args(argv)
    name = args.env if args.env.endswith("-play-v0") else args.env.split("-task")[0] + "-play-v0"
    if name not in PUBLIC_EPISODES:
        parser.error(f"unknown --env {args.env!r}; use one of {', '.join(n[:-8] for n in PUBLIC_EPISODES)}")
    if args.episodes is not None and args.episodes < 1:
        parser.error(f"--episodes must be >= 1 (got {args.episodes})")
    episodes = args.episodes or PUBLIC_EPISODES[name]
    out = os.path.expanduser(args.dataset_dir) if args.dataset_dir else default_generated_dir(name, episodes, args.seed)
    try:
        generate_dataset(name, out, episodes, args.seed, args.workers)
    except DataError as e:
        raise SystemExit(f"error: {e}")
    print(f"train on it: python mvp.py --env {name[:-8]}-task1 --dataset-dir {out}")


if __name__ == "__main__":
    sys.exit(main())
