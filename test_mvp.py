"""Tests for mvp.py: the maths on cases with known answers, the sampler, data, and real CLI runs.

Run: python -m pytest -q test_mvp.py   (CPU; a few minutes on 2 cores)
"""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import mvp

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = "cube-double-play-singletask-task1-v0"


# ---------------------------------------------------------------------------------------------
# Mean-flow maths
# ---------------------------------------------------------------------------------------------
def test_jvp_matches_finite_difference():
    """du/dt from the single JVP call equals a central difference along (v, 1, 0)."""
    torch.manual_seed(0)
    net = mvp.MeanVelocityNet(obs_dim=3, act_dim=4, hidden_dim=32, num_layers=2).double()
    B = 16
    obs, a_t, v = torch.randn(B, 3).double(), torch.randn(B, 4).double(), torch.randn(B, 4).double()
    t, r = torch.rand(B, 1).double() * 0.5, 0.5 + torch.rand(B, 1).double() * 0.5
    u, u_tgt = mvp.mean_flow_target(net, obs, a_t, v, t, r)
    dudt = (u_tgt - v) / (r - t)
    h = 1e-5
    fd = (net(obs, a_t + h * v, t + h, r) - net(obs, a_t - h * v, t - h, r)) / (2 * h)
    assert torch.allclose(dudt, fd, atol=1e-7), (dudt - fd).abs().max()
    assert torch.allclose(u, net(obs, a_t, t, r))
    assert u.requires_grad and not u_tgt.requires_grad  # gradient through u only, target detached


class GaussianFlow:
    """Noise N(0, I) -> target N(mu, s^2 I) with independent coupling and a_t = (1 - t) eps + t a1.

    The marginal flow is linear: x_t = t mu + sigma_t z with sigma_t = sqrt((1 - t)^2 + t^2 s^2),
    z = eps conserved along trajectories. So the instantaneous velocity and the mean velocity over
    [t, r] have closed forms."""

    def __init__(self, mu, s):
        self.mu, self.s = mu, s

    def sigma(self, t):
        return torch.sqrt((1 - t) ** 2 + (t * self.s) ** 2)

    def z(self, a, t):
        return (a - t * self.mu) / self.sigma(t)

    def velocity(self, a, t):
        dsigma = (-(1 - t) + t * self.s ** 2) / self.sigma(t)
        return self.mu + dsigma * self.z(a, t)

    def mean_velocity(self, obs, a, t, r):
        a_r = r * self.mu + self.sigma(r) * self.z(a, t)  # flow map from t to r
        return (a_r - a) / (r - t)


def _gaussian_case(B=512, dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    flow = GaussianFlow(mu=torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), s=0.3)
    a = torch.randn(B, dim, generator=g, dtype=torch.float64)
    t = torch.rand(B, 1, generator=g, dtype=torch.float64) * 0.9
    r = t + 0.05 + torch.rand(B, 1, generator=g, dtype=torch.float64) * (0.95 - t)
    obs = torch.zeros(B, 1, dtype=torch.float64)
    return flow, obs, a, t, r


def test_true_mean_velocity_has_zero_identity_residual_and_zero_ivc():
    flow, obs, a, t, r = _gaussian_case()
    v = flow.velocity(a, t)
    u, u_tgt = mvp.mean_flow_target(flow.mean_velocity, obs, a, v, t, r)
    assert (u - u_tgt).abs().max() < 1e-8  # the mean-flow identity holds at the true field
    # boundary: as r -> t the mean velocity tends to the instantaneous one
    near = flow.mean_velocity(obs, a, t, t + 1e-7)
    assert (near - v).abs().max() < 1e-5


