"""MVP: the mean velocity policy, offline-to-online RL with one-step action generation.

MVP (Zhan et al., ICLR 2026) trains a network u(a_t, t, r | s) to predict the *mean* velocity of a
noise-to-action flow over an interval [t, r], so one call maps noise straight to an action chunk:
a = eps + u(eps, 0, 1 | s). The mean-flow identity gives u's training target; the instantaneous
velocity constraint (IVC) pins the boundary u(a, t, t) = v that the identity alone leaves free. The
policy only imitates; a Q-critic ensemble improves behaviour by picking the best of N one-step
candidates, offline on a dataset and then online.

Commands (README.md has them all, with their cost and result):
    python mvp.py --env cube-double    # the paper's protocol, OGBench's default task 2; it states its cost first
    python mvp.py --resume runs/<run>  # continue an interrupted (or finished) run
    python mvp.py --eval-only --checkpoint runs/<run>/checkpoint.pt

Time convention (the paper's, also flow-policy code's): noise at t = 0, action at t = 1.

Paper symbol -> code name
    s                    obs
    eps ~ N(0, I)        eps
    a(1), a1             a1: target action chunk, h actions flattened, dim A = h * action_dim
    a_t                  a_t = (1 - t) * eps + t * a1
    v = a1 - eps         v
    t <= r               t, r (shape (B, 1))
    u_theta(a_t, t, r|s) policy(obs, a_t, t, r)         class MeanVelocityNet
    du/dt                dudt, from one torch.func.jvp call with tangents (v, 1, 0)
    L_MF, L_IVC, lambda  mean_flow_loss, ivc_loss, hp.ivc_coef
    Q_k(s, a), K         critic(obs, a) -> (K, B)        class CriticEnsemble
    N, a*                hp.num_candidates, best_of_n(...), act(...) for one observation
    h, gamma, tau        hp.chunk_len, hp.discount, hp.tau (hp: class Hyperparams, the paper's defaults)

Copying the method into your own loop: everything above the fence runs without the command line's Args and
without run_utils.py: Hyperparams, new_learner, ReplayBuffer, train_step and act (examples/pendulum.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import prepare_ogbench  # OGBench's tasks, data and envs (these three files never import this one)
import prepare_robomimic  # robomimic's
from run_utils import (CUDAGraphed, KEEP_CHECKPOINTS, StopRequest, append_csv, calls_per_second, check_disk_space,
                       check_run_dir, cpu_has_bfloat16, dataclass_parser, eval_processes, load_state_dicts,
                       lock_run_dir, map_in_processes, new_run_dir, newest_checkpoint, out_of_memory, out_of_range,
                       pick_device, plan_line, read_checkpoint, release_run_dirs, rng_states, save_checkpoint,
                       seed_everything, set_rng_states, truncate_csv, write_json)  # they know nothing of MVP


# ================================================================================================
# Settings: the method's (Hyperparams), then the command line's (Args = the method's + how a run runs)
# ================================================================================================
def arg(default, help: str, choices=None, range: str | None = None, how: bool = False):
    """A dataclass field with its --help text, allowed values, range ("[1, inf)", "(0, 1]"; parse_args checks) and
    whether it says how a run runs rather than what it computes (how=True: a resumed run may change it)."""
    return field(default=default, metadata=dict(help=help, choices=choices, range=range, how=how))


@dataclass(frozen=True)
class TimeSampler:
    """How L_MF draws (t, r) with 0 <= t <= r <= 1 (sample_times) [choice: not given in the paper]."""
    kind: str = "uniform"  # uniform (two sorted draws) | logit_normal (MeanFlow's) | gap_uniform (r - t ~ U(0, 1))
    mu: float = -0.4  # logit-normal mean (MeanFlow's value)
    sigma: float = 1.0  # logit-normal std (MeanFlow's value)
    equal_frac: float = 0.0  # fraction of rows with r = t (MeanFlow's implicit boundary)
    one_step_frac: float = 0.0  # fraction of rows with (t, r) = (0, 1), the very map acting uses


@dataclass
class Hyperparams:
    """All the method's settings that new_learner, train_step and update read, with the paper's defaults; flags too."""
    policy: str = arg("mvp", "mvp (one-step mean flow) | flow (Q-chunking's flow matching)", ("mvp", "flow"))
    flow_steps: int = arg(10, "Euler steps of the flow baseline (10 = QC, 1 = its one-step variant)", range="[1, inf)")
    hidden_dim: int = arg(512, "width of actor and critic MLPs", range="[1, inf)")
    num_layers: int = arg(4, "hidden layers of actor and critic MLPs", range="[1, inf)")
    num_critics: int = arg(2, "critic ensemble size K", range="[1, inf)")
    lr: float = arg(3e-4, "Adam learning rate, actor and critic", range="(0, inf)")
    batch_size: int = arg(256, "minibatch size", range="[1, inf)")
    discount: float = arg(0.99, "gamma", range="(0, 1]")
    tau: float = arg(0.005, "Polyak rate of the target critic", range="(0, 1]")
    chunk_len: int = arg(5, "action chunk length h", range="[1, inf)")
    num_candidates: int = arg(32, "best-of-N candidates N", range="[1, inf)")
    ivc_coef: float = arg(1.0, "lambda on L_IVC; 0 is the paper's ablation", range="[0, inf)")
    # the fields of TimeSampler, as flags
    time_sampler: str = arg(TimeSampler.kind, "(t, r) sampler: uniform (two sorted draws) | logit_normal | "
                            "gap_uniform (r - t ~ U(0, 1)) [choice]", ("uniform", "logit_normal", "gap_uniform"))
    time_mu: float = arg(TimeSampler.mu, "logit-normal mean (MeanFlow's value)")
    time_sigma: float = arg(TimeSampler.sigma, "logit-normal std (MeanFlow's value)")
    equal_tr_frac: float = arg(TimeSampler.equal_frac, "fraction of L_MF rows with r = t (MeanFlow's implicit "
                               "boundary)", range="[0, 1]")
    one_step_frac: float = arg(TimeSampler.one_step_frac, "fraction of L_MF rows with (t, r) = (0, 1) [choice]",
                               range="[0, 1]")

    @property
    def times(self) -> TimeSampler:
        return TimeSampler(self.time_sampler, self.time_mu, self.time_sigma, self.equal_tr_frac, self.one_step_frac)


@dataclass
class Args(Hyperparams):
    """The command line: the method's settings (above), the protocol, data, logs, then how the run runs."""
    env: str = arg("cube-double", "OGBench task or alias (cube-double = task 2, cube-triple-task4), or lift|can|square")
    seed: int = arg(0, "seed for networks, sampling and environments (--eval-only: the run's, unless given)")
    # protocol [QC]
    offline_steps: int = arg(1_000_000, "offline gradient steps on the dataset", range="[0, inf)")
    online_steps: int = arg(1_000_000, "online environment steps (1 update per step)", range="[0, inf)")
    start_training: int = arg(5_000, "online updates begin at this env step [QC]", range="[0, inf)")
    imitation_target: str = arg("buffer", "online policy target: buffer chunks | best_of_n", ("buffer", "best_of_n"))
    # evaluation and logging
    eval_interval: int = arg(100_000, "evaluate every this many steps per phase (0: only at its end)", range="[0, inf)")
    eval_episodes: int = arg(50, "episodes per evaluation", range="[1, inf)")
    log_interval: int = arg(1_000, "write a CSV row every this many updates", range="[1, inf)")
    # data
    dataset_dir: str | None = arg(None, "dataset folder (default ~/.ogbench/data, ~/.robomimic) or robomimic .hdf5")
    generate_data: bool = arg(False, "OGBench: make the play data with OGBench's planner instead of downloading it")
    dataset_episodes: int | None = arg(None, "OGBench: episodes to generate (implies --generate-data); robomimic file: "
                                       "its first N demos (default: the public size; all)", range="[1, inf)")
    data_seed: int = arg(0, "seed of the generated dataset")
    data_workers: int = arg(0, "worker processes for generation (0: all cores)", range="[0, inf)")
    # output
    run_dir: str | None = arg(None, "output directory (default runs/<env>_s<seed>_<time>)")
    save_interval: int = arg(50_000, "resumable checkpoint every this many steps per phase and at its end (0: "
                             "none by steps)", range="[0, inf)")
    resume: str | None = arg(None, "continue the run in this directory from its newest good checkpoint")
    checkpoint: str | None = arg(None, "checkpoint to evaluate with --eval-only")
    eval_only: bool = arg(False, "only evaluate --checkpoint")
    # how the run runs: the same numbers (up to float rounding) whatever these are; a resumed run may change them
    device: str = arg("auto", "auto | cpu | cuda | cuda:N", how=True)
    threads: int = arg(0, "CPU threads for torch (0: torch's default); 1 on a busy machine", range="[0, inf)", how=True)
    cuda_graph: str = arg("auto", "updates and acting as CUDA graphs (auto: on CUDA)", ("auto", "on", "off"), how=True)
    compile: bool = arg(False, "torch.compile the training step: fused kernels (compiling takes minutes)", how=True)
    matmul_precision: str = arg("high", "CUDA matmuls: high (TF32, as JAX) | highest", ("high", "highest"), how=True)
    bon_block: int = arg(-1, "states per best-of-N block in the critic target (same result, less memory; "
                         "-1: 32 on CPU, all on CUDA; 0: all)", range="[-1, inf)", how=True)
    select_dtype: str = arg("float32", "bfloat16: the critic target's N candidates under bfloat16 autocast "
                            "(only fast where the hardware has bfloat16) [choice]", ("float32", "bfloat16"), how=True)
    eval_workers: int = arg(-1, "evaluation processes, each with a CPU copy of the networks (0: in this process; "
                            "-1: 0 on CPU, one per spare core up to 16 with CUDA)", range="[-1, inf)", how=True)
    save_minutes: float = arg(30.0, "also a checkpoint this many minutes after the last (0: never)",
                              range="[0, inf)", how=True)
    given: tuple = field(default=(), metadata=dict(help=None))  # the flags given on the command line (parse_args)


