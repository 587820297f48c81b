"""MVP: the mean velocity policy, offline-to-online RL with one-step action generation.

MVP (Zhan et al., ICLR 2026) trains a network u(a_t, t, r | s) to predict the *mean* velocity
of a noise-to-action flow over an interval [t, r], so one call maps noise straight to an action
chunk: a = eps + u(eps, 0, 1 | s). The mean-flow identity gives u's training target; the
instantaneous velocity constraint (IVC) pins the boundary u(a, t, t) = v that the identity alone
leaves free. The policy only imitates; a Q-critic ensemble improves behaviour by picking the best
of N one-step candidates, offline on a dataset and then online.

Commands:
    python mvp.py --env cube-double                         # paper protocol (1M offline + 1M online)
    python mvp.py --env cube-double-task1 --hidden-dim 256 --num-layers 2 --offline-steps 20000 \
        --online-steps 0 --eval-interval 5000 --threads 1   # a short CPU run
    python mvp.py --env lift --generate-data                # robomimic Lift on scripted demos (no download)
    python mvp.py --env cube-double --policy flow --flow-steps 10   # Q-chunking's flow baseline
    python mvp.py --env cube-double-task1 --compile         # CUDA: each update is one replayed CUDA graph
                                                            # (default), here also compiled (fused kernels)
    python mvp.py --resume runs/<run>                       # continue an interrupted run
    python mvp.py --eval-only --checkpoint runs/<run>/checkpoint.pt
    python -m pytest -q test_mvp.py

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
    L_MF, L_IVC, lambda  mean_flow_loss, ivc_loss, args.ivc_coef
    Q_k(s, a), K         critic(obs, a) -> (K, B)        class CriticEnsemble
    N, a*                args.num_candidates, best_of_n(...)
    h, gamma, tau        args.chunk_len, args.discount, args.tau
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import glob
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ================================================================================================
# Arguments: every constant of the spec, with the spec's default and a one-line help.
# ================================================================================================
@dataclass
class Args:
    env: str = field(default="cube-double", metadata=dict(help="OGBench task, full name or alias (cube-single, cube-double, cube-triple-task4, ...), or robomimic lift | can | square"))
    seed: int = field(default=0, metadata=dict(help="seed for networks, sampling and environments"))
    device: str = field(default="auto", metadata=dict(help="auto | cpu | cuda"))
    threads: int = field(default=0, metadata=dict(help="CPU threads for torch (0: torch's default); use 1 on a busy shared machine"))
    cuda_graph: str = field(default="auto", metadata=dict(help="replay the whole update and best-of-N acting as CUDA graphs: auto (on with CUDA) | on | off"))
    compile: bool = field(default=False, metadata=dict(help="torch.compile the training step: fewer, fused kernels (compiling takes a minute or more)"))
    matmul_precision: str = field(default="high", metadata=dict(help="float32 matmuls on CUDA: high (TF32 tensor cores, JAX's default on A100/H100, so Q-chunking's) | highest (full fp32)"))
    # protocol [QC]
    offline_steps: int = field(default=1_000_000, metadata=dict(help="offline gradient steps on the dataset"))
    online_steps: int = field(default=1_000_000, metadata=dict(help="online environment steps (1 update per step)"))
    start_training: int = field(default=5_000, metadata=dict(help="online updates begin after this many env steps"))
    batch_size: int = field(default=256, metadata=dict(help="minibatch size"))
    lr: float = field(default=3e-4, metadata=dict(help="Adam learning rate, actor and critic"))
    hidden_dim: int = field(default=512, metadata=dict(help="width of actor and critic MLPs"))
    num_layers: int = field(default=4, metadata=dict(help="hidden layers of actor and critic MLPs"))
    num_critics: int = field(default=2, metadata=dict(help="critic ensemble size K"))
    discount: float = field(default=0.99, metadata=dict(help="gamma"))
    tau: float = field(default=0.005, metadata=dict(help="Polyak rate of the target critic"))
    chunk_len: int = field(default=5, metadata=dict(help="action chunk length h"))
    num_candidates: int = field(default=32, metadata=dict(help="best-of-N candidates N"))
    bon_block: int = field(default=-1, metadata=dict(help="states scored per best-of-N block in the critic target (same result, less memory; -1: 32 on CPU, all at once on CUDA; 0: all at once)"))
    select_dtype: str = field(default="float32", metadata=dict(help="float32 | bfloat16: generate and score the critic target's N candidates under bfloat16 autocast; the chosen chunk's value stays float32 [choice]"))
    # policy: MVP, or the flow-matching baselines that share everything else
    policy: str = field(default="mvp", metadata=dict(help="mvp (one-step mean flow) | flow (Q-chunking's flow matching, --flow-steps Euler steps)"))
    flow_steps: int = field(default=10, metadata=dict(help="Euler steps of the flow baseline (10 = QC, 1 = its one-step variant)"))
    # MVP policy loss [paper]
    ivc_coef: float = field(default=1.0, metadata=dict(help="lambda on L_IVC; 0 is the paper's ablation"))
    time_sampler: str = field(default="uniform", metadata=dict(help="(t, r) sampler: uniform (two sorted draws) | logit_normal | gap_uniform (r - t ~ U(0, 1)) [choice]"))
    time_mu: float = field(default=-0.4, metadata=dict(help="logit-normal mean (MeanFlow's value)"))
    time_sigma: float = field(default=1.0, metadata=dict(help="logit-normal std (MeanFlow's value)"))
    equal_tr_frac: float = field(default=0.0, metadata=dict(help="fraction of L_MF rows with r = t (MeanFlow's implicit boundary)"))
    one_step_frac: float = field(default=0.0, metadata=dict(help="fraction of L_MF rows with (t, r) = (0, 1), the one-step map acting uses [choice]"))
    imitation_target: str = field(default="buffer", metadata=dict(help="online policy target: buffer (chunks in the replay buffer) | best_of_n (recomputed a*)"))
    # evaluation and logging
    eval_interval: int = field(default=100_000, metadata=dict(help="evaluate every this many steps in each phase (0: only at the end)"))
    eval_episodes: int = field(default=50, metadata=dict(help="episodes per evaluation"))
    eval_workers: int = field(default=-1, metadata=dict(help="processes that run evaluation episodes, each with a CPU copy of the networks (0: in this process; -1: auto, 0 on CPU, one per spare core up to 16 with CUDA)"))
    log_interval: int = field(default=1_000, metadata=dict(help="write a CSV row every this many updates"))
    # data
    dataset_dir: str | None = field(default=None, metadata=dict(help="dataset directory (default OGBench's ~/.ogbench/data, robomimic's ~/.robomimic)"))
    generate_data: bool = field(default=False, metadata=dict(help="generate data: OGBench's scripted planner, or scripted robomimic demos (lift, can)"))
    dataset_episodes: int | None = field(default=None, metadata=dict(help="OGBench: episodes to generate (default public size; implies --generate-data). robomimic: demos to record, or the first N demos of a file"))
    data_seed: int = field(default=0, metadata=dict(help="seed of the generated dataset"))
    data_workers: int = field(default=0, metadata=dict(help="worker processes for generation (0: all cores)"))
    # output
    run_dir: str | None = field(default=None, metadata=dict(help="output directory (default runs/<env>_s<seed>_<time>)"))
    save_interval: int = field(default=50_000, metadata=dict(help="write a resumable checkpoint every this many steps per phase and at its end (0: only by --save-minutes; Ctrl-C always saves)"))
    save_minutes: float = field(default=30.0, metadata=dict(help="also write one when this many minutes have passed since the last (0: never): what a crash can lose"))
    resume: str | None = field(default=None, metadata=dict(help="continue the run in this directory from its newest good checkpoint"))
    checkpoint: str | None = field(default=None, metadata=dict(help="checkpoint to evaluate with --eval-only"))
    eval_only: bool = field(default=False, metadata=dict(help="only evaluate --checkpoint"))


def parse_args(argv=None) -> Args:
    """Build an argparse parser from the dataclass (flags use dashes) and validate values."""
    parser = argparse.ArgumentParser(description="MVP: mean velocity policy (offline-to-online RL).", allow_abbrev=False)
    for f in dataclasses.fields(Args):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
        else:
            kind = {"int": int, "float": float, "str": str}[f.type.split(" ")[0]]
            parser.add_argument(flag, type=kind, default=f.default, help=f.metadata["help"] + f" (default {f.default})")
    ns = parser.parse_args(argv)
    args = Args(**vars(ns))
    args._explicit = {a.split("=")[0][2:].replace("-", "_") for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
    problems = []
    for name in ["num_candidates", "chunk_len", "flow_steps", "batch_size", "hidden_dim", "num_layers", "num_critics", "eval_episodes", "log_interval"]:
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    for name in ["offline_steps", "online_steps", "start_training", "eval_interval", "data_workers", "threads", "save_interval", "save_minutes"]:
        if getattr(args, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(args, name)})")
    if args.eval_workers < -1:
        problems.append(f"--eval-workers must be -1 (auto), 0 (in this process) or a number of processes (got {args.eval_workers})")
    for name in ("threads", "data_workers", "eval_workers"):  # beyond the cores only slows a run (or fails to fork)
        if getattr(args, name) > (os.cpu_count() or 1):
            problems.append(f"--{name.replace('_', '-')} {getattr(args, name)} is more than this machine's {os.cpu_count()} cores")
    if args.select_dtype not in ("float32", "bfloat16"):
        problems.append(f"--select-dtype must be float32 or bfloat16 (got {args.select_dtype!r})")
    if args.bon_block < -1:
        problems.append(f"--bon-block must be -1 (auto), 0 (all states at once) or a block size >= 1 (got {args.bon_block})")
    if args.ivc_coef < 0:
        problems.append(f"--ivc-coef must be >= 0 (got {args.ivc_coef})")
    for name in ("equal_tr_frac", "one_step_frac"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            problems.append(f"--{name.replace('_', '-')} must be in [0, 1] (got {getattr(args, name)})")
    if not 0.0 < args.discount <= 1.0:
        problems.append(f"--discount must be in (0, 1] (got {args.discount})")
    if not 0.0 < args.tau <= 1.0:
        problems.append(f"--tau must be in (0, 1] (got {args.tau})")
    if args.lr <= 0:
        problems.append(f"--lr must be > 0 (got {args.lr})")
    if args.policy not in ("mvp", "flow"):
        problems.append(f"--policy must be mvp or flow (got {args.policy!r})")
    if args.time_sampler not in ("uniform", "logit_normal", "gap_uniform"):
        problems.append(f"--time-sampler must be uniform, logit_normal or gap_uniform (got {args.time_sampler!r})")
    if args.imitation_target not in ("buffer", "best_of_n"):
        problems.append(f"--imitation-target must be buffer or best_of_n (got {args.imitation_target!r})")
    if args.cuda_graph not in ("auto", "on", "off"):
        problems.append(f"--cuda-graph must be auto, on or off (got {args.cuda_graph!r})")
    elif args.cuda_graph == "on" and (args.device == "cpu" or not torch.cuda.is_available()):
        problems.append("--cuda-graph on needs a CUDA device; use --cuda-graph auto (graphs only on CUDA) or off")
    if args.matmul_precision not in ("highest", "high"):
        problems.append(f"--matmul-precision must be highest or high (got {args.matmul_precision!r})")
    if args.device not in ("auto", "cpu", "cuda") and not args.device.startswith("cuda:"):
        problems.append(f"--device must be auto, cpu or cuda (got {args.device!r})")
    if args.dataset_episodes is not None and args.dataset_episodes < 1:
        problems.append(f"--dataset-episodes must be >= 1 (got {args.dataset_episodes})")
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


def pick_device(name: str, threads: int = 0, matmul_precision: str = "high") -> torch.device:
    """The one place that decides CPU vs CUDA, how many CPU threads torch may use, and whether CUDA
    float32 matmuls may use TF32 tensor cores ("high").

    On a machine whose cores are busy with other work, torch's multi-threaded CPU kernels stall
    waiting for each other: on 2 shared cores we measured 1 thread 7x faster than 2."""
    if threads:
        torch.set_num_threads(threads)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name} asked for, but torch sees no CUDA device "
                         f"(torch {torch.__version__}); use --device cpu or install a CUDA build of torch.")
    if name.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = matmul_precision == "high"
    return torch.device(name)


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
        self.norm_scale = nn.ParameterList(nn.Parameter(torch.ones(num_members, 1, hidden_dim)) for _ in range(num_layers))
        self.norm_shift = nn.ParameterList(nn.Parameter(torch.zeros(num_members, 1, hidden_dim)) for _ in range(num_layers))
        self.head = EnsembleLinear(num_members, hidden_dim, 1)

    def forward(self, obs, a):
        x = torch.cat([obs, a], dim=-1).unsqueeze(0).expand(self.num_members, -1, -1)  # (K, B, in)
        for layer, scale, shift in zip(self.layers, self.norm_scale, self.norm_shift):
            x = F.gelu(layer(x))  # Dense -> GELU -> LayerNorm, as Flow Q-Learning's MLP
            # per-member affine (K, 1, hidden), fused into one kernel: separate mul and add cost the
            # critic about a fifth of its forward time on the 8192 best-of-N rows (CPU profile)
            x = torch.addcmul(shift, F.layer_norm(x, x.shape[-1:]), scale)
        return self.head(x).squeeze(-1)  # (K, B)


# ================================================================================================
# Mean-flow maths: (t, r) sampler, L_MF with one JVP, L_IVC
# ================================================================================================
def sample_times(batch_size: int, sampler: str, mu: float, sigma: float, equal_frac: float,
                 generator: torch.Generator, device, one_step_frac: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw (t, r) with 0 <= t <= r <= 1, each of shape (B, 1) [choice: not given in the paper].

    uniform and logit_normal (MeanFlow's) draw two times and sort them. Two sorted uniforms make
    r - t > 0.9 a 1% event, yet acting only ever uses r - t = 1; gap_uniform draws the gap
    r - t ~ U(0, 1) first, then t ~ U(0, 1 - gap), so every gap is as likely. With continuous draws
    r != t almost surely, so L_MF never sees the boundary and only L_IVC pins it. equal_frac > 0
    sets r = t on that fraction of rows (MeanFlow's implicit boundary); one_step_frac > 0 sets
    (t, r) = (0, 1) on that fraction: the very map a = eps + u(eps, 0, 1) that acting uses.
    """
    if sampler == "uniform":
        x = torch.rand(batch_size, 2, generator=generator, device=device)
        t, r = x.min(dim=1).values, x.max(dim=1).values
    elif sampler == "logit_normal":
        x = torch.sigmoid(mu + sigma * torch.randn(batch_size, 2, generator=generator, device=device))
        t, r = x.min(dim=1).values, x.max(dim=1).values
    else:  # gap_uniform
        x = torch.rand(batch_size, 2, generator=generator, device=device)
        t = (1 - x[:, 1]) * x[:, 0]
        r = (t + x[:, 1]).clamp(max=1.0)
    if equal_frac > 0:
        equal = torch.rand(batch_size, generator=generator, device=device) < equal_frac
        r = torch.where(equal, t, r)
    if one_step_frac > 0:
        one = torch.rand(batch_size, generator=generator, device=device) < one_step_frac
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


