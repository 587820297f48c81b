"""Tests of the method itself, the part of mvp.py above its fence that people copy: the mean-flow maths on cases
with known answers, the RL losses, best-of-N and the samplers, the replay buffer and its chunk sampler, the update
and the train step, and the copy path (the core's boundary, and an example that uses it from another loop).

Everything around the method has a file of its own in tests/, named by what it checks: test_runs.py (real runs,
interruption and resume), test_evaluation.py, test_errors.py, test_code.py, test_ogbench.py, test_robomimic.py,
test_toy.py, test_benchmarks.py, test_onnx.py, test_docs.py, test_run_safety.py.

Run: python -m pytest -q test_mvp.py   (CPU; the whole suite: python -m pytest -q -n 2 test_mvp.py tests)
"""
import ast
import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mvp
import run_benchmarks
from tests.helpers import QuadraticCritic  # a critic with a known answer, shared with tests/

HERE = os.path.dirname(os.path.abspath(__file__))


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
    def grads(coef):
        net.zero_grad()
        loss, info = mvp.policy_loss(net, obs, a1, valid, 2, torch.Generator().manual_seed(1), ivc_coef=coef)
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
    for _ in range(400):
        a1 = flow.mu + flow.s * torch.randn(256, 2, generator=g)
        loss, info = mvp.policy_loss(net, obs, a1, valid, 1, g, ivc_coef=1.0, times=mvp.TimeSampler("uniform"))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = error()
    assert after < 0.2 * before, (before, after)


def test_time_sampler_orders_and_equal_fraction():
    g = torch.Generator().manual_seed(0)
    for sampler in ("uniform", "logit_normal"):
        t, r = mvp.sample_times(10_000, mvp.TimeSampler(sampler), g, "cpu")
        assert t.shape == (10_000, 1) and (t <= r).all() and (t >= 0).all() and (r <= 1).all()
        assert (r > t).all()
    t, r = mvp.sample_times(10_000, mvp.TimeSampler(equal_frac=0.25), g, "cpu")
    assert abs((r == t).float().mean().item() - 0.25) < 0.02
    gap = torch.sub(*mvp.sample_times(100_000, mvp.TimeSampler(), g, "cpu")[::-1])
    assert abs((gap > 0.9).float().mean().item() - 0.01) < 0.002  # sorted uniforms: gap density 2 (1 - gap)


def test_gap_uniform_sampler_and_one_step_rows():
    """gap_uniform: r - t ~ U(0, 1) with t, r inside [0, 1]; one_step_frac rows are exactly (0, 1)."""
    g = torch.Generator().manual_seed(0)
    t, r = mvp.sample_times(100_000, mvp.TimeSampler("gap_uniform"), g, "cpu")
    gap = r - t
    assert (t >= 0).all() and (r <= 1).all() and (gap >= 0).all()
    hist = torch.histc(gap, bins=10, min=0, max=1) / len(gap)
    assert (hist - 0.1).abs().max() < 0.006  # flat in the gap, 10% above 0.9
    assert abs(t[gap > 0.5].mean().item() - 0.125) < 0.01  # t ~ U(0, 1 - gap): E[t | gap > 0.5] = 1/8
    t, r = mvp.sample_times(100_000, mvp.TimeSampler(one_step_frac=0.25), g, "cpu")
    one = (t == 0) & (r == 1)
    assert abs(one.float().mean().item() - 0.25) < 0.01 and (r[~one] - t[~one] < 1).all()


# ---------------------------------------------------------------------------------------------
# Acting: best-of-N and the one-step sampler
# ---------------------------------------------------------------------------------------------
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
# The critic and the RL losses
# ---------------------------------------------------------------------------------------------
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
# The replay buffer and its chunk sampler, on a hand-built dataset
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
    assert int(buf.num_rows) == 14 and buf.size == 14 and buf.num_rows.dtype == torch.long
    starts = buf.sample_chunks(4000, 2, 0.9, g)["obs"][:, 0].long()
    assert set(starts.tolist()) == set(range(13))  # the new rows 10..13 are drawn, start 12 is the last legal one