# ================================================================================================
# Networks
# ================================================================================================
def mlp(in_dim: int, hidden_dim: int, num_layers: int, out_dim: int) -> nn.Sequential:
    """num_layers hidden layers of width hidden_dim with GELU, then a linear head (the actor: no LayerNorm [QC])."""
    layers, d = [], in_dim
    for _ in range(num_layers):
        layers += [nn.Linear(d, hidden_dim), nn.GELU()]
        d = hidden_dim
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


class MeanVelocityNet(nn.Module):
    """u_theta(a_t, t, r | s): the mean velocity of the flow over [t, r] at point a_t, given state s.

    t and r enter as raw scalars next to s and a_t (as Flow Q-Learning feeds t). Every input is an
    explicit argument so torch.func.jvp can push tangents through (a_t, t, r) while s stays fixed.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, num_layers: int):
        super().__init__()
        self.act_dim = act_dim
        self.net = mlp(obs_dim + act_dim + 2, hidden_dim, num_layers, act_dim)

    def forward(self, obs, a_t, t, r):
        return self.net(torch.cat([obs, a_t, t, r], dim=-1))


class EnsembleLinear(nn.Module):
    """K independent linear layers applied as one batched matmul: (K, B, in) -> (K, B, out)."""

    def __init__(self, num_members: int, in_dim: int, out_dim: int):
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)  # nn.Linear's default init, per member
        self.weight = nn.Parameter(torch.empty(num_members, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_members, 1, out_dim).uniform_(-bound, bound))

    def forward(self, x):
        return torch.baddbmm(self.bias, x, self.weight)


class CriticEnsemble(nn.Module):
    """K critics Q_k(s, a), MLPs with GELU and LayerNorm [QC]; the ensemble is a leading axis (K, B)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, num_layers: int, num_members: int):
        super().__init__()
        self.num_members = num_members
        dims = [obs_dim + act_dim] + [hidden_dim] * num_layers
        self.layers = nn.ModuleList(EnsembleLinear(num_members, i, o) for i, o in zip(dims[:-1], dims[1:]))
        norm = [torch.ones(num_members, 1, hidden_dim), torch.zeros(num_members, 1, hidden_dim)]  # LayerNorm's affine
        self.norm_scale = nn.ParameterList(nn.Parameter(norm[0].clone()) for _ in range(num_layers))
        self.norm_shift = nn.ParameterList(nn.Parameter(norm[1].clone()) for _ in range(num_layers))
        self.head = EnsembleLinear(num_members, hidden_dim, 1)

    def forward(self, obs, a):
        x = torch.cat([obs, a], dim=-1).unsqueeze(0).expand(self.num_members, -1, -1)  # (K, B, in)
        for layer, scale, shift in zip(self.layers, self.norm_scale, self.norm_shift):
            x = F.gelu(layer(x))  # Dense -> GELU -> LayerNorm, as Flow Q-Learning's MLP
            # per-member affine (K, 1, hidden), fused into one kernel: separate mul and add cost the
            # critic about a fifth of its forward time on the 8192 best-of-N rows (CPU profile)
            x = torch.addcmul(shift, F.layer_norm(x, x.shape[-1:], eps=1e-6), scale)  # Flax's epsilon [QC]
        return self.head(x).squeeze(-1)  # (K, B)


