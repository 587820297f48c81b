"""robomimic for mvp.py: its tasks, low-dim files and environments, the files' download, or scripted demos.

mvp.py reads a task's file and builds its env through this file (which never imports mvp.py).

The paper trains on robomimic's multi-human files (low_dim_v141.hdf5, recorded with robosuite 1.4.1):
    python prepare_robomimic.py lift --download        # to ~/.robomimic/lift/mh/low_dim_v141.hdf5
    python mvp.py --env lift
Where they cannot be downloaded, a scripted demonstrator records Lift or Can demos in the same layout.
They are NOT the paper's data (one noisy controller instead of many people), and results on them are not
comparable to the paper's; the file is marked so, and the reader here says so when it loads one:
    python prepare_robomimic.py lift --demos 100      # about a minute on one core
    python mvp.py --env lift --dataset-dir ~/.robomimic/lift/scripted/low_dim_scripted_100demos_seed0.hdf5

Each attempt's outcome is kept as it finishes, in <file>.parts/: Ctrl-C loses only the one under way, and
a rerun with the same settings continues with the next attempt. Attempt j depends on (seed, j) alone and
the file holds no timestamps or timings, so the same settings give the same bytes, interrupted or not.
"""
import argparse
import glob
import json
import os
import shutil
import sys
import time

import numpy as np


def import_h5py():
    try:
        import h5py
    except ImportError as e:
        raise SystemExit(f"error: h5py is not installed ({e}). Run: pip install -r requirements.txt")
    return h5py


class DataError(Exception):
    """A robomimic file is missing, unreadable or does not match its task."""


# ---- robomimic (Lift, Can, Square) through robosuite, without the robomimic package -------------
# Its PyPI release (0.3.0) imports mujoco_py and declares unpinned torch (pip would swap the CPU torch for
# a multi-GB CUDA build). What is needed is small and stable: the HDF5 layout, how it rebuilds an env
# (robosuite.make(env_name, **env_kwargs), rendering off, object observations on) and the download URLs.
# dataset: robomimic's own layout <task>/<mh|ph>/low_dim_v141.hdf5 (v141: recorded with robosuite 1.4.1).
ROBOMIMIC_TASKS = {
    "lift": dict(env_name="Lift", max_episode_steps=300, dataset="lift/mh/low_dim_v141.hdf5"),
    "can": dict(env_name="PickPlaceCan", max_episode_steps=300, dataset="can/mh/low_dim_v141.hdf5"),
    "square": dict(env_name="NutAssemblySquare", max_episode_steps=400, dataset="square/mh/low_dim_v141.hdf5"),
}
OBS_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object")
ACTION_SLACK = 1e-3  # actions further than this outside [-1, 1] are not rounding: the protocol's clip would hide them
DEFAULT_ROOT = "~/.robomimic"


def dataset_url(task: str, kind: str = "mh") -> str:
    """robomimic 0.3's registry address of a task's v141 low-dim file ('mh' multi-human, 'ph' proficient)."""
    return f"http://downloads.cs.stanford.edu/downloads/rt_benchmark/{task}/{kind}/low_dim_v141.hdf5"


def default_dataset_path(task: str, dataset_dir: str = None) -> str:
    return os.path.join(os.path.expanduser(dataset_dir or DEFAULT_ROOT), ROBOMIMIC_TASKS[task]["dataset"])


def import_robosuite():
    """Import robosuite without its three 'No private macro file found!' start-up lines (not actionable here)."""
    import logging
    import warnings
    logger = logging.getLogger("robosuite_logs")
    if not logger.filters:
        logger.addFilter(lambda r: not ("private macro file" in r.getMessage() or "setup_macros" in r.getMessage()))
    warnings.filterwarnings("ignore", module="glfw")  # no display: rendering is never used
    warnings.filterwarnings("ignore", message="The 'warn' method is deprecated", category=DeprecationWarning)
    try:
        import robosuite
    except ImportError as e:
        raise SystemExit(f"error: robosuite is not installed ({e}). Run: pip install -r requirements.txt")
    return robosuite