def test_boundary_error_passes_the_identity_but_not_ivc():
    """u + C(z, r) / (r - t), with z constant along trajectories, satisfies the mean-flow identity
    exactly, so L_MF cannot see it; the IVC term (u at r = t must equal v) exposes it."""
    flow, obs, a, t, r = _gaussian_case()
    c = lambda a_, t_, r_: 0.2 * (1 + r_) * flow.z(a_, t_)

    def wrong(obs_, a_, t_, r_):
        return flow.mean_velocity(obs_, a_, t_, r_) + c(a_, t_, r_) / (r_ - t_)

    v = flow.velocity(a, t)
    u, u_tgt = mvp.mean_flow_target(wrong, obs, a, v, t, r)
    assert (u - u_tgt).abs().max() < 1e-7  # identity residual ~0 for the wrong field too
    assert (u - flow.mean_velocity(obs, a, t, r)).abs().mean() > 0.05  # yet it is wrong

    # IVC via the project's loss, evaluated near the boundary (at r = t exactly the wrong field is infinite)
    def near_boundary(field):
        return lambda obs_, a_, t_, r_: field(obs_, a_, t_, r_ + 1e-3)

    # a1 such that the conditional velocity a1 - eps equals the marginal one at a_t: isolates the boundary term
    a_t = a
    a1 = a_t + (1 - t) * flow.velocity(a_t, t)
    eps = a_t - t * flow.velocity(a_t, t)
    valid = torch.ones(a.shape[0], 1, dtype=torch.float64)
    ivc_true = mvp.ivc_loss(near_boundary(flow.mean_velocity), obs, a1, eps, t, valid, chunk_len=1)
    ivc_wrong = mvp.ivc_loss(near_boundary(wrong), obs, a1, eps, t, valid, chunk_len=1)
    assert ivc_true < 1e-4
    assert ivc_wrong > 1.0