# ================================================================================================
# Mean-flow maths: (t, r) sampler, L_MF with one JVP, L_IVC
# ================================================================================================
def sample_times(batch_size: int, times: TimeSampler, generator: torch.Generator,
                 device) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw (t, r) with 0 <= t <= r <= 1, each of shape (B, 1) [choice: not given in the paper].

    uniform and logit_normal (MeanFlow's) sort two draws, so r - t > 0.9 is a 1% event, yet acting uses
    r - t = 1; gap_uniform draws r - t ~ U(0, 1), then t ~ U(0, 1 - gap). r != t almost surely, so only
    L_IVC pins the boundary; equal_frac sets r = t on that fraction of rows (MeanFlow's implicit boundary),
    one_step_frac (t, r) = (0, 1), the very map a = eps + u(eps, 0, 1) that acting uses."""
    if times.kind == "uniform":
        x = torch.rand(batch_size, 2, generator=generator, device=device)
        t, r = x.min(dim=1).values, x.max(dim=1).values
    elif times.kind == "logit_normal":
        x = torch.sigmoid(times.mu + times.sigma * torch.randn(batch_size, 2, generator=generator, device=device))
        t, r = x.min(dim=1).values, x.max(dim=1).values
    else:  # gap_uniform
        x = torch.rand(batch_size, 2, generator=generator, device=device)
        t = (1 - x[:, 1]) * x[:, 0]
        r = (t + x[:, 1]).clamp(max=1.0)
    if times.equal_frac > 0:
        equal = torch.rand(batch_size, generator=generator, device=device) < times.equal_frac
        r = torch.where(equal, t, r)
    if times.one_step_frac > 0:
        one = torch.rand(batch_size, generator=generator, device=device) < times.one_step_frac
        t, r = torch.where(one, 0.0, t), torch.where(one, 1.0, r)
    return t[:, None], r[:, None]


def interpolate(eps, a1, t):
    """Linear path from noise (t = 0) to action (t = 1) and its conditional velocity."""
    a_t = (1 - t) * eps + t * a1  # Eq. a_t = (1 - t) eps + t a1
    v = a1 - eps  # Eq. v = da_t/dt
    return a_t, v


def mean_flow_target(policy, obs, a_t, v, t, r):
    """u and the stop-gradient mean-flow target u_tgt = v + (r - t) du/dt.

    du/dt = (du/da) v + du/dt|_a, with r held fixed, is the directional derivative of u along the
    tangent (v, 1, 0) in (a_t, t, r): one forward-mode call returns u and du/dt together. u keeps
    its graph to the parameters; the target is detached so no gradient flows through du/dt.
    """
    u, dudt = torch.func.jvp(lambda a_, t_, r_: policy(obs, a_, t_, r_),
                             (a_t, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    u_tgt = v + (r - t) * dudt  # Eq. mean-flow identity
    return u, u_tgt.detach()


def masked_mse(pred, target, valid, chunk_len: int):
    """Squared error averaged over chunk steps, with steps past an episode end masked [QC].

    pred, target: (B, h * action_dim); valid: (B, h)."""
    err = (pred - target).square().view(pred.shape[0], chunk_len, -1)  # (B, h, action_dim)
    return (err * valid[:, :, None]).mean()


def mean_flow_loss(policy, obs, a1, eps, t, r, valid, chunk_len: int):
    """L_MF = E || u_theta(a_t, t, r | s) - sg(u_tgt) ||^2. Returns (loss, u)."""
    a_t, v = interpolate(eps, a1, t)
    u, u_tgt = mean_flow_target(policy, obs, a_t, v, t, r)
    return masked_mse(u, u_tgt, valid, chunk_len), u  # Eq. L_MF


def ivc_loss(policy, obs, a1, eps, t, valid, chunk_len: int):
    """L_IVC = E || u_theta(a_t, t, t | s) - v ||^2: over an empty interval the mean velocity is the
    instantaneous one. Without it, u + C(a, r) / (r - t) also satisfies the mean-flow identity."""
    a_t, v = interpolate(eps, a1, t)
    return masked_mse(policy(obs, a_t, t, t), v, valid, chunk_len)  # Eq. L_IVC


def policy_loss(policy, obs, a1, valid, chunk_len: int, generator, ivc_coef: float = 1.0,
                times: TimeSampler = TimeSampler()):
    """L_policy = L_MF + lambda * L_IVC on target chunks a1 (B, A). Returns (loss, info)."""
    eps = torch.randn(a1.shape, generator=generator, device=a1.device)
    t, r = sample_times(a1.shape[0], times, generator, a1.device)
    l_mf, u = mean_flow_loss(policy, obs, a1, eps, t, r, valid, chunk_len)
    with torch.set_grad_enabled(torch.is_grad_enabled() and ivc_coef > 0):  # lambda = 0: logged, no backward pass
        l_ivc = ivc_loss(policy, obs, a1, eps, t, valid, chunk_len)
    loss = l_mf + ivc_coef * l_ivc  # Eq. L_policy
    return loss, dict(policy_loss=loss, mf_loss=l_mf, ivc_loss=l_ivc, u_norm=u.detach().norm(dim=-1).mean())


def flow_matching_loss(policy, obs, a1, valid, chunk_len: int, generator):
    """Baseline (Q-chunking's flow policy): L_FM = E || v_theta(a_t, t | s) - (a1 - eps) ||^2, t ~ U(0, 1).

    v_theta is the same network read at r = t, so L_FM is exactly L_IVC: the baselines differ from
    MVP only in this loss and in the sampler. mf_loss is logged as 0."""
    eps = torch.randn(a1.shape, generator=generator, device=a1.device)
    t = torch.rand(a1.shape[0], 1, generator=generator, device=a1.device)
    loss = ivc_loss(policy, obs, a1, eps, t, valid, chunk_len)  # Eq. L_FM
    return loss, dict(policy_loss=loss, mf_loss=torch.zeros_like(loss), ivc_loss=loss, u_norm=torch.zeros_like(loss))


# ================================================================================================
# Acting: one-step generation and best-of-N selection
# ================================================================================================
def one_step(policy, obs, eps):
    """a = clip(eps + u_theta(eps, 0, 1 | s), -1, 1): one network call from noise to action chunk."""
    zeros = torch.zeros(eps.shape[0], 1, device=eps.device)
    return (eps + policy(obs, eps, zeros, zeros + 1)).clamp(-1.0, 1.0)  # Eq. one-step sample


def euler_sample(policy, obs, eps, steps: int):
    """Baseline sampler: integrate da/dt = v_theta(a, t | s) from noise at t = 0 to t = 1 in `steps`
    Euler steps (one network call each), then clip, as Q-chunking does."""
    a, dt = eps, 1.0 / steps
    for k in range(steps):
        t = torch.full((eps.shape[0], 1), k * dt, device=eps.device)
        a = a + dt * policy(obs, a, t, t)  # Eq. Euler step
    return a.clamp(-1.0, 1.0)


@torch.no_grad()
def best_of_n(policy, critic, obs, num_candidates: int, generator=None, sample=one_step, block: int = 0):
    """Generate N candidates per state with `sample` (MVP: one_step) and keep a* = argmax_i mean_k Q_k(s, a_i).

    obs: (B, obs_dim) -> a*: (B, A), plus the candidates' Q values (B, N) for logging; A is policy.act_dim (an
    attribute of MeanVelocityNet: a policy network of your own needs it too). block > 0 scores
    `block` states at a time (the same result): on CPU, blocks of 32 states stay in cache where a 32 MiB
    (K, 8192, 512) activation is page-faulted back on every op (critic target 1.6x faster for MVP)."""
    if 0 < block < obs.shape[0]:
        parts = [best_of_n(policy, critic, o, num_candidates, generator, sample) for o in obs.split(block)]
        return torch.cat([a for a, _ in parts]), torch.cat([q for _, q in parts])
    B, N, A = obs.shape[0], num_candidates, policy.act_dim
    obs_rep = obs.repeat_interleave(N, dim=0)  # (B * N, obs_dim), row b * N + i is candidate i of state b
    eps = torch.randn(B * N, A, generator=generator, device=obs.device)
    cand = sample(policy, obs_rep, eps)  # (B * N, A)
    q = critic(obs_rep, cand).mean(dim=0).view(B, N)  # mean over K members [QC], then (B, N)
    best = q.argmax(dim=1)  # (B,)
    return cand.view(B, N, A)[torch.arange(B, device=obs.device), best], q


@torch.no_grad()
def act(learner: Learner, obs: np.ndarray, num_candidates: int, chunk_len: int, generator=None) -> np.ndarray:
    """The agent's step: best-of-N for one observation, as (h, action_dim) numpy rows to execute open loop."""
    obs_t = torch.as_tensor(np.asarray(obs, dtype=np.float32), device=next(learner.policy.parameters()).device)
    a, _ = best_of_n(learner.policy, learner.critic, obs_t[None], num_candidates, generator, learner.sample)
    return a.view(chunk_len, -1).cpu().numpy()  # CPU-GPU sync point: the env needs the action


# ================================================================================================
# RL losses: chunked critic target, critic loss, Polyak update
# ================================================================================================
def critic_target(policy, critic, target_critic, next_obs, reward_sum, mask, discount: float,
                  chunk_len: int, num_candidates: int, generator, sample=one_step, block: int = 0,
                  select_dtype=torch.float32):
    """y = sum_{i<h} gamma^i r_{k+i} + gamma^h * mask * mean_K Q_target(s_{k+h}, a*_{k+h}).

    select_dtype=torch.bfloat16 runs the selection (N candidates per state, most of an update's
    arithmetic) under autocast [choice]; a* is then valued in float32 like the rest."""
    with torch.autocast(next_obs.device.type, dtype=select_dtype, enabled=select_dtype != torch.float32):
        # a* selected with the online critic, valued with the target critic
        next_a, cand_q = best_of_n(policy, critic, next_obs, num_candidates, generator, sample, block)
    cand_q = cand_q.float()  # a* is float32 already: float32 noise plus a bfloat16 velocity
    next_q = target_critic(next_obs, next_a).mean(dim=0)  # (B,)
    y = reward_sum + discount ** chunk_len * mask * next_q  # Eq. chunked n-step target
    return y, cand_q


def critic_loss(critic, obs, actions, y, valid_last):
    """Squared TD error, averaged over members and batch, with invalid chunks masked. Returns (loss, info)."""
    q = critic(obs, actions)  # (K, B)
    loss = ((q - y).square() * valid_last).mean()
    return loss, dict(critic_loss=loss, q_mean=q.mean(), q_min=q.min(), q_max=q.max(), target_mean=y.mean())


@torch.no_grad()
def polyak(target: nn.Module, online: nn.Module, tau: float):
    """target <- (1 - tau) target + tau online, over all parameters in one multi-tensor kernel."""
    torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), tau)


# ================================================================================================
# Replay buffer: Q-chunking's chunk sampler is part of the RL target (n-step rewards, masks, s_{k+h})
# ================================================================================================
def clip_dataset_actions(actions: np.ndarray) -> np.ndarray:
    """[QC] clips dataset actions to +-(1 - 1e-5) on loading, every suite: recorded actions sit on the bounds."""
    return np.clip(actions, -1 + 1e-5, 1 - 1e-5)


class BufferDataError(ValueError):
    """What ReplayBuffer was given is not a table of transitions: the message names every bad key."""