def policy_loss(policy, obs, a1, valid, ivc_coef: float, chunk_len: int, time_kw: dict, generator):
    """L_policy = L_MF + lambda * L_IVC on target chunks a1 (B, A). Returns (loss, info)."""
    eps = torch.randn(a1.shape, generator=generator, device=a1.device)
    t, r = sample_times(a1.shape[0], generator=generator, device=a1.device, **time_kw)
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

    obs: (B, obs_dim) -> a*: (B, A), plus the candidates' Q values (B, N) for logging. block > 0 scores
    `block` states at a time; selection is per state, so the result is the same. On CPU this is
    faster: over all 256 x 32 rows each (K, rows, 512) critic activation is 32 MiB, which the allocator
    returns to the OS and page-faults back in on every op; blocks of 32 states stay in cache (the
    critic target ran 1.6x faster for MVP, 1.25x for flow-10, run_benchmarks.py speed)."""
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
        next_a, cand_q = best_of_n(policy, critic, next_obs, num_candidates, generator, sample, block)  # selected with the online critic
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
    bon_block: int = 0  # states per best-of-N block over a batch (0: all at once)
    select_dtype: torch.dtype = torch.float32  # of the critic target's best-of-N selection
    cuda_graph: bool = False  # replay train steps and acting as CUDA graphs (class CUDAGraphed)
    graphs: dict = field(default_factory=dict)  # recorded acting graphs, by (N, generator)
    eval_generator: torch.Generator | None = None  # evaluation's candidate noise, reseeded from each episode's seed


def make_learner(obs_dim: int, act_dim: int, args: Args, device) -> Learner:
    policy = MeanVelocityNet(obs_dim, act_dim, args.hidden_dim, args.num_layers).to(device)
    critic = CriticEnsemble(obs_dim, act_dim, args.hidden_dim, args.num_layers, args.num_critics).to(device)
    target_critic = CriticEnsemble(obs_dim, act_dim, args.hidden_dim, args.num_layers, args.num_critics).to(device)
    target_critic.load_state_dict(critic.state_dict())
    target_critic.requires_grad_(False)
    if args.policy == "mvp":
        time_kw = dict(sampler=args.time_sampler, mu=args.time_mu, sigma=args.time_sigma, equal_frac=args.equal_tr_frac,
                       one_step_frac=args.one_step_frac)
        def loss(policy, obs, a1, valid, chunk_len, generator):
            return policy_loss(policy, obs, a1, valid, args.ivc_coef, chunk_len, time_kw, generator)
        sample = one_step
    else:
        loss, sample = flow_matching_loss, functools.partial(euler_sample, steps=args.flow_steps)
    device_type = torch.device(device).type
    bon_block = args.bon_block if args.bon_block >= 0 else (32 if device_type == "cpu" else 0)
    if args.cuda_graph == "on" and device_type != "cuda":
        raise SystemExit(f"error: --cuda-graph on needs a CUDA device, this run is on {device}; use --cuda-graph auto or off")
    cuda_graph = device_type == "cuda" and args.cuda_graph != "off"
    # fused Adam: one kernel over all parameters; on CPU the critic's step drops from about 7 to 1 ms.
    # capturable: its step count stays on the GPU, so the step can be recorded in a CUDA graph
    opt = functools.partial(torch.optim.Adam, lr=args.lr, fused=device_type in ("cpu", "cuda"), capturable=cuda_graph)
    return Learner(policy, critic, target_critic, opt(policy.parameters()), opt(critic.parameters()), loss, sample,
                   bon_block, getattr(torch, args.select_dtype), cuda_graph, eval_generator=torch.Generator(device))


def update(learner: Learner, batch: dict, a1, valid_a1, args: Args, generator) -> dict:
    """One gradient step on the critic and one on the policy; returns device tensors (no sync)."""
    y, cand_q = critic_target(learner.policy, learner.critic, learner.target_critic, batch["next_obs"],
                              batch["reward_sum"], batch["mask"], args.discount, args.chunk_len,
                              args.num_candidates, generator, learner.sample, learner.bon_block, learner.select_dtype)
    c_loss, c_info = critic_loss(learner.critic, batch["obs"], batch["actions"], y, batch["valid"][:, -1])
    learner.critic_opt.zero_grad(set_to_none=True)
    c_loss.backward()
    learner.critic_opt.step()
    polyak(learner.target_critic, learner.critic, args.tau)

    p_loss, p_info = learner.loss(learner.policy, batch["obs"], a1, valid_a1, args.chunk_len, generator)
    learner.policy_opt.zero_grad(set_to_none=True)
    p_loss.backward()
    learner.policy_opt.step()
    # how much selection buys over an average candidate, in Q units
    bon_gain = (cand_q.max(dim=1).values - cand_q.mean(dim=1)).mean()
    return {k: v.detach() for k, v in {**c_info, **p_info, "bon_gain": bon_gain}.items()}


def buffer_target(learner, batch, args, generator):
    """Imitate the chunks stored in the buffer (offline data + executed a*), masked past episode ends."""
    return batch["actions"], batch["valid"]


def best_of_n_target(learner, batch, args, generator):
    """Imitate a* recomputed on the batch's states from the current policy and critic (paper appendix)."""
    a_star, _ = best_of_n(learner.policy, learner.critic, batch["obs"], args.num_candidates, generator,
                          learner.sample, learner.bon_block)
    return a_star, torch.ones_like(batch["valid"])


def make_train_step(learner: Learner, buffer, imitation: Callable, args: Args, generator) -> Callable[[], dict]:
    """A training step as a function of nothing: sample chunks from the replay buffer, pick what the
    policy imitates (buffer_target or best_of_n_target), update. Its inputs all live on the device,
    so with CUDA it is recorded once and replayed as one graph (CUDAGraphed, in the plumbing)."""
    def step():
        batch = buffer.sample_chunks(args.batch_size, args.chunk_len, args.discount, generator)
        a1, valid_a1 = imitation(learner, batch, args, generator)
        return update(learner, batch, a1, valid_a1, args, generator)
    if args.compile:  # fuses elementwise work; the first call compiles (graph breaks at backward are fine)
        step = torch.compile(step)
    return CUDAGraphed(step, generator) if learner.cuda_graph else step


# ================================================================================================
# =====================================  PLUMBING  ===============================================
# Data (OGBench files, generation), environments, replay buffer, evaluation, logging. Nothing
# below changes the algorithm; env-specific details stay here and never reach the loops.
# ================================================================================================
class DatasetError(Exception):
    """A dataset file is missing, unreadable or does not match the environment."""


CUBES = ("single", "double", "triple")
TASK_ALIASES = {f"cube-{n}": f"cube-{n}-play-singletask-v0" for n in CUBES}
TASK_ALIASES.update({f"cube-{n}-task{k}": f"cube-{n}-play-singletask-task{k}-v0" for n in CUBES for k in range(1, 6)})
FULL_NAME = re.compile(rf"^cube-({'|'.join(CUBES)})-play-singletask(-task[1-5])?-v0$")


def resolve_env_name(name: str) -> str:
    """Alias or full OGBench name -> full name, e.g. cube-double-task3 -> cube-double-play-singletask-task3-v0."""
    if name in TASK_ALIASES:
        return TASK_ALIASES[name]
    if name in ROBOMIMIC_TASKS:
        return name
    if FULL_NAME.match(name):
        return name
    raise ValueError(f"unknown --env {name!r}. Accepted: {', '.join(TASK_ALIASES)}, {', '.join(ROBOMIMIC_TASKS)}, "
                     f"or full OGBench names cube-{{{','.join(CUBES)}}}-play-singletask[-task{{1..5}}]-v0")


def dataset_name_of(env_name: str) -> str:
    """cube-double-play-singletask-task3-v0 -> cube-double-play-v0 (the file OGBench loads)."""
    return re.sub(r"-singletask(-task\d)?", "", env_name)


def import_ogbench():
    import warnings
    warnings.filterwarnings("ignore", message=".*precision lowered by casting.*")  # gymnasium, on OGBench's spaces
    warnings.filterwarnings("ignore", module="glfw")  # no display: MuJoCo rendering is never used here
    try:
        import ogbench  # noqa: F401  (registers the environments with gymnasium)
    except ImportError as e:
        raise SystemExit(f"error: OGBench is not installed ({e}). Run: pip install -r requirements.txt")
    return ogbench


