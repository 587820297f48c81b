"""Evaluation: evaluate() on a fake env with known numbers, episodes in worker processes (--eval-workers), and
--eval-only on a saved policy.
"""
import json
import math
import os

import numpy as np
import pytest
import torch

import mvp
import prepare_ogbench
from tests.helpers import ENV, SINGLE, QuadraticCritic, main_error, read_csv, run_cli


# ---------------------------------------------------------------------------------------------
# evaluate() on a fake env with known numbers, in this process and in worker processes
# ---------------------------------------------------------------------------------------------
class ReachEnv:
    """A fake env with known numbers: 7 steps, reward -||a - goal||^2 per action, and (unless contact=False) the
    info key OGBench reports for gripper contact, 1 on every third step. Logs every reset seed, action and reward."""

    def __init__(self, goal, contact=True):
        self.goal, self.contact, self.log, self.t = goal, contact, [], 0

    def reset(self, seed=None):
        self.t = 0
        self.log.append(dict(seed=seed, actions=[], rewards=[]))
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.t += 1
        reward = -float(np.square(action - self.goal).sum())
        self.log[-1]["actions"].append(action)
        self.log[-1]["rewards"].append(reward)
        info = dict(success=reward > -0.05,
                    **({"proprio/gripper_contact": np.array([float(self.t % 3 == 0)])} if self.contact else {}))
        return np.zeros(2, np.float32), reward, False, self.t == 7, info


def test_evaluate_reports_n1_alone_q0_discounted_return_and_contact():
    torch.manual_seed(0)
    h, gamma, goal = 3, 0.9, np.full(2, 0.5, np.float32)
    learner = mvp.make_learner(2, 2 * h, mvp.Args(hidden_dim=16, num_layers=1), torch.device("cpu"))
    # mean_K Q = -1.5 ||chunk - goal||^2: it knows the reward
    learner.critic = QuadraticCritic(goal=torch.full((2 * h,), 0.5))
    env, actor = ReachEnv(goal), mvp.Actor(learner, torch.device("cpu"))
    res = mvp.evaluate(actor, env, 4, 16, h, gamma, seed=100)
    best, alone = env.log[:4], env.log[4:]
    assert [e["seed"] for e in best] == [e["seed"] for e in alone] == [100, 101, 102, 103]  # same env seeds
    for prefix, eps in (("", best), ("bc_", alone)):
        q0 = [-1.5 * np.square(np.stack(e["actions"][:h]) - goal).sum() for e in eps]  # the first chunk run
        assert res[prefix + "q0_mean"] == pytest.approx(np.mean(q0), rel=1e-5)
        disc = [sum(gamma ** k * r for k, r in enumerate(e["rewards"])) for e in eps]
        assert res[prefix + "disc_return_mean"] == pytest.approx(np.mean(disc))
        assert res[prefix + "return_mean"] == pytest.approx(np.mean([sum(e["rewards"]) for e in eps]))
        assert res[prefix + "length_mean"] == 7 and res[prefix + "contact_frac"] == pytest.approx(2 / 7)
    # best-of-16 runs other chunks than one sample alone: those the critic ranks higher (here rightly so)
    assert not np.array_equal(best[0]["actions"][0], alone[0]["actions"][0])
    assert res["q0_mean"] > res["bc_q0_mean"] + 0.5 and res["return_mean"] > res["bc_return_mean"] + 0.5
    # an env that does not report the info key (robomimic): NaN, not an error
    res = mvp.evaluate(actor, ReachEnv(goal, contact=False), 1, 4, h, gamma, seed=0)
    assert math.isnan(res["contact_frac"]) and math.isnan(res["bc_contact_frac"]) and np.isfinite(res["q0_mean"])