class ReplayBuffer:
    """Flat transitions in one preallocated device tensor; offline data first, online steps appended.

    data: float arrays observations and next_observations (n, obs_dim), actions (n, action_dim) in [-1, 1],
    rewards, masks and terminals (n,). Chunks are h consecutive rows; 'terminals' marks each episode's last
    row, 'masks' is 0 where bootstrapping stops (success). Fields are column blocks of one tensor (an append is
    one copy) and the row count lives on the device, so sampling needs no host value and replays in a CUDA graph.
    clip_actions applies clip_dataset_actions (the protocol's, for a dataset; a buffer of other data is as given)."""

    FIELDS = (("obs", "observations"), ("actions", "actions"), ("rewards", "rewards"), ("masks", "masks"),
              ("terminals", "terminals"), ("next_obs", "next_observations"))

    def __init__(self, data: dict, capacity: int, device, clip_actions: bool = False):
        n = self.check(data)
        if clip_actions:
            data = dict(data, actions=clip_dataset_actions(data["actions"]))
        self.capacity, self.device = max(capacity, n), torch.device(device)
        arrays = [np.asarray(data[src], dtype=np.float32).reshape(n, -1) for _, src in self.FIELDS]
        widths = [a.shape[1] for a in arrays]
        self.rows = torch.zeros(self.capacity, sum(widths), device=self.device)
        self.rows[:n] = torch.as_tensor(np.concatenate(arrays, axis=1)).to(self.device)
        self.store, col = {}, 0
        for (key, src), w in zip(self.FIELDS, widths):
            view = self.rows[:, col:col + w]
            self.store[key] = view if np.ndim(data[src]) > 1 else view[:, 0]  # (capacity, dim) or (capacity,)
            col += w
        self.num_rows = torch.zeros((), dtype=torch.long, device=self.device)  # the row count, read by sample_chunks
        self.size = n

    @classmethod
    def check(cls, data: dict) -> int:
        """The number of rows, or one BufferDataError listing every key that is missing, mis-shaped or not finite."""
        n, problems = next((len(data[k]) for _, k in cls.FIELDS if k in data and np.ndim(data[k])), 0), []
        for _, key in cls.FIELDS:
            ndim = 1 if key in ("rewards", "masks", "terminals") else 2
            want = f"({n},)" if ndim == 1 else f"({n}, dim)"
            if key not in data:
                problems.append(f"{key} missing (want shape {want})")
                continue
            x = np.asarray(data[key])
            if x.ndim != ndim or len(x) != n or x.dtype.kind not in "biuf":
                problems.append(f"{key} has shape {x.shape} ({x.dtype}), want {want} (numbers)")
            elif not np.isfinite(x).all():
                bad = np.flatnonzero(~np.isfinite(x).reshape(n, -1).all(axis=1))
                problems.append(f"{key} has {len(bad)} rows with NaN or inf (first: row {bad[0]})")
        if problems:
            raise BufferDataError("ReplayBuffer data: " + "; ".join(problems))
        return n

    @property
    def size(self) -> int:
        return self._size

    @size.setter
    def size(self, n: int):
        self._size = n
        self.num_rows.fill_(n)  # a kernel launch, not a sync

    def add(self, obs, action, reward, mask, terminal, next_obs):
        if self.size >= self.capacity:
            raise RuntimeError("replay buffer full: capacity is dataset size + online steps")
        row = torch.from_numpy(np.concatenate([np.ravel(x) for x in (obs, action, reward, mask, terminal, next_obs)])
                               .astype(np.float32))
        if self.rows.is_cuda:  # pinned, so the copy is queued behind the running update instead of waiting for it
            row = row.pin_memory()
        self.rows[self.size].copy_(row, non_blocking=True)
        self.size += 1

    def sample_chunks(self, batch_size: int, chunk_len: int, discount: float, generator) -> dict:
        """Q-chunking's sequence sampler, on the device.

        valid[:, i] = 0 once an episode ended before step i; rewards after an end are not summed;
        mask is the min over valid steps; next_obs is s_{k+h}, or the state after the last valid step."""
        idx = uniform_index(batch_size, self.num_rows - chunk_len + 1, generator)  # start in [0, size - h]
        rows = idx[:, None] + torch.arange(chunk_len, device=self.device)  # (B, h)
        term = self.store["terminals"][rows]  # (B, h)
        ended = torch.cummax(term, dim=1).values  # ended[:, i] = 1 if an episode ended at or before step i
        valid = torch.cat([torch.ones_like(term[:, :1]), 1.0 - ended[:, :-1]], dim=1)  # (B, h)
        disc = discount ** torch.arange(chunk_len, device=self.device, dtype=torch.float32)  # (h,)
        reward_sum = (self.store["rewards"][rows] * disc * valid).sum(dim=1)  # Eq. sum_i gamma^i r_{k+i}
        mask = torch.where(valid > 0, self.store["masks"][rows], torch.ones_like(valid)).min(dim=1).values
        last = idx + valid.sum(dim=1).long() - 1  # last valid row of each chunk
        return dict(obs=self.store["obs"][idx],
                    actions=self.store["actions"][rows].reshape(batch_size, -1),  # (B, h * action_dim)
                    reward_sum=reward_sum, mask=mask, valid=valid, next_obs=self.store["next_obs"][last])


def uniform_index(batch_size: int, n: torch.Tensor, generator) -> torch.Tensor:
    """floor(m * n / 2^53) for m ~ U{0, ..., 2^53 - 1}: uniform in [0, n) for a count n on the device, in int64
    (no float64, which some accelerators lack). On CPU the same draws and rows as floor(torch.rand(float64) * n)."""
    m = torch.randint(0, 2 ** 53, (batch_size,), generator=generator, device=n.device)
    hi, lo = m >> 26, m & (2 ** 26 - 1)  # m * n needs 74 bits: split m so each product fits in 63
    return (hi * n + ((lo * n) >> 26)) >> 27


# ================================================================================================
# One update: a critic step and a policy step. The policy never sees a Q-gradient.
# ================================================================================================
@dataclass
class Learner:
    """The networks and optimizers one update touches, and the policy's loss and sampler (MVP's, or a
    flow baseline's), chosen once here so no loop ever branches on the method."""
    policy: MeanVelocityNet
    critic: CriticEnsemble
    target_critic: CriticEnsemble
    policy_opt: torch.optim.Optimizer
    critic_opt: torch.optim.Optimizer
    loss: Callable  # loss(policy, obs, a1, valid, chunk_len, generator) -> (loss, info)
    sample: Callable  # sample(policy, obs, eps) -> action chunks in [-1, 1]
    bon_block: int = 0  # states per best-of-N block in the critic target (the same result; 0: all at once)
    select_dtype: torch.dtype = torch.float32  # of the critic target's best-of-N selection


def new_learner(obs_dim: int, act_dim: int, hp: Hyperparams, device, bon_block: int = 0,
                select_dtype: torch.dtype = torch.float32) -> Learner:
    """Policy, critic ensemble and its target, Adam for both; act_dim is a chunk's size A = h * action_dim."""
    policy = MeanVelocityNet(obs_dim, act_dim, hp.hidden_dim, hp.num_layers).to(device)
    critic = CriticEnsemble(obs_dim, act_dim, hp.hidden_dim, hp.num_layers, hp.num_critics).to(device)
    target_critic = CriticEnsemble(obs_dim, act_dim, hp.hidden_dim, hp.num_layers, hp.num_critics).to(device)
    target_critic.load_state_dict(critic.state_dict())
    target_critic.requires_grad_(False)
    if hp.policy == "mvp":
        loss, sample = functools.partial(policy_loss, ivc_coef=hp.ivc_coef, times=hp.times), one_step
    else:
        loss, sample = flow_matching_loss, functools.partial(euler_sample, steps=hp.flow_steps)
    # fused Adam: one kernel over all parameters; on CPU the critic's step drops from about 7 to 1 ms
    opt = functools.partial(torch.optim.Adam, lr=hp.lr, fused=torch.device(device).type in ("cpu", "cuda"))
    return Learner(policy, critic, target_critic, opt(policy.parameters()), opt(critic.parameters()), loss, sample,
                   bon_block, select_dtype)


def update(learner: Learner, batch: dict, a1, valid_a1, hp: Hyperparams, generator) -> dict:
    """One gradient step on the critic and one on the policy; returns device tensors (no sync)."""
    y, cand_q = critic_target(learner.policy, learner.critic, learner.target_critic, batch["next_obs"],
                              batch["reward_sum"], batch["mask"], hp.discount, hp.chunk_len,
                              hp.num_candidates, generator, learner.sample, learner.bon_block, learner.select_dtype)
    c_loss, c_info = critic_loss(learner.critic, batch["obs"], batch["actions"], y, batch["valid"][:, -1])
    learner.critic_opt.zero_grad(set_to_none=True)
    c_loss.backward()
    learner.critic_opt.step()
    polyak(learner.target_critic, learner.critic, hp.tau)

    p_loss, p_info = learner.loss(learner.policy, batch["obs"], a1, valid_a1, hp.chunk_len, generator)
    learner.policy_opt.zero_grad(set_to_none=True)
    p_loss.backward()
    learner.policy_opt.step()
    # how much selection buys over an average candidate, in Q units
    bon_gain = (cand_q.max(dim=1).values - cand_q.mean(dim=1)).mean()
    return {k: v.detach() for k, v in {**c_info, **p_info, "bon_gain": bon_gain}.items()}


def buffer_target(learner: Learner, batch: dict, hp: Hyperparams, generator):
    """Imitate the chunks stored in the buffer (offline data + executed a*), masked past episode ends."""
    return batch["actions"], batch["valid"]


def best_of_n_target(learner: Learner, batch: dict, hp: Hyperparams, generator):
    """Imitate a* recomputed on the batch's states from the current policy and critic (paper appendix)."""
    a_star, _ = best_of_n(learner.policy, learner.critic, batch["obs"], hp.num_candidates, generator,
                          learner.sample, learner.bon_block)
    return a_star, torch.ones_like(batch["valid"])


def train_step(learner: Learner, buffer: ReplayBuffer, imitation: Callable, hp: Hyperparams, generator) -> dict:
    """Sample chunks from the replay buffer, pick what the policy imitates (buffer_target or best_of_n_target),
    update. Its inputs all live on the device, so with CUDA it can be replayed as one graph (make_train_step)."""
    batch = buffer.sample_chunks(hp.batch_size, hp.chunk_len, hp.discount, generator)
    a1, valid_a1 = imitation(learner, batch, hp, generator)
    return update(learner, batch, a1, valid_a1, hp, generator)


# ================================================================================================
# Training: an offline loop on the dataset, the replay-buffer hand-off, an online loop. Every *when*
# (log, evaluate, save) is written here; *how* (files, progress bars, signals, resume) is Run's.
# ================================================================================================
def due(step: int, interval: int, total: int) -> bool:  # every `interval` steps (0: never) and at the last
    return bool(interval and step % interval == 0) or step == total