# ---- generating the play dataset with OGBench's own scripted planner ---------------------------
# OGBench's data_gen_scripts: episodes per public file, and p_stack ~ U(lo, hi) per episode, the chance that a
# new target is on top of another cube (OGBench fixes 0 for one cube, where set_new_target cannot stack anyway)
PUBLIC_EPISODES = {"cube-single-play-v0": 1000, "cube-double-play-v0": 1000, "cube-triple-play-v0": 3000}
P_STACK_RANGE = {"cube-single-play-v0": (0.0, 0.0), "cube-double-play-v0": (0.0, 0.25), "cube-triple-play-v0": (0.05, 0.35)}
EPISODE_STEPS = 1001  # the public files' episode length
GENERATED_KEY = "mvp_generated"  # a string array inside each generated npz: its settings as JSON
_worker = {}


def _init_generation_worker(collection_env: str):
    import gymnasium
    import_ogbench()
    from ogbench.manipspace.oracles.plan.cube_plan import CubePlanOracle
    torch.set_num_threads(1)
    env = gymnasium.make(collection_env, terminate_at_goal=False, mode="data_collection",
                         max_episode_steps=EPISODE_STEPS)
    _worker["env"] = env
    _worker["oracle"] = CubePlanOracle(env=env, noise=0.1, noise_smoothing=0.5)


def _generate_episode(job):
    """One play episode. The planner draws from numpy's global RNG, so it is seeded per episode:
    every episode depends only on (seed, index), whatever the number of workers."""
    seed, index, p_lo, p_hi = job
    env, oracle = _worker["env"], _worker["oracle"]
    np.random.seed([seed, index])
    ob, info = env.reset(seed=int(np.random.randint(2**31)))
    p_stack = np.random.uniform(p_lo, p_hi)
    oracle.reset(ob, info)
    rows = {k: [] for k in ("observations", "actions", "terminals", "qpos", "qvel")}
    done = False
    while not done:
        # rounded to the stored dtype before the step: the file then holds exactly what was executed
        action = np.clip(np.asarray(oracle.select_action(ob, info)), -1, 1).astype(np.float32)
        next_ob, _, terminated, truncated, info = env.step(action)
        done = terminated or truncated
        if oracle.done:  # the planner finished its target: pick a new one, as the public data did
            target_ob, target_info = env.unwrapped.set_new_target(p_stack=p_stack)
            oracle.reset(target_ob, target_info)
        rows["observations"].append(ob)
        rows["actions"].append(action)
        rows["terminals"].append(done)
        rows["qpos"].append(info["prev_qpos"])
        rows["qvel"].append(info["prev_qvel"])
        ob = next_ob
    return index, {k: np.asarray(v) for k, v in rows.items()}


def _read_generated_settings(path: str):
    """Settings recorded in a generated file, or None if the file was not made by this project."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return json.loads(str(f[GENERATED_KEY])) if GENERATED_KEY in f.files else None
    except Exception as e:
        raise DatasetError(f"cannot read {path} ({type(e).__name__}: {e}). Delete it and rerun with --generate-data.")


def _atomic_savez(path: str, arrays: dict):
    """Write to path.tmp, flush to disk, then rename: a half-written file never has the final name."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def generate_dataset(dataset_name: str, out_dir: str, num_episodes: int, seed: int, workers: int) -> str:
    """Write <out_dir>/<dataset_name>.npz and -val.npz (a further 10% of episodes) in OGBench's format.

    Reuses files already generated with the same settings; refuses to overwrite files it did not make."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp
    from tqdm import tqdm

    os.makedirs(out_dir, exist_ok=True)
    train_path = os.path.join(out_dir, f"{dataset_name}.npz")
    val_path = os.path.join(out_dir, f"{dataset_name}-val.npz")
    num_val = max(1, num_episodes // 10)
    settings = dict(generator="mvp.py generate_dataset", oracle="CubePlanOracle", noise=0.1, noise_smoothing=0.5,
                    p_stack_range=list(P_STACK_RANGE[dataset_name]), episodes=num_episodes, val_episodes=num_val,
                    episode_steps=EPISODE_STEPS, seed=seed)
    existing = [p for p in (train_path, val_path) if os.path.exists(p)]
    for p in existing:
        made = _read_generated_settings(p)
        if made is None:
            raise DatasetError(f"{p} exists and was not generated by this project (an official OGBench file?); "
                               f"refusing to overwrite it. Pass a different --dataset-dir to generate elsewhere.")
    if len(existing) == 2 and all(_read_generated_settings(p) == {**settings, "split": s}
                                  for p, s in ((train_path, "train"), (val_path, "val"))):
        print(f"[data] reusing generated {train_path}")
        return out_dir

    collection_env = dataset_name.replace("-play", "")  # cube-double-play-v0 -> cube-double-v0
    workers = workers or os.cpu_count() or 1
    total = num_episodes + num_val
    jobs = [(seed, i, *P_STACK_RANGE[dataset_name]) for i in range(total)]
    episodes = [None] * total
    print(f"[data] generating {num_episodes} + {num_val} episodes of {dataset_name} with OGBench's scripted "
          f"planner on {workers} worker(s) into {out_dir}")
    start = time.time()
    ctx = mp.get_context("spawn")  # fresh interpreters: no forked torch/mujoco state
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_generation_worker,
                             initargs=(collection_env,)) as pool:
        for index, ep in tqdm(pool.map(_generate_episode, jobs, chunksize=4), total=total,
                              desc="generating episodes", unit="ep", dynamic_ncols=True):
            episodes[index] = ep
    for split, eps, path in (("val", episodes[num_episodes:], val_path), ("train", episodes[:num_episodes], train_path)):
        arrays = {k: np.concatenate([e[k] for e in eps]).astype(bool if k == "terminals" else np.float32)
                  for k in eps[0]}
        arrays[GENERATED_KEY] = np.array(json.dumps({**settings, "split": split}))
        _atomic_savez(path, arrays)  # train last: its presence means both are complete
    print(f"[data] wrote {total * EPISODE_STEPS:,} steps in {time.time() - start:.0f}s")
    return out_dir


# ---- locating and loading datasets ---------------------------------------------------------------
def default_generated_dir(dataset_name: str, episodes: int, seed: int) -> str:
    return os.path.expanduser(f"~/.ogbench/generated/{dataset_name}_{episodes}ep_seed{seed}")


def prepare_dataset_dir(env_name: str, args: Args) -> str:
    """Directory holding <dataset>.npz: OGBench's files if present, else OGBench's download, else generate."""
    ogbench = import_ogbench()
    name = dataset_name_of(env_name)
    episodes = args.dataset_episodes or PUBLIC_EPISODES[name]
    explicit_dir = args.dataset_dir is not None
    official_dir = os.path.expanduser(args.dataset_dir or "~/.ogbench/data")
    if not (args.generate_data or args.dataset_episodes):
        if all(os.path.exists(os.path.join(official_dir, f"{name}{s}.npz")) for s in ("", "-val")):
            return official_dir
        try:
            print(f"[data] {name} not in {official_dir}; trying OGBench's download")
            ogbench.download_datasets([name], official_dir)
            return official_dir
        except Exception as e:
            print(f"[data] download failed ({type(e).__name__}: {e}); generating the data instead")
    out_dir = official_dir if (explicit_dir and (args.generate_data or args.dataset_episodes)) \
        else default_generated_dir(name, episodes, args.data_seed)
    return generate_dataset(name, out_dir, episodes, args.data_seed, args.data_workers)


def load_ogbench(env_name: str, dataset_dir: str):
    """(env, train, val) through OGBench's own loader, which relabels single-task rewards from qpos."""
    ogbench = import_ogbench()
    name = dataset_name_of(env_name)
    paths = [os.path.join(dataset_dir, f"{name}{s}.npz") for s in ("", "-val")]
    for p in paths:  # validate each file before OGBench reads it, to name the file that is broken
        try:
            with np.load(p, allow_pickle=False) as f:
                missing = {"observations", "actions", "terminals", "qpos"} - set(f.files)
                if missing:
                    raise DatasetError(f"{p} lacks keys {sorted(missing)}")
                lengths = {k: f[k].shape[0] for k in ("observations", "actions", "terminals", "qpos")}
        except DatasetError as e:
            raise DatasetError(f"{e}; delete it and rerun with --generate-data to regenerate") from None
        except Exception as e:
            raise DatasetError(f"cannot read dataset file {p} ({type(e).__name__}: {e}); it is missing or corrupt. "
                               f"Delete it and rerun with --generate-data to regenerate it.") from None
        if len(set(lengths.values())) != 1:
            raise DatasetError(f"{p} has arrays of different lengths {lengths}; delete it and rerun with --generate-data")
    env, train, val = ogbench.make_env_and_datasets(env_name, dataset_dir=dataset_dir)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    if train["observations"].shape[1] != obs_dim or train["actions"].shape[1] != act_dim:
        raise DatasetError(f"{paths[0]} holds observations/actions of size {train['observations'].shape[1]}/"
                           f"{train['actions'].shape[1]}, but {env_name} has {obs_dim}/{act_dim}: a file of another "
                           f"task. Delete it and rerun with --generate-data.")
    return env, train, val


def make_env(env_name: str):
    """The single-task evaluation / interaction environment, with its episode cap (200 single, 500 double, 1000 triple)."""
    env = import_ogbench().make_env_and_datasets(env_name, env_only=True)
    env.reset = functools.partial(reset_clean, env, env.reset)
    return env


def reset_clean(env, reset: Callable, **kwargs):
    """OGBench's reset, then MuJoCo's controls and solver warm start zeroed (as mj_resetData leaves them).
    A task reset settles the goal scene with two steps of an unseeded random action and keeps both; the
    episode's first step reads the warm start, so the same seed and actions could give another episode
    (README, deviation 18). The first action overwrites the controls."""
    out = reset(**kwargs)
    env.unwrapped.data.ctrl[:] = 0.0
    env.unwrapped.data.qacc_warmstart[:] = 0.0
    return out


def load_task(env_name: str, args: Args):
    """(dataset, make_env) for a resolved task name: the one place that knows which suite a task is from.

    dataset: float32 arrays observations, actions, rewards, masks, terminals, next_observations.
    make_env(): a new gymnasium-style env whose info["success"] reports task success; its
    .env_args (robomimic: the file's env_args) let --eval-only rebuild it without the dataset."""
    if env_name in ROBOMIMIC_TASKS:
        # --dataset-episodes: the first N demos of a human file, or the demos to record with --generate-data
        return load_robomimic(env_name, args.dataset_dir, args.generate_data, args.dataset_episodes, args.data_seed)
    _, dataset, _ = load_ogbench(env_name, prepare_dataset_dir(env_name, args))
    new_env = functools.partial(make_env, env_name)
    return dataset, new_env


def env_from_checkpoint(ckpt: dict):
    """The evaluation env of a saved policy: OGBench by name, robomimic from the env_args it was trained in."""
    if ckpt["env_name"] in ROBOMIMIC_TASKS:
        return RobomimicEnv(json.loads(ckpt["env_args"]), ROBOMIMIC_TASKS[ckpt["env_name"]]["max_episode_steps"],
                            source=f"checkpoint of {ckpt['env_name']}")
    return make_env(ckpt["env_name"])


# Robomimic's task table, HDF5 reader, env rebuilt from the file's env_args, and scripted demonstrators.
# Why no `robomimic` import: its PyPI release (0.3.0) imports mujoco_py at load and declares unpinned
# torch/torchvision (pip would swap the CPU torch for a multi-GB CUDA build). What is needed from it
# is small and stable: the HDF5 layout, how it rebuilds an env (robosuite.make(env_name, **env_kwargs)
# with rendering off and object observations on) and the dataset URLs; they are re-stated here.
# ---- robomimic tasks (Lift, Can, Square) through robosuite; no dependency on the robomimic package ------------------------------------------------------------------------------
# env_name: robosuite environment the datasets were recorded in (the file's env_args must match);
# max_episode_steps: the protocol's episode cap; dataset: path under the dataset root, robomimic's
# own layout <task>/<mh|ph>/low_dim_v141.hdf5 (v141 = recorded with robosuite 1.4.1).
ROBOMIMIC_TASKS = {
    "lift": dict(env_name="Lift", max_episode_steps=300, dataset="lift/mh/low_dim_v141.hdf5"),
    "can": dict(env_name="PickPlaceCan", max_episode_steps=300, dataset="can/mh/low_dim_v141.hdf5"),
    "square": dict(env_name="NutAssemblySquare", max_episode_steps=400, dataset="square/mh/low_dim_v141.hdf5"),
}
OBS_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object")
DEFAULT_ROOT = "~/.robomimic"
# robomimic 0.3's DATASET_REGISTRY entry for the v141 low-dim files (checked against the 0.3.0 sdist).
URL_TEMPLATE = "http://downloads.cs.stanford.edu/downloads/rt_benchmark/{task}/{kind}/low_dim_v141.hdf5"
DEFAULT_SCRIPTED_DEMOS = 100
ROBOSUITE_VERSION = "1.4.1"