def flat_obs(obs: dict) -> np.ndarray:
    """robosuite's observation dict -> the protocol's flat float32 vector (robomimic's 'object' = 'object-state')."""
    parts = [obs["object-state"] if k == "object" else obs[k] for k in OBS_KEYS]
    return np.concatenate([np.asarray(p, dtype=np.float32).ravel() for p in parts])


class RobomimicEnv:
    """A robosuite task with gymnasium's API: reward = success - 1 (robosuite's sparse reward is the success
    indicator, so this matches the dataset's shifted rewards), terminated = success, truncated at the cap.

    Built as robomimic rebuilds a file's env (renderers and cameras off, object observations on, ignore_done),
    with hard_reset False [choice]: resets restore the compiled model (same scenes, ~7x faster; a recompile per
    reset leaks ~50 mesh files in MuJoCo 3.1.6 and hits the open-file limit in ~400 episodes). robosuite draws
    scenes from NumPy's *global* RNG: every reset runs under a seed drawn from this env's own generator and
    puts the caller's global state back, so resets are reproducible and leave np.random alone."""

    def __init__(self, env_args: dict, max_episode_steps: int, source: str = "env_args"):
        from gymnasium.spaces import Box
        robosuite = import_robosuite()
        self.env_args, self.env_name, self.max_episode_steps = env_args, env_args["env_name"], int(max_episode_steps)
        kwargs = dict(env_args.get("env_kwargs", {}), has_renderer=False, has_offscreen_renderer=False,
                      use_camera_obs=False, use_object_obs=True, ignore_done=True, camera_depths=False,
                      hard_reset=False)
        # robosuite draws part of the model (Lift: the cube's size) from NumPy's global RNG when it builds the env,
        # and resets keep the model: built from a fixed seed, every process (training, evaluation workers, the
        # scripted recorder, --eval-only) has the same one; the caller's global state is put back
        state = np.random.get_state()
        try:
            np.random.seed(0)
            self.env = robosuite.make(env_args["env_name"], **kwargs)
        except (TypeError, KeyError, ValueError, AssertionError) as e:  # kwargs of another robosuite version
            raise DataError(f"{source}: robosuite {robosuite.__version__} cannot build {self.env_name} from the "
                               f"file's env_kwargs ({e}); it was recorded with robosuite "
                               f"{env_args.get('env_version', '?')}. Use the v141 files (robosuite 1.4.1).")
        finally:
            np.random.set_state(state)
        self.action_space = Box(*(np.asarray(x, np.float32) for x in self.env.action_spec), dtype=np.float32)
        self.np_random, self._t, self.raw_obs = np.random.default_rng(), 0, None
        self.observation_space = Box(-np.inf, np.inf, self.reset()[0].shape, dtype=np.float32)

    def reset(self, seed=None, options=None):
        if seed is not None:
            self.np_random = np.random.default_rng(seed)
        state = np.random.get_state()
        try:
            np.random.seed(int(self.np_random.integers(2**32 - 1)))
            self.raw_obs = self.env.reset()  # robosuite's full observation dict (the scripted demonstrator reads it)
        finally:
            np.random.set_state(state)
        self._t = 0
        return flat_obs(self.raw_obs), {"success": False}

    def step(self, action):
        action = np.clip(np.asarray(action, dtype=np.float64), self.action_space.low, self.action_space.high)
        self.raw_obs, _, _, info = self.env.step(action)
        self._t += 1
        success = bool(self.env._check_success())
        truncated = (not success) and self._t >= self.max_episode_steps
        return flat_obs(self.raw_obs), float(success) - 1.0, success, truncated, dict(info, success=success)

    @property
    def unwrapped(self):  # gymnasium's name, through which checkpoints save and restore the env's RNG
        return self

    def close(self):
        self.env.close()