def train(args: Args, resume: dict | None = None) -> dict:
    """Offline phase, replay-buffer hand-off, online phase. `resume` is a checkpoint from --resume."""
    run = Run(args, resume)  # device, seeds, dataset, envs, learner, replay buffer, logs (a resumed run's state)
    learner, buffer, env, gen, hp = run.learner, run.buffer, run.env, run.gen, run.hp

    # ---- offline: behaviour-clone the dataset's chunks by mean flow, learn Q, select best-of-N ----
    step_fn = make_train_step(learner, buffer, buffer_target, hp, gen, args.compile, run.cuda_graph)  # train_step
    for step in run.phase("offline", args.offline_steps):  # after each step: stop (and save) if asked
        info = step_fn()
        run.watch(step, info)  # non-finite losses are caught on the device, reported at the next log
        if due(step, args.log_interval, args.offline_steps):
            run.log(step, info)
        if due(step, args.eval_interval, args.offline_steps):
            run.evaluate(step)
        if run.time_to_save(step, args.offline_steps):
            run.save()
    del step_fn  # frees a recorded CUDA graph's memory before the online one is recorded

    # ---- hand-off: the replay buffer already holds the offline data; online rows are appended ----
    imitation = best_of_n_target if args.imitation_target == "best_of_n" else buffer_target
    step_fn = make_train_step(learner, buffer, imitation, hp, gen, args.compile, run.cuda_graph)
    # obs is None between episodes: the env is reset lazily, so a checkpoint there needs only the env's RNG
    obs = env.reset(seed=args.seed)[0] if run.pos["online"] == 0 else None
    queue, ep_return, ep_len, save_due = [], 0.0, 0, False
    for step in run.phase("online", args.online_steps):
        if obs is None:
            obs, _ = env.reset()
        if not queue:  # a new chunk every h steps, executed open loop
            queue = list(run.act(obs, args.num_candidates, args.chunk_len, gen))  # act(), or its CUDA graph
        action = queue.pop(0)
        next_obs, reward, terminated, truncated, info = env.step(action)
        buffer.add(obs, action, reward, 1.0 - float(terminated), float(terminated or truncated), next_obs)
        obs, ep_return, ep_len = next_obs, ep_return + float(reward), ep_len + 1
        if terminated or truncated:
            run.episode_end(ep_return, ep_len, float(info.get("success", 0.0)))
            obs, queue, ep_return, ep_len = None, [], 0.0, 0
        if step >= args.start_training:  # [QC] the first update comes at env step start_training
            info = step_fn()
            run.watch(step, info)
            if due(step, args.log_interval, args.online_steps):
                run.log(step, info)
        if due(step, args.eval_interval, args.online_steps):
            run.evaluate(step)
        save_due = save_due or run.time_to_save(step, args.online_steps)
        if obs is not None and (run.stopping or (save_due and step == args.online_steps)):
            buffer.store["terminals"][buffer.size - 1] = 1.0  # cut mid-episode: it ends here, as at a time limit
            obs, queue, ep_return, ep_len = None, [], 0.0, 0
        if save_due and obs is None:  # checkpoints wait for an episode's end, so a resumed run is exact
            run.save()
            save_due = False
    return run.finish()  # the final checkpoint.pt and summary.json


# ================================================================================================
# =====================================  PLUMBING  ===============================================
# Tasks, evaluation, a training run's logs, checkpoints and resume: safe to skip. Nothing below
# changes the algorithm. Each benchmark suite's details live in prepare_ogbench.py and
# prepare_robomimic.py; what knows nothing of MVP (CUDA graphs, checkpoint files, signals) in run_utils.py.
# ================================================================================================
# ---- the command line: Args -> flags, values checked before anything runs --------------------------------------
def build_parser() -> argparse.ArgumentParser:
    return dataclass_parser(Args, "MVP: mean velocity policy (offline-to-online RL).", dict(
        Args="the run", Hyperparams="the method (Hyperparams)", how="how it runs (same numbers; a resume may change)"))


def parse_args(argv=None) -> Args:
    """Parse the command line, then check every value's range and the combinations argparse cannot."""
    parser, argv = build_parser(), sys.argv[1:] if argv is None else argv
    args = Args(**vars(parser.parse_args(argv)))
    args.given = tuple(sorted({a.split("=")[0][2:].replace("-", "_") for a in argv if a.startswith("--")}))
    problems = out_of_range(args)
    for name in ("threads", "data_workers", "eval_workers"):  # beyond the cores only slows a run (or fails to fork)
        if getattr(args, name) > (os.cpu_count() or 1):
            problems.append(f"--{name.replace('_', '-')} {getattr(args, name)} is more than this machine's "
                            f"{os.cpu_count()} cores")
    if args.device not in ("auto", "cpu", "cuda") and not args.device.startswith("cuda:"):
        problems.append(f"--device must be auto, cpu or cuda (got {args.device!r})")
    if args.cuda_graph == "on" and (args.device == "cpu" or not torch.cuda.is_available()):
        problems.append("--cuda-graph on needs a CUDA device; use --cuda-graph auto (graphs only on CUDA) or off")
    if args.eval_only and not args.checkpoint:
        problems.append("--eval-only needs --checkpoint PATH")
    if not args.eval_only:
        try:
            resolve_env_name(args.env)
        except ValueError as e:
            problems.append(str(e))
    if problems:
        parser.error("; ".join(problems))
    return args


# ---- tasks: each benchmark suite's names, dataset reader and environments live in its own file ------------
DATA_ERRORS = (prepare_ogbench.DataError, prepare_robomimic.DataError, BufferDataError)  # missing, corrupt, mismatched


def resolve_env_name(name: str) -> str:
    """A robomimic task (lift, can, square), or an OGBench alias or full name -> OGBench's full name."""
    if name in prepare_robomimic.ROBOMIMIC_TASKS:
        return name
    if full := prepare_ogbench.resolve_env_name(name):
        return full
    raise ValueError(f"unknown --env {name!r}. Accepted: {', '.join(prepare_ogbench.TASK_ALIASES)}, "
                     f"{', '.join(prepare_robomimic.ROBOMIMIC_TASKS)}, or full OGBench names "
                     f"cube-{{{','.join(prepare_ogbench.CUBES)}}}-play-singletask[-task{{1..5}}]-v0")


def load_task(env_name: str, args: Args):
    """(dataset, make_env, source file) of a resolved task name, the one place that knows a task's suite; make_env()
    gives a new env with info["success"] (OGBench's first: the one that relabelled the dataset; builds cost seconds)."""
    if env_name in prepare_robomimic.ROBOMIMIC_TASKS:
        dataset, new_env = prepare_robomimic.load_robomimic(env_name, args.dataset_dir, args.dataset_episodes,
                                                            check_env=True, generate=args.generate_data)
        return dataset, new_env, new_env.dataset_path
    data_dir = prepare_ogbench.find_dataset(env_name, args.dataset_dir, args.generate_data or args.dataset_episodes,
                                            args.dataset_episodes, args.data_seed, args.data_workers)
    built = [prepare_ogbench.make_env(env_name)]
    dataset = prepare_ogbench.load_dataset(env_name, data_dir, built[0])
    source = os.path.join(data_dir, prepare_ogbench.dataset_name(env_name) + ".npz")
    return dataset, lambda: built.pop() if built else prepare_ogbench.make_env(env_name), source


def env_from_checkpoint(ckpt: dict):
    """The evaluation env of a saved policy: OGBench by name, robomimic from the env_args it was trained in."""
    if task := prepare_robomimic.ROBOMIMIC_TASKS.get(name := ckpt["env_name"]):
        return prepare_robomimic.RobomimicEnv(json.loads(ckpt["env_args"]), task["max_episode_steps"],
                                              source=f"checkpoint of {name}")
    return prepare_ogbench.make_env(name)


# ---- from the command line to the method, and the speed machinery that wraps it -------------------------------
def hyperparams(args: Args) -> Hyperparams:  # the method's settings out of the command line's
    return Hyperparams(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Hyperparams)})


def use_cuda_graph(args: Args, device: torch.device) -> bool:
    """--cuda-graph auto: graphs wherever the device is CUDA (parse_args refuses `on` without CUDA)."""
    return device.type == "cuda" and args.cuda_graph != "off"


def make_learner(obs_dim: int, act_dim: int, args: Args, device) -> Learner:
    """new_learner with the command line's settings; --bon-block -1 is 32 on CPU (cache-sized blocks), else all."""
    device = torch.device(device)
    bon_block = args.bon_block if args.bon_block >= 0 else (32 if device.type == "cpu" else 0)
    learner = new_learner(obs_dim, act_dim, hyperparams(args), device, bon_block, getattr(torch, args.select_dtype))
    set_capturable(learner, use_cuda_graph(args, device))
    return learner


def set_capturable(learner: Learner, on: bool):
    """Adam's step count stays on the GPU, so an optimizer step can be recorded in a CUDA graph."""
    for group in learner.policy_opt.param_groups + learner.critic_opt.param_groups:
        group["capturable"] = on


def make_train_step(learner: Learner, buffer: ReplayBuffer, imitation: Callable, hp: Hyperparams, generator,
                    compile: bool = False, cuda_graph: bool = False) -> Callable[[], dict]:
    """train_step as a function of nothing, torch.compile'd (fuses elementwise work; the first call compiles,
    graph breaks at backward are fine) and/or recorded once and replayed as one CUDA graph (run_utils.CUDAGraphed)."""
    step = functools.partial(train_step, learner, buffer, imitation, hp, generator)
    step = torch.compile(step) if compile else step
    return CUDAGraphed(step, generator) if cuda_graph else step