def dataset_url(task: str, kind: str = "mh") -> str:
    """Public download address of robomimic's low-dim file for a task ('mh' multi-human, 'ph' proficient)."""
    return URL_TEMPLATE.format(task=task, kind=kind)


def _task(task: str) -> dict:
    if task not in ROBOMIMIC_TASKS:
        raise ValueError(f"unknown robomimic task {task!r}; accepted: {', '.join(ROBOMIMIC_TASKS)}")
    return ROBOMIMIC_TASKS[task]


def _task_of_env_name(env_name: str):
    return next((t for t, spec in ROBOMIMIC_TASKS.items() if spec["env_name"] == env_name), None)


# ---- optional imports, with the fix in the message ---------------------------------------------
def _import_h5py():
    try:
        import h5py
    except ImportError as e:
        raise SystemExit(f"error: h5py is not installed ({e}). Run: pip install -r requirements.txt")
    return h5py


class _MacroNagFilter:
    """logging filter dropping robosuite's 'No private macro file found!' start-up lines, and only those."""

    def filter(self, record):
        msg = record.getMessage()
        return not ("private macro file" in msg or "setup_macros.py" in msg)


def import_robosuite():
    """Import robosuite quietly: its 'No private macro file found!' warnings are not actionable here.

    The filter is attached to robosuite's own logger before the import, so only those three
    start-up lines are dropped; any other robosuite warning still shows."""
    import logging
    import warnings
    logger = logging.getLogger("robosuite_logs")
    if not any(isinstance(f, _MacroNagFilter) for f in logger.filters):
        logger.addFilter(_MacroNagFilter())
    warnings.filterwarnings("ignore", module="glfw")  # no display: rendering is never used
    # robosuite 1.4.1 calls the deprecated Logger.warn for those same lines
    warnings.filterwarnings("ignore", message="The 'warn' method is deprecated", category=DeprecationWarning)
    try:
        import robosuite
    except ImportError as e:
        raise SystemExit(f"error: robosuite is not installed ({e}). Run: pip install -r requirements.txt")
    if not robosuite.__version__.startswith("1.4."):
        print(f"[robomimic] warning: robosuite {robosuite.__version__} installed; the v141 datasets were "
              f"recorded with {ROBOSUITE_VERSION} (pinned in requirements.txt)", file=sys.stderr)
    return robosuite


# ---- environment metadata (env_args) -------------------------------------------------------------
def robomimic_env_args(task: str) -> dict:
    """The env_args robomimic stores for a task's v141 low-dim file (used to record scripted data).

    Same structure as robomimic's EnvRobosuite.serialize(): env_name, env_version, type 1
    (robosuite), env_kwargs with robosuite's default OSC_POSE controller, Panda, 20 Hz, sparse
    reward, no cameras. Loading a real file always uses the file's own env_args instead."""
    robosuite = import_robosuite()
    from robosuite.controllers import load_controller_config
    return dict(
        env_name=_task(task)["env_name"], env_version=robosuite.__version__, type=1,
        env_kwargs=dict(has_renderer=False, has_offscreen_renderer=False, ignore_done=True,
                        use_object_obs=True, use_camera_obs=False, control_freq=20,
                        controller_configs=load_controller_config(default_controller="OSC_POSE"),
                        robots=["Panda"], camera_depths=False, camera_heights=84, camera_widths=84,
                        reward_shaping=False))


def _make_robosuite_env(env_args: dict, source: str = "env_args"):
    """robosuite.make(env_name, **env_kwargs), with the overrides robomimic applies for low-dim data.

    robomimic's EnvRobosuite forces has_renderer/has_offscreen_renderer/use_camera_obs False,
    use_object_obs True, ignore_done True (it caps episodes itself) and camera_depths False.
    hard_reset False [choice]: resets restore the compiled model (same scenes, ~7x faster); a recompile per
    reset leaks ~50 mesh files in MuJoCo 3.1.6, and a process hits the open-file limit in ~400 episodes."""
    robosuite = import_robosuite()
    kwargs = dict(env_args.get("env_kwargs", {}))
    kwargs.update(has_renderer=False, has_offscreen_renderer=False, use_camera_obs=False,
                  use_object_obs=True, ignore_done=True, camera_depths=False, hard_reset=False)
    state = np.random.get_state()  # robosuite's constructor resets the scene from the global RNG
    try:
        return robosuite.make(env_args["env_name"], **kwargs)
    except (TypeError, KeyError, ValueError, AssertionError) as e:  # kwargs of another robosuite version
        raise DatasetError(f"{source}: robosuite {robosuite.__version__} cannot build {env_args['env_name']} from the "
                           f"file's env_kwargs ({e}); it was recorded with robosuite "
                           f"{env_args.get('env_version', '?')}. Use the v141 files (robosuite {ROBOSUITE_VERSION}).")
    finally:
        np.random.set_state(state)


def flat_obs(obs: dict) -> np.ndarray:
    """robosuite's observation dict -> the protocol's flat float32 vector (robomimic's 'object' = 'object-state')."""
    parts = [obs["object-state"] if k == "object" else obs[k] for k in OBS_KEYS]
    return np.concatenate([np.asarray(p, dtype=np.float32).ravel() for p in parts])


class _Space:
    """Just enough of a gymnasium Box for the training loop (shape, dtype, low/high, sample)."""

    def __init__(self, low, high, shape, rng=None):
        self.shape, self.dtype = tuple(shape), np.float32
        self.low = np.full(shape, low, np.float32)
        self.high = np.full(shape, high, np.float32)
        self._rng = rng or np.random.default_rng()

    def sample(self):
        return self._rng.uniform(self.low, self.high).astype(np.float32)


class RobomimicEnv:
    """A robosuite task with the protocol's gymnasium-like API (reset -> (obs, info), step -> 5-tuple).

    reward = success - 1 (with reward_shaping False, robosuite's sparse reward is exactly the
    success indicator, so this matches the dataset's shifted rewards); terminated = success (it ends
    the episode); truncated = the cap is reached without success; info["success"] is a bool.

    Seeding: robosuite 1.4 draws object placements and robot init noise from NumPy's *global*
    RNG. reset(seed) reseeds this env's own generator; every reset draws a seed from it, runs
    robosuite's reset under that global state and restores the caller's global state afterwards,
    so resets are reproducible and do not disturb other users of np.random."""

    def __init__(self, env_args: dict, max_episode_steps: int, source: str = "env_args"):
        self.env_args = env_args
        self.env_name = env_args["env_name"]
        self.max_episode_steps = int(max_episode_steps)
        self.env = _make_robosuite_env(env_args, source)
        low, high = self.env.action_spec
        self.action_space = _Space(-1.0, 1.0, np.asarray(low).shape)
        self.action_space.low, self.action_space.high = np.asarray(low, np.float32), np.asarray(high, np.float32)
        self._rng = np.random.default_rng()
        self._t, self._raw = 0, None
        obs, _ = self.reset()
        self.observation_space = _Space(-np.inf, np.inf, obs.shape)

    def reset(self, seed=None, options=None):
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        state = np.random.get_state()
        try:
            np.random.seed(int(self._rng.integers(2**32 - 1)))
            self._raw = self.env.reset()
        finally:
            np.random.set_state(state)
        self._t = 0
        return flat_obs(self._raw), {"success": False}

    def step(self, action):
        action = np.clip(np.asarray(action, dtype=np.float64), self.action_space.low, self.action_space.high)
        self._raw, _, _, info = self.env.step(action)
        self._t += 1
        success = bool(self.env._check_success())
        truncated = (not success) and self._t >= self.max_episode_steps
        info = dict(info, success=success)
        return flat_obs(self._raw), float(success) - 1.0, success, truncated, info

    @property
    def raw_obs(self) -> dict:
        """robosuite's full observation dict of the last reset/step (the scripted demonstrator reads it)."""
        return self._raw

    @property
    def unwrapped(self):  # gymnasium's names, which checkpoints use to save and restore the env's RNG
        return self

    @property
    def np_random(self) -> np.random.Generator:
        return self._rng

    @np_random.setter
    def np_random(self, rng: np.random.Generator):
        self._rng = rng

    def close(self):
        self.env.close()


# ---- reading robomimic's HDF5 ----------------------------------------------------------------------
def _fix(path, task):
    """The remedy for a bad file: regenerate (scripted files, tasks with a demonstrator) and/or re-download."""
    if os.path.basename(path).startswith("low_dim_scripted_"):
        return "Delete it and rerun with --generate-data to regenerate it."
    redownload = f"re-download it from {dataset_url(task)} to {path}" if task in ROBOMIMIC_TASKS else "re-download it"
    if task in SCRIPTED:
        return (f"Delete it and regenerate with --generate-data (scripted demos, not the paper's data), "
                f"or {redownload}.")
    return f"Delete it and {redownload}."


def read_robomimic_hdf5(path: str, task: str, num_demos: int = None):
    """Read a robomimic low-dim file into the flat arrays the training loop uses.

    Returns (dataset, env_args, scripted_settings or None). Demos are taken in numeric order
    (demo_0, demo_1, ..., demo_10: robomimic names them by index, not zero-padded), the first
    num_demos if given. rewards are shifted by -1; masks = 0 where the file's reward is 1 (success:
    bootstrapping stops there, as online, where success terminates); terminals = 1 on each demo's
    last row, from the demo boundaries (the file's `dones` also marks success steps in robomimic's
    done_mode 2, so it is not used for boundaries)."""
    h5py = _import_h5py()
    spec = _task(task)
    if not os.path.exists(path):
        raise DatasetError(f"dataset file {path} does not exist")
    try:
        f = h5py.File(path, "r")
    except Exception as e:
        raise DatasetError(f"cannot read dataset file {path} ({type(e).__name__}: {e}); it is corrupt or not HDF5. "
                           + _fix(path, task)) from None
    with f:
        try:
            data = f["data"]
            env_args = json.loads(data.attrs["env_args"])
            scripted = json.loads(data.attrs["mvp_scripted"]) if "mvp_scripted" in data.attrs else None
            names = sorted((k for k in data.keys() if k.startswith("demo_")), key=lambda k: int(k[5:]))
        except Exception as e:
            raise DatasetError(f"{path} is not a robomimic dataset (no readable data group / env_args: "
                               f"{type(e).__name__}: {e}). " + _fix(path, task)) from None
        if env_args.get("env_name") != spec["env_name"]:
            other = _task_of_env_name(env_args.get("env_name"))
            what = f"task '{other}'" if other else "another environment"
            raise DatasetError(f"{path} holds demos of {env_args.get('env_name')!r} ({what}), not {spec['env_name']!r} "
                               f"(task '{task}'). Put the {task} file there "
                               f"({dataset_url(task)}) or regenerate with --generate-data.")
        version = str(env_args.get("env_version", ROBOSUITE_VERSION))
        if not version.startswith("1.4."):
            raise DatasetError(f"{path} was recorded with robosuite {version}; this project runs robosuite "
                               f"{ROBOSUITE_VERSION} (MuJoCo 3.1.6, shared with OGBench) and needs the v141 files: "
                               f"{dataset_url(task)}")
        if not names:
            raise DatasetError(f"{path} has no demos under data/. " + _fix(path, task))
        if num_demos is not None:
            if num_demos > len(names):
                raise DatasetError(f"{path} has {len(names)} demos, fewer than the {num_demos} asked for")
            names = names[:num_demos]
        cols = {k: [] for k in ("observations", "actions", "rewards", "masks", "terminals", "next_observations")}
        try:
            for name in names:
                demo = data[name]
                obs = np.concatenate([np.asarray(demo["obs"][k], np.float32) for k in OBS_KEYS], axis=1)
                nxt = np.concatenate([np.asarray(demo["next_obs"][k], np.float32) for k in OBS_KEYS], axis=1)
                act = np.asarray(demo["actions"], np.float32)
                rew = np.asarray(demo["rewards"], np.float32).reshape(-1)
                n = len(act)
                if n == 0 or not (len(obs) == len(nxt) == len(rew) == n):
                    raise ValueError(f"{name}: obs/next_obs/actions/rewards lengths {len(obs)}/{len(nxt)}/{n}/{len(rew)}")
                if not np.isin(rew, (0.0, 1.0)).all():
                    raise ValueError(f"{name}: rewards are not sparse 0/1 (a dense-reward file?); the protocol "
                                     f"uses the sparse low_dim files")
                term = np.zeros(n, np.float32)
                term[-1] = 1.0
                cols["observations"].append(obs)
                cols["next_observations"].append(nxt)
                cols["actions"].append(act)
                cols["rewards"].append(rew - 1.0)
                cols["masks"].append((rew != 1.0).astype(np.float32))
                cols["terminals"].append(term)
        except (KeyError, ValueError, OSError) as e:
            raise DatasetError(f"{path}: bad demo data ({type(e).__name__}: {e}). " + _fix(path, task)) from None
    dataset = {k: np.ascontiguousarray(np.concatenate(v, axis=0), dtype=np.float32) for k, v in cols.items()}
    if dataset["actions"].shape[1] != 7:
        raise DatasetError(f"{path} has {dataset['actions'].shape[1]}-D actions, expected 7 (OSC_POSE + gripper)")
    return dataset, env_args, scripted