def read_robomimic_hdf5(path: str, task: str, num_demos: int = None):
    """A robomimic low-dim file -> (flat float32 arrays as the training loop uses, env_args, scripted settings or
    None). Demos in numeric order (demo_0, demo_1, ..., demo_10), the first num_demos if given. rewards shifted
    by -1; masks 0 where the file's reward is 1 (success stops bootstrapping, as online); terminals 1 on each
    demo's last row (the file's `dones` also marks success steps in robomimic's done_mode 2)."""
    h5py = import_h5py()
    scripted_cmd = f"python prepare_robomimic.py {task}"
    fix = (f"Delete it and rerun {scripted_cmd} to regenerate it." if "scripted" in os.path.basename(path) else
           f"Delete it and re-download it ({scripted_cmd} --download, or {dataset_url(task)} to {path})"
           + (f", or record scripted demos (not the paper's data): {scripted_cmd}." if task != "square" else "."))
    try:
        with h5py.File(path, "r") as f:
            data = f["data"]
            env_args = json.loads(data.attrs["env_args"])
            scripted = json.loads(data.attrs["mvp_scripted"]) if "mvp_scripted" in data.attrs else None
            names = sorted((k for k in data.keys() if k.startswith("demo_")), key=lambda k: int(k[5:]))
            demos = [{p: np.concatenate([np.asarray(data[n][p][k], np.float32) for k in OBS_KEYS], axis=1)
                      for p in ("obs", "next_obs")} | {k: np.asarray(data[n][k], np.float32) for k in
                                                       ("actions", "rewards")} for n in names[:num_demos]]
    except Exception as e:
        raise DataError(f"cannot read {path} as a robomimic low-dim dataset ({type(e).__name__}: {e}); it is "
                           f"corrupt or not one. {fix}") from None
    want = ROBOMIMIC_TASKS[task]["env_name"]
    if env_args.get("env_name") != want:
        other = next((t for t, s in ROBOMIMIC_TASKS.items() if s["env_name"] == env_args.get("env_name")), None)
        raise DataError(f"{path} holds demos of {env_args.get('env_name')!r} "
                           f"({f'task {other!r}' if other else 'another environment'}), not {want!r} "
                           f"(task '{task}'). Put the {task} file there ({dataset_url(task)}).")
    if not str(env_args.get("env_version", "1.4.1")).startswith("1.4."):
        raise DataError(f"{path} was recorded with robosuite {env_args['env_version']}; this project runs robosuite "
                           f"1.4.1 (MuJoCo 3.1.6, shared with OGBench) and needs the v141 files: {dataset_url(task)}")
    if not names or (num_demos or 0) > len(names):
        raise DataError(f"{path} has {len(names)} demos under data/, fewer than the {num_demos or 1} needed. {fix}")
    for name, d in zip(names, demos):
        n, rew = len(d["actions"]), d["rewards"].ravel()
        if n == 0 or not len(d["obs"]) == len(d["next_obs"]) == len(rew) == n:
            raise DataError(f"{path}: {name} has obs/next_obs/actions/rewards of lengths {len(d['obs'])}/"
                               f"{len(d['next_obs'])}/{n}/{len(rew)}. {fix}")
        if d["obs"].shape[1] != demos[0]["obs"].shape[1] or d["next_obs"].shape[1] != demos[0]["obs"].shape[1]:
            raise DataError(f"{path}: {name} has observations of size {d['obs'].shape[1]} (next_obs "
                            f"{d['next_obs'].shape[1]}), {names[0]} of size {demos[0]['obs'].shape[1]}; the keys "
                            f"{', '.join(OBS_KEYS)} differ in size between demos. {fix}")
        for key in ("obs", "next_obs", "actions", "rewards"):
            finite = np.isfinite(d[key]).reshape(n, -1).all(axis=1)
            if not finite.all():
                raise DataError(f"{path}: {name}'s {key} has NaN or inf values in {np.count_nonzero(~finite)} "
                                f"row(s), the first in row {np.argmin(finite)} of {name}. {fix}")
        if not np.isin(rew, (0.0, 1.0)).all():
            raise DataError(f"{path}: {name} has rewards other than 0/1 (a dense-reward file?); the protocol uses "
                               f"the sparse low_dim files")
    beyond = {name: np.abs(d["actions"]) > 1 + ACTION_SLACK for name, d in zip(names, demos)}
    if count := sum(np.count_nonzero(b) for b in beyond.values()):
        name, b = next((name, b) for name, b in beyond.items() if b.any())
        raise DataError(f"{path}: actions has {count} value(s) outside [-1, 1] by more than {ACTION_SLACK}, the first "
                        f"in row {np.flatnonzero(b.any(axis=1))[0]} of {name}, which the protocol's clip to [-1, 1] "
                        f"would hide: the actions need scaling to [-1, 1]")
    cat = (lambda f: np.ascontiguousarray(np.concatenate([f(d) for d in demos]), dtype=np.float32))
    dataset = dict(observations=cat(lambda d: d["obs"]), actions=cat(lambda d: d["actions"]),
                   rewards=cat(lambda d: d["rewards"].ravel() - 1.0), masks=cat(lambda d: d["rewards"].ravel() != 1),
                   terminals=cat(lambda d: np.arange(len(d["actions"])) == len(d["actions"]) - 1),
                   next_observations=cat(lambda d: d["next_obs"]))
    if dataset["actions"].shape[1] != 7:
        raise DataError(f"{path} has {dataset['actions'].shape[1]}-D actions, expected 7 (OSC_POSE + gripper)")
    return dataset, env_args, scripted