class Actor:
    """act() for one observation as a run does it: eagerly, or with CUDA graphs one graph recorded per (N, generator)
    and replayed; it holds the evaluation's candidate noise generator, reseeded from each episode's seed."""

    def __init__(self, learner: Learner, device: torch.device, cuda_graph: bool = False):
        self.learner, self.device, self.cuda_graph, self.graphs = learner, device, cuda_graph, {}
        self.eval_generator = torch.Generator(device)

    def __call__(self, obs: np.ndarray, num_candidates: int, chunk_len: int, generator) -> np.ndarray:
        if not self.cuda_graph:
            return act(self.learner, obs, num_candidates, chunk_len, generator)
        obs_t, learner = torch.from_numpy(np.asarray(obs, dtype=np.float32))[None], self.learner
        key = (num_candidates, id(generator))
        if key not in self.graphs:  # best_of_n on a fixed input tensor: copy the observation in, replay
            obs_in = torch.zeros(obs_t.shape, device=self.device)
            self.graphs[key] = obs_in, CUDAGraphed(lambda: best_of_n(learner.policy, learner.critic, obs_in,
                                                                     num_candidates, generator, learner.sample)[0],
                                                   generator, warmup=1)
        obs_in, replay = self.graphs[key]
        obs_in.copy_(obs_t.pin_memory(), non_blocking=True)
        return replay().view(chunk_len, -1).cpu().numpy()  # CPU-GPU sync point: the env needs the action


# ---- evaluation ----------------------------------------------------------------------------------
@torch.no_grad()
def run_episode(actor: Actor, env, seed: int, num_candidates: int, chunk_len: int, discount: float,
                generator) -> dict:
    """One episode, chunks open loop, as eval.csv columns: success, return, length, q0 = mean_K Q_k(s_0, a*_0) beside
    the discounted return it estimates, the fraction of steps OGBench's gripper touches something (robomimic: NaN)."""
    obs, _ = env.reset(seed=seed)
    queue, rewards, contact, info, done, q0 = [], [], [], {}, False, None
    while not done:
        if not queue:
            queue = list(actor(obs, num_candidates, chunk_len, generator))
            if q0 is None:  # one extra critic call per episode, on the chunk the env will run
                s0 = torch.as_tensor(obs, dtype=torch.float32, device=actor.device)[None]
                a0 = torch.as_tensor(np.stack(queue), dtype=torch.float32, device=actor.device).reshape(1, -1)
                q0 = actor.learner.critic(s0, a0).mean().item()  # mean over K members; sync point, once per episode
        obs, reward, terminated, truncated, info = env.step(queue.pop(0))
        done = terminated or truncated
        rewards.append(float(reward))
        if "proprio/gripper_contact" in info:  # OGBench's pad contact: 0 or about 1
            contact.append(float(np.mean(info["proprio/gripper_contact"])))
    return dict(success_rate=float(info.get("success", 0.0)), return_mean=float(np.sum(rewards)),
                length_mean=len(rewards), q0_mean=q0,  # Eq. sum_k gamma^k r_k below, exactly rounded (a BLAS dot's
                disc_return_mean=math.fsum(discount ** k * r for k, r in enumerate(rewards)),  # last bit varies)
                contact_frac=float(np.mean(contact)) if contact else float("nan"))


def evaluate(actor: Actor, env, episodes: int, num_candidates: int, chunk_len: int, discount: float,
             seed: int, desc: str = "eval", workers: int = 0, args: Args | None = None, task: dict | None = None):
    """run_episode's means for best-of-N and, on the same env seeds, for N = 1 (columns bc_); candidate noise seeded
    per episode. workers > 0: in processes with CPU float32 copies of the networks (learner from args, env from
    task), the numbers of a CPU run (a CUDA run's in-process episodes differ: CUDA random numbers, TF32)."""
    from tqdm import tqdm
    jobs = [(n, seed + ep, chunk_len, discount) for n in (num_candidates, 1) for ep in range(episodes)]
    if workers := eval_processes(workers, actor.device):
        nets = {k: {n: v.detach().cpu() for n, v in getattr(actor.learner, k).state_dict().items()}
                for k in ("policy", "critic")}
        eps = map_in_processes(_eval_episode, jobs, workers, _init_eval_worker,
                               (task, dataclasses.asdict(args), nets), desc)
    else:
        eps = [run_episode(actor, env, s, n, h, g, actor.eval_generator.manual_seed(s))
               for n, s, h, g in tqdm(jobs, desc=f"{desc} N={num_candidates}, then N=1", leave=False,
                                      dynamic_ncols=True)]
    return {prefix + k: float(np.mean([e[k] for e in eps[i:i + episodes]]))
            for i, prefix in ((0, ""), (episodes, "bc_")) for k in eps[0]}


_eval_worker = {}


def _init_eval_worker(task: dict, args: dict, nets: dict):
    torch.set_num_threads(1)
    cpu_args = Args(**{**args, "cuda_graph": "off"})
    learner = make_learner(task["obs_dim"], task["action_dim"] * cpu_args.chunk_len, cpu_args, torch.device("cpu"))
    load_state_dicts({k: getattr(learner, k) for k in nets}, nets, "the evaluated networks")
    _eval_worker.update(actor=Actor(learner, torch.device("cpu")), env=env_from_checkpoint(task))


def _eval_episode(job) -> dict:
    (n, seed, chunk_len, discount), actor = job, _eval_worker["actor"]
    return run_episode(actor, _eval_worker["env"], seed, n, chunk_len, discount, actor.eval_generator.manual_seed(seed))


# ---- what a checkpoint holds (its file handling is run_utils.py's) ----------------------------------
NETWORK_FLAGS = {"policy", "flow_steps", "hidden_dim", "num_layers", "num_critics", "chunk_len"}
# where and how the same computation runs: a resumed run may change them (--eval-only takes today's)
HOW_FLAGS = {f.name for f in dataclasses.fields(Args) if f.metadata.get("how")}
LEARNER_STATE = ("policy", "critic", "target_critic", "policy_opt", "critic_opt")
RUN_STATE = ("args", "env_name", "obs_dim", "action_dim", "env_args", "device_type", "dataset", *LEARNER_STATE, "pos",
             "evals", "segments", "rng", "buffer_rows", "env_rng")  # what every checkpoint of Run.save holds


def checkpoint_state(learner: Learner, args: Args, task: dict, **run) -> dict:
    """Networks, optimizers, args, task (weights_only-loadable), plus what a run needs to resume exactly."""
    nets = {k: getattr(learner, k).state_dict() for k in LEARNER_STATE}
    return dict(args=dataclasses.asdict(args), **task, **nets, **run)


def load_learner(learner: Learner, state: dict, cuda_graph: bool):
    load_state_dicts({k: getattr(learner, k) for k in LEARNER_STATE}, state, "the checkpoint")
    set_capturable(learner, cuda_graph)  # load_state_dict restores the saved run's setting


CPU_RECIPE = ("python mvp.py --env cube-single-task1 --seed 4 --hidden-dim 256 --num-layers 2 --dataset-episodes 150 "
              "--offline-steps 15000 --online-steps 15000 --eval-interval 5000 --eval-episodes 50 --threads 1")


def say_plan(env_name: str, args: Args, device: torch.device, pos: dict):
    """The run's cost before any of it is spent: the data to make, and the updates left, timed on a few updates of
    this run's sizes here (zero rows, eager: CUDA graphs and --compile run faster). Draws from no seeded stream."""
    data = None if env_name in prepare_robomimic.ROBOMIMIC_TASKS else prepare_ogbench.generation_plan(
        env_name, args.dataset_dir, args.generate_data or args.dataset_episodes, args.dataset_episodes,
        args.data_seed, args.data_workers)
    def rate() -> float:  # updates/s of these sizes here, on zero rows (plan_line times only long runs)
        n, obs_dim, action_dim, gen = 4 * args.batch_size + args.chunk_len, 40, 5, torch.Generator(device)
        buffer = ReplayBuffer(dict(observations=np.zeros((n, obs_dim)), actions=np.zeros((n, action_dim)),
                                   rewards=np.zeros(n), masks=np.ones(n), terminals=np.zeros(n),
                                   next_observations=np.zeros((n, obs_dim))), n, device)
        learner, hp = make_learner(obs_dim, action_dim * args.chunk_len, args, device), hyperparams(args)
        return calls_per_second(lambda: train_step(learner, buffer, buffer_target, hp, gen)["q_mean"])
    online = args.online_steps - max(pos["online"], args.start_training - 1)  # online updates begin at start_training
    plan_line(f"{env_name} on {device}, {args.num_layers}x{args.hidden_dim}, batch {args.batch_size}, "
              f"N = {args.num_candidates}", data, args.offline_steps - pos["offline"] + max(0, online), rate,
              f"to see MVP learn on this machine first, the README's CPU recipe takes about an hour and a half: "
              f"{CPU_RECIPE}")


