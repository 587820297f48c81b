"""MVP inside a training loop of your own, on a task this project does not ship: gymnasium's Pendulum-v1.

Only the copyable core of mvp.py is used (what lies above its fence): Hyperparams, new_learner,
ReplayBuffer, train_step with buffer_target, and act. Everything else here is the glue you would write
anyway: a dataset of 50 random episodes, an offline loop, an online loop with one update per env step, and
an evaluation with best-of-N (the agent) and with the policy alone (N = 1).

    python examples/pendulum.py --offline-steps 3000 --online-steps 3000 --seed 0

The last line printed is one JSON object; its returns are Pendulum's own (unscaled): random play scores
about -1,200 per episode, a swing-up that holds the pendulum upright about -150.
"""
import argparse
import json
import os
import sys
import time

import gymnasium as gym
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # mvp.py is one folder up
import mvp  # noqa: E402

MAX_TORQUE = 2.0  # Pendulum's actions lie in [-2, 2], MVP's in [-1, 1] (its samples are clipped there): env gets 2a
REWARD_SCALE = 0.1  # a step's reward lies in [-16.3, 0]; scaled by 0.1 the critic's Q stays within about [-160, 0]


def random_dataset(env, episodes: int, rng: np.random.Generator) -> tuple[dict, float]:
    """Uniform random play as the table ReplayBuffer reads: observations and next_observations (n, 3), actions
    (n, 1) in [-1, 1], rewards, masks and terminals (n,). Pendulum never terminates, so masks are all 1 (bootstrap
    through the time limit) and terminals mark each episode's last row. Also returns the mean episode return."""
    keys = ("observations", "actions", "rewards", "masks", "terminals", "next_observations")
    rows, returns = {k: [] for k in keys}, []
    for _ in range(episodes):
        obs, _ = env.reset(seed=int(rng.integers(2 ** 31)))
        done, ret = False, 0.0
        while not done:
            a = rng.uniform(-1, 1, size=1).astype(np.float32)
            next_obs, reward, terminated, truncated, _ = env.step(MAX_TORQUE * a)
            done = terminated or truncated
            for k, v in zip(keys, (obs, a, REWARD_SCALE * reward, 1.0 - terminated, float(done), next_obs)):
                rows[k].append(v)
            obs, ret = next_obs, ret + float(reward)
        returns.append(ret)
    return {k: np.asarray(v, dtype=np.float32) for k, v in rows.items()}, float(np.mean(returns))


def evaluate(env, learner: mvp.Learner, hp: mvp.Hyperparams, num_candidates: int, episodes: int, seed: int) -> float:
    """Mean raw return over `episodes` episodes, each chunk of h actions picked by mvp.act and run open loop."""
    gen, returns = torch.Generator().manual_seed(seed), []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        done, ret, queue = False, 0.0, []
        while not done:
            if not queue:
                queue = list(mvp.act(learner, obs, num_candidates, hp.chunk_len, gen))  # (h, 1) rows
            obs, reward, terminated, truncated, _ = env.step(MAX_TORQUE * queue.pop(0))
            done, ret = terminated or truncated, ret + float(reward)
        returns.append(ret)
    return float(np.mean(returns))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="MVP on gymnasium's Pendulum-v1 from a loop of one's own.")
    parser.add_argument("--offline-steps", type=int, default=3000, help="updates on the random data (default 3000)")
    parser.add_argument("--online-steps", type=int, default=3000, help="env steps, one update each (default 3000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-episodes", type=int, default=5, help="episodes per evaluation (default 5)")
    args = parser.parse_args(argv)
    if min(args.offline_steps, args.online_steps) < 0 or args.eval_episodes < 1:
        parser.error("--offline-steps and --online-steps must be >= 0, --eval-episodes >= 1")
    torch.set_num_threads(1)  # networks this small run fastest on one thread
    torch.manual_seed(args.seed)
    gen, rng = torch.Generator().manual_seed(args.seed), np.random.default_rng(args.seed)
    env, began = gym.make("Pendulum-v1"), time.time()

    # the method's settings: small networks for a small task, the paper's chunk length, N, gamma, tau
    hp = mvp.Hyperparams(hidden_dim=64, num_layers=2)
    data, random_return = random_dataset(env, 50, rng)
    obs_dim, action_dim = data["observations"].shape[1], data["actions"].shape[1]
    learner = mvp.new_learner(obs_dim, action_dim * hp.chunk_len, hp, "cpu")  # a chunk is h actions, flattened
    # capacity for the online rows too; no clip_actions: these actions are ours, already inside [-1, 1]
    buffer = mvp.ReplayBuffer(data, len(data["observations"]) + args.online_steps, "cpu")

    for _ in range(args.offline_steps):  # offline: imitate the data's chunks, learn Q
        info = mvp.train_step(learner, buffer, mvp.buffer_target, hp, gen)
    if args.offline_steps:
        print(f"offline: {args.offline_steps} updates, critic loss {float(info['critic_loss']):.3f}, "
              f"Q {float(info['q_mean']):.1f}", flush=True)

    obs, queue = env.reset(seed=args.seed + 10_000)[0], []
    for _ in range(args.online_steps):  # online: act with best-of-N, store the step, one update
        if not queue:
            queue = list(mvp.act(learner, obs, hp.num_candidates, hp.chunk_len, gen))
        action = queue.pop(0)
        next_obs, reward, terminated, truncated, _ = env.step(MAX_TORQUE * action)
        buffer.add(obs, action, REWARD_SCALE * reward, 1.0 - terminated, float(terminated or truncated), next_obs)
        obs = next_obs
        if terminated or truncated:
            obs, queue = env.reset()[0], []
        info = mvp.train_step(learner, buffer, mvp.buffer_target, hp, gen)
    if args.online_steps:
        print(f"online: {args.online_steps} env steps, critic loss {float(info['critic_loss']):.3f}, "
              f"Q {float(info['q_mean']):.1f}", flush=True)

    result = dict(seed=args.seed, offline_steps=args.offline_steps, online_steps=args.online_steps,
                  random_return=round(random_return, 1),
                  best_of_n_return=round(evaluate(env, learner, hp, hp.num_candidates, args.eval_episodes, 20_000), 1),
                  policy_return=round(evaluate(env, learner, hp, 1, args.eval_episodes, 20_000), 1),
                  seconds=round(time.time() - began, 1))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