def test_mean_flow_loss_trains_a_network_toward_the_true_mean_velocity():
    """A few hundred steps of L_MF + L_IVC on the Gaussian case reduce the error to u* clearly."""
    torch.manual_seed(0)
    flow = GaussianFlow(mu=torch.tensor([0.5, -1.0]), s=0.3)
    net = mvp.MeanVelocityNet(obs_dim=1, act_dim=2, hidden_dim=64, num_layers=2)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    obs = torch.zeros(256, 1)
    valid = torch.ones(256, 1)

    def error():
        a = torch.randn(2048, 2, generator=g)
        t = torch.zeros(2048, 1)
        r = torch.ones(2048, 1)
        with torch.no_grad():
            return (net(torch.zeros(2048, 1), a, t, r) - flow.mean_velocity(None, a, t, r)).square().mean().item()

    before = error()
    time_kw = dict(sampler="uniform", mu=0.0, sigma=1.0, equal_frac=0.0)
    for _ in range(400):
        a1 = flow.mu + flow.s * torch.randn(256, 2, generator=g)
        loss, info = mvp.policy_loss(net, obs, a1, valid, 1.0, 1, time_kw, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = error()
    assert after < 0.2 * before, (before, after)


def test_time_sampler_orders_and_equal_fraction():
    g = torch.Generator().manual_seed(0)
    for sampler in ("uniform", "logit_normal"):
        t, r = mvp.sample_times(10_000, sampler, -0.4, 1.0, 0.0, g, "cpu")
        assert t.shape == (10_000, 1) and (t <= r).all() and (t >= 0).all() and (r <= 1).all()
        assert (r > t).all()
    t, r = mvp.sample_times(10_000, "uniform", 0.0, 1.0, 0.25, g, "cpu")
    assert abs((r == t).float().mean().item() - 0.25) < 0.02


# ---------------------------------------------------------------------------------------------
# Acting and RL losses
# ---------------------------------------------------------------------------------------------
class QuadraticCritic(torch.nn.Module):
    """A critic with a known answer: Q_k(s, a) = -k * ||a - goal||^2 (members differ by scale)."""

    def __init__(self, goal, members=2):
        super().__init__()
        self.goal, self.scales = goal, torch.arange(1, members + 1, dtype=torch.float32)[:, None]

    def forward(self, obs, a):
        return -self.scales * (a - self.goal).square().sum(-1)[None]  # (K, B)


def test_best_of_n_picks_argmax_with_shapes_and_clip():
    torch.manual_seed(0)
    policy = mvp.MeanVelocityNet(obs_dim=4, act_dim=10, hidden_dim=32, num_layers=2)
    with torch.no_grad():
        policy.net[-1].bias.fill_(3.0)  # pushes raw samples outside [-1, 1]: the clip must hold
    critic = QuadraticCritic(goal=torch.full((10,), 0.9))
    obs = torch.randn(3, 4)
    a_star, q = mvp.best_of_n(policy, critic, obs, 16, torch.Generator().manual_seed(5))
    assert a_star.shape == (3, 10) and q.shape == (3, 16)
    assert a_star.abs().max() <= 1.0
    # recompute the same candidates with the same generator and check the pick is the argmax
    eps = torch.randn(3 * 16, 10, generator=torch.Generator().manual_seed(5))
    cand = mvp.one_step(policy, obs.repeat_interleave(16, 0), eps).view(3, 16, 10)
    q_ref = critic(None, cand.view(-1, 10)).mean(0).view(3, 16)
    assert torch.allclose(q, q_ref)
    assert torch.equal(a_star, cand[torch.arange(3), q_ref.argmax(1)])
    assert (q_ref.max(1).values >= q_ref.mean(1)).all()


def test_one_step_is_noise_plus_mean_velocity_over_0_1():
    torch.manual_seed(0)
    policy = mvp.MeanVelocityNet(obs_dim=2, act_dim=3, hidden_dim=16, num_layers=1)
    obs, eps = torch.randn(5, 2), torch.randn(5, 3) * 0.1
    expected = (eps + policy(obs, eps, torch.zeros(5, 1), torch.ones(5, 1))).clamp(-1, 1)
    assert torch.allclose(mvp.one_step(policy, obs, eps), expected)


def test_critic_ensemble_members_are_independent_and_shaped():
    torch.manual_seed(0)
    critic = mvp.CriticEnsemble(obs_dim=3, act_dim=2, hidden_dim=16, num_layers=2, num_members=3)
    q = critic(torch.randn(7, 3), torch.randn(7, 2))
    assert q.shape == (3, 7)
    assert not torch.allclose(q[0], q[1])
    q[0].sum().backward()  # member 0's loss touches only member 0's weights
    assert critic.layers[0].weight.grad[1:].abs().sum() == 0 and critic.layers[0].weight.grad[0].abs().sum() > 0


def test_critic_target_formula():
    torch.manual_seed(0)
    policy = mvp.MeanVelocityNet(obs_dim=2, act_dim=3, hidden_dim=16, num_layers=1)
    critic = QuadraticCritic(goal=torch.zeros(3))
    target = QuadraticCritic(goal=torch.zeros(3))
    next_obs = torch.randn(4, 2)
    reward_sum, mask = torch.tensor([1.0, -2.0, 0.5, 0.0]), torch.tensor([1.0, 0.0, 1.0, 1.0])
    y, _ = mvp.critic_target(policy, critic, target, next_obs, reward_sum, mask, 0.9, 5, 8, torch.Generator().manual_seed(3))
    a_star, _ = mvp.best_of_n(policy, critic, next_obs, 8, torch.Generator().manual_seed(3))
    expected = reward_sum + 0.9 ** 5 * mask * target(next_obs, a_star).mean(0)
    assert torch.allclose(y, expected)


def test_polyak():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = a.weight.detach().clone()
    mvp.polyak(a, b, 0.25)
    assert torch.allclose(a.weight, 0.75 * before + 0.25 * b.weight)


def test_no_q_gradient_reaches_the_policy():
    """The policy's gradient comes from L_policy alone: the critic step leaves policy grads empty."""
    torch.manual_seed(0)
    args = mvp.Args(hidden_dim=16, num_layers=1, num_candidates=4, batch_size=8)
    learner = mvp.make_learner(3, 4, args, torch.device("cpu"))
    batch = dict(obs=torch.randn(8, 3), actions=torch.rand(8, 4) * 2 - 1, reward_sum=torch.zeros(8),
                 mask=torch.ones(8), valid=torch.ones(8, 2), next_obs=torch.randn(8, 3))
    g = torch.Generator().manual_seed(0)
    y, _ = mvp.critic_target(learner.policy, learner.critic, learner.target_critic, batch["next_obs"],
                             batch["reward_sum"], batch["mask"], 0.99, 2, 4, g)
    loss, _ = mvp.critic_loss(learner.critic, batch["obs"], batch["actions"], y, batch["valid"][:, -1])
    loss.backward()
    assert all(p.grad is None for p in learner.policy.parameters())
    assert all(p.grad is not None for p in learner.critic.parameters())


# ---------------------------------------------------------------------------------------------
# The chunked sampler on a hand-built dataset
# ---------------------------------------------------------------------------------------------
def _hand_dataset():
    """Two episodes of lengths 4 and 6. obs[i] = i so every sampled row names its index."""
    n = 10
    terminals = np.zeros(n, np.float32)
    terminals[[3, 9]] = 1
    masks = np.ones(n, np.float32)
    masks[7] = 0  # success at row 7: bootstrapping must stop there
    return dict(observations=np.arange(n, dtype=np.float32)[:, None], actions=np.arange(n * 2, dtype=np.float32).reshape(n, 2),
                rewards=np.arange(1, n + 1, dtype=np.float32), masks=masks, terminals=terminals,
                next_observations=100 + np.arange(n, dtype=np.float32)[:, None])


def _reference_chunk(d, k, h, gamma):
    valid, ended = [], False
    for i in range(h):
        valid.append(0.0 if ended else 1.0)
        ended = ended or d["terminals"][k + i] == 1
    rsum = sum(gamma ** i * d["rewards"][k + i] * valid[i] for i in range(h))
    mask = min(d["masks"][k + i] for i in range(h) if valid[i])
    last = k + int(sum(valid)) - 1
    return valid, rsum, mask, d["next_observations"][last, 0]


def test_chunk_sampler_matches_reference_across_episode_ends():
    d = _hand_dataset()
    buf = mvp.ReplayBuffer(d, 10, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    h, gamma = 3, 0.9
    batch = buf.sample_chunks(500, h, gamma, g)
    starts = batch["obs"][:, 0].long()
    assert set(starts.tolist()) == set(range(10 - h + 1))  # every legal start drawn, none past the end
    for b in range(500):
        k = int(starts[b])
        valid, rsum, mask, nxt = _reference_chunk(d, k, h, gamma)
        assert batch["valid"][b].tolist() == valid
        assert batch["reward_sum"][b].item() == pytest.approx(rsum)
        assert batch["mask"][b].item() == mask
        assert batch["next_obs"][b, 0].item() == nxt
        assert batch["actions"][b].tolist() == d["actions"][k:k + h].reshape(-1).tolist()
    # spot checks written out by hand: start 2 crosses the end at row 3
    row = (starts == 2).nonzero()[0, 0]
    assert batch["valid"][row].tolist() == [1, 1, 0]
    assert batch["reward_sum"][row].item() == pytest.approx(3 + 0.9 * 4)
    assert batch["next_obs"][row, 0].item() == 103
    row = (starts == 6).nonzero()[0, 0]  # rows 6, 7, 8: success at 7 zeroes the mask
    assert batch["mask"][row].item() == 0 and batch["valid"][row].tolist() == [1, 1, 1]


def test_replay_buffer_appends_online_rows():
    d = _hand_dataset()
    buf = mvp.ReplayBuffer(d, 12, torch.device("cpu"))
    buf.add(np.array([50.0]), np.array([1.0, 2.0]), -1.0, 1.0, 0.0, np.array([51.0]))
    assert buf.size == 11 and buf.store["obs"][10, 0] == 50 and buf.store["next_obs"][10, 0] == 51
    buf.add(np.array([51.0]), np.array([1.0, 2.0]), -1.0, 1.0, 1.0, np.array([52.0]))
    with pytest.raises(RuntimeError, match="full"):
        buf.add(np.array([52.0]), np.array([1.0, 2.0]), -1.0, 1.0, 0.0, np.array([53.0]))


# ---------------------------------------------------------------------------------------------
# Names, data generation and loading through OGBench
# ---------------------------------------------------------------------------------------------
def test_env_names():
    assert mvp.resolve_env_name("cube-double") == "cube-double-play-singletask-v0"
    assert mvp.resolve_env_name("cube-triple-task4") == "cube-triple-play-singletask-task4-v0"
    assert mvp.resolve_env_name(ENV) == ENV
    assert mvp.dataset_name_of(ENV) == "cube-double-play-v0"
    with pytest.raises(ValueError, match="cube-triple-task4"):
        mvp.resolve_env_name("cube-quadruple")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A tiny generated cube-double dataset: 2 training episodes and 1 validation episode."""
    d = str(tmp_path_factory.mktemp("data"))
    mvp.generate_dataset("cube-double-play-v0", d, num_episodes=2, seed=0, workers=2)
    return d


def test_generated_files_load_through_ogbench_with_single_task_rewards(data_dir):
    env, train, val = mvp.load_ogbench(ENV, data_dir)
    n = 2 * (mvp.EPISODE_STEPS - 1)  # OGBench drops the last state of each episode
    assert train["observations"].shape == (n, env.observation_space.shape[0])
    assert train["actions"].shape == (n, 5) and np.abs(train["actions"]).max() <= 1
    assert len(val["observations"]) == mvp.EPISODE_STEPS - 1
    assert train["terminals"].sum() == 2
    assert set(np.unique(train["rewards"])) <= {-2.0, -1.0, 0.0}  # (#cubes at goal) - #cubes
    assert np.array_equal(train["masks"], (train["rewards"] != 0).astype(np.float32))
    with np.load(os.path.join(data_dir, "cube-double-play-v0.npz"), allow_pickle=False) as f:
        settings = json.loads(str(f[mvp.GENERATED_KEY]))
    assert settings["episodes"] == 2 and settings["split"] == "train" and settings["noise"] == 0.1


def test_generation_is_deterministic_and_independent_of_workers(data_dir, tmp_path):
    mvp.generate_dataset("cube-double-play-v0", str(tmp_path), num_episodes=2, seed=0, workers=1)
    for name in ("cube-double-play-v0.npz", "cube-double-play-v0-val.npz"):
        with np.load(os.path.join(data_dir, name)) as a, np.load(tmp_path / name) as b:
            for k in ("observations", "actions", "qpos"):
                assert np.array_equal(a[k], b[k]), (name, k)


def test_generation_reuses_its_own_files_and_refuses_foreign_ones(data_dir, tmp_path, capsys):
    mvp.generate_dataset("cube-double-play-v0", data_dir, num_episodes=2, seed=0, workers=1)
    assert "reusing" in capsys.readouterr().out
    foreign = tmp_path / "cube-double-play-v0.npz"
    np.savez(foreign, observations=np.zeros((3, 2)))
    before = foreign.read_bytes()
    with pytest.raises(mvp.DatasetError, match="not generated by this project"):
        mvp.generate_dataset("cube-double-play-v0", str(tmp_path), num_episodes=1, seed=0, workers=1)
    assert foreign.read_bytes() == before
    assert not (tmp_path / "cube-double-play-v0.npz.tmp").exists()


# ---------------------------------------------------------------------------------------------
# Real CLI runs
# ---------------------------------------------------------------------------------------------
TINY = ["--env", "cube-double-task1", "--hidden-dim", "32", "--num-layers", "2", "--batch-size", "32",
        "--num-candidates", "4", "--eval-episodes", "1", "--log-interval", "50", "--data-workers", "1"]


def run_cli(*argv, check=True):
    proc = subprocess.run([sys.executable, os.path.join(HERE, "mvp.py"), *argv], capture_output=True, text=True,
                          cwd=HERE, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_end_to_end_offline_online_eval(data_dir, tmp_path):
    run = tmp_path / "run"
    run_cli(*TINY, "--dataset-dir", data_dir, "--offline-steps", "200", "--online-steps", "520",
            "--start-training", "100", "--eval-interval", "0", "--run-dir", str(run))
    offline, online, evals = (read_csv(run / f) for f in ("offline.csv", "online.csv", "eval.csv"))
    assert [int(r["step"]) for r in offline] == [50, 100, 150, 200]
    # updates start after 100 env steps; the episode cap (500) ends one episode on the way
    assert [int(r["step"]) for r in online] == [150, 200, 250, 300, 350, 400, 450, 500, 520]
    assert online[0]["episode"] == "0" and online[-1]["episode"] == "1" and online[-1]["episode_length"] == "500"
    for row in offline + online:
        for k in ("critic_loss", "mf_loss", "ivc_loss", "q_mean", "updates_per_s"):
            assert np.isfinite(float(row[k]))
    assert [(r["phase"], int(r["step"])) for r in evals] == [("offline", 200), ("online", 520)]
    assert 0.0 <= float(evals[-1]["success_rate"]) <= 1.0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_eval"]["step"] == 520 and summary["env"] == ENV and summary["offline_updates_per_s"] > 0
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert set(ckpt) >= {"policy", "critic", "target_critic", "args"} and ckpt["args"]["hidden_dim"] == 32
    # the saved policy evaluates on its own
    proc = run_cli("--eval-only", "--checkpoint", str(run / "checkpoint.pt"), "--eval-episodes", "1")
    assert json.loads(proc.stdout.strip().splitlines()[-1])["env"] == ENV


def test_same_seed_gives_identical_losses(data_dir, tmp_path):
    losses = []
    for name in ("a", "b"):
        run = tmp_path / name
        run_cli(*TINY, "--dataset-dir", data_dir, "--offline-steps", "100", "--online-steps", "120",
                "--start-training", "20", "--eval-interval", "0", "--run-dir", str(run), "--seed", "3")
        rows = read_csv(run / "offline.csv") + read_csv(run / "online.csv")
        losses.append([(r["critic_loss"], r["mf_loss"], r["ivc_loss"], r["q_mean"]) for r in rows])
    assert losses[0] == losses[1] and len(losses[0]) == 5  # offline 50, 100; online 50, 100, 120


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors, no library tracebacks
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--env", "cube-quadruple"], "unknown --env 'cube-quadruple'. Accepted: cube-double"),
    (["--num-candidates", "0"], "--num-candidates must be >= 1"),
    (["--chunk-len", "0"], "--chunk-len must be >= 1"),
    (["--offline-steps", "-5"], "--offline-steps must be >= 0"),
    (["--ivc-coef", "-1"], "--ivc-coef must be >= 0"),
    (["--eval-only"], "--eval-only needs --checkpoint"),
    (["--device", "tpu"], "--device must be auto, cpu or cuda"),
])
def test_bad_arguments(argv, message):
    proc = run_cli(*argv, check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def _copy_dataset(src_dir, dst_dir, edit=lambda arrays: None):
    for split in ("", "-val"):
        with np.load(os.path.join(src_dir, f"cube-double-play-v0{split}.npz")) as f:
            arrays = {k: f[k].copy() for k in f.files}
        edit(arrays)
        np.savez(os.path.join(dst_dir, f"cube-double-play-v0{split}.npz"), **arrays)


def test_corrupt_dataset_file_is_named(data_dir, tmp_path):
    _copy_dataset(data_dir, tmp_path)
    path = tmp_path / "cube-double-play-v0.npz"
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    proc = run_cli(*TINY, "--dataset-dir", str(tmp_path), "--offline-steps", "5", "--run-dir", str(tmp_path / "r"), check=False)
    assert proc.returncode == 1 and str(path) in proc.stderr and "--generate-data" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_mismatched_dataset_is_refused(data_dir, tmp_path):
    def widen(arrays):  # 3 extra observation dims: a file made for another task
        arrays["observations"] = np.concatenate([arrays["observations"], arrays["observations"][:, :3]], axis=1)

    _copy_dataset(data_dir, tmp_path, widen)
    proc = run_cli(*TINY, "--dataset-dir", str(tmp_path), "--offline-steps", "5", "--run-dir", str(tmp_path / "r"), check=False)
    assert proc.returncode == 1 and "another task" in proc.stderr and "Traceback" not in proc.stderr


def test_non_finite_loss_stops_naming_step_and_terms(data_dir, tmp_path):
    _copy_dataset(data_dir, tmp_path, lambda arrays: arrays["observations"].fill(np.nan))
    proc = run_cli(*TINY, "--dataset-dir", str(tmp_path), "--offline-steps", "60", "--run-dir", str(tmp_path / "r"), check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "non-finite loss in the offline phase, first at update 1" in proc.stderr
    assert "mf_loss=" in proc.stderr and "Traceback" not in proc.stderr


def test_eval_only_refuses_a_checkpoint_of_another_env_and_a_corrupt_one(tmp_path):
    args = mvp.Args(hidden_dim=8, num_layers=1)
    learner = mvp.make_learner(37, 25, args, torch.device("cpu"))
    path = str(tmp_path / "c.pt")
    mvp.save_checkpoint(path, learner, args, dict(env_name=ENV, obs_dim=37, action_dim=5))
    proc = run_cli("--eval-only", "--checkpoint", path, "--env", "cube-double-task2", check=False)
    assert proc.returncode == 1 and "trained on " + ENV in proc.stderr
    with open(path, "r+b") as f:
        f.truncate(200)
    proc = run_cli("--eval-only", "--checkpoint", path, check=False)
    assert proc.returncode == 1 and "truncated or corrupt" in proc.stderr and "Traceback" not in proc.stderr


def test_importing_mvp_needs_no_simulator():
    code = "import sys, mvp; assert 'ogbench' not in sys.modules and 'mujoco' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=HERE)


# ---------------------------------------------------------------------------------------------
# Flow-matching baselines share everything but the loss and the sampler
# ---------------------------------------------------------------------------------------------
def test_euler_sampler_integrates_a_known_velocity_field():
    """A velocity field v(a, t) = c (constant) moves noise by exactly c whatever the step count;
    v(a, t) = a grows it by (1 + 1/K)^K, Euler's approximation of e."""
    obs, eps = torch.zeros(4, 1), torch.full((4, 2), 0.1)
    const = lambda o, a, t, r: torch.full_like(a, 0.3)
    linear = lambda o, a, t, r: a
    for k in (1, 10):
        assert torch.allclose(mvp.euler_sample(const, obs, eps, k), eps + 0.3)
        assert torch.allclose(mvp.euler_sample(linear, obs, eps, k), eps * (1 + 1 / k) ** k)
    assert mvp.euler_sample(const, obs, torch.full((4, 2), 0.9), 1).max() == 1.0  # clipped


def test_flow_loss_is_the_ivc_term_and_learner_picks_loss_and_sampler():
    torch.manual_seed(0)
    net = mvp.MeanVelocityNet(obs_dim=2, act_dim=3, hidden_dim=16, num_layers=1)
    obs, a1, valid = torch.randn(8, 2), torch.rand(8, 3), torch.ones(8, 1)
    loss, info = mvp.flow_matching_loss(net, obs, a1, valid, 1, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(a1.shape, generator=g)
    t = torch.rand(8, 1, generator=g)
    assert torch.allclose(loss, mvp.ivc_loss(net, obs, a1, eps, t, valid, 1)) and info["mf_loss"] == 0
    flow = mvp.make_learner(2, 3, mvp.Args(policy="flow", flow_steps=4, hidden_dim=8, num_layers=1), torch.device("cpu"))
    eps = torch.randn(5, 3)
    assert torch.allclose(flow.sample(flow.policy, obs[:5], eps), mvp.euler_sample(flow.policy, obs[:5], eps, 4))
    ours = mvp.make_learner(2, 3, mvp.Args(hidden_dim=8, num_layers=1), torch.device("cpu"))
    assert ours.sample is mvp.one_step


# ---------------------------------------------------------------------------------------------
# run_benchmarks.py: aggregation, dry run, a tiny real suite through submitit, a tiny speed run
# ---------------------------------------------------------------------------------------------
import run_benchmarks  # noqa: E402


def _fake_run(root, task, method, seed, rows, offline_steps=100):
    d = run_benchmarks.run_dir_of(str(root), task, method, seed)
    os.makedirs(d)
    with open(os.path.join(d, "args.json"), "w") as f:
        json.dump(dict(offline_steps=offline_steps), f)
    with open(os.path.join(d, "eval.csv"), "w") as f:
        f.write("phase,step,success_rate,return_mean,length_mean\n")
        for phase, step, success in rows:
            f.write(f"{phase},{step},{success},-1,1\n")


def test_aggregate_table_and_curves_on_synthetic_csvs(tmp_path):
    _fake_run(tmp_path, "cube-double-task4", "mvp", 0, [("offline", 100, 0.2), ("online", 50, 0.6)])
    _fake_run(tmp_path, "cube-double-task4", "mvp", 1, [("offline", 100, 0.4), ("online", 50, 1.0)])
    _fake_run(tmp_path, "cube-double-task4", "flow10", 0, [("offline", 100, 0.1), ("online", 50, 0.3)])
    table = run_benchmarks.aggregate(str(tmp_path), ["cube-double-task4"], ["mvp", "flow10"], [0, 1])
    mvp_row = table["cube-double-task4/mvp"]
    assert mvp_row["cells"] == {150: dict(mean=pytest.approx(0.8), std=pytest.approx(0.2), n=2)}  # online step 50 -> 150
    assert mvp_row["curve"] == {100: [0.2, 0.4], 150: [0.6, 1.0]}
    at_100 = run_benchmarks.aggregate(str(tmp_path), ["cube-double-task4"], ["mvp"], [0, 1], steps=[100])
    assert at_100["cube-double-task4/mvp"]["cells"][100]["mean"] == pytest.approx(0.3)
    md = run_benchmarks.table_markdown(table)
    assert "| cube-double-task4 | mvp | 0.80 ± 0.20 (n=2) | 0.95 |" in md
    assert "| cube-double-task4 | flow10 | 0.30 ± 0.00 (n=1) | 0.93 |" in md
    paths = run_benchmarks.plot_curves(table, str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["curves_cube-double-task4.png"] and os.path.getsize(paths[0]) > 5000


def test_suite_dry_run_prints_commands_and_skips_finished(tmp_path, capsys):
    finished = run_benchmarks.run_dir_of(str(tmp_path), "cube-double-task1", "mvp", 0)
    os.makedirs(finished)
    open(os.path.join(finished, "summary.json"), "w").write("{}")
    run_benchmarks.main(["suite", "--tasks", "cube-double-task1", "--seeds", "0", "1", "--methods", "mvp", "flow10",
                         "--out-dir", str(tmp_path), "--dry-run"])
    out = capsys.readouterr().out
    assert "4 run(s), 1 already finished, 3 to run" in out
    lines = [l for l in out.splitlines() if "mvp.py" in l]
    assert len(lines) == 3 and all("--hidden-dim 256" in l for l in lines)  # the cpu preset
    assert sum("--policy flow --flow-steps 10" in l for l in lines) == 2
    assert not any(os.path.join("mvp", "seed0") in l for l in lines)


def test_tiny_real_suite_through_submitit_local_executor(data_dir, tmp_path):
    out = tmp_path / "suite"
    argv = ["suite", "--tasks", "cube-double-task1", "--seeds", "0", "--methods", "mvp", "flow1",
            "--launcher", "submitit-local", "--out-dir", str(out), "--extra", *TINY, "--dataset-dir", data_dir,
            "--offline-steps", "100", "--online-steps", "60", "--start-training", "20", "--eval-interval", "0"]
    table = run_benchmarks.main(argv)
    assert set(table) == {"cube-double-task1/mvp", "cube-double-task1/flow1"}
    for row in table.values():
        assert list(row["curve"]) == [100, 160] and row["cells"][160]["n"] == 1
    assert (out / "results.md").exists() and (out / "curves_cube-double-task1.png").exists()
    flow_args = json.loads((out / "cube-double-task1" / "flow1" / "seed0" / "args.json").read_text())
    assert flow_args["policy"] == "flow" and flow_args["flow_steps"] == 1
    # a second call finds both runs finished and launches nothing
    before = os.path.getmtime(out / "cube-double-task1" / "mvp" / "seed0" / "summary.json")
    run_benchmarks.main(argv)
    assert os.path.getmtime(out / "cube-double-task1" / "mvp" / "seed0" / "summary.json") == before


def test_speed_writes_table_with_ratios(tmp_path):
    out = run_benchmarks.main(["speed", "--hidden-dim", "16", "--num-layers", "1", "--batch-size", "8",
                               "--num-candidates", "4", "--repeats", "1", "--seconds", "0.1",
                               "--latency-calls", "3", "--out-dir", str(tmp_path)])
    assert set(out["results"]) == set(run_benchmarks.METHODS)
    assert out["results"]["flow10"]["updates_ratio_vs_flow10"] == 1.0
    assert all(r["updates_per_s"] > 0 and r["latency_ms_p95"] >= 0 for r in out["results"].values())
    md = (tmp_path / "speed.md").read_text()
    assert "| flow1 |" in md and "Machine:" in md and json.loads((tmp_path / "speed.json").read_text())["machine"]