# ---- a training run: what train() delegates --------------------------------------------------------
class Run:
    """Everything of a training run besides the method: device, seeds, data, envs, run folder, logs, evaluation,
    checkpoints, resume; on Ctrl-C, SIGTERM or a failed evaluation it saves, then exits or re-raises."""

    def __init__(self, args: Args, resume: dict | None):
        self.args, self.device = args, pick_device(args.device, args.threads, args.matmul_precision)
        if args.select_dtype == "bfloat16" and self.device.type == "cpu" and not cpu_has_bfloat16():
            raise SystemExit("error: --select-dtype bfloat16 needs a CPU with native bfloat16 (AVX512-BF16 or AMX); "
                             "on this one it runs emulated, about 25x slower than float32. Use --select-dtype float32")
        env_name = resolve_env_name(args.env)
        # the default folder is made exclusively: a run started in the same second gets -2, -3, ...
        self.dir = args.run_dir or new_run_dir(f"runs/{args.env}_s{args.seed}_{time.strftime('%Y%m%d-%H%M%S')}")
        created = check_run_dir(self.dir, fresh=resume is None) if args.run_dir else self.dir  # gone if stopped early
        print(f"[mvp] {env_name} on {self.device}, run dir {self.dir}")
        try:  # the plan before the data is made (or found); then the run's own random streams
            say_plan(env_name, args, self.device, resume["pos"] if resume else dict(offline=0, online=0))
            self.gen = seed_everything(args.seed, self.device)
            dataset, new_env, source = load_task(env_name, args)
        except BaseException:  # no data (or Ctrl-C while making it): no stub run directory is left behind
            if created:
                shutil.rmtree(created, ignore_errors=True)
            raise
        crc = zlib.crc32(dataset["actions"].tobytes())  # of the file's actions, before the buffer clips them
        n = len(dataset["observations"])
        if args.chunk_len > n:  # the chunk sampler would index before the first row
            raise SystemExit(f"error: --chunk-len {args.chunk_len} is longer than the dataset ({n} rows); lower "
                             f"--chunk-len or use more --dataset-episodes")
        self.env, self.eval_env = new_env(), new_env()
        (obs_dim,), (action_dim,) = self.env.observation_space.shape, self.env.action_space.shape
        self.task = dict(env_name=env_name, obs_dim=obs_dim, action_dim=action_dim,  # what --eval-only needs
                         env_args=json.dumps(getattr(new_env, "env_args", None)), device_type=self.device.type,
                         dataset=dict(source=source, rows=n, crc32=crc))
        self.hp, self.cuda_graph = hyperparams(args), use_cuda_graph(args, self.device)
        self.learner = make_learner(obs_dim, action_dim * args.chunk_len, args, self.device)
        self.act = Actor(self.learner, self.device, self.cuda_graph)
        self.buffer, self.dataset_rows = ReplayBuffer(dataset, n + args.online_steps, self.device, clip_actions=True), n
        # a checkpoint in float32: policy and critic with Adam's two moments, the target critic, the online rows
        nets = [3 * p.numel() for m in (self.learner.policy, self.learner.critic) for p in m.parameters()]
        nets += [p.numel() for p in self.learner.target_critic.parameters()]
        check_disk_space(self.dir, 4 * (sum(nets) + args.online_steps * (2 * obs_dim + action_dim + 3)))
        self.pos = dict(offline=0, online=0, episodes=0, last_ep=dict(episode=0, episode_return=float("nan"),
                                                                       episode_length=0, episode_success=float("nan")))
        self.evals, self.rates, self.failure = [], {}, None
        self.first_bad = torch.full((), -1, dtype=torch.long, device=self.device)  # first non-finite update
        self.segments = list(resume.get("segments", [])) if resume else []  # how each stretch ran (HOW_FLAGS)
        if resume is not None:
            self.restore(resume)
        self.segments.append(dict(from_offline_step=self.pos["offline"], from_online_step=self.pos["online"],
                                  torch=str(torch.__version__), **{k: getattr(args, k) for k in sorted(HOW_FLAGS)}))
        # rewritten on --resume: phases may have grown
        write_json(os.path.join(self.dir, "args.json"), dict(dataclasses.asdict(args), segments=self.segments))
        self.stop, self.saved_at = StopRequest(), time.time()  # Ctrl-C, SIGTERM: save after this step, then exit

    def restore(self, state: dict):
        """Load a checkpoint into this freshly built run, once it is known to be the same task, data and device."""
        for key, what in (("obs_dim", "observation size"), ("action_dim", "action size"), ("device_type", "device "
                          f"type (random streams cannot move between devices; resume with --device "
                          f"{state.get('device_type')})"), ("dataset", "dataset (rows, checksum of the actions; put "
                          "the run's data back where it was found)")):
            if state[key] != self.task[key]:
                raise SystemExit(f"error: the checkpoint in {self.dir} differs from this run in its {what}: "
                                 f"{state[key]} there, {self.task[key]} here")
        load_learner(self.learner, state, self.cuda_graph)
        set_rng_states(state["rng"], self.gen, self.device)
        self.env.unwrapped.np_random = np.random.Generator(np.random.PCG64())
        self.env.unwrapped.np_random.bit_generator.state = state["env_rng"]
        rows, size = state["buffer_rows"], self.buffer.size
        for k, v in rows.items():
            self.buffer.store[k][size:size + len(v)] = v.to(self.device)
        self.buffer.size = size + len(rows["obs"])
        # a resumed run starts a new episode: the saved one (or the dataset's last) ends at its last row, however late
        self.buffer.store["terminals"][self.buffer.size - 1] = 1.0
        self.pos, self.evals = state["pos"], list(state["evals"])
        for phase in ("offline", "online"):
            truncate_csv(os.path.join(self.dir, f"{phase}.csv"), lambda r: int(r["step"]) <= self.pos[phase])
        kept = {(str(e["step"]), e["phase"]) for e in self.evals}
        truncate_csv(os.path.join(self.dir, "eval.csv"), lambda r: (r["step"], r["phase"]) in kept)
        print(f"[mvp] resumed at offline step {self.pos['offline']}, online step {self.pos['online']}")

    def phase(self, name: str, total: int):
        """Yields a phase's steps pos[name] + 1 .. total with a progress bar; after each, saves and stops if asked."""
        from tqdm import tqdm
        start, self.name = self.pos[name], name
        self.bar = tqdm(range(start + 1, total + 1), desc=name, unit="upd" if name == "offline" else "step",
                        dynamic_ncols=True, initial=start, total=total, disable=total <= start)  # none if done
        self.tick = began = time.time()
        self.eval_seconds, self.updates, self.tick_step = 0.0, 0, start
        if self.pos.get("failed_eval") == name:  # a run resumed after a failed evaluation first runs it again
            self.evaluate(start)
            self.stop_if_asked()
        for step in self.bar:
            self.pos[name], self.step_began = step, time.time()
            yield step
            self.stop_if_asked()
            if step == start + 200:  # the whole run's time at this speed, said within the first minutes
                rate = 200 / max(time.time() - began - self.eval_seconds, 1e-9)
                left = total - step + (self.args.online_steps if name == "offline" else 0)
                self.bar.write(f"[mvp] {rate:.1f} steps/s in the {name} phase: about {left / rate / 3600:.1f} h of "
                               f"training left at this speed (evaluations not included)")
        self.bar.close()
        # steps per second in this process, evaluations excluded; None where a --resume found the phase done
        seconds = max(time.time() - began - self.eval_seconds, 1e-9)
        self.rates[name] = round((total - start) / seconds, 2) if total > start else None

    def watch(self, step: int, info: dict):
        """Notes the first update with a non-finite loss, on the device (no sync); log() reports it."""
        bad = ~torch.isfinite(torch.stack([info["critic_loss"], info["mf_loss"], info["ivc_loss"]])).all()
        self.first_bad = torch.where(bad & (self.first_bad < 0), torch.full_like(self.first_bad, step), self.first_bad)
        if self.updates == 0 and step - 1 > self.tick_step:  # the first update after steps without any (online, before
            self.tick, self.tick_step = self.step_began, step - 1  # start_training): a log row's rates start here
        self.updates += 1

    def log(self, step: int, info: dict):
        if self.first_bad.item() >= 0:  # sync point, only at log time
            terms = ", ".join(f"{k}={float(info[k]):.4g}" for k in ("critic_loss", "mf_loss", "ivc_loss"))
            raise SystemExit(f"error: non-finite loss in the {self.name} phase, first at update "
                             f"{self.first_bad.item()} (latest: {terms}). Try a lower --lr, or check the dataset for "
                             f"NaN/inf values.")
        seconds, row = time.time() - self.tick, {k: round(float(v), 6) for k, v in info.items()}  # .item() here only
        row["updates_per_s"] = round(self.updates / seconds, 2)
        if self.name == "online":
            row.update(env_steps_per_s=round((step - self.tick_step) / seconds, 2), **self.pos["last_ep"])
        append_csv(os.path.join(self.dir, f"{self.name}.csv"), {"step": step, **row})
        self.tick, self.updates, self.tick_step = time.time(), 0, step

    def episode_end(self, ep_return: float, ep_len: int, success: float):
        self.pos["episodes"] += 1
        self.pos["last_ep"] = dict(episode=self.pos["episodes"], episode_return=ep_return, episode_length=ep_len,
                                   episode_success=success)

    def evaluate(self, step: int):
        args, start = self.args, time.time()
        try:
            res = evaluate(self.act, self.eval_env, args.eval_episodes, args.num_candidates, args.chunk_len,
                           args.discount, seed=10_000 * (args.seed + 1), desc=f"eval {self.name} {step}",
                           workers=args.eval_workers, args=args, task=self.task)
        except Exception as e:  # the run saves (pos records the evaluation to redo), then raises e
            self.failure, self.pos["failed_eval"] = e, self.name
            return
        self.pos.pop("failed_eval", None)
        self.evals.append(dict(phase=self.name, step=step, **res))
        append_csv(os.path.join(self.dir, "eval.csv"), self.evals[-1])
        self.bar.set_postfix(success=f"{res['success_rate']:.2f}", refresh=True)
        self.bar.write(f"[eval] {self.name} step {step}: success {res['success_rate']:.3f} (N = 1: "
                       f"{res['bc_success_rate']:.3f}), return {res['return_mean']:.1f} (N = 1: "
                       f"{res['bc_return_mean']:.1f}), Q(s0, a*) {res['q0_mean']:.2f} vs discounted return "
                       f"{res['disc_return_mean']:.2f}, contact {res['contact_frac']:.2f}")
        self.eval_seconds += time.time() - start
        self.tick, self.tick_step, self.updates = time.time(), step, 0  # a log row's rates leave evaluations out

    def time_to_save(self, step: int, total: int) -> bool:
        """Every --save-interval steps and at a phase's end, or --save-minutes after the last checkpoint."""
        by_step = self.args.save_interval and (step % self.args.save_interval == 0 or step == total)
        return bool(by_step or (self.args.save_minutes and time.time() - self.saved_at > 60 * self.args.save_minutes))

    def save(self, path: str | None = None):
        # copies: a slice of the buffer is a view, and torch.save writes a view's whole storage (the dataset too)
        rows = {k: v[self.dataset_rows:self.buffer.size].to("cpu", copy=True) for k, v in self.buffer.store.items()}
        state = checkpoint_state(self.learner, self.args, self.task, pos=self.pos, evals=self.evals,
                                 segments=self.segments, rng=rng_states(self.gen, self.device), buffer_rows=rows,
                                 env_rng=dict(self.env.unwrapped.np_random.bit_generator.state))
        keep, tag = (0, None) if path else (KEEP_CHECKPOINTS, self.pos["offline"] + self.pos["online"])
        path = path or os.path.join(self.dir, "checkpoints", f"resume-{tag:010d}.pt")
        save_checkpoint(path, state, keep=keep)
        self.bar.write(f"[mvp] checkpoint {path}")
        self.saved_at = time.time()

    @property
    def stopping(self) -> bool:
        return bool(self.stop.signal or self.failure)

    def stop_if_asked(self):
        if not self.stopping:
            return
        self.save()
        self.stop.restore()
        if self.failure is not None:
            print(f"[mvp] the evaluation failed (below); the run is saved and a resumed run redoes the evaluation "
                  f"first. Once its cause is fixed: python mvp.py --resume {self.dir}", flush=True)
            raise self.failure
        self.stop.exit(f"python mvp.py --resume {self.dir}")

    def finish(self) -> dict:
        self.stop.restore()
        self.save(os.path.join(self.dir, "checkpoint.pt"))
        summary = dict(env=self.task["env_name"], seed=self.args.seed, device=str(self.device),
                       offline_steps=self.args.offline_steps, online_steps=self.args.online_steps,
                       offline_updates_per_s=self.rates["offline"], online_env_steps_per_s=self.rates["online"],
                       final_eval=self.evals[-1] if self.evals else None, evals=self.evals, run_dir=self.dir)
        write_json(os.path.join(self.dir, "summary.json"), summary)
        print(f"[mvp] done: {json.dumps(summary['final_eval'])}; outputs in {self.dir}")
        return summary