def test_evaluation_in_worker_processes_matches_episodes_run_here(monkeypatch):
    """--eval-workers: the workers act with the learner's own weights, and each episode depends on its seed
    alone (its candidate noise too), so the numbers equal those of evaluating here, whatever the worker count."""
    torch.manual_seed(0)
    cpu, args = torch.device("cpu"), mvp.Args(env="cube-single-task1", hidden_dim=16, num_layers=1)
    env_name = mvp.resolve_env_name(args.env)
    env = prepare_ogbench.make_env(env_name)
    obs_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
    actor = mvp.Actor(mvp.make_learner(obs_dim, action_dim * args.chunk_len, args, cpu), cpu)
    task = dict(env_name=env_name, env_args="null", obs_dim=obs_dim, action_dim=action_dim)
    res = mvp.evaluate(actor, None, 2, 4, args.chunk_len, args.discount, seed=7, workers=2, args=args, task=task)
    torch.randn(3)  # the global random state is not what seeds an episode's candidates
    assert mvp.evaluate(actor, env, 2, 4, args.chunk_len, args.discount, seed=7) == res
    assert mvp.evaluate(actor, env, 2, 4, args.chunk_len, args.discount, seed=9) != res
    # auto (-1): in this process on CPU; with CUDA one process per spare core, at most 16
    for cores, expected in ((40, 16), (8, 7), (1, 0)):
        monkeypatch.setattr(os, "cpu_count", lambda: cores)
        assert mvp.eval_processes(-1, torch.device("cuda")) == expected and mvp.eval_processes(-1, cpu) == 0
    assert mvp.eval_processes(3, torch.device("cuda")) == 3


# ---------------------------------------------------------------------------------------------
# --eval-only: a saved policy evaluated on its own
# ---------------------------------------------------------------------------------------------
def test_eval_only_repeats_the_runs_last_evaluation(uninterrupted):
    """The saved policy evaluates on its own: by default on the run's seed (1, not the flag's default 0) and
    episode count, so on a CPU its last evaluation comes out again, number for number."""
    last = read_csv(uninterrupted / "eval.csv")[-1]
    proc = run_cli("--eval-only", "--checkpoint", str(uninterrupted / "checkpoint.pt"), "--threads", "1")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {k: res[k] for k in last if k not in ("phase", "step")} == {
        k: float(v) for k, v in last.items() if k not in ("phase", "step")}
    assert res["env"] == SINGLE and (res["seed"], res["episodes"], res["num_candidates"]) == (1, 1, 4)


def test_eval_only_takes_n_and_refuses_another_env_network_or_a_corrupt_checkpoint(tmp_path, monkeypatch, capsys):
    args = mvp.Args(hidden_dim=8, num_layers=1)
    learner = mvp.make_learner(37, 25, args, torch.device("cpu"))
    path = str(tmp_path / "c.pt")
    mvp.save_checkpoint(path, mvp.checkpoint_state(learner, args, dict(env_name=ENV, obs_dim=37, action_dim=5)))
    assert "trained on " + ENV in main_error("--eval-only", "--checkpoint", path, "--env", "cube-double-task2")
    assert "trained with --hidden-dim 8, not 16" in main_error("--eval-only", "--checkpoint", path, "--hidden-dim",
                                                               "16", "--num-layers", "1")
    # best-of-N is evaluated with the checkpoint's N, or the one given now (before, it was silently ignored)
    calls = []
    monkeypatch.setattr(mvp, "env_from_checkpoint", lambda ckpt: None)
    monkeypatch.setattr(mvp, "evaluate", lambda learner, env, episodes, n, *a, **k: calls.append(n) or {})
    for extra in ([], ["--num-candidates", "3"]):
        mvp.main(["--eval-only", "--checkpoint", path, "--num-layers", "1", *extra])
    assert calls == [32, 3] and '"num_candidates": 3' in capsys.readouterr().out
    with open(path, "r+b") as f:
        f.truncate(200)
    proc = run_cli("--eval-only", "--checkpoint", path, check=False)  # through the command line once
    assert proc.returncode == 1 and "truncated or corrupt" in proc.stderr and "Traceback" not in proc.stderr


def test_eval_only_of_a_graphed_cuda_run_works_on_a_cpu(tmp_path, monkeypatch):
    """--eval-only takes how to run (device, CUDA graphs) from today's flags, not from the training run's."""
    args = mvp.Args(hidden_dim=8, num_layers=1)
    learner = mvp.make_learner(37, 25, args, torch.device("cpu"))
    trained = mvp.Args(hidden_dim=8, num_layers=1, device="cuda", cuda_graph="on")
    path = str(tmp_path / "c.pt")
    mvp.save_checkpoint(path, mvp.checkpoint_state(learner, trained, dict(env_name=ENV, obs_dim=37, action_dim=5)))
    monkeypatch.setattr(mvp, "env_from_checkpoint", lambda ckpt: None)
    monkeypatch.setattr(mvp, "evaluate", lambda actor, *a, **k: dict(graphed=actor.cuda_graph))
    assert mvp.main(["--eval-only", "--checkpoint", path, "--device", "cpu"]) == dict(graphed=False)