# ---- locating the file: local, download, or generated ---------------------------------------------
def default_dataset_path(task: str, dataset_dir: str = None) -> str:
    """<dataset_dir or ~/.robomimic>/<task>/mh/low_dim_v141.hdf5 (robomimic's own layout, multi-human)."""
    return os.path.join(os.path.expanduser(dataset_dir or DEFAULT_ROOT), _task(task)["dataset"])


def scripted_dataset_path(task: str, num_demos: int, seed: int, dataset_dir: str = None) -> str:
    """Where generated files go: a separate 'scripted' folder and name, so a human file is never shadowed."""
    root = os.path.expanduser(dataset_dir or DEFAULT_ROOT)
    return os.path.join(root, task, "scripted", f"low_dim_scripted_{num_demos}demos_seed{seed}.hdf5")


def download(url: str, path: str, timeout: float = 30.0):
    """Fetch url to path (through path + '.tmp', then renamed, so a partial file is never used)."""
    import urllib.request
    from tqdm import tqdm
    folder = os.path.dirname(path) or "."
    created = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    tmp, ok = path + ".tmp", False
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


def load_robomimic(task: str, dataset_dir: str = None, generate: bool = False, num_demos: int = None,
                   seed: int = 0):
    """(dataset, make_env) for 'lift', 'can' or 'square', the same contract as mvp.load_task.

    Where the data comes from:
    - generate=False: <dataset_dir or ~/.robomimic>/<task>/mh/low_dim_v141.hdf5 (dataset_dir may also
      be the .hdf5 file itself); if absent, robomimic's public URL is tried; if that fails, a
      DatasetError names the URL and the exact path to put the file. num_demos: the first N demos.
    - generate=True: a scripted-demonstrator file (Lift or Can; not Square) with num_demos successful demos
      (default 100) for `seed`, in <root>/<task>/scripted/, reused when its settings match.
    make_env() builds a NEW RobomimicEnv from the file's own env_args, capped at the task's limit.
    It carries .dataset_path and .scripted (the generator's settings or None) as attributes."""
    spec = _task(task)
    if generate:
        n = num_demos or DEFAULT_SCRIPTED_DEMOS
        path = scripted_dataset_path(task, n, seed, dataset_dir)
        generate_scripted(task, path, n, seed)
        num_demos = None  # the generated file holds exactly n demos
    else:
        direct = dataset_dir is not None and str(dataset_dir).endswith((".hdf5", ".h5"))
        path = os.path.expanduser(dataset_dir) if direct else default_dataset_path(task, dataset_dir)
        if not os.path.exists(path):
            url = dataset_url(task)
            try:
                print(f"[robomimic] {path} not found; downloading {url}", file=sys.stderr)
                download(url, path)
            except Exception as e:
                alt = ("; or run with --generate-data to record scripted demos (not the paper's data)"
                       if task in SCRIPTED else f" (there is no scripted demonstrator for {task})")
                raise DatasetError(
                    f"robomimic dataset for '{task}' not found at {path} and the download failed "
                    f"({type(e).__name__}: {e}). Download {url} and put it at {path} "
                    f"(or pass --dataset-dir){alt}.") from None
    dataset, env_args, scripted = read_robomimic_hdf5(path, task, num_demos)
    if scripted:
        print(f"[robomimic] {path}: SCRIPTED demos ({scripted.get('demonstrator')}), not the human data of the "
              f"paper; results are not comparable.", file=sys.stderr)
    cap = spec["max_episode_steps"]

    def make_env():
        return RobomimicEnv(env_args, cap, source=path)

    make_env.dataset_path, make_env.scripted, make_env.env_args = path, scripted, env_args
    return dataset, make_env


# ---- scripted demonstrator -------------------------------------------------------------------------
# Std of the noise on the scripted translation actions. Lift, 5k offline steps at 2x256: with 0.05 the demos
# were too alike for the critic to rank actions and best-of-N trailed the policy alone (0.40 vs 0.96); 0.3: 0.96 vs 0.98.
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


def _scripted_kwargs(task: str, env: "RobomimicEnv") -> dict:
    """Scene facts a demonstrator needs that are not in the observation (Can: its target compartment)."""
    if task == "can":
        e = env.env
        return dict(target_xy=tuple(float(x) for x in e.target_bin_placements[e.object_id][:2]))
    return {}


def _robomimic_obs(env) -> dict:
    """robomimic's stored observation keys: 'object' plus every robot0_* entry except proprio-state."""
    raw = env.raw_obs
    out = {"object": np.array(raw["object-state"], np.float64)}  # copies: robosuite may reuse its buffers
    for k, v in raw.items():
        if k.startswith("robot0_") and not k.endswith("proprio-state"):
            out[k] = np.array(v, np.float64)
    return out