# ---- --resume, --eval-only, main -------------------------------------------------------------------
def saved_args(state: dict) -> Args:
    return Args(**{k: v for k, v in state["args"].items() if k in {f.name for f in dataclasses.fields(Args)}})


def resume_args(args: Args) -> tuple[Args, dict]:
    """The settings of the run being resumed; flags given now must agree, but for how it runs (HOW_FLAGS) and the
    phases' lengths, which may grow (a finished run continues; the offline phase only before the online begins)."""
    lock_run_dir(args.resume)  # before its checkpoints are read: one process per run folder
    path, state = newest_checkpoint(args.resume, RUN_STATE)
    saved, explicit, pos = saved_args(state), set(args.given), state["pos"]
    grown = explicit & {"offline_steps", "online_steps"}
    shrunk = [k for k in grown if getattr(args, k) < pos[k.split("_")[0]]]
    if shrunk or ("offline_steps" in grown and pos["online"] and args.offline_steps != saved.offline_steps):
        raise SystemExit(f"error: the run in {args.resume} is at offline step {pos['offline']}, online step "
                         f"{pos['online']}: a phase can only grow, and the offline one only before the online begins")
    same = (lambda k, v: resolve_env_name(v) if k == "env" else v)
    changed = sorted(k for k in explicit - HOW_FLAGS - grown - {"resume", "run_dir"}
                     if same(k, getattr(args, k)) != same(k, getattr(saved, k)))
    for k in changed[:1]:
        raise SystemExit(f"error: the run in {args.resume} was trained with --{k.replace('_', '-')} "
                         f"{same(k, getattr(saved, k))}, not {getattr(args, k)}; a resumed run keeps its settings "
                         f"(start a new run to change them)")
    for k in (explicit & (HOW_FLAGS | grown)) | {"device"}:  # --threads too is the run's unless given (<= cores)
        setattr(saved, k, getattr(args, k))
    saved.run_dir, saved.resume, saved.threads = args.resume, args.resume, min(saved.threads, os.cpu_count() or 1)
    print(f"[mvp] resuming from {path}")
    return saved, state


def eval_only(args: Args) -> dict:
    """Evaluate a saved policy as trained (only N and how the evaluation runs may change) on the run's own episodes
    (its --seed, --eval-episodes) unless given: on a CPU this repeats the run's last evaluation number for number."""
    device = pick_device(args.device, args.threads, args.matmul_precision)
    ckpt = read_checkpoint(args.checkpoint, ("args", "env_name", "obs_dim", "action_dim", "policy", "critic"))
    saved, env_name, explicit = saved_args(ckpt), ckpt["env_name"], set(args.given)
    if "env" in explicit and resolve_env_name(args.env) != env_name:
        raise SystemExit(f"error: checkpoint {args.checkpoint} was trained on {env_name}, not "
                         f"{resolve_env_name(args.env)}")
    for k in sorted(k for k in explicit & NETWORK_FLAGS if getattr(args, k) != getattr(saved, k))[:1]:
        raise SystemExit(f"error: checkpoint {args.checkpoint} was trained with --{k.replace('_', '-')} "
                         f"{getattr(saved, k)}, not {getattr(args, k)}; it is evaluated as trained "
                         f"(only --num-candidates and how the evaluation runs may change)")
    for k in HOW_FLAGS | (explicit & {"num_candidates", "seed", "eval_episodes"}):
        setattr(saved, k, getattr(args, k))
    learner = make_learner(ckpt["obs_dim"], ckpt["action_dim"] * saved.chunk_len, saved, device)
    load_state_dicts({k: getattr(learner, k) for k in ("policy", "critic")}, ckpt, args.checkpoint)
    seed_everything(saved.seed, device)
    actor = Actor(learner, device, use_cuda_graph(saved, device))
    res = evaluate(actor, env_from_checkpoint(ckpt), saved.eval_episodes, saved.num_candidates, saved.chunk_len,
                   saved.discount, seed=10_000 * (saved.seed + 1), workers=saved.eval_workers, args=saved,
                   task={k: ckpt.get(k) for k in ("env_name", "env_args", "obs_dim", "action_dim")})
    print(json.dumps(dict(env=env_name, checkpoint=args.checkpoint, seed=saved.seed, episodes=saved.eval_episodes,
                          num_candidates=saved.num_candidates, **res)))
    return res


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.eval_only:
            return eval_only(args)
        return train(*resume_args(args)) if args.resume else train(args)
    except DATA_ERRORS as e:
        raise SystemExit(f"error: {e}")
    except RuntimeError as e:
        if not (tried := out_of_memory(e)):
            raise
        raise SystemExit(f"error: out of memory ({tried}). Lower "
                         f"--num-candidates, --batch-size or --hidden-dim (a new run), or score the critic target's "
                         f"best-of-N in blocks with --bon-block 32 (also with --resume, from the last checkpoint)")
    finally:  # the run folder this process held (a run in-process, e.g. a test, may be followed by another process)
        release_run_dirs()


if __name__ == "__main__":
    main()