def load_robomimic(task: str, dataset_dir: str = None, num_demos: int = None, check_env: bool = False,
                   generate: bool = False):
    """(dataset, make_env) for 'lift', 'can' or 'square', as mvp.py's load_task uses them. The file: dataset_dir
    itself if it is an .hdf5 file (the scripted ones made below, say), else <dataset_dir or ~/.robomimic>/
    <task>/mh/low_dim_v141.hdf5; a missing file's error names its download and the scripted alternative.
    make_env() builds a NEW env from the file's own env_args, and carries .dataset_path, .scripted, .env_args.
    check_env: build one env now and check the file's observation and action sizes against it (the env is then
    make_env()'s first, as a build costs seconds). generate (mvp.py's --generate-data) is refused with the command."""
    if generate:
        raise DataError(f"scripted robomimic demos are not the paper's data and have their own command: python "
                        f"prepare_robomimic.py {task}, then --dataset-dir with the file it names")
    direct = dataset_dir is not None and str(dataset_dir).endswith((".hdf5", ".h5"))
    path = os.path.expanduser(dataset_dir) if direct else default_dataset_path(task, dataset_dir)
    if not os.path.exists(path):
        alt = (f"; or record scripted demos (not the paper's data): python prepare_robomimic.py {task}, then "
               f"--dataset-dir with the file it names" if task != "square" else
               " (there is no scripted demonstrator for square)")
        raise DataError(f"robomimic dataset for '{task}' not found at {path}. Download it: python "
                           f"prepare_robomimic.py {task} --download (or fetch {dataset_url(task)} and put it at "
                           f"{path}, or pass --dataset-dir){alt}.")
    dataset, env_args, scripted = read_robomimic_hdf5(path, task, num_demos)
    if scripted:
        print(f"[robomimic] {path}: SCRIPTED demos ({scripted.get('demonstrator')}), not the human data of the "
              f"paper; results are not comparable.", file=sys.stderr)

    built = []

    def make_env():
        return built.pop() if built else RobomimicEnv(env_args, ROBOMIMIC_TASKS[task]["max_episode_steps"], source=path)

    if check_env:
        built.append(make_env())
        (obs_dim,), (act_dim,) = built[0].observation_space.shape, built[0].action_space.shape
        if dataset["observations"].shape[1] != obs_dim or dataset["actions"].shape[1] != act_dim:
            raise DataError(f"{path} holds observations/actions of size {dataset['observations'].shape[1]}/"
                            f"{dataset['actions'].shape[1]}, but the {task} env its env_args build has "
                            f"{obs_dim}/{act_dim}: a file of another setup (robot, objects, observation keys)")
    make_env.dataset_path, make_env.scripted, make_env.env_args = path, scripted, env_args
    return dataset, make_env



def robomimic_env_args(task: str) -> dict:
    """The env_args robomimic stores for a task's v141 low-dim file (used to record scripted data).

    Same structure as robomimic's EnvRobosuite.serialize(): env_name, env_version, type 1
    (robosuite), env_kwargs with robosuite's default OSC_POSE controller, Panda, 20 Hz, sparse
    reward, no cameras. Loading a real file always uses the file's own env_args instead."""
    robosuite = import_robosuite()
    from robosuite.controllers import load_controller_config
    return dict(
        env_name=ROBOMIMIC_TASKS[task]["env_name"], env_version=robosuite.__version__, type=1,
        env_kwargs=dict(has_renderer=False, has_offscreen_renderer=False, ignore_done=True,
                        use_object_obs=True, use_camera_obs=False, control_freq=20,
                        controller_configs=load_controller_config(default_controller="OSC_POSE"),
                        robots=["Panda"], camera_depths=False, camera_heights=84, camera_widths=84,
                        reward_shaping=False))