def generate_scripted(task: str, path: str, num_demos: int, seed: int, noise_std: float = SCRIPTED_NOISE_STD,
                      max_attempts: int = None) -> str:
    """Record num_demos successful scripted demos of `task` in robomimic's HDF5 layout at path.

    The env is built from robomimic's env_args for the task (robomimic_env_args), exactly as a
    loaded file's env would be. Attempt j resets with seed SeedSequence([seed, j]) and draws its
    action noise from the same sequence, so the file is deterministic for a seed. Each attempt runs
    until success (then stops, so rewards/dones are 1 only on the last row) or the task's episode
    cap; failures are dropped and counted. data.attrs['mvp_scripted'] records the settings and the
    success rate. An existing file with the same settings is reused; a file without the marker is
    never overwritten. Written to path + '.tmp', then renamed."""
    if task not in SCRIPTED:
        raise DatasetError(f"no scripted demonstrator for '{task}' (only {', '.join(SCRIPTED)}); download the "
                           f"human data from {dataset_url(task)} to {default_dataset_path(task)}")
    h5py = _import_h5py()
    from tqdm import tqdm
    spec = _task(task)
    settings = dict(demonstrator=f"{SCRIPTED[task].__name__} (mvp scripted, not human data)", task=task,
                    num_demos=num_demos, seed=seed, noise_std=noise_std, max_episode_steps=spec["max_episode_steps"])
    if os.path.exists(path):
        try:
            with h5py.File(path, "r") as f:
                old = json.loads(f["data"].attrs["mvp_scripted"]) if "mvp_scripted" in f["data"].attrs else None
        except Exception:
            old = "unreadable"
        if old is None:
            raise DatasetError(f"{path} exists and was not generated by this project (a human dataset?); "
                               f"refusing to overwrite it. Move it or pass another --dataset-dir.")
        if isinstance(old, dict) and all(old.get(k) == v for k, v in settings.items()):
            return path
        print(f"[robomimic] regenerating {path} (settings differ or file unreadable)", file=sys.stderr)
    env_args = robomimic_env_args(task)
    env = RobomimicEnv(env_args, spec["max_episode_steps"], source="scripted generator")
    max_attempts = max_attempts or 3 * num_demos + 10
    demos, attempts, started = [], 0, time.time()
    bar = tqdm(total=num_demos, desc=f"scripted {task} demos", unit="demo", dynamic_ncols=True)
    while len(demos) < num_demos and attempts < max_attempts:
        ss = np.random.SeedSequence([seed, attempts])
        env_seed, policy_seed = ss.generate_state(2)
        attempts += 1
        policy = SCRIPTED[task](np.random.default_rng(policy_seed), noise_std=noise_std, **_scripted_kwargs(task, env))
        env.reset(seed=int(env_seed))
        rec = {k: [] for k in ("obs", "next_obs", "actions", "rewards", "dones", "states")}
        done = success = False
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
        demos += [rec] if success else []
        bar.set_postfix(attempts=attempts, success=f"{len(demos) / attempts:.2f}", refresh=False)
        bar.update(int(success))
    bar.close()
    env.close()
    if len(demos) < num_demos:
        raise DatasetError(f"scripted {task} demonstrator succeeded in only {len(demos)} of {attempts} attempts; "
                           f"cannot record {num_demos} demos")
    settings.update(attempts=attempts, success_rate=round(len(demos) / attempts, 4),
                    seconds=round(time.time() - started, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    try:
        with h5py.File(tmp, "w") as f:
            data = f.create_group("data")
            total = 0
            for i, rec in enumerate(demos):
                g = data.create_group(f"demo_{i}")
                for part in ("obs", "next_obs"):
                    sub = g.create_group(part)
                    for k in rec[part][0]:
                        sub.create_dataset(k, data=np.stack([o[k] for o in rec[part]]))
                g.create_dataset("actions", data=np.stack(rec["actions"]))
                g.create_dataset("rewards", data=np.asarray(rec["rewards"], np.float64))
                g.create_dataset("dones", data=np.asarray(rec["dones"], np.int64))
                g.create_dataset("states", data=np.stack(rec["states"]))
                g.attrs["num_samples"] = len(rec["actions"])
                total += len(rec["actions"])
            data.attrs["total"] = total
            data.attrs["env_args"] = json.dumps(env_args, indent=4)
            data.attrs["mvp_scripted"] = json.dumps(settings)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"[robomimic] wrote {num_demos} scripted {task} demos ({total} steps) to {path}; scripted success "
          f"rate {settings['success_rate']:.2f} ({attempts} attempts, {settings['seconds']} s)", file=sys.stderr)
    return path


# ---- replay buffer on the device -----------------------------------------------------------------
class ReplayBuffer:
    """Flat transitions in one preallocated device tensor; offline data first, online steps appended.

    Chunks are read as h consecutive rows; 'terminals' marks the last row of each episode, 'masks'
    is 0 where bootstrapping must stop (success). Each field is a column block of one (capacity, width)
    tensor, so appending a transition is a single host-to-device copy, and the number of rows is also
    kept on the device, so sampling needs no host value and can be replayed inside a CUDA graph."""

    FIELDS = (("obs", "observations"), ("actions", "actions"), ("rewards", "rewards"), ("masks", "masks"),
              ("terminals", "terminals"), ("next_obs", "next_observations"))

    def __init__(self, data: dict, capacity: int, device):
        n = len(data["observations"])
        self.capacity, self.device = max(capacity, n), device
        arrays = [np.asarray(data[src], dtype=np.float32).reshape(n, -1) for _, src in self.FIELDS]
        widths = [a.shape[1] for a in arrays]
        self.rows = torch.zeros(self.capacity, sum(widths), device=device)
        self.rows[:n] = torch.as_tensor(np.concatenate(arrays, axis=1)).to(device)
        self.store, col = {}, 0
        for (key, src), w in zip(self.FIELDS, widths):
            view = self.rows[:, col:col + w]
            self.store[key] = view if np.ndim(data[src]) > 1 else view[:, 0]  # (capacity, dim) or (capacity,)
            col += w
        self.num_rows = torch.zeros((), dtype=torch.float64, device=device)  # the row count, read by sample_chunks
        self.size = n

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
        u = torch.rand(batch_size, generator=generator, device=self.device, dtype=torch.float64)
        idx = (u * (self.num_rows - chunk_len + 1)).long()  # uniform start in [0, size - h], exact in float64
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


# ---- CUDA graphs: record a step once, replay it as one launch (a reader may skip this) ------------
class CUDAGraphed:
    """Calls fn() eagerly `warmup` times, then records one call as a CUDA graph and replays it after.

    Why: an eager MVP update is about 380 small kernels, and launching them costs the host more than
    the GPU needs to run them (one H100: 12.9 ms wall, 2.9 ms of GPU work). A replay is one launch.
    What fn must respect:
    - it reads tensors at fixed addresses (replay buffer, networks, optimizer state, an input tensor the
      caller fills in place) and returns tensors that every replay overwrites;
    - no host synchronisation inside: no .item(), no shapes that depend on values;
    - its random numbers come from `generator`, registered with the graph: each replay advances it,
      so each replay draws fresh numbers, the same ones eager code would draw from that state.
    The warm-up calls are real calls (real updates); they run on a side stream so that lazy set-up
    (cuBLAS workspaces, autograd's streams, Adam's state) happens before recording, as PyTorch requires.
    """

    def __init__(self, fn: Callable, generator: torch.Generator, warmup: int = 3):
        self.fn, self.generator, self.warmup = fn, generator, warmup
        self.graph, self.out = None, None

    def __call__(self):
        if self.warmup > 0:
            self.warmup -= 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.fn()
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None:  # record (nothing runs yet), then the replay below does this call's work
            self.graph = torch.cuda.CUDAGraph()
            self.graph.register_generator_state(self.generator)
            with torch.cuda.graph(self.graph):
                self.out = self.fn()
        self.graph.replay()
        return self.out


# ---- evaluation ----------------------------------------------------------------------------------
def act_chunk(learner: Learner, obs: np.ndarray, num_candidates: int, chunk_len: int, device, generator) -> np.ndarray:
    """Best-of-N chunk for one observation, as (h, action_dim) numpy rows to execute open loop."""
    obs_t = torch.from_numpy(np.asarray(obs, dtype=np.float32))[None]
    if learner.cuda_graph:  # one recorded graph per (N, generator): copy the observation in, replay
        key = (num_candidates, id(generator))
        if key not in learner.graphs:
            obs_in = torch.zeros(obs_t.shape, device=device)
            def act():
                return best_of_n(learner.policy, learner.critic, obs_in, num_candidates, generator, learner.sample)[0]
            learner.graphs[key] = obs_in, CUDAGraphed(act, generator, warmup=1)
        obs_in, act = learner.graphs[key]
        obs_in.copy_(obs_t.pin_memory(), non_blocking=True)
        a = act()
    else:
        a, _ = best_of_n(learner.policy, learner.critic, obs_t.to(device), num_candidates, generator, learner.sample)
    return a.view(chunk_len, -1).cpu().numpy()  # CPU-GPU sync point: the env needs the action


# Extra eval.csv columns read from the env's step info: column -> info key, averaged over an episode's steps,
# then over episodes; NaN where the env does not report the key (robomimic). OGBench's manipspace envs report
# the gripper pad's contact force scaled to [0, 1], which reads 0 or about 1: the fraction of steps the gripper
# touches something, in practice a cube. A policy that never touches a cube is broken, not learning slowly.
EVAL_INFO_STATS = {"contact_frac": "proprio/gripper_contact"}


@torch.no_grad()
def run_episode(learner: Learner, env, seed: int, num_candidates: int, chunk_len: int, discount: float, device,
                generator) -> dict:
    """One evaluation episode, chunks open loop; returns its eval.csv columns (evaluate averages them).

    Besides success, return and length: the critic's estimate at the start, q0 = mean_K Q_k(s_0, a*_0) for the
    first chunk run, and the realised discounted return it estimates, sum_k gamma^k r_k over env steps (the
    chunked target sums per-step discounted rewards the same way). The critic bootstraps through time limits,
    so at the episode cap L the realised sum lacks a tail gamma^L V(s_L), e.g. -13.4 after 200 steps of -1."""
    obs, _ = env.reset(seed=seed)
    queue, rewards, info, done, q0 = [], [], {}, False, None
    seen = {col: [] for col in EVAL_INFO_STATS}
    while not done:
        if not queue:
            queue = list(act_chunk(learner, obs, num_candidates, chunk_len, device, generator))
            if q0 is None:  # one extra critic call per episode, on the chunk the env will run
                s0 = torch.as_tensor(obs, dtype=torch.float32, device=device)[None]
                a0 = torch.as_tensor(np.stack(queue), dtype=torch.float32, device=device).reshape(1, -1)  # (1, h * action_dim)
                q0 = learner.critic(s0, a0).mean().item()  # mean over K members; sync point, once per episode
        obs, reward, terminated, truncated, info = env.step(queue.pop(0))
        done = terminated or truncated
        rewards.append(float(reward))
        for col, key in EVAL_INFO_STATS.items():
            if key in info:
                seen[col].append(float(np.mean(info[key])))
    rewards = np.asarray(rewards)
    return dict(success_rate=float(info.get("success", 0.0)), return_mean=float(rewards.sum()),
                length_mean=len(rewards), q0_mean=q0,
                disc_return_mean=float(discount ** np.arange(len(rewards)) @ rewards),  # Eq. sum_k gamma^k r_k
                **{col: float(np.mean(v)) if v else float("nan") for col, v in seen.items()})


def evaluate(learner: Learner, env, episodes: int, num_candidates: int, chunk_len: int, discount: float, device,
             seed: int, desc: str = "eval", workers: int = 0, args: Args | None = None, task: dict | None = None) -> dict:
    """run_episode's numbers averaged over episodes, for best-of-N and, on the same env seeds, for the
    behaviour-cloned policy alone (N = 1, columns prefixed bc_): what selection adds over imitation.
    Each episode's candidate noise is seeded from its env seed (learner.eval_generator), so evaluating
    leaves the training's random draws alone. workers (--eval-workers) > 0 runs the episodes in processes
    that rebuild the learner from args and the env from task (a checkpoint's env_name, env_args, obs_dim,
    action_dim); on a CPU run the numbers are the same as here."""
    from tqdm import tqdm
    jobs = [(n, seed + ep, chunk_len, discount) for n in (num_candidates, 1) for ep in range(episodes)]
    workers = eval_processes(workers, device)
    if workers:
        nets = {name: {k: v.detach().cpu() for k, v in getattr(learner, name).state_dict().items()}
                for name in ("policy", "critic")}
        eps = _episodes_in_workers(jobs, workers, (task, dataclasses.asdict(args), nets), desc)
    else:
        eps = [run_episode(learner, env, s, n, h, g, device, learner.eval_generator.manual_seed(s))
               for n, s, h, g in tqdm(jobs, desc=f"{desc} N={num_candidates}, then N=1", leave=False, dynamic_ncols=True)]
    res = {}
    for i, prefix in ((0, ""), (episodes, "bc_")):
        part = eps[i:i + episodes]
        res.update({prefix + k: float(np.mean([e[k] for e in part])) for k in part[0]})
    return res


# Evaluation in worker processes: env stepping (MuJoCo, on the CPU) dominates an episode, so episodes
# spread over cores. Each worker holds a CPU float32 copy of the policy and critic and its own env, and
# seeds each episode's candidate noise from the episode's seed, as evaluate does here.
_eval_worker = {}


def _init_eval_worker(task: dict, args: dict, nets: dict):
    torch.set_num_threads(1)
    cpu_args = Args(**{**args, "cuda_graph": "off"})
    learner = make_learner(task["obs_dim"], task["action_dim"] * cpu_args.chunk_len, cpu_args, torch.device("cpu"))
    learner.policy.load_state_dict(nets["policy"])
    learner.critic.load_state_dict(nets["critic"])
    _eval_worker.update(learner=learner, env=env_from_checkpoint(task))


def _episodes_in_workers(jobs: list, workers: int, worker_init: tuple, desc: str) -> list:
    """_eval_episode over jobs in `workers` spawned processes. They start with Ctrl-C and SIGTERM ignored
    (a terminal or Slurm signals the whole process group): those are the training process's, which saves
    after the evaluation; a second signal drops the episodes not started."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp
    from tqdm import tqdm
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=mp.get_context("spawn"),
                             initializer=_init_eval_worker, initargs=worker_init) as pool:
        previous = set_stop_handlers(signal.SIG_IGN)  # inherited by the processes map() starts
        try:
            results = pool.map(_eval_episode, jobs)
        finally:
            set_stop_handlers(previous)
        try:
            return list(tqdm(results, total=len(jobs), desc=f"{desc} ({workers} processes)", leave=False,
                             dynamic_ncols=True))
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def eval_processes(requested: int, device) -> int:
    """--eval-workers resolved: -1 (auto) is this process on a CPU run, one per spare core (at most 16) with CUDA."""
    if requested >= 0:
        return requested
    return min(16, (os.cpu_count() or 1) - 1) if device.type == "cuda" else 0


def _eval_episode(job) -> dict:
    num_candidates, seed, chunk_len, discount = job
    learner = _eval_worker["learner"]
    return run_episode(learner, _eval_worker["env"], seed, num_candidates, chunk_len, discount, torch.device("cpu"),
                       learner.eval_generator.manual_seed(seed))


# ---- logging and checkpoints ---------------------------------------------------------------------
class CSVLog:
    """Appends rows to a CSV, header from the first row, flushed on every write so a killed run keeps them."""

    def __init__(self, path: str):
        self.path, self.file, self.writer = path, None, None

    def write(self, row: dict):
        if self.writer is None:
            self.file = open(self.path, "a", newline="")
            self.writer = csv.DictWriter(self.file, fieldnames=list(row))
            if self.file.tell() == 0:
                self.writer.writeheader()
        self.writer.writerow(row)
        self.file.flush()

    def close(self):
        if self.file:
            self.file.close()


class NonFiniteLoss(Exception):
    pass


class LossMonitor:
    """Tracks the first update whose losses were not finite, on the device (no per-step sync)."""

    def __init__(self, device):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def observe(self, step: int, info: dict):
        bad = ~torch.isfinite(torch.stack([info["critic_loss"], info["mf_loss"], info["ivc_loss"]])).all()
        self.first_bad = torch.where(bad & (self.first_bad < 0), torch.full_like(self.first_bad, step), self.first_bad)

    def check(self, phase: str, info: dict):
        if self.first_bad.item() >= 0:  # sync point, only at log time
            terms = ", ".join(f"{k}={float(info[k]):.4g}" for k in ("critic_loss", "mf_loss", "ivc_loss"))
            raise NonFiniteLoss(f"non-finite loss in the {phase} phase, first at update {self.first_bad.item()} "
                                f"(latest: {terms}). Try a lower --lr, or check the dataset for NaN/inf values.")


def save_checkpoint(path: str, learner: Learner, args: Args, extra: dict):
    """Networks, target, optimizers and the args as plain values: loadable with weights_only=True."""
    state = dict(policy=learner.policy.state_dict(), critic=learner.critic.state_dict(),
                 target_critic=learner.target_critic.state_dict(),
                 policy_opt=learner.policy_opt.state_dict(), critic_opt=learner.critic_opt.state_dict(),
                 args=dataclasses.asdict(args), **extra)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, device) -> dict:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"error: checkpoint {path} does not exist")
    except Exception as e:
        raise SystemExit(f"error: checkpoint {path} is truncated or corrupt ({type(e).__name__}: {e})")


# ---- resumable checkpoints: --save-interval, Ctrl-C, --resume ----------------------------------
RESUME_FORMAT = 1
KEEP_CHECKPOINTS = 2  # the newest two, so a checkpoint cut short by a kill always has a good predecessor


def check_run_dir(run_dir: str, fresh: bool):
    """Fail before training, not hours later, if the run directory cannot be written. A fresh run never
    writes over another run's checkpoints; logs left by one that died before its first checkpoint go."""
    if fresh and os.path.exists(os.path.join(run_dir, "summary.json")):
        raise SystemExit(f"error: the run directory {run_dir} already holds a finished run; pass another --run-dir")
    if fresh and glob.glob(os.path.join(run_dir, "checkpoints", "resume-*.pt")):
        raise SystemExit(f"error: the run directory {run_dir} already holds a resumable run; continue it with "
                         f"`python mvp.py --resume {run_dir}`, or pass another --run-dir")
    stale = glob.glob(os.path.join(run_dir, "*.csv")) if fresh else []
    if stale:
        print(f"[mvp] {run_dir} has the logs of a run that left no checkpoint: starting it over", flush=True)
    for path in stale:
        os.remove(path)
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"error: cannot write to the run directory {run_dir} ({e.strerror or e}); pass a writable --run-dir")