def test_replay_buffer_refuses_what_is_not_a_table_of_transitions_naming_every_bad_key():
    """(N, 1) rewards, masks and terminals (as many codebases store them) once gave next_obs of shape (B, B, dim)
    and a shape error deep inside torch; now one error lists each bad key with its shape and the shape wanted."""
    d = _hand_dataset()
    bad = dict(d, rewards=d["rewards"][:, None], masks=d["masks"][:, None], terminals=d["terminals"][:, None])
    with pytest.raises(mvp.BufferDataError) as e:
        mvp.ReplayBuffer(bad, 10, "cpu")
    for key in ("rewards", "masks", "terminals"):
        assert f"{key} has shape (10, 1) (float32), want (10,)" in str(e.value)
    assert "observations" not in str(e.value) and isinstance(e.value, ValueError)
    bad = {k: v for k, v in d.items() if k != "next_observations"}
    bad["actions"], bad["observations"] = d["actions"][:7], d["observations"].copy()
    bad["observations"][4, 0] = np.nan
    with pytest.raises(mvp.BufferDataError) as e:
        mvp.ReplayBuffer(bad, 10, torch.device("cpu"))
    assert str(e.value) == ("ReplayBuffer data: observations has 1 rows with NaN or inf (first: row 4); actions has "
                            "shape (7, 2) (float32), want (10, dim) (numbers); next_observations missing (want shape "
                            "(10, dim))")


def test_replay_buffer_clips_actions_only_when_asked():
    """clip_dataset_actions, the protocol's clip of a dataset [QC], is applied where dataset rows become buffer rows,
    and only there: a buffer of other data keeps its actions."""
    d = _hand_dataset()
    d["actions"] = np.linspace(-1.5, 1.5, 20, dtype=np.float32).reshape(10, 2)
    d["actions"][0] = [1.0, -1.0]
    kept, clipped = mvp.ReplayBuffer(d, 10, "cpu"), mvp.ReplayBuffer(d, 10, "cpu", clip_actions=True)
    assert np.array_equal(kept.store["actions"][:10].numpy(), d["actions"])
    assert clipped.store["actions"][:10].abs().max() == np.float32(1 - 1e-5)
    assert np.array_equal(clipped.store["actions"][:10].numpy(), np.clip(d["actions"], -1 + 1e-5, 1 - 1e-5))


def test_chunk_starts_need_no_float64_and_are_the_float64_draws_on_cpu():
    """uniform_index works in int64 (Apple's MPS has no float64) and gives, on CPU, the rows floor(u * n) of the
    float64 draw it replaced, from the same generator state, and leaves the generator where that draw did."""
    for n in (1, 6, 165_161, 1_001_000, 3_003_000):
        g1, g2 = torch.Generator().manual_seed(n), torch.Generator().manual_seed(n)
        u = torch.rand(200_000, generator=g1, dtype=torch.float64)
        idx = mvp.uniform_index(200_000, torch.tensor(n), g2)
        assert idx.dtype == torch.long and torch.equal(idx, (u * n).long())
        assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))


# ---------------------------------------------------------------------------------------------
# The update and the train step (eager, compiled, CUDA-graphed)
# ---------------------------------------------------------------------------------------------
def _tiny_learner_and_buffer():
    hp = mvp.Hyperparams(hidden_dim=32, num_layers=2, batch_size=16, num_candidates=4)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    learner = mvp.new_learner(40, 25, hp, "cpu", bon_block=32)
    return hp, gen, learner, run_benchmarks.synthetic_buffer(40, 5, 500, 500, torch.device("cpu"))


def _params(learner):
    return torch.cat([p.detach().flatten() for m in (learner.policy, learner.critic, learner.target_critic)
                      for p in m.parameters()])


def test_train_step_is_a_batch_draw_then_one_update():
    """train_step (what the loops run, and make_train_step wraps) = sample_chunks, imitation target, update."""
    hp, gen, learner, buf = _tiny_learner_and_buffer()
    infos = [mvp.train_step(learner, buf, mvp.buffer_target, hp, gen) for _ in range(3)]
    hp, gen, manual, buf = _tiny_learner_and_buffer()
    for _ in range(3):
        batch = buf.sample_chunks(hp.batch_size, hp.chunk_len, hp.discount, gen)
        info = mvp.update(manual, batch, batch["actions"], batch["valid"], hp, gen)
    assert torch.equal(_params(learner), _params(manual))
    assert float(infos[-1]["critic_loss"]) == float(info["critic_loss"]) and float(infos[0]["mf_loss"]) > 0