# ---- the human data: a download --------------------------------------------------------------------
def download(url: str, path: str, timeout: float = 30.0):
    """Fetch url to path (through path.<pid>.tmp, then renamed, so a partial file is never used)."""
    import urllib.request
    from tqdm import tqdm
    folder = os.path.dirname(path) or "."
    created = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    tmp, ok = f"{path}.{os.getpid()}.tmp", False
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as out:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(path)) as bar:
                while chunk := r.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
        with open(tmp, "rb") as f:  # an HTML error page saved as .hdf5 would only fail later, less clearly
            if f.read(8) != b"\x89HDF\r\n\x1a\n":
                raise OSError(f"{url} did not return an HDF5 file")
        os.replace(tmp, path)
        ok = True
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        if created and not ok:  # leave no empty folders behind a failed download
            try:
                os.removedirs(folder)
            except OSError:
                pass


# ---- scripted demonstrators ------------------------------------------------------------------------
# Std of the noise on the scripted translation actions. Lift, 5k offline steps at 2x256: with 0.05 the demos
# were too alike for the critic to rank actions and best-of-N trailed the policy alone (0.40 vs 0.96);
# with 0.3: 0.96 vs 0.98.
SCRIPTED_NOISE_STD = 0.3


class ScriptedPick:
    """A phase machine for scripted demos with OSC_POSE delta actions: reach above an object, descend,
    close the gripper; subclasses add what follows the grasp. Each call returns one 7-D action: a
    proportional move of the end effector towards the phase's target, Gaussian noise on the
    translation (noise_std: the spread of actions the critic learns to rank), and the gripper command."""

    def __init__(self, rng, noise_std: float = SCRIPTED_NOISE_STD, gain: float = 10.0):
        self.rng, self.noise_std, self.gain = rng, noise_std, gain
        self.phase, self.t_phase = "reach", 0

    def _next(self, phase):
        self.phase, self.t_phase = phase, 0

    def _pick(self, eef, obj, hover: float, depth: float):
        """(target, grip) of the reach / descend / grasp phases; phases fall through within one call."""
        target, grip = None, -1.0
        if self.phase == "reach":
            target = obj + np.array([0.0, 0.0, hover])
            if np.linalg.norm((target - eef)[:2]) < 0.01 and abs((target - eef)[2]) < 0.02 or self.t_phase > 80:
                self._next("descend")
        if self.phase == "descend":
            target = obj + np.array([0.0, 0.0, depth])
            if np.linalg.norm(target - eef) < 0.01 or self.t_phase > 40:
                self._next("grasp")
        if self.phase == "grasp":
            target, grip = obj + np.array([0.0, 0.0, depth]), 1.0
            if self.t_phase >= 12:
                self._next("lift")
        return target, grip

    def _act(self, eef, target, grip: float) -> np.ndarray:
        self.t_phase += 1
        action = np.zeros(7)
        action[:3] = self.gain * (target - eef) + self.rng.normal(0.0, self.noise_std, 3)
        action[6] = grip
        return np.clip(action, -1.0, 1.0)


class ScriptedLift(ScriptedPick):
    """Reach above the cube, descend, close the gripper, lift: a proportional controller on OSC_POSE deltas.

    Reads the cube position from robosuite's observation dict (privileged, fine for a demonstrator).
    The gripper is not turned to the cube's yaw: the cube (about 4 cm) fits the 8 cm opening at any
    yaw and the fingers square it up while closing."""

    def __call__(self, obs: dict) -> np.ndarray:
        eef, cube = np.asarray(obs["robot0_eef_pos"]), np.asarray(obs["cube_pos"])
        target, grip = self._pick(eef, cube, hover=0.06, depth=-0.005)
        if self.phase == "lift":
            target, grip = np.array([cube[0], cube[1], cube[2] + 0.15]), 1.0
        return self._act(eef, target, grip)


