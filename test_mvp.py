"""Tests for mvp.py: the maths on cases with known answers, the sampler, data, and real CLI runs.

Run: python -m pytest -q -n 2 test_mvp.py   (CPU, two pytest-xdist workers; about 5 minutes on 2 quiet cores)
"""
import csv
import functools
import gc
import inspect
import json
import math
import os
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zipfile
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import submitit  # noqa: F401  (its import runs logging.config.dictConfig, which closes every logging handler there
# is: absl's, once an in-process run made one, then closes the stream it holds, pytest's capture, unless this import
# came first)
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.text import Text

import mvp
import prepare_ogbench
import prepare_robomimic
import run_benchmarks
import run_utils
import toy_2d

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


def test_policy_loss_gradient_is_mf_plus_lambda_ivc_and_lambda_0_still_logs_ivc():
    torch.manual_seed(0)
    net = mvp.MeanVelocityNet(obs_dim=3, act_dim=4, hidden_dim=16, num_layers=2)
    obs, a1, valid = torch.randn(8, 3), torch.rand(8, 4) * 2 - 1, torch.ones(8, 2)
    time_kw = dict(sampler="uniform", mu=0.0, sigma=1.0, equal_frac=0.0)

    def grads(coef):
        net.zero_grad()
        loss, info = mvp.policy_loss(net, obs, a1, valid, coef, 2, time_kw, torch.Generator().manual_seed(1))
        loss.backward()
        return torch.cat([p.grad.flatten() for p in net.parameters()]), info

    g0, info0 = grads(0.0)
    g1, info1 = grads(1.0)
    g2, _ = grads(2.0)
    assert info0["ivc_loss"] > 0 and torch.allclose(info0["ivc_loss"], info1["ivc_loss"])  # logged at lambda = 0
    assert torch.allclose(info0["policy_loss"], info0["mf_loss"])
    assert torch.allclose(g2 - g1, g1 - g0, atol=1e-6)  # the gradient is linear in lambda
    assert (g1 - g0).abs().max() > 1e-4  # and IVC contributes at lambda > 0


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
    gap = torch.sub(*mvp.sample_times(100_000, "uniform", 0.0, 1.0, 0.0, g, "cpu")[::-1])
    assert abs((gap > 0.9).float().mean().item() - 0.01) < 0.002  # sorted uniforms: gap density 2 (1 - gap)


def test_gap_uniform_sampler_and_one_step_rows():
    """gap_uniform: r - t ~ U(0, 1) with t, r inside [0, 1]; one_step_frac rows are exactly (0, 1)."""
    g = torch.Generator().manual_seed(0)
    t, r = mvp.sample_times(100_000, "gap_uniform", 0.0, 1.0, 0.0, g, "cpu")
    gap = r - t
    assert (t >= 0).all() and (r <= 1).all() and (gap >= 0).all()
    hist = torch.histc(gap, bins=10, min=0, max=1) / len(gap)
    assert (hist - 0.1).abs().max() < 0.006  # flat in the gap, 10% above 0.9
    assert abs(t[gap > 0.5].mean().item() - 0.125) < 0.01  # t ~ U(0, 1 - gap): E[t | gap > 0.5] = 1/8
    t, r = mvp.sample_times(100_000, "uniform", 0.0, 1.0, 0.0, g, "cpu", one_step_frac=0.25)
    one = (t == 0) & (r == 1)
    assert abs(one.float().mean().item() - 0.25) < 0.01 and (r[~one] - t[~one] < 1).all()


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


@pytest.mark.parametrize("policy_kind", ["mvp", "flow"])
def test_best_of_n_in_blocks_selects_the_same_chunks(policy_kind):
    # blocks of states draw their noise in order from the same generator (each block's draw is a
    # multiple of 16 numbers, so torch's CPU normal sampler yields the same stream), hence the same
    # candidates; selection is per state, so blocking must change nothing but speed
    torch.manual_seed(0)
    policy = mvp.MeanVelocityNet(obs_dim=6, act_dim=8, hidden_dim=32, num_layers=2)
    critic = mvp.CriticEnsemble(obs_dim=6, act_dim=8, hidden_dim=32, num_layers=2, num_members=2)
    sample = mvp.one_step if policy_kind == "mvp" else functools.partial(mvp.euler_sample, steps=3)
    obs = torch.randn(10, 6)
    a_all, q_all = mvp.best_of_n(policy, critic, obs, 16, torch.Generator().manual_seed(1), sample, block=0)
    a_blk, q_blk = mvp.best_of_n(policy, critic, obs, 16, torch.Generator().manual_seed(1), sample, block=4)
    assert a_blk.shape == (10, 8) and q_blk.shape == (10, 16)  # 10 states in blocks of 4, 4, 2
    assert torch.allclose(q_blk, q_all, atol=1e-5)
    assert torch.allclose(a_blk, a_all, atol=1e-6)


def test_bon_block_default_is_32_on_cpu_and_flag_is_validated():
    learner = mvp.make_learner(4, 10, mvp.parse_args(["--hidden-dim", "16", "--num-layers", "1"]), "cpu")
    assert learner.bon_block == 32
    learner = mvp.make_learner(4, 10, mvp.parse_args(["--hidden-dim", "16", "--num-layers", "1", "--bon-block",
                                                      "0"]), "cpu")
    assert learner.bon_block == 0
    with pytest.raises(SystemExit):
        mvp.parse_args(["--bon-block", "-2"])


def test_one_step_is_noise_plus_mean_velocity_over_0_1():
    torch.manual_seed(0)
    policy = mvp.MeanVelocityNet(obs_dim=2, act_dim=3, hidden_dim=16, num_layers=1)
    obs, eps = torch.randn(5, 2), torch.randn(5, 3) * 0.1
    expected = (eps + policy(obs, eps, torch.zeros(5, 1), torch.ones(5, 1))).clamp(-1, 1)
    assert torch.allclose(mvp.one_step(policy, obs, eps), expected)


def test_critic_layer_norm_has_flaxs_epsilon():
    """Dense -> GELU -> LayerNorm(eps 1e-6, Flax's default [QC]) -> affine, per member: on activations whose
    variance is near 1e-6 the two epsilons give visibly different outputs."""
    torch.manual_seed(0)
    critic = mvp.CriticEnsemble(3, 2, hidden_dim=16, num_layers=1, num_members=2)
    with torch.no_grad():
        critic.layers[0].weight.mul_(1e-3)
        critic.layers[0].bias.zero_()
    obs, a = torch.randn(8, 3), torch.randn(8, 2)

    def by_hand(eps):
        x = torch.cat([obs, a], dim=-1).expand(2, -1, -1)
        h = F.gelu(torch.baddbmm(critic.layers[0].bias, x, critic.layers[0].weight))
        h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + eps)
        h = h * critic.norm_scale[0] + critic.norm_shift[0]
        return torch.baddbmm(critic.head.bias, h, critic.head.weight).squeeze(-1)

    with torch.no_grad():
        q, flax, torch_default = critic(obs, a), by_hand(1e-6), by_hand(1e-5)
    torch.testing.assert_close(q, flax, atol=1e-5, rtol=1e-4)
    assert (q - torch_default).abs().max() > 1e-2


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
    y, _ = mvp.critic_target(policy, critic, target, next_obs, reward_sum, mask, 0.9, 5, 8,
                             torch.Generator().manual_seed(3))
    a_star, _ = mvp.best_of_n(policy, critic, next_obs, 8, torch.Generator().manual_seed(3))
    expected = reward_sum + 0.9 ** 5 * mask * target(next_obs, a_star).mean(0)
    assert torch.allclose(y, expected)