def check_disk_space(run_dir: str, learner: Learner, online_steps: int, obs_dim: int, action_dim: int):
    """Estimate what the checkpoints will take (networks, Adam moments, online buffer rows) and refuse
    to start if the disk cannot hold them."""
    n_train = sum(p.numel() for m in (learner.policy, learner.critic) for p in m.parameters())
    n_target = sum(p.numel() for p in learner.target_critic.parameters())
    net_bytes = 4 * (3 * n_train + n_target)  # weights + two Adam moments, and the target critic
    row_bytes = 4 * online_steps * (2 * obs_dim + action_dim + 3)
    need = (KEEP_CHECKPOINTS + 1) * (net_bytes + row_bytes) + net_bytes  # kept ones, one being written, final
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise SystemExit(f"error: {run_dir} has {free / 1e9:.2f} GB free, but this run's checkpoints need about "
                         f"{need / 1e9:.2f} GB. Free some space or pass another --run-dir.")


def rng_states(gen: torch.Generator) -> dict:
    """Every random stream the run draws from, as tensors and plain values (weights_only-loadable)."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return dict(torch=torch.get_rng_state(), gen=gen.get_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                numpy=[name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
                python=[version, list(internal), gauss])


def set_rng_states(state: dict, gen: torch.Generator):
    torch.set_rng_state(state["torch"])
    gen.set_state(state["gen"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def run_state(learner: Learner, buffer: ReplayBuffer, dataset_rows: int, gen, env) -> dict:
    """What a checkpoint needs beyond positions: networks, optimizers, RNGs, the env's RNG and the
    online rows of the replay buffer (the offline rows are reloaded from the dataset)."""
    return dict(policy=learner.policy.state_dict(), critic=learner.critic.state_dict(),
                target_critic=learner.target_critic.state_dict(),
                policy_opt=learner.policy_opt.state_dict(), critic_opt=learner.critic_opt.state_dict(),
                rng=rng_states(gen), env_rng=dict(env.unwrapped.np_random.bit_generator.state),
                buffer_rows={k: v[dataset_rows:buffer.size].cpu() for k, v in buffer.store.items()})


def restore_run(state: dict, learner: Learner, buffer: ReplayBuffer, gen, env, run_dir: str):
    """Load a checkpoint into a freshly built run; trim the logs to the checkpoint's step."""
    learner.policy.load_state_dict(state["policy"])
    learner.critic.load_state_dict(state["critic"])
    learner.target_critic.load_state_dict(state["target_critic"])
    learner.policy_opt.load_state_dict(state["policy_opt"])
    learner.critic_opt.load_state_dict(state["critic_opt"])
    set_rng_states(state["rng"], gen)
    env_rng = np.random.Generator(np.random.PCG64())
    env_rng.bit_generator.state = state["env_rng"]
    env.unwrapped.np_random = env_rng
    rows = state["buffer_rows"]
    n = len(rows["obs"])
    for k, v in rows.items():
        buffer.store[k][buffer.size:buffer.size + n] = v.to(buffer.device)
    buffer.size += n
    pos, evals = state["pos"], list(state["evals"])
    # rows written after the checkpoint (before the run died) are dropped, so the logs continue without duplicates
    truncate_csv(os.path.join(run_dir, "offline.csv"), lambda r: int(r["step"]) <= pos["offline"])
    truncate_csv(os.path.join(run_dir, "online.csv"), lambda r: int(r["step"]) <= pos["online"])
    truncate_csv(os.path.join(run_dir, "eval.csv"), lambda r: len(evals) > 0 and
                 any(str(e["step"]) == r["step"] and e["phase"] == r["phase"] for e in evals))
    return pos, evals


def truncate_csv(path: str, keep: Callable):
    if not os.path.exists(path):
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, [r for r in reader if keep(r)]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        if fields and rows:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    os.replace(tmp, path)


def save_resume_checkpoint(run_dir: str, tag: int, state: dict) -> str:
    """Atomic write (temporary file, fsync, rename), then keep only the newest KEEP_CHECKPOINTS."""
    folder = os.path.join(run_dir, "checkpoints")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"resume-{tag:010d}.pt")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old in sorted(glob.glob(os.path.join(folder, "resume-*.pt")))[:-KEEP_CHECKPOINTS]:
        os.remove(old)
    return path


def load_resume_checkpoint(run_dir: str):
    """The newest readable checkpoint of a run; a truncated or corrupt one is reported and skipped."""
    paths = sorted(glob.glob(os.path.join(run_dir, "checkpoints", "resume-*.pt")), reverse=True)
    if not paths:
        raise SystemExit(f"error: no checkpoint in {os.path.join(run_dir, 'checkpoints')}: nothing to resume "
                         f"(checkpoints are written every --save-interval steps or --save-minutes, and on Ctrl-C or SIGTERM)")
    for path in paths:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)  # cannot run code, unlike pickle
            if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
                raise ValueError("not a checkpoint of this project")
            return path, state
        except Exception as e:
            print(f"[mvp] checkpoint {path} is truncated or corrupt ({type(e).__name__}: {str(e)[:200]}); "
                  f"falling back to the previous one", flush=True)
    raise SystemExit(f"error: every checkpoint in {os.path.join(run_dir, 'checkpoints')} is truncated or corrupt")


def resume_args(args: Args):
    """Settings of the run being resumed; flags given now must agree with them, except those that say
    where and how the same computation runs (device, threads, bon_block, cuda_graph, compile, matmul_precision,
    select_dtype, eval_workers, save_minutes) and the phases' lengths, which may grow: a finished run continues."""
    path, state = load_resume_checkpoint(args.resume)
    names = {f.name for f in dataclasses.fields(Args)}
    saved = Args(**{k: v for k, v in state["args"].items() if k in names})
    how = {"device", "threads", "bon_block", "cuda_graph", "compile", "matmul_precision", "select_dtype", "eval_workers", "save_minutes"}
    explicit, pos = getattr(args, "_explicit", set()), state["pos"]
    for k in sorted(explicit & {"offline_steps", "online_steps"}):  # a phase may grow, so a finished run continues
        phase = k.split("_")[0]
        if getattr(args, k) < pos[phase] or (phase == "offline" and pos["online"] and args.offline_steps != saved.offline_steps):
            raise SystemExit(f"error: the run in {args.resume} is at offline step {pos['offline']}, online step "
                             f"{pos['online']}: a phase can only grow, and the offline one only before the online one begins")
        how = how | {k}
    for k in sorted(explicit & names - how - {"resume", "run_dir"}):
        given, kept = getattr(args, k), getattr(saved, k)
        if k == "env":
            given, kept = resolve_env_name(given), resolve_env_name(kept)
        if given != kept:
            raise SystemExit(f"error: the run in {args.resume} was trained with --{k.replace('_', '-')} {kept}, "
                             f"not {given}; a resumed run keeps its settings (start a new run to change them)")
    saved.run_dir, saved.resume, saved.device, saved.threads = args.resume, args.resume, args.device, args.threads
    for k in explicit & how:
        setattr(saved, k, getattr(args, k))
    print(f"[mvp] resuming from {path}")
    return saved, state


# ================================================================================================
# Training: an offline loop on the dataset, the replay-buffer hand-off, an online loop.
# ================================================================================================
def seed_everything(seed: int, device) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def log_row(phase_step: int, info: dict, extra: dict) -> dict:
    return {"step": phase_step, **{k: round(float(v), 6) for k, v in info.items()}, **extra}  # .item() here only