class ScriptedCan(ScriptedPick):
    """Pick the can, carry it high over the bin wall to the can's target compartment, drop it, back off.

    robosuite's Can success needs the can inside its compartment of the second bin AND the gripper
    away from it, hence the release-and-retreat phases. Same controller and noise as ScriptedLift."""

    CARRY_Z, DROP_Z = 1.05, 0.95

    def __init__(self, rng, noise_std: float = SCRIPTED_NOISE_STD, gain: float = 10.0, target_xy=(0.1975, 0.4025)):
        super().__init__(rng, noise_std, gain)
        self.target_xy = np.asarray(target_xy, dtype=np.float64)

    def __call__(self, obs: dict) -> np.ndarray:
        eef, can = np.asarray(obs["robot0_eef_pos"]), np.asarray(obs["Can_pos"])
        tx, ty = self.target_xy
        target, grip = self._pick(eef, can, hover=0.08, depth=0.0)
        if self.phase == "lift":
            target, grip = np.array([eef[0], eef[1], self.CARRY_Z]), 1.0
            if eef[2] > self.CARRY_Z - 0.03 or self.t_phase > 60:
                self._next("carry")
        if self.phase == "carry":
            target, grip = np.array([tx, ty, self.CARRY_Z]), 1.0
            if np.linalg.norm((target - eef)[:2]) < 0.02 or self.t_phase > 100:
                self._next("lower")
        if self.phase == "lower":
            target, grip = np.array([tx, ty, self.DROP_Z]), 1.0
            if abs(eef[2] - self.DROP_Z) < 0.02 or self.t_phase > 40:
                self._next("release")
        if self.phase == "release":  # grip is left as set above: open, except on the step that enters release
            target = np.array([tx, ty, self.DROP_Z])
            if self.t_phase >= 10:
                self._next("retreat")
        if self.phase == "retreat":
            target = np.array([tx, ty, self.CARRY_Z + 0.05])
        return self._act(eef, target, grip)


SCRIPTED = {"lift": ScriptedLift, "can": ScriptedCan}


# ---- recording scripted demos ----------------------------------------------------------------------
def scripted_dataset_path(task: str, num_demos: int, seed: int, dataset_dir: str = None) -> str:
    """A separate 'scripted' folder and name, so a human file is never shadowed."""
    root = os.path.expanduser(dataset_dir or DEFAULT_ROOT)
    return os.path.join(root, task, "scripted", f"low_dim_scripted_{num_demos}demos_seed{seed}.hdf5")


def _robomimic_obs(env) -> dict:
    """robomimic's stored observation keys: 'object' plus every robot0_* entry except proprio-state."""
    out = {"object": np.array(env.raw_obs["object-state"], np.float64)}  # copies: robosuite reuses its buffers
    out.update({k: np.array(v, np.float64) for k, v in env.raw_obs.items()
                if k.startswith("robot0_") and not k.endswith("proprio-state")})
    return out


def _attempt(task: str, env, seed: int, j: int, noise_std: float):
    """Attempt j: reset and action noise from SeedSequence([seed, j]), so it depends on (seed, j) alone. Runs
    until success (rewards and dones are 1 only on the last row) or the task's cap; returns the demo or None."""
    env_seed, policy_seed = np.random.SeedSequence([seed, j]).generate_state(2)
    kwargs = {}
    if task == "can":  # the can's target compartment is not in the observation
        kwargs["target_xy"] = tuple(float(x) for x in env.env.target_bin_placements[env.env.object_id][:2])
    policy = SCRIPTED[task](np.random.default_rng(policy_seed), noise_std=noise_std, **kwargs)
    env.reset(seed=int(env_seed))
    rec, done, success = {k: [] for k in ("obs", "next_obs", "actions", "rewards", "dones", "states")}, False, False
    while not done:
        rec["obs"].append(_robomimic_obs(env))
        rec["states"].append(np.asarray(env.env.sim.get_state().flatten()))
        # executed as float32 (what the loader returns), stored exactly: a replay of the loaded demo is the
        # recording bit for bit; contacts amplify a 3e-8 rounding into another outcome on some CPUs
        action = policy(env.raw_obs).astype(np.float32).astype(np.float64)
        _, _, success, truncated, _ = env.step(action)
        done = success or truncated
        rec["next_obs"].append(_robomimic_obs(env))
        rec["actions"].append(action)
        rec["rewards"].append(float(success))
        rec["dones"].append(int(done))
    if not success:
        return None
    demo = {f"{p}/{k}": np.stack([o[k] for o in rec[p]]) for p in ("obs", "next_obs") for k in rec[p][0]}
    return demo | dict(actions=np.stack(rec["actions"]), rewards=np.asarray(rec["rewards"], np.float64),
                       dones=np.asarray(rec["dones"], np.int64), states=np.stack(rec["states"]))