def test_bfloat16_selection_values_the_chosen_chunk_in_float32():
    """--select-dtype bfloat16: the N candidates are generated and scored under autocast, then a* is valued by
    the target critic in float32; the bfloat16 scores pick the float32 winner on (nearly) every state."""
    torch.manual_seed(0)
    learner = mvp.make_learner(6, 10, mvp.Args(hidden_dim=64, num_layers=2), torch.device("cpu"))
    next_obs, reward_sum, mask = torch.randn(64, 6), -torch.rand(64), (torch.rand(64) > 0.2).float()
    nets = (learner.policy, learner.critic, learner.target_critic)
    y, cand_q = mvp.critic_target(*nets, next_obs, reward_sum, mask, 0.99, 2, 8, torch.Generator().manual_seed(3),
                                  select_dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a_star, q_bf16 = mvp.best_of_n(learner.policy, learner.critic, next_obs, 8, torch.Generator().manual_seed(3))
    assert a_star.dtype == torch.float32 and q_bf16.dtype == torch.bfloat16 and y.dtype == cand_q.dtype == torch.float32
    assert torch.equal(y, reward_sum + 0.99 ** 2 * mask * learner.target_critic(next_obs, a_star).mean(0))
    _, q_fp32 = mvp.best_of_n(learner.policy, learner.critic, next_obs, 8, torch.Generator().manual_seed(3))
    assert (q_bf16.float() - q_fp32).abs().max() < 0.02 < q_fp32.std(dim=1).mean()
    assert (q_bf16.argmax(dim=1) == q_fp32.argmax(dim=1)).float().mean() >= 0.9


def test_bfloat16_selection_is_refused_on_a_cpu_without_native_bfloat16(tmp_path, monkeypatch):
    """Emulated bfloat16 made MVP's update 25x slower on an AVX2 CPU (7.66 against 0.30 updates/s): a training run
    there is refused before it loads anything; run_benchmarks.py speed can still measure it."""
    monkeypatch.setattr(mvp, "cpu_has_bfloat16", lambda: False)
    run = tmp_path / "run"
    with pytest.raises(SystemExit, match="needs a CPU with native bfloat16.*--select-dtype float32"):
        mvp.main([*TINY, "--select-dtype", "bfloat16", "--device", "cpu", "--run-dir", str(run)])
    assert not run.exists()
    args = mvp.Args(hidden_dim=8, num_layers=1, select_dtype="bfloat16")
    assert mvp.make_learner(4, 10, args, torch.device("cpu")).select_dtype == torch.bfloat16


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
    return dict(observations=np.arange(n, dtype=np.float32)[:, None], actions=np.arange(n * 2,
                                                                                        dtype=np.float32).reshape(n, 2),
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


def test_replay_buffer_keeps_its_row_count_on_the_device_and_samples_new_rows():
    """sample_chunks reads the row count from a device tensor (so it can run inside a CUDA graph):
    rows appended online become reachable, rows past the end never are."""
    d = _hand_dataset()
    d["terminals"][-1] = 1
    buf = mvp.ReplayBuffer(d, 14, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    assert int(buf.sample_chunks(2000, 2, 0.9, g)["obs"][:, 0].max()) == 8  # last start is size - h = 8
    for i in range(4):
        buf.add(np.array([10.0 + i]), np.array([0.0, 0.0]), -1.0, 1.0, float(i == 3), np.array([11.0 + i]))
    assert float(buf.num_rows) == 14 and buf.size == 14
    starts = buf.sample_chunks(4000, 2, 0.9, g)["obs"][:, 0].long()
    assert set(starts.tolist()) == set(range(13))  # the new rows 10..13 are drawn, start 12 is the last legal one


def _tiny_learner_and_buffer(extra=()):
    args = mvp.parse_args(["--hidden-dim", "32", "--num-layers", "2", "--batch-size", "16", "--num-candidates", "4",
                           *extra])
    gen = mvp.seed_everything(0, torch.device("cpu"))
    learner = mvp.make_learner(40, 25, args, torch.device("cpu"))
    return args, gen, learner, run_benchmarks.synthetic_buffer(40, 5, 500, 500, torch.device("cpu"))


def _params(learner):
    return torch.cat([p.detach().flatten() for m in (learner.policy, learner.critic, learner.target_critic)
                      for p in m.parameters()])


def test_train_step_is_a_batch_draw_then_one_update():
    """make_train_step (what the loops and the CUDA graph run) = sample_chunks, imitation target, update."""
    args, gen, learner, buf = _tiny_learner_and_buffer()
    step = mvp.make_train_step(learner, buf, mvp.buffer_target, args, gen)
    infos = [step() for _ in range(3)]
    args, gen, manual, buf = _tiny_learner_and_buffer()
    for _ in range(3):
        batch = buf.sample_chunks(args.batch_size, args.chunk_len, args.discount, gen)
        info = mvp.update(manual, batch, batch["actions"], batch["valid"], args, gen)
    assert torch.equal(_params(learner), _params(manual))
    assert float(infos[-1]["critic_loss"]) == float(info["critic_loss"]) and float(infos[0]["mf_loss"]) > 0


def test_compiled_train_step_matches_eager_on_cpu():
    """--compile (torch.compile of the whole step) gives the parameters eager code gives, to 1e-5,
    after 3 updates from the same seed; and the updates did move them."""
    args, gen, eager, buf = _tiny_learner_and_buffer()
    start = _params(eager)
    step = mvp.make_train_step(eager, buf, mvp.buffer_target, args, gen)
    for _ in range(3):
        step()
    args, gen, compiled, buf = _tiny_learner_and_buffer(["--compile"])
    step = mvp.make_train_step(compiled, buf, mvp.buffer_target, args, gen)
    for _ in range(3):
        step()
    assert (_params(eager) - start).abs().max() > 1e-4
    torch.testing.assert_close(_params(compiled), _params(eager), atol=1e-5, rtol=1e-5)


def test_cuda_graph_on_without_cuda_is_refused():
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        mvp.make_learner(4, 10, mvp.Args(cuda_graph="on", hidden_dim=8, num_layers=1), torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graphed_training_matches_eager_and_draws_fresh_numbers(tmp_path):
    report = run_benchmarks.main(["graph-check", "--updates", "100", "--hidden-dim", "64", "--num-layers", "2",
                                  "--batch-size", "64", "--out-dir", str(tmp_path)])
    assert report["draws"]["replays_equal_eager"] and report["draws"]["replays_differ"]
    assert all(report[m]["max_rel_loss_diff_first10"] < 1e-3 for m in ("mvp", "flow10"))


# ---------------------------------------------------------------------------------------------
# Names, data generation and loading through OGBench
# ---------------------------------------------------------------------------------------------
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


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A tiny generated cube-double dataset: 2 training episodes and 1 validation episode."""
    d = str(tmp_path_factory.mktemp("data"))
    prepare_ogbench.generate_dataset("cube-double-play-v0", d, num_episodes=2, seed=0, workers=2)
    return d


@pytest.fixture(scope="session")
def single_dir(tmp_path_factory):
    """The same for cube-single, whose episodes last at most 200 steps: the training runs' data."""
    d = str(tmp_path_factory.mktemp("single"))
    prepare_ogbench.generate_dataset("cube-single-play-v0", d, num_episodes=2, seed=0, workers=2)
    return d


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


# ---------------------------------------------------------------------------------------------
# Real CLI runs
# ---------------------------------------------------------------------------------------------
TINY = ["--env", "cube-single-task1", "--hidden-dim", "32", "--num-layers", "2", "--batch-size", "32",
        "--num-candidates", "4", "--eval-episodes", "1", "--log-interval", "50", "--data-workers", "1"]
SINGLE = "cube-single-play-singletask-task1-v0"
# one run shared by the end-to-end checks and the resume tests: 200 offline updates, then 500 online steps (episodes
# of 200 steps: two end, the third is cut), evaluated at offline 200 and online 300 and 500; seed 1, not the default
RESUMABLE = [*TINY, "--seed", "1", "--offline-steps", "200", "--online-steps", "500", "--start-training", "20",
             "--eval-interval", "300", "--save-interval", "100", "--log-interval", "20", "--threads", "1"]


def run_cli(*argv, check=True, cwd=HERE):
    proc = subprocess.run([sys.executable, os.path.join(HERE, "mvp.py"), *argv], capture_output=True, text=True,
                          cwd=cwd, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="session")
def uninterrupted(single_dir, tmp_path_factory):
    """RESUMABLE run start to end; its output is in stdout.txt beside it."""
    run = tmp_path_factory.mktemp("whole") / "run"
    proc = run_cli(*RESUMABLE, "--dataset-dir", single_dir, "--run-dir", str(run))
    (run.parent / "stdout.txt").write_text(proc.stdout)
    return run


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


def test_eval_only_repeats_the_runs_last_evaluation(uninterrupted):
    """The saved policy evaluates on its own: by default on the run's seed (1, not the flag's default 0) and
    episode count, so on a CPU its last evaluation comes out again, number for number."""
    last = read_csv(uninterrupted / "eval.csv")[-1]
    proc = run_cli("--eval-only", "--checkpoint", str(uninterrupted / "checkpoint.pt"), "--threads", "1")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {k: res[k] for k in last if k not in ("phase", "step")} == {
        k: float(v) for k, v in last.items() if k not in ("phase", "step")}
    assert res["env"] == SINGLE and (res["seed"], res["episodes"], res["num_candidates"]) == (1, 1, 4)


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
    mvp.set_stop_handlers(resumed.previous_handlers)
    assert resumed.buffer.size == 2000 + 50 and resumed.buffer.store["terminals"][2000 + 49] == 1.0


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
    env = ReachEnv(goal)
    res = mvp.evaluate(learner, env, 4, 16, h, gamma, torch.device("cpu"), seed=100)
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
    res = mvp.evaluate(learner, ReachEnv(goal, contact=False), 1, 4, h, gamma, torch.device("cpu"), seed=0)
    assert math.isnan(res["contact_frac"]) and math.isnan(res["bc_contact_frac"]) and np.isfinite(res["q0_mean"])


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


def test_evaluation_in_worker_processes_matches_episodes_run_here(monkeypatch):
    """--eval-workers: the workers act with the learner's own weights, and each episode depends on its seed
    alone (its candidate noise too), so the numbers equal those of evaluating here, whatever the worker count."""
    torch.manual_seed(0)
    cpu, args = torch.device("cpu"), mvp.Args(env="cube-single-task1", hidden_dim=16, num_layers=1)
    env_name = mvp.resolve_env_name(args.env)
    env = prepare_ogbench.make_env(env_name)
    obs_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
    learner = mvp.make_learner(obs_dim, action_dim * args.chunk_len, args, cpu)
    task = dict(env_name=env_name, env_args="null", obs_dim=obs_dim, action_dim=action_dim)
    res = mvp.evaluate(learner, None, 2, 4, args.chunk_len, args.discount, cpu, seed=7, workers=2, args=args, task=task)
    torch.randn(3)  # the global random state is not what seeds an episode's candidates
    assert mvp.evaluate(learner, env, 2, 4, args.chunk_len, args.discount, cpu, seed=7) == res
    assert mvp.evaluate(learner, env, 2, 4, args.chunk_len, args.discount, cpu, seed=9) != res
    # auto (-1): in this process on CPU; with CUDA one process per spare core, at most 16
    for cores, expected in ((40, 16), (8, 7), (1, 0)):
        monkeypatch.setattr(os, "cpu_count", lambda: cores)
        assert mvp.eval_processes(-1, torch.device("cuda")) == expected and mvp.eval_processes(-1, cpu) == 0
    assert mvp.eval_processes(3, torch.device("cuda")) == 3


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors, no library tracebacks
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--env", "cube-quadruple"], "unknown --env 'cube-quadruple'. Accepted: cube-single"),
    (["--num-candidates", "0"], "--num-candidates must be >= 1"),
    (["--chunk-len", "0"], "--chunk-len must be >= 1"),
    (["--offline-steps", "-5"], "--offline-steps must be >= 0"),
    (["--save-minutes", "-1"], "--save-minutes must be >= 0"),
    (["--ivc-coef", "-1"], "--ivc-coef must be >= 0"),
    (["--eval-only"], "--eval-only needs --checkpoint"),
    (["--device", "tpu"], "--device must be auto, cpu or cuda"),
    (["--cuda-graph", "yes"], "argument --cuda-graph: invalid choice: 'yes'"),
    (["--cuda-graph", "on", "--device", "cpu"], "--cuda-graph on needs a CUDA device"),
    (["--time-sampler", "beta"], "argument --time-sampler: invalid choice: 'beta'"),
    (["--one-step-frac", "1.5"], "--one-step-frac must be in [0, 1] (got 1.5)"),
    (["--matmul-precision", "medium"], "argument --matmul-precision: invalid choice: 'medium'"),
    (["--select-dtype", "float16"], "argument --select-dtype: invalid choice: 'float16'"),
    (["--eval-workers", "-3"], "--eval-workers must be >= -1 (got -3)"),
    (["--lr", "0"], "--lr must be > 0 (got 0.0)"),
    (["--discount", "1.5"], "--discount must be in (0, 1] (got 1.5)"),
    (["--threads", "100000"], "--threads 100000 is more than this machine's"),
])
def test_bad_arguments(argv, message, capsys):
    """argparse's usage error (exit 2) naming the value and the rule; in this process, as the CLI parses them."""
    with pytest.raises(SystemExit) as e:
        mvp.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_bad_argument_on_the_command_line_is_one_usage_error():
    proc = run_cli("--env", "cube-quadruple", "--num-candidates", "0", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unknown --env 'cube-quadruple'" in proc.stderr and "--num-candidates must be >= 1" in proc.stderr


def main_error(*argv) -> str:
    """The one-line error mvp.main stops with (a SystemExit carrying a message, which Python prints without a
    traceback), the signal handlers of the run it began put back."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit) as e:
            mvp.main(list(argv))
    finally:
        mvp.set_stop_handlers(handlers)
    assert isinstance(e.value.code, str) and e.value.code.startswith("error: "), e.value.code
    return e.value.code


def test_out_of_memory_names_the_flags_to_lower(single_dir, tmp_path):
    # 32 states x 10^9 candidates: terabytes for the first tensor of best-of-N, refused by the allocator at once
    message = main_error(*TINY, "--dataset-dir", single_dir, "--offline-steps", "1", "--online-steps", "0",
                         "--num-candidates", str(10 ** 9), "--run-dir", str(tmp_path / "r"))
    assert "error: out of memory" in message and "--num-candidates" in message


def test_chunks_longer_than_the_dataset_are_refused(single_dir, tmp_path):
    message = main_error(*TINY, "--dataset-dir", single_dir, "--chunk-len", "2500", "--offline-steps", "1",
                         "--online-steps", "0", "--run-dir", str(tmp_path / "r"))
    assert "--chunk-len 2500 is longer than the dataset (2000 rows)" in message


def _copy_dataset(src_dir, dst_dir, edit=lambda arrays: None, name="cube-single-play-v0"):
    for split in ("", "-val"):
        with np.load(os.path.join(src_dir, f"{name}{split}.npz")) as f:
            arrays = {k: f[k].copy() for k in f.files}
        edit(arrays)
        np.savez(os.path.join(dst_dir, f"{name}{split}.npz"), **arrays)


def test_corrupt_dataset_file_is_named(single_dir, tmp_path):
    _copy_dataset(single_dir, tmp_path)
    path = tmp_path / "cube-single-play-v0.npz"
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    message = main_error(*TINY, "--dataset-dir", str(tmp_path), "--offline-steps", "5", "--run-dir",
                         str(tmp_path / "r"))
    assert str(path) in message and "--generate-data" in message


def test_mismatched_dataset_is_refused(single_dir, tmp_path):
    def widen(arrays):  # 3 extra observation dims: a file made for another task
        arrays["observations"] = np.concatenate([arrays["observations"], arrays["observations"][:, :3]], axis=1)

    _copy_dataset(single_dir, tmp_path, widen)
    message = main_error(*TINY, "--dataset-dir", str(tmp_path), "--offline-steps", "5", "--run-dir",
                         str(tmp_path / "r"))
    assert "another task" in message


def test_non_finite_loss_stops_naming_step_and_terms(single_dir, tmp_path):
    _copy_dataset(single_dir, tmp_path, lambda arrays: arrays["observations"].fill(np.nan))
    message = main_error(*TINY, "--dataset-dir", str(tmp_path), "--offline-steps", "60", "--run-dir",
                         str(tmp_path / "r"))
    assert "non-finite loss in the offline phase, first at update 1" in message and "mf_loss=" in message


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


def test_no_python_line_is_over_120_characters():
    """ruff's E501 lets a long line through when what overflows is one word (an attribute chain, a URL)."""
    files, long = [f for f in os.listdir(HERE) if f.endswith(".py")], []
    for name in files:
        with open(os.path.join(HERE, name)) as f:
            long += [f"{name}:{i}" for i, line in enumerate(f.read().splitlines(), 1) if len(line) > 120]
    assert len(files) >= 7 and not long


def test_importing_mvp_needs_no_simulator():
    code = "import sys, mvp; assert 'ogbench' not in sys.modules and 'mujoco' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=HERE)
    # mvp.py imports each suite's file and run_utils.py; they never import it back (no cycle)
    code = "import sys, prepare_ogbench, prepare_robomimic, run_utils; assert 'mvp' not in sys.modules"
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
    flow = mvp.make_learner(2, 3, mvp.Args(policy="flow", flow_steps=4, hidden_dim=8, num_layers=1),
                            torch.device("cpu"))
    eps = torch.randn(5, 3)
    assert torch.allclose(flow.sample(flow.policy, obs[:5], eps), mvp.euler_sample(flow.policy, obs[:5], eps, 4))
    ours = mvp.make_learner(2, 3, mvp.Args(hidden_dim=8, num_layers=1), torch.device("cpu"))
    assert ours.sample is mvp.one_step


# ---------------------------------------------------------------------------------------------
# run_benchmarks.py: aggregation, dry run, a tiny real suite through submitit, a tiny speed run
# ---------------------------------------------------------------------------------------------


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
    # online step 50 -> 150
    assert mvp_row["cells"] == {150: dict(mean=pytest.approx(0.8), std=pytest.approx(0.2), n=2)}
    assert mvp_row["curve"] == {100: [0.2, 0.4], 150: [0.6, 1.0]}
    at_100 = run_benchmarks.aggregate(str(tmp_path), ["cube-double-task4"], ["mvp"], [0, 1], steps=[100])
    assert at_100["cube-double-task4/mvp"]["cells"][100]["mean"] == pytest.approx(0.3)
    md = run_benchmarks.table_markdown(table)
    assert "| cube-double-task4 | mvp | 0.80 ± 0.20 (n=2) | 0.95 |" in md
    assert "| cube-double-task4 | flow10 | 0.30 ± 0.00 (n=1) | 0.93 |" in md
    paths = run_benchmarks.plot_curves(table, str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["curves_cube-double-task4.png"] and os.path.getsize(paths[0]) > 5000


def _closed_figures(monkeypatch) -> list:
    """The figures run_benchmarks.py closes after saving them, kept open to be looked at."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figs = []
    monkeypatch.setattr(plt, "close", figs.append)
    return figs


def plt_close_all(figs):
    import matplotlib.pyplot as plt
    for fig in figs:
        plt.close(fig)


def test_curves_x_label_says_whether_the_runs_went_online(tmp_path, monkeypatch):
    """The success curves' step axis: offline gradient steps, then online env steps only where a drawn step is an
    online evaluation; a seed's online steps that the other seeds lack are not drawn."""
    _fake_run(tmp_path, "cube-single-task1", "mvp", 0, [("offline", 50, 0.1), ("offline", 100, 0.2)])
    _fake_run(tmp_path, "cube-single-task1", "mvp", 1, [("offline", 100, 0.3), ("online", 50, 0.6)])
    _fake_run(tmp_path, "cube-double-task1", "mvp", 0, [("offline", 100, 0.2), ("online", 50, 0.6)])
    table = run_benchmarks.aggregate(str(tmp_path), ["cube-single-task1", "cube-double-task1"], ["mvp"], [0, 1])
    assert list(table["cube-single-task1/mvp"]["curve"]) == [100]  # both seeds' offline end only
    figs = _closed_figures(monkeypatch)
    run_benchmarks.plot_curves(table, str(tmp_path))
    monkeypatch.undo()
    labels = {fig.axes[0].get_title(): fig.axes[0].get_xlabel() for fig in figs}
    plt_close_all(figs)
    assert labels == {"cube-single-task1": "offline gradient step",
                      "cube-double-task1": "step: offline gradient steps, then online env steps"}
    assert not table["cube-single-task1/mvp"]["online"] and table["cube-double-task1/mvp"]["online"]


def test_suite_dry_run_prints_commands_and_skips_finished(tmp_path, capsys, monkeypatch):
    finished = run_benchmarks.run_dir_of(str(tmp_path), "cube-double-task1", "mvp", 0)
    os.makedirs(finished)
    # the preset's
    open(os.path.join(finished, "summary.json"), "w").write('{"offline_steps": 20000, "online_steps": 20000}')
    run_benchmarks.main(["suite", "--tasks", "cube-double-task1", "--seeds", "0", "1", "--methods", "mvp", "flow10",
                         "--out-dir", str(tmp_path), "--dry-run"])
    out = capsys.readouterr().out
    assert "4 run(s), 1 already finished, 3 to run" in out
    lines = [line for line in out.splitlines() if "mvp.py" in line]
    assert len(lines) == 3 and all("--hidden-dim 256" in line for line in lines)  # the cpu preset
    assert sum("--policy flow --flow-steps 10" in line for line in lines) == 2
    assert not any(os.path.join("mvp", "seed0") in line for line in lines)
    interrupted = run_benchmarks.run_dir_of(str(tmp_path), "cube-double-task1", "flow10", 1)
    os.makedirs(os.path.join(interrupted, "checkpoints"))
    open(os.path.join(interrupted, "checkpoints", "resume-0000000500.pt"), "wb").close()
    run_benchmarks.main(["suite", "--tasks", "cube-double-task1", "--seeds", "0", "1", "--methods", "mvp", "flow10",
                         "--out-dir", str(tmp_path), "--dry-run"])
    lines = [line for line in capsys.readouterr().out.splitlines() if "mvp.py" in line]
    assert [line.endswith(f"--resume {interrupted}") for line in lines] == [False, False, True]  # it goes on, not over
    assert not any("--eval-workers" in line for line in lines)  # one run at a time: mvp.py's auto
    # side by side, the runs split the spare cores between their evaluation workers, unless told otherwise
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    for extra, expected in (([], "--eval-workers 3"), (["--extra", "--eval-workers 1"], "--eval-workers 1")):
        run_benchmarks.main(["suite", "--tasks", "cube-double-task1", "--seeds", "0", "1", "--methods", "mvp", "flow10",
                             "--out-dir", str(tmp_path), "--workers", "4", "--dry-run", *extra])
        lines = [line for line in capsys.readouterr().out.splitlines() if "mvp.py" in line]
        assert len(lines) == 3 and all(line.count("--eval-workers") == 1 and expected in line for line in lines)


def test_cube_single_presets_differ_only_in_budget():
    full, short = (vars(mvp.parse_args(run_benchmarks.PRESETS[k])) for k in ("cube-single-cpu",
                                                                             "cube-single-cpu-short"))
    assert (full["offline_steps"], full["eval_interval"], short["offline_steps"], short["eval_interval"]) == (15000,
                                                                                                              5000,
                                                                                                              6000,
                                                                                                              2000)
    assert {k for k in full if full[k] != short[k]} == {"offline_steps", "eval_interval"}
    assert (short["eval_episodes"], short["dataset_episodes"], short["hidden_dim"], short["online_steps"]) == (20,
                                                                                                               150,
                                                                                                               256, 0)


def test_suite_report_only_tables_what_exists_and_launches_nothing(tmp_path, monkeypatch):
    """--report-only: seeds a method has not run yet are left out of its mean, and nothing is launched."""
    for method, seed, success in [("mvp", 0, 0.2), ("mvp", 1, 0.4), ("flow10", 0, 0.1)]:
        d = run_benchmarks.run_dir_of(str(tmp_path), "cube-single-task1", method, seed)
        os.makedirs(d)
        open(os.path.join(d, "args.json"), "w").write(json.dumps(dict(offline_steps=100)))
        open(os.path.join(d, "eval.csv"), "w").write(f"phase,step,success_rate\noffline,100,{success}\n")
    monkeypatch.setattr(run_benchmarks, "launch", lambda *a: pytest.fail("--report-only launched runs"))
    table = run_benchmarks.main(["suite", "--tasks", "cube-single-task1", "--seeds", "0", "1", "--methods", "mvp",
                                 "flow10",
                                 "--out-dir", str(tmp_path), "--report-only"])
    assert table["cube-single-task1/mvp"]["cells"][100] == dict(mean=pytest.approx(0.3), std=pytest.approx(0.1), n=2)
    assert table["cube-single-task1/flow10"]["cells"][100]["n"] == 1
    assert (tmp_path / "curves_cube-single-task1.png").exists()


def test_tiny_real_suite_through_submitit_local_executor(single_dir, tmp_path):
    out = tmp_path / "suite"
    argv = ["suite", "--tasks", "cube-single-task1", "--seeds", "0", "--methods", "mvp", "flow1",
            "--launcher", "submitit-local", "--out-dir", str(out), "--extra"]
    extra = [*TINY, "--dataset-dir", single_dir, "--offline-steps", "100", "--start-training", "20",
             "--eval-interval", "0"]
    argv = [*argv, shlex.join([*extra, "--online-steps", "60"])]
    table = run_benchmarks.main(argv)
    assert set(table) == {"cube-single-task1/mvp", "cube-single-task1/flow1"}
    for row in table.values():
        assert list(row["curve"]) == [100, 160] and row["cells"][160]["n"] == 1
    assert (out / "results.md").exists() and (out / "curves_cube-single-task1.png").exists()
    flow_args = json.loads((out / "cube-single-task1" / "flow1" / "seed0" / "args.json").read_text())
    assert flow_args["policy"] == "flow" and flow_args["flow_steps"] == 1
    # --workers 1 (the default): the second run starts once the first has finished
    runs = out / "cube-single-task1"
    finished, started = runs / "mvp" / "seed0" / "summary.json", runs / "flow1" / "seed0" / "args.json"
    assert os.path.getmtime(finished) <= os.path.getmtime(started)
    # a second call finds both runs finished and launches nothing
    before = os.path.getmtime(out / "cube-single-task1" / "mvp" / "seed0" / "summary.json")
    run_benchmarks.main(argv)
    assert os.path.getmtime(out / "cube-single-task1" / "mvp" / "seed0" / "summary.json") == before
    # more steps asked of a finished run: it continues from its end-of-phase checkpoint (the other stays as it is)
    table = run_benchmarks.main([*argv[:6], "mvp", *argv[8:-1], shlex.join([*extra, "--online-steps", "80"])])
    assert list(table["cube-single-task1/mvp"]["curve"]) == [100, 160, 180]


def test_suite_tells_interrupted_runs_from_failed_ones(tmp_path, capsys):
    """mvp.py exits 130 / 143 after saving on Ctrl-C / SIGTERM: the suite says a relaunch resumes it."""
    todo = [(str(tmp_path / name), [sys.executable, "-c", f"raise SystemExit({code})"]) for name, code in (("a",
                                                                                                            143),
                                                                                                            ("b", 1))]
    assert run_benchmarks.launch(SimpleNamespace(launcher="local", workers=1), todo) == [143, 1]
    out = capsys.readouterr().out
    assert f"interrupted and saved (143): {tmp_path / 'a'}; the same suite command resumes it" in out
    assert f"FAILED (1): {tmp_path / 'b'}" in out and "FAILED (143)" not in out


def test_a_dead_submitit_job_is_one_line_not_a_traceback(tmp_path, capsys):
    """A submitit job that dies (here: its run directory cannot be made) is reported in one line naming the
    run and submitit's logs; the next run still goes, and the suite's summary tells it from a failed run."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    todo = [(str(path), [sys.executable, "-c", "pass"]) for path in (blocker / "run", tmp_path / "ok")]
    opts = SimpleNamespace(launcher="submitit-local", workers=1, out_dir=str(tmp_path / "suite"), timeout_min=5)
    assert run_benchmarks.launch(opts, todo) == [run_benchmarks.DIED, 0]
    out = capsys.readouterr().out
    assert "died (FailedJobError: NotADirectoryError: " in out  # the job's own exception, in one line
    assert f"): {blocker / 'run'}; submitit's logs are in {tmp_path}" in out
    assert "Traceback" not in out and "FAILED" not in out


def test_speed_writes_table_with_ratios(tmp_path):
    out = run_benchmarks.main(["speed", "--hidden-dim", "16", "--num-layers", "1", "--batch-size", "8",
                               "--num-candidates", "4", "--repeats", "1", "--seconds", "0.1",
                               "--latency-calls", "3", "--out-dir", str(tmp_path)])
    assert set(out["results"]) == {f"{m} eager" for m in run_benchmarks.SPEED_METHODS}  # CPU: eager mode only
    assert out["results"]["flow10 eager"]["updates_ratio_vs_flow10"] == 1.0
    assert out["results"]["mvp eager"]["updates_ratio_vs_eager"] == 1.0
    assert all(r["updates_per_s"] > 0 and r["latency_ms_p95"] >= 0 for r in out["results"].values())
    md = (tmp_path / "speed.md").read_text()
    assert "| flow1 | eager |" in md and "Machine:" in md
    assert json.loads((tmp_path / "speed.json").read_text())["machine"]
    parts = out["latency_parts"]
    assert parts["policy_call_ms"] > 0 and parts["critic_call_ms"] > 0 and "cannot exceed" in md
    assert parts["flow10_latency_ratio_ceiling"] == pytest.approx(run_benchmarks.latency_ceiling(
        parts["policy_call_ms"], parts["critic_call_ms"], 10))


def test_speed_compares_bfloat16_selection_on_cpu_and_refuses_graph_modes(tmp_path):
    tiny = ["--device", "cpu", "--hidden-dim", "16", "--num-layers", "1", "--batch-size", "8", "--num-candidates", "4",
            "--repeats", "1", "--seconds", "0.1", "--latency-calls", "2", "--out-dir", str(tmp_path)]
    out = run_benchmarks.main(["speed", "--methods", "mvp", "flow10", "--modes", "eager", "eager-bf16", *tiny])
    assert set(out["results"]) == {f"{m} {mode}" for m in ("mvp", "flow10") for mode in ("eager", "eager-bf16")}
    assert out["results"]["mvp eager-bf16"]["updates_ratio_vs_eager"] > 0
    assert run_benchmarks.MODES["graph-tf32-compile-bf16"][-2:] == ["--select-dtype", "bfloat16"]
    with pytest.raises(SystemExit, match="only be eager and eager-bf16"):
        run_benchmarks.main(["speed", "--modes", "graph-tf32-bf16", *tiny])


def test_latency_ceiling_formula():
    assert run_benchmarks.latency_ceiling(1.0, 0.0, 10) == 10.0  # a free critic: K policy calls against 1
    assert run_benchmarks.latency_ceiling(1.0, 2.0, 10) == 4.0  # (10 + 2) / (1 + 2)
    # o = 0.5 of each timed call is the runtime's cost of a run, paid once per step: (10 * 0.5 + 1.5 + 0.5) / 2.5
    assert run_benchmarks.latency_ceiling(1.0, 2.0, 10, 0.5) == pytest.approx(7.0 / 2.5)
    # a first policy call of 3 (cold caches) then 9 of 1: (3 + 9 + 2) / (3 + 2)
    assert run_benchmarks.latency_ceiling(1.0, 2.0, 10, 0.0, 3.0) == pytest.approx(14.0 / 5.0)


# ---------------------------------------------------------------------------------------------
# Runs survive interruption and bad files
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


def test_plot_reads_a_real_runs_logs_on_one_step_axis(uninterrupted, tmp_path):
    """run_benchmarks.py plot: online rows count after the 200 offline steps, in the training and eval logs."""
    curves = run_benchmarks.run_curves(str(uninterrupted))
    assert list(curves["eval"]["success_rate"][0]) == [200, 500, 700]  # offline 200; online 300, 500
    rows = read_csv(uninterrupted / "eval.csv")
    assert list(curves["eval"]["bc_success_rate"][1]) == [float(r["bc_success_rate"]) for r in rows]
    steps = curves["train"]["critic_loss"][0]
    assert steps[0] == 20 and steps[9] == 200 and steps[10] == 220 and steps[-1] == 700
    out = run_benchmarks.main(["plot", str(uninterrupted), str(uninterrupted), "--out", str(tmp_path / "c.png")])
    assert os.path.getsize(out) > 20000
    with pytest.raises(SystemExit, match="not a run directory of mvp.py"):
        run_benchmarks.main(["plot", str(tmp_path)])


def test_a_finished_run_continues_online_exactly_as_the_longer_run(single_dir, uninterrupted, tmp_path):
    """A phase's end writes a checkpoint, so --resume with a larger --online-steps extends a finished
    offline-only run; it logs what the run with those steps from the start logs. Phases cannot shrink,
    and the offline one cannot change once the online one has begun. How each stretch ran is recorded."""
    run = tmp_path / "run"
    run_cli(*RESUMABLE, "--online-steps", "0", "--save-interval", "150", "--dataset-dir", single_dir, "--run-dir",
            str(run))
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt")) == ["resume-0000000150.pt",
                                                                          "resume-0000000200.pt"]
    assert _evals(run) == _evals(uninterrupted)[:1]
    run_cli("--resume", str(run), "--online-steps", "500", "--matmul-precision", "highest")  # CUDA-only: same here
    assert _losses(run) == _losses(uninterrupted)
    assert _evals(run) == _evals(uninterrupted)
    saved = json.loads((run / "args.json").read_text())
    assert saved["online_steps"] == 500  # what the suite's plots read
    segments = [(g["from_offline_step"], g["from_online_step"], g["matmul_precision"]) for g in saved["segments"]]
    assert segments == [(0, 0, "high"), (200, 0, "highest")]  # not only the newest value
    assert torch.load(run / "checkpoint.pt", weights_only=True)["segments"] == saved["segments"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["offline_updates_per_s"] is None and summary["online_env_steps_per_s"] > 0  # not a 0.0 speed
    for flags in (["--online-steps", "400"], ["--offline-steps", "300"]):
        assert "a phase can only grow" in main_error("--resume", str(run), *flags)


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
    learner.cuda_graph = True  # as a CUDA run with graphs is built
    mvp.load_learner(learner, state)
    assert all(g["capturable"] for g in learner.policy_opt.param_groups + learner.critic_opt.param_groups)


def test_eval_only_of_a_graphed_cuda_run_works_on_a_cpu(tmp_path, monkeypatch):
    """--eval-only takes how to run (device, CUDA graphs) from today's flags, not from the training run's."""
    args = mvp.Args(hidden_dim=8, num_layers=1)
    learner = mvp.make_learner(37, 25, args, torch.device("cpu"))
    trained = mvp.Args(hidden_dim=8, num_layers=1, device="cuda", cuda_graph="on")
    path = str(tmp_path / "c.pt")
    mvp.save_checkpoint(path, mvp.checkpoint_state(learner, trained, dict(env_name=ENV, obs_dim=37, action_dim=5)))
    monkeypatch.setattr(mvp, "env_from_checkpoint", lambda ckpt: None)
    monkeypatch.setattr(mvp, "evaluate", lambda learner, *a, **k: dict(graphed=learner.cuda_graph))
    assert mvp.main(["--eval-only", "--checkpoint", path, "--device", "cpu"]) == dict(graphed=False)


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
    mvp.set_stop_handlers(run.previous_handlers)
    # [QC] the dataset's actions are clipped to +-(1 - 1e-5) as they are loaded; the checksum is the file's
    actions = prepare_ogbench.load_dataset(SINGLE, single_dir)["actions"]
    assert np.abs(actions).max() == 1.0 and run.task["dataset"]["crc32"] == zlib.crc32(actions.tobytes())
    loaded = run.buffer.store["actions"][:len(actions)].numpy()
    assert np.abs(loaded).max() == np.float32(1 - 1e-5)
    assert np.array_equal(loaded, np.clip(actions, -1 + 1e-5, 1 - 1e-5))


def test_dataset_with_pickled_objects_is_refused(data_dir, tmp_path):
    _copy_dataset(data_dir, tmp_path, lambda arrays: arrays.update(actions=np.array([object()] * 3, dtype=object)),
                  name="cube-double-play-v0")
    with pytest.raises(mvp.DATA_ERRORS, match="cube-double-play-v0.npz"):
        prepare_ogbench.load_dataset(ENV, str(tmp_path))


# ---------------------------------------------------------------------------------------------
# toy_2d.py: the distance and the ground-truth flow on known answers, the samplers, a --quick run
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
def test_sliced_wasserstein_is_zero_on_itself_and_exact_for_a_shift():
    """SW_2(x, x) = 0; SW_2(x, x + d) = |d| / sqrt(2), since every projection shifts by theta . d and
    the mean of cos^2 over evenly spaced directions is 1/2."""
    x = torch.randn(5000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d = torch.tensor([3.0, -4.0], dtype=torch.float64)
    assert toy_2d.sliced_wasserstein(x, x).item() == 0.0
    assert math.isclose(toy_2d.sliced_wasserstein(x, x + d).item(), 5 / math.sqrt(2), rel_tol=1e-9)


def test_sliced_wasserstein_between_independent_samples_is_close_to_the_true_value():
    """N(0, I) against N(d, I): every 1-D projection is a mean shift, so SW_2 = |d| / sqrt(2); two
    independent sets of the same law come out near 0 (sampling noise only)."""
    gen = torch.Generator().manual_seed(1)
    x, y, z = (torch.randn(20000, 2, generator=gen) for _ in range(3))
    d = torch.tensor([1.0, 1.0])
    assert toy_2d.sliced_wasserstein(x, y).item() < 0.05
    assert abs(toy_2d.sliced_wasserstein(x, z + d).item() - 1.0) < 0.05  # |d| / sqrt(2) = 1


# ---------------------------------------------------------------------------------------------
# Ground truth: v* in closed form, u* by RK4
# ---------------------------------------------------------------------------------------------
def single_gaussian(mean, std):
    return toy_2d.MixtureTarget("one", torch.tensor([mean], dtype=torch.float64),
                                torch.ones(1, dtype=torch.float64), torch.tensor([std], dtype=torch.float64))


def points(n, seed, lo=0.0, hi=1.0):
    gen = torch.Generator().manual_seed(seed)
    t = lo + (hi - lo) * torch.rand(n, 1, generator=gen, dtype=torch.float64)
    return gen, t


def test_true_mean_velocity_matches_the_closed_form_flow_of_a_single_gaussian():
    """For one Gaussian N(m, s^2 I) the flow is linear: X_r = r m + sigma(r) / sigma(t) (x - t m),
    sigma(t)^2 = (1 - t)^2 + t^2 s^2. The RK4 u* must match (X_r - x) / (r - t), and v* at r = t."""
    m, s = [2.0, -1.0], 0.3
    target = single_gaussian(m, s)
    mean = target.means[0]
    sigma = lambda t: torch.sqrt((1 - t) ** 2 + t ** 2 * s ** 2)
    gen, t = points(512, 0, 0.0, 0.9)
    r = t + (1 - t) * torch.rand(512, 1, generator=gen, dtype=torch.float64)  # t < r <= 1
    x = 3 * torch.randn(512, 2, generator=gen, dtype=torch.float64)
    state = torch.zeros(512, 1, dtype=torch.float64)
    x_r = r * mean + sigma(r) / sigma(t) * (x - t * mean)
    u_closed = (x_r - x) / (r - t)
    u_rk4 = toy_2d.true_mean_velocity(target, state, x, t, r, ode_steps=100)
    assert torch.allclose(u_rk4, u_closed, atol=1e-8), (u_rk4 - u_closed).abs().max()
    v_closed = mean + (-(1 - t) + t * s ** 2) / sigma(t) ** 2 * (x - t * mean)
    assert torch.allclose(toy_2d.true_mean_velocity(target, state, x, t, t, ode_steps=100), v_closed, atol=1e-12)


def test_true_flow_of_a_mixture_carries_noise_onto_the_target():
    """Integrating v* from t = 0 to 1 must turn N(0, I) into the mixture: the SW_2 of the transported
    noise to target samples is at the level of two target sample sets, and far below noise's."""
    target = toy_2d.ring8().double()
    gen = torch.Generator().manual_seed(0)
    n, state = 4096, torch.zeros(4096, 1, dtype=torch.float64)
    eps = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    x1 = toy_2d.flow_map(target, state, eps, torch.zeros(n, 1, dtype=torch.float64),
                         torch.ones(n, 1, dtype=torch.float64), ode_steps=100)
    ref, ref2 = target.sample(state, gen), target.sample(state, gen)
    floor = toy_2d.sliced_wasserstein(ref, ref2).item()
    assert toy_2d.sliced_wasserstein(x1, ref).item() < 2 * floor + 0.05
    assert toy_2d.sliced_wasserstein(eps, ref).item() > 1.0


def test_conditional_target_rotates_with_the_state():
    target = toy_2d.rotating3()
    s = torch.tensor([[0.0], [1.0]])
    m = target.means_at(s)  # (2, K, 2)
    angle = math.pi / 3
    rot = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    assert torch.allclose(m[0], target.means, atol=1e-6)
    assert torch.allclose(m[1], target.means @ rot.T, atol=1e-6)


def test_error_measures_are_zero_for_the_truth_and_exact_for_an_offset():
    """The toy's probes sit where they say (boundary r = t; then t = 0, r = gap), and its error measures
    give 0 for a network that returns the true u* / v* and |d|^2 for one that is off by a constant d.
    boundary_maps' p_t integrates to 1 over its grid."""
    target = toy_2d.ring8()
    probes = toy_2d.truth_probes(target, 256, 100, torch.Generator().manual_seed(0))
    assert torch.equal(probes[0]["r"], probes[0]["t"]) and 0 < probes[0]["t"].min() < probes[0]["t"].max() < 1
    assert [p["gap"] for p in probes[1:]] == list(toy_2d.GAPS)
    assert all(torch.all(p["t"] == 0) and torch.all(p["r"] == p["gap"]) for p in probes[1:])
    d = torch.tensor([0.3, -0.4])  # |d|^2 = 0.25

    def oracle(offset):
        def net(s, x, t, r):
            return toy_2d.true_mean_velocity(target.double(), s.double(), x.double(), t.double(), r.double(),
                                             100).float() + offset
        return net
    assert max(toy_2d.mean_velocity_errors(oracle(0.0), probes, False)) < 1e-8
    assert toy_2d.mean_velocity_errors(oracle(d), probes, False) == pytest.approx([0.25] * len(probes), rel=1e-4)
    assert toy_2d.boundary_error_at(oracle(0.0), target, 0.5) < 1e-8
    assert toy_2d.boundary_error_at(oracle(d), target, 0.5) == pytest.approx(0.25, rel=1e-4)
    maps = toy_2d.boundary_maps(oracle(d), target, n=161)
    cell = (2 * maps["extent"] / 160) ** 2
    for m in maps["maps"].values():
        assert m["density"].sum() * cell == pytest.approx(1.0, abs=0.02)
        assert m["err"] == pytest.approx(0.5, rel=1e-4)  # |d| everywhere


# ---------------------------------------------------------------------------------------------
# Samplers against mvp.py
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def test_samplers_are_mvps_without_the_clip():
    """one_step_unclipped and euler are mvp.one_step and mvp.euler_sample without the clip to [-1, 1];
    1-step Euler is eps + u(eps, 0, 0)."""
    torch.manual_seed(0)
    net = mvp.MeanVelocityNet(obs_dim=1, act_dim=2, hidden_dim=16, num_layers=2)
    obs, eps = torch.rand(64, 1), torch.randn(64, 2)
    assert torch.equal(toy_2d.one_step_unclipped(net, obs, eps).clamp(-1, 1), mvp.one_step(net, obs, eps))
    assert torch.equal(toy_2d.euler(net, obs, eps, 10).clamp(-1, 1), mvp.euler_sample(net, obs, eps, 10))
    zeros = torch.zeros(64, 1)
    assert torch.allclose(toy_2d.euler(net, obs, eps, 1), eps + net(obs, eps, zeros, zeros))


# ---------------------------------------------------------------------------------------------
# The script end to end
# ---------------------------------------------------------------------------------------------
def test_quick_run_writes_figures_json_and_table(tmp_path, capsys):
    report = toy_2d.main(["--quick", "--full", "--out-dir", str(tmp_path)])
    assert (tmp_path / "toy_2d.png").stat().st_size > 10_000 and (tmp_path / "toy_2d_ivc.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "toy_2d.json").read_text())
    assert saved["config"]["quick"] and saved["gaps"] == list(toy_2d.GAPS)
    variants = toy_2d.make_variants(toy_2d.parse_args(["--quick"]))
    samplers = {s for v in variants.values() for s in v.samplers}
    for name in ("ring8", "checkerboard", "rotating3"):
        res = saved["results"][name]
        assert set(res["sw"]) == samplers
        assert all(len(v) == 2 and all(math.isfinite(x) and x > 0 for x in v) for v in res["sw"].values())
        assert set(res["u_err"]) == set(toy_2d.VARIANT_NAMES)  # one error list per trained network
        assert all(len(e) == 1 + len(toy_2d.GAPS) for v in res["u_err"].values() for e in v)  # boundary, then gaps
        assert res["true_v_as_proxy"][0] == 0.0  # at r = t the mean velocity is v* itself
        assert all(len(c) == 2 and c[-1][0] == 40 for v in res["curve"].values() for c in v)  # --quick: 2 points
    ivc = saved["ivc_boundary_mse"]
    assert ivc["times"] == list(toy_2d.IVC_TIMES) and len(ivc["mf"]) == len(ivc["mvp"]) == len(toy_2d.IVC_TIMES)
    table = capsys.readouterr().out
    assert table.count("\n| ") >= 3 * (1 + len(samplers)) and "MVP (λ = 1), 1 step" in table
    assert report["table"] in table


def test_variants_reach_mvp_sample_times(tmp_path, monkeypatch):
    """Each MVP variant's (t, r) sampler settings reach mvp.sample_times, and --variants trains only those named."""
    seen = []
    real = mvp.sample_times
    monkeypatch.setattr(mvp, "sample_times", lambda *a, **kw: seen.append(
        (kw["sampler"], kw.get("one_step_frac", 0.0), kw["equal_frac"])) or real(*a, **kw))
    toy_2d.main(["--quick", "--variants", "mvp,mvp_logitnormal,mvp_gap,mvp_onestep,meanflow", "--out-dir",
                 str(tmp_path)])
    assert set(seen) == {("uniform", 0.0, 0.0), ("logit_normal", 0.0, 0.0), ("gap_uniform", 0.0, 0.0),
                         ("uniform", 0.25, 0.0), ("uniform", 0.0, 0.5)}
    assert set(json.loads((tmp_path / "toy_2d.json").read_text())["results"]["ring8"]["u_err"]) == \
        {"mvp", "mvp_logitnormal", "mvp_gap", "mvp_onestep", "meanflow"}
    with pytest.raises(SystemExit):
        toy_2d.parse_args(["--variants", "mvp,nope"])


def test_worker_processes_train_the_same_networks(tmp_path):
    """Training in spawned worker processes gives exactly what training in this process gives."""
    flags = ["--quick", "--variants", "mvp,fm", "--curve-points", "0"]
    one = toy_2d.main(flags + ["--out-dir", str(tmp_path / "a")])
    two = toy_2d.main(flags + ["--workers", "2", "--out-dir", str(tmp_path / "b")])
    assert one["results"]["ring8"]["sw"] == two["results"]["ring8"]["sw"]
    assert one["results"]["ring8"]["u_err"] == two["results"]["ring8"]["u_err"]


# ---------------------------------------------------------------------------------------------
# Robomimic: the HDF5 loader, the env rebuilt from the file's metadata, scripted demos, errors.
# No download: files are recorded here by the scripted demonstrators in the real robosuite env,
# or written by hand with h5py.
# ---------------------------------------------------------------------------------------------

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


# ---- loader --------------------------------------------------------------------------------------
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


# ---- environment from the file's metadata ----------------------------------------------------------
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


# ---- generation ------------------------------------------------------------------------------------
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


# ---- errors ----------------------------------------------------------------------------------------
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


def test_import_does_not_load_robosuite():
    code = "import sys, mvp; assert 'robosuite' not in sys.modules and 'h5py' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=HERE)


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


# ---------------------------------------------------------------------------------------------
# The docs stay true: every command they show parses
# ---------------------------------------------------------------------------------------------
SCRIPTS = ("mvp", "run_benchmarks", "prepare_ogbench", "prepare_robomimic")


def doc_commands(text: str) -> list[tuple[str, list[str]]]:
    """(script, argv) of every `python <script>.py ...` in a markdown text: code-block lines (with backslash
    continuations, comments dropped) and inline code spans (which may wrap across lines). Commands with
    placeholders (<run>, ..., [N]) are skipped."""
    import re
    import shlex
    found = []
    text = re.sub(r"\\\n\s*", " ", text)
    spans = re.findall(r"`([^`]*)`", text) + [line for line in text.splitlines() if line.startswith("python ")]
    for span in spans:
        for part in re.split(r"&&|;", " ".join(span.split())):
            m = re.match(rf"\s*python ({'|'.join(SCRIPTS)})\.py(.*)", part)
            if m and not re.search(r"<|\.\.\.|\[|\||RUN_DIR|\b[NS]\b", m[2].split("#")[0]):
                found.append((m[1], shlex.split(m[2].split(" #")[0])))
    return found


def check_command_parses(script: str, argv: list[str]):
    if script == "run_benchmarks":
        return run_benchmarks.build_parser().parse_args(argv)
    return {"mvp": mvp, "prepare_ogbench": prepare_ogbench, "prepare_robomimic": prepare_robomimic}[script] \
        .build_parser().parse_args(argv)


def test_every_command_in_the_docs_parses():
    import glob
    commands = [(path, c) for path in ["README.md", *glob.glob(os.path.join(HERE, "docs", "*.md"))]
                for c in doc_commands(open(os.path.join(HERE, path)).read())]
    assert len(commands) > 30 and {s for _, (s, _) in commands} == set(SCRIPTS)
    for path, (script, argv) in commands:
        try:
            check_command_parses(script, argv)
        except SystemExit:
            pytest.fail(f"{path}: python {script}.py {' '.join(argv)} does not parse")


def test_a_misspelt_flag_in_a_doc_command_fails_the_check():
    (script, argv), = doc_commands("Run `python mvp.py --env cube-single-task1 --hidden-dims 256` first.")
    with pytest.raises(SystemExit):
        check_command_parses(script, argv)
    (script, argv), = doc_commands("```bash\npython mvp.py --env cube-single-task1 --hidden-dim 256 \\\n"
                                   "    --threads 1   # a comment\n```")
    assert argv[-2:] == ["--threads", "1"] and check_command_parses(script, argv).hidden_dim == 256


# ---------------------------------------------------------------------------------------------
# run_benchmarks.py: the suite's flags, exit code and report, --help, plot
# ---------------------------------------------------------------------------------------------
SUITE = ["suite", "--tasks", "cube-double-task1", "--methods", "mvp", "flow10"]


def _no_launch(*_):
    pytest.fail("the suite launched runs")


def test_suite_extra_is_one_quoted_string_and_flags_after_it_stay_the_suites(tmp_path, capsys, monkeypatch):
    """The issue's command ended `--extra ... --dry-run`: the --dry-run went to mvp.py and the runs started."""
    monkeypatch.setattr(run_benchmarks, "launch", _no_launch)
    run_benchmarks.main([*SUITE, "--out-dir", str(tmp_path), "--extra", "--tau 0.02 --dataset-dir '/data/my runs'",
                         "--dry-run"])
    lines = [shlex.split(line) for line in capsys.readouterr().out.splitlines() if "mvp.py" in line]
    assert len(lines) == 2 and all(cmd[-4:] == ["--tau", "0.02", "--dataset-dir", "/data/my runs"] for cmd in lines)
    run_benchmarks.main([*SUITE, "--out-dir", str(tmp_path), "--extra=--compile", "--dry-run"])
    assert all(line.endswith("--compile") for line in capsys.readouterr().out.splitlines() if "mvp.py" in line)
    # the old form is refused, with the new one in the message, rather than read some other way
    with pytest.raises(SystemExit):
        run_benchmarks.main([*SUITE, "--out-dir", str(tmp_path), "--extra", "--tau", "0.02", "--dry-run"])
    assert "--extra takes one quoted string" in capsys.readouterr().err


def test_suite_exits_non_zero_and_names_the_runs_that_did_not_finish(tmp_path, capsys, monkeypatch):
    """mvp finishes (one evaluation each), flow10 seed 0 fails, flow10 seed 1 is interrupted (143, resumable)."""
    failed, interrupted = (run_benchmarks.run_dir_of(str(tmp_path), "cube-double-task1", "flow10", s) for s in (0, 1))

    def fake_run(run_dir, cmd):  # what mvp.py leaves behind, and its exit code
        code = {failed: 1, interrupted: 143}.get(run_dir, 0)
        if code == 0:
            _fake_run(tmp_path, "cube-double-task1", "mvp", int(cmd[cmd.index("--seed") + 1]), [("offline", 100, 0.5)])
        return code

    monkeypatch.setattr(run_benchmarks, "run_logged", fake_run)
    with pytest.raises(SystemExit) as exit_:
        run_benchmarks.main([*SUITE, "--seeds", "0", "1", "--out-dir", str(tmp_path)])
    message = str(exit_.value.code)  # a message: Python exits 1
    assert message.startswith("[suite] 2 of 4 run(s) did not finish")
    assert f"{failed}: failed (exit 1), log {os.path.join(failed, 'stdout.log')}" in message
    assert f"{interrupted}: interrupted, resumable (exit 143), log" in message
    # the finished runs were reported all the same
    assert "| cube-double-task1 | mvp | 0.50 ± 0.00 (n=2) |" in (tmp_path / "results.md").read_text()
    # no run launched, so none failed: no exit, the table comes back
    assert run_benchmarks.main([*SUITE, "--seeds", "0", "--out-dir", str(tmp_path), "--report-only"])


def test_suite_without_results_says_so_instead_of_an_empty_table(tmp_path, capsys):
    run_benchmarks.main([*SUITE, "--out-dir", str(tmp_path), "--report-only"])
    out = capsys.readouterr().out
    assert "no results yet" in out and "|" not in out and not os.listdir(tmp_path)
    assert run_benchmarks.table_markdown({}).startswith("No results yet")
    # evaluations, but none at the steps asked for: a sentence again, not a table without step columns
    _fake_run(tmp_path, "cube-double-task1", "mvp", 0, [("offline", 100, 0.5)])
    run_benchmarks.main([*SUITE, "--out-dir", str(tmp_path), "--report-only", "--report-steps", "999"])
    out = capsys.readouterr().out
    assert "no results yet" in out and "at step(s) 999" in out and "|" not in out
    # results: every header names its column, and the last line lists the files written
    run_benchmarks.main([*SUITE, "--out-dir", str(tmp_path), "--report-only"])
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("| task"))
    assert all(cell.strip() for cell in header.strip("|").split("|"))
    written = [str(tmp_path / name) for name in ("results.md", "results.json", "curves_cube-double-task1.png")]
    assert lines[-1] == f"[suite] wrote {', '.join(written)}" and all(os.path.exists(p) for p in written)


def test_suite_report_only_says_it_launches_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(run_benchmarks, "launch", _no_launch)
    run_benchmarks.main([*SUITE, "--seeds", "0", "1", "--out-dir", str(tmp_path), "--report-only"])
    first = capsys.readouterr().out.splitlines()[0]
    assert "4 run(s), 0 already finished" in first and "to run" not in first and "launching nothing" in first


def test_help_lists_only_public_subcommands_and_internal_ones_still_parse(capsys):
    with pytest.raises(SystemExit):
        run_benchmarks.main(["--help"])
    out = capsys.readouterr().out
    assert "_rate" not in out and all(c in out for c in ("speed", "graph-check", "share", "envs", "suite", "plot"))
    with pytest.raises(SystemExit):
        run_benchmarks.main(["_rate", "--help"])  # `share` starts its processes with it
    assert "--start-at" in capsys.readouterr().out


def test_plot_draws_a_run_with_one_log_row_as_points(tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    _fake_run(tmp_path, "cube-double-task1", "mvp", 0, [("offline", 100, 0.5)])  # logs no Q(s0, a*)
    run = run_benchmarks.run_dir_of(str(tmp_path), "cube-double-task1", "mvp", 0)
    with open(os.path.join(run, "offline.csv"), "w") as f:
        f.write("step,critic_loss,q_mean,target_mean,mf_loss,ivc_loss,bon_gain\n100,0.5,-3,-3.1,0.2,0.1,0.05\n")
    figs = []
    monkeypatch.setattr(plt, "close", figs.append)  # keep the figure to look at
    run_benchmarks.main(["plot", run, "--out", str(tmp_path / "c.png")])
    (fig,) = figs
    success, q0, *train = fig.axes  # PANELS' order
    for ax in [success, *train]:
        assert ax.lines and all(line.get_marker() not in (None, "None", "", " ") for line in ax.lines)
    assert [t.get_text() for t in q0.texts] == ["nothing logged yet"] and not q0.get_yticks().size
    monkeypatch.undo()
    plt.close(fig)


def test_plot_x_label_says_whether_a_drawn_run_went_online(tmp_path, monkeypatch):
    """Offline-only runs: offline gradient steps; a run with an online phase among them: offline gradient
    steps, then online env steps, with a dotted line at the hand-off."""
    train = "step,critic_loss,q_mean,target_mean,mf_loss,ivc_loss,bon_gain\n{},0.5,-3,-3.1,0.2,0.1,0.05\n"
    _fake_run(tmp_path, "cube-single-task1", "mvp", 0, [("offline", 100, 0.5)])
    offline = run_benchmarks.run_dir_of(str(tmp_path), "cube-single-task1", "mvp", 0)
    open(os.path.join(offline, "offline.csv"), "w").write(train.format(100))
    _fake_run(tmp_path, "cube-single-task1", "mvp", 1, [("offline", 100, 0.5), ("online", 50, 0.7)])
    online = run_benchmarks.run_dir_of(str(tmp_path), "cube-single-task1", "mvp", 1)
    open(os.path.join(online, "offline.csv"), "w").write(train.format(100))
    open(os.path.join(online, "online.csv"), "w").write(train.format(50))
    figs = _closed_figures(monkeypatch)
    for runs in ([offline], [offline, online]):
        run_benchmarks.main(["plot", *runs, "--out", str(tmp_path / "c.png")])
    monkeypatch.undo()
    plt_close_all(figs)
    alone, both = figs
    assert [ax.get_xlabel() for ax in alone.axes[3:]] == ["offline gradient step"] * 3
    assert [ax.get_xlabel() for ax in both.axes[3:]] == ["step: offline gradient steps, then online env steps "
                                                         "(dotted: hand-off)"] * 3
    assert [ax.get_xlabel() for ax in alone.axes[:3] + both.axes[:3]] == [""] * 6  # only the bottom row's
    handoffs = [line for line in both.axes[0].lines if line.get_linestyle() == ":"]
    assert len(handoffs) == 1 and list(handoffs[0].get_xdata()) == [100, 100]
    assert not any(line.get_linestyle() == ":" for line in alone.axes[0].lines)


# ---------------------------------------------------------------------------------------------
# toy_2d.py's figures read where they are shown
# ---------------------------------------------------------------------------------------------
SHOWN_WIDTH = 880  # px: the width a README or docs page gives an image


def png_size(path) -> tuple[int, int]:
    """(width, height) in pixels, from the PNG's IHDR chunk."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The default targets and variants at --quick budgets; each saved figure with the PNG it went to."""
    out, figures = tmp_path_factory.mktemp("toy"), {}
    real = Figure.savefig

    def savefig(fig, path, *args, **kwargs):
        real(fig, path, *args, **kwargs)
        figures[str(path).rsplit("/", 1)[-1]] = fig

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Figure, "savefig", savefig)
        toy_2d.main(["--quick", "--out-dir", str(out)])
    return out, figures


def panel_rows(fig) -> list[int]:
    """How many panels sit in each row of the figure, rows found by the panels' top edges."""
    tops = {}
    for ax in fig.get_axes():
        box = ax.get_position()  # in the figure's coordinates, after savefig's layout
        if box.width > 0.1:  # a panel, not a colorbar
            tops.setdefault(round(box.y1, 2), []).append(ax)
    return [len(tops[y]) for y in sorted(tops, reverse=True)]


@pytest.mark.parametrize("name", ["toy_2d.png", "toy_2d_ivc.png"])
def test_toy_figure_is_laid_out_in_rows_readable_at_880_px(quick_run, name):
    out, figures = quick_run
    width, height = png_size(out / name)
    # Sharp when scaled down to 880 px, and not a strip: the old figure was 2288 x 374 (aspect 6.1).
    assert 1400 <= width <= 2000, (width, height)
    assert 1.0 <= width / height < 3.0, (width, height)
    fig = figures[name]
    assert toy_2d.FIG_DPI * fig.get_figwidth() == pytest.approx(width, abs=1)  # saved at FIG_DPI
    rows = panel_rows(fig)
    assert len(rows) >= 2 and max(rows) <= 4, rows  # the old figure: one row of 8 panels
    # Every piece of text, shown at 880 px, is at least 9 px tall (the old figure's smallest was 3 px).
    scale = SHOWN_WIDTH / (72 * fig.get_figwidth())  # px on the page per point of font
    sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    assert sizes and min(sizes) * scale >= 9, (min(sizes), scale)


def test_toy_main_figure_has_two_rows_of_four(quick_run):
    """The default run: target + 5 sampler scatters + 2 line plots = 8 panels, in 2 rows of 4."""
    _, figures = quick_run
    assert panel_rows(figures["toy_2d.png"]) == [4, 4]
    assert panel_rows(figures["toy_2d_ivc.png"]) == [4, 4]  # without and with IVC: samples and 3 times


def test_panel_grid_leaves_few_cells_empty():
    assert [toy_2d.panel_grid(n) for n in (4, 5, 6, 7, 8)] == [(4, 1), (3, 2), (3, 2), (4, 2), (4, 2)]


# =============================================================================================
# Issue #36: one ONNX graph of the acting step (export_onnx.py), its torch-free runner
# (onnx_policy.py), the proofs that it is the same policy, and run_benchmarks.py latency.
# This section stands alone (its own helpers and fixtures); keep it last.
# =============================================================================================
import contextlib  # noqa: E402  (imported here, not at the top, so this section merges as one block)
import hashlib  # noqa: E402
from collections import Counter  # noqa: E402

import export_onnx  # noqa: E402
import onnx_policy  # noqa: E402

ONNX_ENV = "cube-single-play-singletask-task1-v0"  # 200-step episodes, observations of 28, actions of 5
ONNX_LIFT_OBS_DIM = 19


def onnx_checkpoint(path: str, env_name: str, obs_dim: int, action_dim: int, extra=(), env_args=None) -> str:
    """A checkpoint of tiny random networks (2x32, N = 32, h = 5) in mvp.py's format: random critics rank the
    candidates as decisively as trained ones, which is all the export has to reproduce."""
    args = mvp.parse_args(["--env", env_name, "--hidden-dim", "32", "--num-layers", "2", *extra])
    torch.manual_seed(0)
    learner = mvp.make_learner(obs_dim, action_dim * args.chunk_len, args, torch.device("cpu"))
    task = dict(env_name=env_name, obs_dim=obs_dim, action_dim=action_dim, env_args=json.dumps(env_args))
    run_utils.save_checkpoint(path, mvp.checkpoint_state(learner, args, task, pos=dict(offline=7, online=0)))
    return path


@contextlib.contextmanager
def torch_threads(n: int):
    """torch on n threads (one: tiny networks on a busy machine run several times faster), then as before."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    with torch_threads(1):
        yield


def export_cli(*argv) -> dict:
    """export_onnx.main in this process (it sets torch's threads, to 1 by default), threads restored after."""
    with torch_threads(torch.get_num_threads()):
        return export_onnx.main([*argv])


@pytest.fixture(scope="module")
def onnx_policies(tmp_path_factory):
    """MVP and flow10 on cube-single, each a checkpoint exported by the CLI, with its learner loaded back."""
    folder, out = tmp_path_factory.mktemp("onnx"), {}
    for method, extra in (("mvp", []), ("flow10", ["--policy", "flow", "--flow-steps", "10"])):
        ckpt = onnx_checkpoint(str(folder / f"{method}.pt"), ONNX_ENV, 28, 5, extra)
        path = export_cli(ckpt, "--check-states", "0")["onnx"]
        learner, state, args = export_onnx.load_policy(ckpt)
        out[method] = SimpleNamespace(ckpt=ckpt, onnx=path, learner=learner, state=state, args=args)
    return out


@pytest.fixture(scope="module")
def cube_single_env():
    return prepare_ogbench.make_env(ONNX_ENV)


@pytest.fixture(scope="module")
def cube_single_states(onnx_policies, cube_single_env):
    """1,000 observations of seeded cube-single episodes (export_onnx's states where no training data is found)."""
    obs, source = export_onnx.check_states(onnx_policies["mvp"].state, 1000, env=cube_single_env)
    assert obs.shape == (1000, 28) and "env episodes" in source
    return obs


def test_onnx_export_is_one_file_holding_the_whole_acting_step_and_its_metadata(onnx_policies, one_thread):
    import onnx
    for method, p in onnx_policies.items():
        assert sorted(os.listdir(os.path.dirname(p.onnx))) == ["flow10.onnx", "flow10.pt", "mvp.onnx", "mvp.pt"]
        model = onnx.load(p.onnx)
        meta = {m.key: m.value for m in model.metadata_props}
        assert (meta["task"], meta["method"], meta["checkpoint"]) == (ONNX_ENV, method, f"{method}.pt")
        assert [meta[k] for k in ("obs_dim", "action_dim", "chunk_len", "num_candidates")] == ["28", "5", "5", "32"]
        with open(p.ckpt, "rb") as f:
            assert meta["checkpoint_sha256"] == hashlib.sha256(f.read()).hexdigest()
        assert json.loads(meta["trained_steps"]) == dict(offline=7, online=0)
        shape = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        assert {v.name: shape(v) for v in model.graph.input} == {"obs": ["batch", 28], "noise": ["batch", 32, 25]}
        assert {v.name: shape(v) for v in model.graph.output} == {"chunk": ["batch", 5, 5], "scores": ["batch", 32]}
        ops = Counter(n.op_type for n in model.graph.node)
        # the critic and the selection are in the graph, the critic member by member (K = 2): a LayerNorm per
        # hidden layer and member holding its member's affine, one ArgMax
        assert ops["LayerNormalization"] == 2 * 2 and ops["ArgMax"] == 1 and ops["MatMul"] == 0
        assert all(len(n.input) == 3 for n in model.graph.node if n.op_type == "LayerNormalization")
        # 3 Gemms per policy call (10 Euler steps unrolled for flow10), 2 per critic member, and the members' heads
        # with the mean over K as one Gemm
        calls = 1 if method == "mvp" else 10
        assert ops["Gemm"] == 3 * calls + 2 * 2 + 1 and ops["ReduceMean"] == 0
        # each policy call's t and r columns are folded into its first layer's bias: it reads obs and a_t only
        inits = {w.name: w for w in model.graph.initializer}
        firsts = [inits[n.input[1]].dims for n in model.graph.node if n.op_type == "Gemm" and n.input[1] in inits
                  and inits[n.input[1]].dims[1] in (28 + 25, 28 + 25 + 2)]
        assert firsts == [[32, 28 + 25]] * calls


@pytest.mark.parametrize("method", ["mvp", "flow10"])
@torch.no_grad()
def test_onnx_step_is_mvps_best_of_n_on_1000_states(onnx_policies, cube_single_states, method, one_thread):
    p = onnx_policies[method]
    policy = onnx_policy.OnnxPolicy(p.onnx)
    report = export_onnx.state_parity(p.learner, policy, cube_single_states)  # batches of 1, 2, 7, 64, 256 states
    assert report["states"] == 1000 and report["num_candidates"] == 32
    assert report["max_abs_chunk"] <= 1e-5 and report["max_rel_scores"] <= 1e-5, report
    assert report["argmax_mismatch_frac"] <= 0.001 and report["tie_flips"] <= report["ties"], report
    assert report["best_not_first_frac"] > 0.5  # the critic decides: candidate 0 is seldom the best
    assert export_onnx.check_problems(dict(states=report)) == []
    # and without best_of_n: the scores are the K critics' mean on the candidates, the chunk is the argmax's
    B, N, A = 64, 32, 25
    obs = cube_single_states[::15][:B]
    noise = np.random.default_rng(1).standard_normal((B, N, A), dtype=np.float32)
    chunk, scores = policy.act_batch(obs, noise)
    obs_rep = torch.from_numpy(obs).repeat_interleave(N, dim=0)
    cand = p.learner.sample(p.learner.policy, obs_rep, torch.from_numpy(noise).reshape(B * N, A)).view(B, N, A)
    q = p.learner.critic(obs_rep, cand.reshape(B * N, A)).mean(dim=0).view(B, N)
    np.testing.assert_allclose(scores, q.numpy(), rtol=1e-5, atol=1e-5)
    assert (q.argmax(dim=1) != 0).float().mean() > 0.5
    np.testing.assert_allclose(chunk.reshape(B, A), cand[torch.arange(B), q.argmax(dim=1)].numpy(), atol=1e-5)


class WrongStep(export_onnx.ActingStep):
    """The acting step with one thing wrong: 'first' drops the critic (candidate 0, scores of zeros), 'worst'
    keeps the scores but executes the argmin's chunk."""

    def __init__(self, learner, chunk_len: int, wrong: str):
        super().__init__(learner, chunk_len)
        self.wrong = wrong

    def forward(self, obs, noise):
        B, N, A = noise.shape
        obs_rep = obs.repeat_interleave(N, dim=0)
        cand = self.sample(self.policy, obs_rep, noise.reshape(B * N, A)).view(B, N, A)
        if self.wrong == "first":
            return cand[:, 0].view(B, self.chunk_len, -1), torch.zeros(B, N)
        scores = self.critic(obs_rep, cand.reshape(B * N, A)).mean(dim=0).view(B, N)
        return cand[torch.arange(B), scores.argmin(dim=1)].view(B, self.chunk_len, -1), scores


@pytest.mark.parametrize("wrong", ["first", "worst"])
def test_onnx_parity_checks_fail_for_a_graph_that_drops_the_critic_or_picks_another_candidate(
        onnx_policies, cube_single_states, tmp_path, wrong, one_thread):
    p = onnx_policies["mvp"]
    path = str(tmp_path / f"{wrong}.onnx")
    example = (torch.zeros(2, 28), torch.zeros(2, 32, 25))
    export_onnx.export_module(WrongStep(p.learner, 5, wrong).eval(), example, ["obs", "noise"], ["chunk", "scores"],
                              path, export_onnx.metadata(p.state, p.args, p.ckpt), batch_inputs=2)
    report = export_onnx.state_parity(p.learner, onnx_policy.OnnxPolicy(path), cube_single_states[:300])
    problems = " ".join(export_onnx.check_problems(dict(states=report)))
    if wrong == "first":  # its scores are not the critic's, and its argmax is another candidate
        assert report["max_rel_scores"] > 0.01 and report["argmax_mismatch_frac"] > 0.5  # allowed: 1e-5, 0.001
        assert "states pick another candidate" in problems
    else:  # the critic's scores, but not the chunk of their argmax
        assert report["max_rel_scores"] <= 1e-5 and report["max_abs_chunk"] > 0.01  # allowed: 1e-5
        assert "chunks differ by" in problems


def test_onnx_policy_runs_without_torch_and_names_bad_inputs(onnx_policies, tmp_path, monkeypatch, one_thread):
    import onnx
    path = onnx_policies["mvp"].onnx
    code = ("import sys, numpy as np, onnx_policy; p = onnx_policy.OnnxPolicy(sys.argv[1], seed=3); "
            "c = p.act(np.zeros(28)); assert c.shape == (5, 5) and np.abs(c).max() <= 1; "
            "assert 'torch' not in sys.modules, 'onnx_policy imported torch'; print(repr(float(c.sum())))")
    proc = subprocess.run([sys.executable, "-c", code, path], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    policy = onnx_policy.OnnxPolicy(path, seed=3)
    assert float(proc.stdout) == float(policy.act(np.zeros(28)).sum())  # same seed, same chunk
    assert (policy.obs_dim, policy.action_dim, policy.chunk_len, policy.num_candidates) == (28, 5, 5, 32)
    # the seeded draws are numpy's standard normals; the caller's noise gives what the same numbers give
    noise = np.random.default_rng(5).standard_normal((1, 32, 25), dtype=np.float32)
    np.testing.assert_array_equal(onnx_policy.OnnxPolicy(path, seed=5).act(np.ones(28)),
                                  policy.act(np.ones(28), noise=noise[0]))
    assert policy.act(np.zeros(28, dtype=np.float64)).dtype == np.float32  # a simulator's float64 is fine
    for bad, message in ((np.zeros(27), r"observation has shape \(27,\), but this policy .* takes \(28,\)"),
                         (np.zeros(28, dtype=np.int64), "dtype int64; pass floating-point"),
                         (np.full(28, np.nan), "NaN or inf"), (np.zeros((2, 28)), r"shape \(2, 28\)")):
        with pytest.raises(ValueError, match=message):
            policy.act(bad)
    with pytest.raises(ValueError, match=r"noise has shape \(32, 24\)"):
        policy.act(np.zeros(28), noise=np.zeros((32, 24)))
    with pytest.raises(ValueError, match=r"observations has shape \(28,\)"):
        policy.act_batch(np.zeros(28))
    model = onnx.load(path)
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "bare.onnx"))
    with pytest.raises(ValueError, match="not a policy written by export_onnx.py"):
        onnx_policy.OnnxPolicy(str(tmp_path / "bare.onnx"))
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    for name in ("junk.onnx", "missing.onnx"):
        with pytest.raises(ValueError, match="cannot load .* as an ONNX model"):
            onnx_policy.OnnxPolicy(str(tmp_path / name))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match="pip install onnxruntime"):
        onnx_policy.OnnxPolicy(path)


def test_onnx_export_cli_names_each_bad_input_in_one_line(onnx_policies, tmp_path, monkeypatch, one_thread):
    def error(*argv) -> str:
        with pytest.raises(SystemExit) as e:
            export_cli(*argv)
        assert str(e.value.code).startswith("error: ") and "\n" not in str(e.value.code)
        return str(e.value.code)

    good = onnx_policies["mvp"].ckpt
    assert "does not exist" in error(str(tmp_path / "missing.pt"))
    with open(good, "rb") as f:
        (tmp_path / "cut.pt").write_bytes(f.read(300))
    assert "truncated or corrupt" in error(str(tmp_path / "cut.pt"))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    assert "is not a policy checkpoint" in error(str(tmp_path / "other.pt"))
    run_utils.save_checkpoint(str(tmp_path / "bare.pt"), dict(args={}, env_name=ONNX_ENV))
    assert "holds no policy (it lacks obs_dim, action_dim, policy, critic)" in error(str(tmp_path / "bare.pt"))
    state = torch.load(good, weights_only=True)
    state["args"]["hidden_dim"] = 16
    torch.save(state, tmp_path / "mismatch.pt")
    assert "do not match its own args" in error(str(tmp_path / "mismatch.pt"))
    (tmp_path / "a_file").write_text("")
    assert "cannot write" in error(good, "--out", str(tmp_path / "a_file" / "policy.onnx"))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert "onnxruntime is not installed" in error(good) and "pip install" in error(good)
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    assert "onnxscript is not installed; export_onnx.py needs it: pip install" in error(good, "--check-states", "0")
    # from the shell: the one line, no traceback
    proc = subprocess.run([sys.executable, os.path.join(HERE, "export_onnx.py"), str(tmp_path / "cut.pt")],
                          capture_output=True, text=True, cwd=HERE, timeout=300)
    assert proc.returncode == 1 and proc.stderr.startswith("error: checkpoint") and "Traceback" not in proc.stderr


def test_onnx_episodes_are_eval_onlys_step_for_step(onnx_policies, cube_single_env, monkeypatch, one_thread):
    """mvp.py --eval-only's episodes against the exported step driven by the runner, on the same seeds and noise
    (episodes cut at 60 steps, the same cut for both)."""
    p, episodes = onnx_policies["mvp"], []

    class Log:  # every episode's actions, whoever runs it
        def reset(self, **kwargs):
            episodes.append([])
            return cube_single_env.reset(**kwargs)

        def step(self, action):
            episodes[-1].append(np.array(action))
            obs, reward, terminated, truncated, info = cube_single_env.step(action)
            return obs, reward, terminated, truncated or len(episodes[-1]) == 60, info

    monkeypatch.setattr(mvp, "env_from_checkpoint", lambda ckpt: Log())
    res = mvp.main(["--eval-only", "--checkpoint", p.ckpt, "--eval-episodes", "2"])
    assert len(episodes) == 4  # N = 32 on seeds 10000 and 10001, then N = 1 on them
    report = export_onnx.episode_parity(p.learner, onnx_policy.OnnxPolicy(p.onnx), Log(), [10_000, 10_001])
    for i, ep in enumerate(report):
        mvps, nudged, onnxs = episodes[4 + 3 * i:7 + 3 * i]  # episode_parity's three runs of the seed
        np.testing.assert_array_equal(np.stack(mvps), np.stack(episodes[i]))  # its reference is --eval-only's
        assert ep["steps"] == ep["steps_torch"] == len(onnxs) == 60 and ep["success"] == ep["success_torch"]
        assert ep["argmax_mismatches"] == 0 and ep["max_abs_chunk_same_obs"] <= 1e-5, ep
        if not ep["tie_flips"]:  # equal, until MuJoCo amplifies float32 rounding (as it does a one-ulp nudge)
            drift = np.abs(np.stack(onnxs) - np.stack(episodes[i])).max(axis=1)
            assert drift[:15].max() <= 1e-5 and drift.max() == pytest.approx(ep["max_abs_action"])
            assert ep["first_step_over_tol"] is None or ep["first_step_over_tol"] >= 15
    assert np.mean([ep["success"] for ep in report]) == res["success_rate"]


def test_onnx_lift_episode_matches_mvps(tmp_path, one_thread):
    """robomimic Lift: one short episode (40 steps) of the exported step against mvp.run_episode."""
    env_args = prepare_robomimic.robomimic_env_args("lift")
    ckpt = onnx_checkpoint(str(tmp_path / "lift.pt"), "lift", ONNX_LIFT_OBS_DIM, 7, env_args=env_args)
    path = export_cli(ckpt, "--check-states", "0")["onnx"]
    policy = onnx_policy.OnnxPolicy(path)
    assert policy.metadata["task"] == "lift" and json.loads(policy.metadata["env_args"]) == env_args
    learner, state, _ = export_onnx.load_policy(ckpt)
    env = prepare_robomimic.RobomimicEnv(json.loads(state["env_args"]), 40, source="test")  # as env_from_checkpoint
    ep, = export_onnx.episode_parity(learner, policy, env, [10_000])
    assert ep["steps"] == ep["steps_torch"] == 40 and ep["success"] == ep["success_torch"]
    assert ep["argmax_mismatches"] == 0 and ep["max_abs_chunk_same_obs"] <= 1e-5, ep
    assert ep["tie_flips"] or ep["first_step_over_tol"] is None or ep["first_step_over_tol"] >= 15, ep


def test_onnx_latency_subcommand_writes_its_table(tmp_path, one_thread):
    out = run_benchmarks.main(["latency", "--sizes", "1x16", "--runtimes", "eager", "onnx", "--calls", "6",
                               "--round", "3", "--out-dir", str(tmp_path)])
    rows = {(r["method"], r["runtime"]): r for r in out["rows"]}
    assert set(rows) == {(m, rt) for m in ("mvp", "flow10") for rt in ("torch eager", "onnxruntime")}
    for r in rows.values():
        assert r["calls"] == 6 and 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"] and r["p99_over_p50_in_round"] >= 1
        assert r["ideal_ms"] == pytest.approx(1e3 * r["macs"] / (out["matmul_gflops"] * 1e9 / 2))
        assert r["x_ideal"] == pytest.approx(r["p50_ms"] / r["ideal_ms"])
    # multiply-adds from the layer shapes (cube-double: observations of 37, chunks of 25): N = 32 rows through
    # the policy (37 + 25 + 2 -> 16 -> 25) once for MVP, 10 times for flow10, then 2 critics (62 -> 16 -> 1)
    policy, critic = 64 * 16 + 16 * 25, 2 * (62 * 16 + 16)
    assert rows["mvp", "onnxruntime"]["macs"] == 32 * (policy + critic)
    assert rows["flow10", "torch eager"]["macs"] == 32 * (10 * policy + critic)
    assert rows["mvp", "torch eager"]["speedup_vs_eager"] == 1.0
    for lead in out["leads"]:
        assert lead["ceiling"] == pytest.approx(run_benchmarks.latency_ceiling(
            lead["policy_call_ms"], lead["critic_call_ms"], 10, lead["per_run_ms"]))
        assert lead["ceiling_in_step"] == pytest.approx(run_benchmarks.latency_ceiling(
            lead["policy_call_ms"], lead["critic_alt_ms"], 10, lead["per_run_ms"], lead["policy_alt_ms"]))
        assert (lead["per_run_ms"] == 0) == (lead["runtime"] == "torch eager")  # onnxruntime's run is timed
        assert lead["per_run_ms"] < lead["policy_call_ms"]
        assert lead["flow10_over_mvp"] == pytest.approx(rows["flow10", lead["runtime"]]["p50_ms"]
                                                        / rows["mvp", lead["runtime"]]["p50_ms"])
    assert {a["aim"].split(":")[0] for a in out["aims"]} >= {"mvp 1x16 onnxruntime", "1x16"}
    md = (tmp_path / "latency.md").read_text()
    assert "| 1x16 | flow10 | onnxruntime |" in md and "GFLOP/s" in md and md.startswith("Machine: ")
    assert json.loads((tmp_path / "latency.json").read_text())["machine"] == out["machine"]
    with pytest.raises(SystemExit):
        run_benchmarks.main(["latency", "--sizes", "4x"])