def test_compiled_train_step_matches_eager_on_cpu():
    """--compile (torch.compile of the whole step) gives the parameters eager code gives, to 1e-5,
    after 3 updates from the same seed; and the updates did move them."""
    hp, gen, eager, buf = _tiny_learner_and_buffer()
    start = _params(eager)
    step = mvp.make_train_step(eager, buf, mvp.buffer_target, hp, gen)
    for _ in range(3):
        step()
    hp, gen, compiled, buf = _tiny_learner_and_buffer()
    step = mvp.make_train_step(compiled, buf, mvp.buffer_target, hp, gen, compile=True)
    for _ in range(3):
        step()
    assert (_params(eager) - start).abs().max() > 1e-4
    torch.testing.assert_close(_params(compiled), _params(eager), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graphed_training_matches_eager_and_draws_fresh_numbers(tmp_path):
    report = run_benchmarks.main(["graph-check", "--updates", "100", "--hidden-dim", "64", "--num-layers", "2",
                                  "--batch-size", "64", "--out-dir", str(tmp_path)])
    assert report["draws"]["replays_equal_eager"] and report["draws"]["replays_differ"]
    assert all(report[m]["max_rel_loss_diff_first10"] < 1e-3 for m in ("mvp", "flow10"))


# ---------------------------------------------------------------------------------------------
# The copy path: what lies above mvp.py's fence needs neither the CLI's Args nor the plumbing below it
# ---------------------------------------------------------------------------------------------
ARGS_TAKERS = {"build_parser", "parse_args", "train"}  # above the fence, only these may take the CLI's Args


CORE_NAMES = {"Hyperparams", "TimeSampler", "new_learner", "Learner", "ReplayBuffer", "train_step", "buffer_target",
              "best_of_n_target", "update", "act", "best_of_n", "one_step", "euler_sample", "policy_loss",
              "MeanVelocityNet", "CriticEnsemble", "clip_dataset_actions"}


def _above_the_fence() -> tuple[ast.Module, set[str]]:
    """mvp.py's statements before the PLUMBING fence, and the names defined or imported after it."""
    with open(os.path.join(HERE, "mvp.py")) as f:
        lines = f.read().splitlines()
    fence = [i for i, line in enumerate(lines) if "PLUMBING" in line]
    assert len(fence) == 1 and lines[fence[0]].startswith("# ===") and fence[0] < 700
    tree = ast.parse("\n".join(lines))
    above = [n for n in tree.body if n.end_lineno <= fence[0]]
    below = {n.name for n in tree.body if n.lineno > fence[0] and hasattr(n, "name")}
    below |= {t.id for n in tree.body if n.lineno > fence[0] and isinstance(n, ast.Assign) for t in n.targets}
    below |= {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "run_utils"
              for a in n.names}
    return ast.Module(body=above, type_ignores=[]), below


def test_the_core_above_the_fence_takes_no_args_and_uses_nothing_below_it():
    core, below = _above_the_fence()
    funcs = [n for n in ast.walk(core) if isinstance(n, ast.FunctionDef)]
    assert CORE_NAMES <= {n.name for n in core.body if hasattr(n, "name")}
    for fn in funcs:
        params = fn.args.args + fn.args.kwonlyargs
        takes_args = any(a.arg == "args" or (a.annotation is not None and "Args" in ast.unparse(a.annotation))
                         for a in params)
        assert not takes_args or fn.name in ARGS_TAKERS, fn.name
        if fn.name not in ARGS_TAKERS:  # train() may call the run plumbing; the method never does
            used = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name)}
            assert not used & below, (fn.name, used & below)
    sources = [f for f in subprocess.run(["git", "ls-files", "*.py"], capture_output=True, text=True, cwd=HERE,
                                         check=True).stdout.split()] + ["examples/pendulum.py"]
    for name in set(sources):
        with open(os.path.join(HERE, name)) as f:
            assert "time" + "_kw" not in f.read(), name  # the untyped dict the sampler's settings once were


def test_the_pendulum_example_runs_from_the_copyable_core_alone():
    """examples/pendulum.py: MVP on a gymnasium task the project does not ship, from the core's names only; its
    last line is a JSON object of raw returns. A few hundred steps here (docs/results.md has 3k + 3k on 3 seeds)."""
    path = os.path.join(HERE, "examples", "pendulum.py")
    with open(path) as f:
        tree = ast.parse(f.read())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "mvp" in imported and not imported & {"run_utils", "prepare_ogbench", "prepare_robomimic", "export_onnx"}
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and getattr(n.value, "id", "") == "mvp"}
    assert used <= CORE_NAMES and {"new_learner", "train_step", "act", "ReplayBuffer"} <= used, used
    proc = subprocess.run([sys.executable, path, "--offline-steps", "200", "--online-steps", "200", "--seed", "1",
                           "--eval-episodes", "2"], capture_output=True, text=True, cwd=HERE, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert -1600 < result["random_return"] < -800  # uniform random torques: about -1,200
    assert all(-3300 < result[k] <= 0 for k in ("best_of_n_return", "policy_return"))  # raw, unscaled returns
    assert result["offline_steps"] == result["online_steps"] == 200