def _read_marker(path: str, h5py):
    """The settings a file was generated with; None if this project did not make it; 'unreadable'."""
    try:
        with h5py.File(path, "r") as f:
            return json.loads(f["data"].attrs["mvp_scripted"]) if "mvp_scripted" in f["data"].attrs else None
    except Exception:
        return "unreadable"


def generate_scripted(task: str, path: str, num_demos: int, seed: int = 0, noise_std: float = SCRIPTED_NOISE_STD,
                      max_attempts: int = None) -> str:
    """Record num_demos successful scripted demos of `task` in robomimic's HDF5 layout at path.

    The env is built from robomimic's env_args for the task, exactly as a loaded file's env is. Failed attempts
    are dropped and counted; data.attrs['mvp_scripted'] records the settings and the success rate. A file with
    the same settings is reused; a file without the marker is never overwritten. Each attempt's outcome is kept
    in <path>.parts/ as it finishes (a demo's arrays, or an empty file for a failure), so an interrupted run
    continues; the file is assembled from the parts at the end, which are then deleted. One process at a time:
    another one making the same file waits for it, says so, and then uses its file."""
    from run_utils import producing  # here: importing this file needs no torch
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with producing(f"{path}.lock", f"[robomimic] another process (pid {{pid}}) is making {path}: waiting for it, "
                                   f"then using its file"):
        return _generate_scripted(task, path, num_demos, seed, noise_std, max_attempts)