class StopFlag:
    """Ctrl-C (SIGINT) or SIGTERM (`kill`, Slurm's time limit or preemption, `docker stop`) sets a flag
    that the loops check between steps, so the run saves and exits cleanly; a second signal aborts at
    once. A failed evaluation (an env or worker crash) is kept in `failure`: the run saves the same way,
    then raises it."""

    def __init__(self):
        self.requested, self.failure = 0, None  # requested: the number of the signal received

    def __call__(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signum
        print(f"\n[mvp] {self.name}: saving a checkpoint after this step (again to abort without saving)", flush=True)

    @property
    def name(self) -> str:
        return "Ctrl-C" if self.requested == signal.SIGINT else signal.Signals(self.requested).name


def set_stop_handlers(handler) -> dict:
    """Sets the handler of SIGINT and SIGTERM (one for both, or the dict a previous call returned);
    returns the previous ones."""
    return {s: signal.signal(s, handler[s] if isinstance(handler, dict) else handler) for s in (signal.SIGINT, signal.SIGTERM)}


def phase_rate(steps: int, seconds: float) -> float | None:
    """Steps per second of a phase in this process; None where it ran no steps (done before a --resume)."""
    return round(steps / max(seconds, 1e-9), 2) if steps else None


def train(args: Args, resume: dict | None = None) -> dict:
    """Offline loop, replay-buffer hand-off, online loop. `resume` is a checkpoint from --resume."""
    from tqdm import tqdm

    device = pick_device(args.device, args.threads, args.matmul_precision)
    env_name = resolve_env_name(args.env)
    run_dir = args.run_dir or os.path.join("runs", f"{args.env}_s{args.seed}_{time.strftime('%Y%m%d-%H%M%S')}")
    check_run_dir(run_dir, fresh=resume is None)
    with open(os.path.join(run_dir, "args.json"), "w") as f:  # rewritten on --resume: the phases may have grown
        json.dump(dataclasses.asdict(args), f, indent=1)
    print(f"[mvp] {env_name} on {device}, run dir {run_dir}")

    gen = seed_everything(args.seed, device)
    dataset, new_env = load_task(env_name, args)
    if args.chunk_len > len(dataset["observations"]):  # the chunk sampler would index before the first row
        raise SystemExit(f"error: --chunk-len {args.chunk_len} is longer than the dataset ({len(dataset['observations'])} "
                         f"rows); lower --chunk-len or use more --dataset-episodes")
    env, eval_env = new_env(), new_env()
    obs_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
    task = dict(env_name=env_name, obs_dim=obs_dim, action_dim=action_dim,
                env_args=json.dumps(getattr(new_env, "env_args", None)))  # what --eval-only needs to rebuild the env
    learner = make_learner(obs_dim, action_dim * args.chunk_len, args, device)
    buffer = ReplayBuffer(dataset, len(dataset["observations"]) + args.online_steps, device)
    check_disk_space(run_dir, learner, args.online_steps, obs_dim, action_dim)
    monitor = LossMonitor(device)
    pos = dict(offline=0, online=0, episodes=0, last_ep=dict(episode=0, episode_return=float("nan"),
                                                             episode_length=0, episode_success=float("nan")))
    evals = []
    if resume is not None:
        if (resume["obs_dim"], resume["action_dim"]) != (obs_dim, action_dim):
            raise SystemExit(f"error: the checkpoint in {run_dir} has observation/action sizes "
                             f"{resume['obs_dim']}/{resume['action_dim']}, the task has {obs_dim}/{action_dim}")
        pos, evals = restore_run(resume, learner, buffer, gen, env, run_dir)
        print(f"[mvp] resumed at offline step {pos['offline']}, online step {pos['online']}")
    eval_log = CSVLog(os.path.join(run_dir, "eval.csv"))
    stop = StopFlag()
    previous_handlers = set_stop_handlers(stop)
    saved_at = time.time()

    def checkpoint(phase_tag: str):
        nonlocal saved_at
        state = dict(format=RESUME_FORMAT, **task,  # task: what --eval-only needs, so it reads these files too
                     args=dataclasses.asdict(args), pos=pos, evals=evals, **run_state(learner, buffer, len(dataset["observations"]), gen, env))
        path = save_resume_checkpoint(run_dir, pos["offline"] + pos["online"], state)
        tqdm.write(f"[mvp] checkpoint {path} ({phase_tag})")
        saved_at = time.time()

    def time_to_save(step, last):  # every --save-interval steps and at a phase's end, or --save-minutes after the last
        by_step = args.save_interval and (step % args.save_interval == 0 or last)
        return bool(by_step or (args.save_minutes and time.time() - saved_at > 60 * args.save_minutes))

    def interrupted():
        checkpoint("interrupted" if stop.failure is None else "evaluation failed")
        set_stop_handlers(previous_handlers)
        if stop.failure is not None:
            print(f"[mvp] the evaluation failed (below); the run is saved and a resumed run redoes the evaluation "
                  f"first. Once its cause is fixed: python mvp.py --resume {run_dir}", flush=True)
            raise stop.failure
        print(f"[mvp] stopped by {stop.name}. Resume with: python mvp.py --resume {run_dir}", flush=True)
        raise SystemExit(128 + stop.requested)  # 130 for Ctrl-C, 143 for SIGTERM, as the shell reports them

    def run_eval(phase, step, bar):
        nonlocal eval_seconds
        start = time.time()
        try:
            res = evaluate(learner, eval_env, args.eval_episodes, args.num_candidates, args.chunk_len, args.discount,
                           device, seed=10_000 * (args.seed + 1), desc=f"eval {phase} {step}",
                           workers=args.eval_workers, args=args, task=task)
        except Exception as e:  # the loop saves (pos records the evaluation to redo), then raises e
            stop.failure, pos["failed_eval"] = e, phase
            return
        pos.pop("failed_eval", None)
        row = dict(phase=phase, step=step, **res)
        eval_log.write(row)
        evals.append(row)
        bar.set_postfix(success=f"{res['success_rate']:.2f}", refresh=True)
        tqdm.write(f"[eval] {phase} step {step}: success {res['success_rate']:.3f} (N = 1: {res['bc_success_rate']:.3f}), "
                   f"return {res['return_mean']:.1f} (N = 1: {res['bc_return_mean']:.1f}), Q(s0, a*) "
                   f"{res['q0_mean']:.2f} vs discounted return {res['disc_return_mean']:.2f}, contact {res['contact_frac']:.2f}")
        eval_seconds += time.time() - start

    def redo_failed_eval(phase, bar):  # a run resumed after a failed evaluation first runs it again
        if pos.get("failed_eval") == phase:
            run_eval(phase, pos[phase], bar)
            if stop.failure:
                interrupted()

    # ---- offline: behaviour-clone the dataset's chunks by mean flow, learn Q, select best-of-N ----
    log = CSVLog(os.path.join(run_dir, "offline.csv"))
    bar = tqdm(range(pos["offline"] + 1, args.offline_steps + 1), desc="offline", unit="upd", dynamic_ncols=True,
               initial=pos["offline"], total=args.offline_steps)
    tick = phase_start = time.time()
    eval_seconds = 0.0
    train_step = make_train_step(learner, buffer, buffer_target, args, gen)
    redo_failed_eval("offline", bar)
    for step in bar:
        info = train_step()
        monitor.observe(step, info)
        if step % args.log_interval == 0 or step == args.offline_steps:
            monitor.check("offline", info)
            n = step % args.log_interval or args.log_interval
            log.write(log_row(step, info, dict(updates_per_s=round(n / (time.time() - tick), 2))))
            tick = time.time()
        if (args.eval_interval and step % args.eval_interval == 0) or step == args.offline_steps:
            run_eval("offline", step, bar)
            tick = time.time()
        pos["offline"] = step
        if time_to_save(step, step == args.offline_steps):
            checkpoint("end of phase" if step == args.offline_steps else "periodic")
        if stop.requested or stop.failure:
            interrupted()
    bar.close()
    log.close()
    offline_rate = phase_rate(args.offline_steps - bar.initial, time.time() - phase_start - eval_seconds)
    del train_step  # frees a recorded graph's memory before the online one is recorded

    # ---- hand-off: the replay buffer already holds the offline data; online rows are appended ----
    imitation = best_of_n_target if args.imitation_target == "best_of_n" else buffer_target
    log = CSVLog(os.path.join(run_dir, "online.csv"))
    bar = tqdm(range(pos["online"] + 1, args.online_steps + 1), desc="online", unit="step", dynamic_ncols=True,
               initial=pos["online"], total=args.online_steps)
    # obs is None between episodes: the env is reset lazily, so a checkpoint taken there needs only the env's RNG
    obs = env.reset(seed=args.seed)[0] if pos["online"] == 0 else None
    queue, ep_return, ep_len, save_due = [], 0.0, 0, False
    tick, updates_since = time.time(), 0
    phase_start, eval_seconds = time.time(), 0.0
    train_step = make_train_step(learner, buffer, imitation, args, gen)
    redo_failed_eval("online", bar)
    for step in bar:
        if obs is None:
            obs, _ = env.reset()
        if not queue:  # a new chunk every h steps, executed open loop
            queue = list(act_chunk(learner, obs, args.num_candidates, args.chunk_len, device, gen))
        action = queue.pop(0)
        next_obs, reward, terminated, truncated, info = env.step(action)
        buffer.add(obs, action, reward, 1.0 - float(terminated), float(terminated or truncated), next_obs)
        obs, ep_return, ep_len = next_obs, ep_return + float(reward), ep_len + 1
        if terminated or truncated:
            pos["episodes"] += 1
            pos["last_ep"] = dict(episode=pos["episodes"], episode_return=ep_return, episode_length=ep_len,
                                  episode_success=float(info.get("success", 0.0)))
            obs, queue, ep_return, ep_len = None, [], 0.0, 0
        if step > args.start_training:
            info = train_step()
            monitor.observe(step, info)
            updates_since += 1
            if step % args.log_interval == 0 or step == args.online_steps:
                monitor.check("online", info)
                rate = dict(updates_per_s=round(updates_since / (time.time() - tick), 2),
                            env_steps_per_s=round(args.log_interval / (time.time() - tick), 2))
                log.write(log_row(step, info, {**rate, **pos["last_ep"]}))
                tick, updates_since = time.time(), 0
        if (args.eval_interval and step % args.eval_interval == 0) or step == args.online_steps:
            run_eval("online", step, bar)
            tick = time.time()
        pos["online"] = step
        last = step == args.online_steps
        save_due = save_due or time_to_save(step, last)
        if obs is not None and (stop.requested or stop.failure or (save_due and last)):
            # stopped (or ended) mid-episode: the partial episode ends here, as a time-limit truncation
            buffer.store["terminals"][buffer.size - 1] = 1.0
            obs, queue, ep_return, ep_len = None, [], 0.0, 0
        if stop.requested or stop.failure:
            interrupted()
        if save_due and obs is None:  # periodic checkpoints wait for the episode's end: exact resume
            checkpoint("end of phase" if last else "periodic")
            save_due = False
    bar.close()
    log.close()
    eval_log.close()
    set_stop_handlers(previous_handlers)
    online_rate = phase_rate(args.online_steps - bar.initial, time.time() - phase_start - eval_seconds)

    save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), learner, args, task)
    summary = dict(env=env_name, seed=args.seed, device=str(device), offline_steps=args.offline_steps,
                   online_steps=args.online_steps, offline_updates_per_s=offline_rate,
                   online_env_steps_per_s=online_rate, final_eval=evals[-1] if evals else None, evals=evals,
                   run_dir=run_dir)
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"[mvp] done: {json.dumps(summary['final_eval'])}; outputs in {run_dir}")
    return summary


def eval_only(args: Args) -> dict:
    """Evaluate a saved policy on the environment it was trained on, best-of-N with the checkpoint's N
    or the --num-candidates given now."""
    device = pick_device(args.device, args.threads, args.matmul_precision)
    ckpt = load_checkpoint(args.checkpoint, device)
    saved = Args(**{k: v for k, v in ckpt["args"].items() if k in {f.name for f in dataclasses.fields(Args)}})
    env_name, explicit = ckpt["env_name"], getattr(args, "_explicit", set())
    if "env" in explicit and resolve_env_name(args.env) != env_name:
        raise SystemExit(f"error: checkpoint {args.checkpoint} was trained on {env_name}, not {resolve_env_name(args.env)}")
    for k in sorted(explicit & {"policy", "flow_steps", "hidden_dim", "num_layers", "num_critics", "chunk_len"}):
        if getattr(args, k) != getattr(saved, k):
            raise SystemExit(f"error: checkpoint {args.checkpoint} was trained with --{k.replace('_', '-')} "
                             f"{getattr(saved, k)}, not {getattr(args, k)}; it is evaluated as trained "
                             f"(only --num-candidates and how the evaluation runs may change)")
    if "num_candidates" in explicit:
        saved.num_candidates = args.num_candidates
    learner = make_learner(ckpt["obs_dim"], ckpt["action_dim"] * saved.chunk_len, saved, device)
    learner.policy.load_state_dict(ckpt["policy"])
    learner.critic.load_state_dict(ckpt["critic"])
    seed_everything(args.seed, device)
    task = {k: ckpt.get(k) for k in ("env_name", "env_args", "obs_dim", "action_dim")}
    res = evaluate(learner, env_from_checkpoint(ckpt), args.eval_episodes, saved.num_candidates, saved.chunk_len,
                   saved.discount, device, seed=10_000 * (args.seed + 1), workers=args.eval_workers, args=saved,
                   task=task)
    print(json.dumps(dict(env=env_name, checkpoint=args.checkpoint, episodes=args.eval_episodes,
                          num_candidates=saved.num_candidates, **res)))
    return res


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.eval_only:
            return eval_only(args)
        if args.resume:
            return train(*resume_args(args))
        return train(args)
    except (DatasetError, NonFiniteLoss) as e:
        raise SystemExit(f"error: {e}")
    except RuntimeError as e:  # out of memory: torch.OutOfMemoryError on CUDA, the allocator's RuntimeError on CPU
        if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
            raise
        tried = re.search(r"[Tt]ried to allocate [0-9.]+ ?[A-Za-z]+", str(e))
        raise SystemExit(f"error: out of memory ({tried[0].strip() if tried else 'allocation failed'}). Lower --num-candidates, "
                         f"--batch-size or --hidden-dim (a new run), or score the critic target's best-of-N in blocks "
                         f"with --bon-block 32 (also with --resume, from the last checkpoint)")


if __name__ == "__main__":
    main()