def _generate_scripted(task: str, path: str, num_demos: int, seed: int, noise_std: float, max_attempts: int) -> str:
    if task not in SCRIPTED:
        raise DataError(f"no scripted demonstrator for {task} (only {', '.join(SCRIPTED)}); download the "
                               f"human data: python prepare_robomimic.py {task} --download (or fetch "
                               f"{dataset_url(task)} and put it at {default_dataset_path(task)})")
    h5py = import_h5py()
    from tqdm import tqdm
    from run_utils import start_parts
    cap = ROBOMIMIC_TASKS[task]["max_episode_steps"]
    settings = dict(demonstrator=f"{SCRIPTED[task].__name__} (mvp scripted, not human data)", task=task,
                    num_demos=num_demos, seed=seed, noise_std=noise_std, max_episode_steps=cap,
                    actions="float32, as executed")  # files from before this rule lack the key: regenerated
    parts = path + ".parts"
    if os.path.exists(path):
        old = _read_marker(path, h5py)
        if old is None:
            raise DataError(f"{path} exists and was not generated by this project (a human dataset?); "
                                   f"refusing to overwrite it. Move it or pass another --dataset-dir.")
        if isinstance(old, dict) and all(old.get(k) == v for k, v in settings.items()):
            shutil.rmtree(parts, ignore_errors=True)  # left over if a run stopped after writing the file
            print(f"[robomimic] reusing {path}", file=sys.stderr)
            return path
        print(f"[robomimic] regenerating {path} (settings differ or file unreadable)", file=sys.stderr)

    start_parts(parts, settings)
    part = (lambda j: os.path.join(parts, f"attempt_{j:06d}.npz"))
    attempts = len(glob.glob(os.path.join(parts, "attempt_*.npz")))  # attempts run one by one: 0 .. attempts-1
    successes = sum(os.path.getsize(part(j)) > 0 for j in range(attempts))
    env_args = robomimic_env_args(task)
    max_attempts, started = max_attempts or 3 * num_demos + 10, time.time()
    if successes < num_demos:
        env = RobomimicEnv(env_args, cap, source="scripted generator")  # the model every process builds
        try:
            with tqdm(total=num_demos, initial=successes, desc=f"scripted {task} demos", unit="demo",
                      dynamic_ncols=True) as bar:
                while successes < num_demos and attempts < max_attempts:
                    demo = _attempt(task, env, seed, attempts, noise_std)
                    tmp = f"{part(attempts)}.{os.getpid()}.tmp"
                    with open(tmp, "wb") as f:  # an empty file: this attempt failed
                        if demo is not None:
                            np.savez(f, **demo)
                    os.replace(tmp, part(attempts))
                    attempts, successes = attempts + 1, successes + (demo is not None)
                    bar.set_postfix(attempts=attempts, success=f"{successes / attempts:.2f}", refresh=False)
                    bar.update(int(demo is not None))
        except KeyboardInterrupt:
            print(f"\n[robomimic] interrupted: {attempts} attempts ({successes} demos) kept in {parts}; rerun to "
                  f"continue", file=sys.stderr)
            raise
        finally:
            env.close()
    if successes < num_demos:
        raise DataError(f"scripted {task} demonstrator succeeded in only {successes} of {attempts} attempts; "
                               f"cannot record {num_demos} demos")

    # the file, from the parts. h5py records no timestamps unless asked (track_times), so same demos, same bytes
    settings.update(attempts=attempts, success_rate=round(successes / attempts, 4))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    demos, total = [part(j) for j in range(attempts) if os.path.getsize(part(j)) > 0], 0
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with h5py.File(tmp, "w") as f:
            data = f.create_group("data")
            for i, p in enumerate(demos):
                g = data.create_group(f"demo_{i}")
                with np.load(p) as demo:
                    for k in demo.files:  # obs/..., next_obs/..., actions, rewards, dones, states
                        g.create_dataset(k, data=demo[k], track_times=False)
                    g.attrs["num_samples"] = n = len(demo["actions"])
                total += n
            data.attrs["total"] = total
            data.attrs["env_args"] = json.dumps(env_args, indent=4)
            data.attrs["mvp_scripted"] = json.dumps(settings)  # read_robomimic_hdf5 reads it and warns
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    shutil.rmtree(parts)
    print(f"[robomimic] wrote {num_demos} scripted {task} demos ({total} steps) to {path}; scripted success rate "
          f"{settings['success_rate']:.2f} ({attempts} attempts, {time.time() - started:.0f} s)", file=sys.stderr)
    return path


# ---- command line -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="robomimic data for mvp.py: download the human file, or record "
                                                 "scripted demos (not the paper's data).")
    parser.add_argument("task", choices=sorted(ROBOMIMIC_TASKS))
    parser.add_argument("--download", action="store_true", help="fetch the multi-human v141 low-dim file")
    parser.add_argument("--demos", type=int, default=100, help="scripted demos to record (lift, can)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the scripted demos")
    parser.add_argument("--dataset-dir", help=f"data root (default {DEFAULT_ROOT})")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    task, url, human = args.task, dataset_url(args.task), default_dataset_path(args.task, args.dataset_dir)
    if args.download:
        if os.path.exists(human):
            print(f"[robomimic] {human} is already there")
        else:
            try:
                download(url, human)
            except Exception as e:
                raise SystemExit(f"error: downloading {url} failed ({type(e).__name__}: {e}); fetch it elsewhere "
                                 f"and put it at {human}")
        print(f"train on it: python mvp.py --env {task}" + (f" --dataset-dir {args.dataset_dir}" if args.dataset_dir
                                                             else ""))
        return
    if task not in SCRIPTED:
        parser.error(f"no scripted demonstrator for {task} (only {', '.join(SCRIPTED)}); download the human data: "
                     f"python prepare_robomimic.py {task} --download (fetches {url} to {human})")
    if args.demos < 1:
        parser.error(f"--demos must be >= 1 (got {args.demos})")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0 (got {args.seed})")
    try:
        path = generate_scripted(task, scripted_dataset_path(task, args.demos, args.seed, args.dataset_dir),
                                 args.demos, args.seed)
    except DataError as e:
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt:  # what was kept is already said
        raise SystemExit(130)
    print(f"train on it (scripted demos, not the paper's data): python mvp.py --env {task} --dataset-dir {path}")


if __name__ == "__main__":
    main()
