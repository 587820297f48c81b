"""Toy 2D: what the instantaneous velocity constraint (IVC) changes, on targets whose flow is known.

MVP trains u_theta(a_t, t, r | s), the *mean* velocity of the noise-to-action flow over [t, r], so
one call maps noise to an action: a = eps + u(eps, 0, 1 | s). The mean-flow identity L_MF fixes u
only up to a term C(a, r) / (r - t); the IVC term L_IVC pins the boundary u(a, t, t) = v(a, t).
This script trains the network and losses of mvp.py (imported, not copied) on 2D Gaussian mixtures,
where the true marginal velocity v*(x, t) has a closed form and the true mean velocity u*(x, t, r)
follows from integrating it finely, and compares four variants trained with the same seeds, steps
and network:

    mf         L_MF only, r != t on every row (lambda = 0, the paper's ablation)
    mvp        L_MF + lambda * L_IVC with lambda = 1 (the paper's method)
    meanflow   L_MF with a fraction of rows at r = t and no separate IVC term (MeanFlow's boundary)
    fm         plain flow matching on u(a_t, t, t), sampled with 1 and with 10 Euler steps

It reports (1) the sliced Wasserstein-2 distance between one-step samples and the target, mean and
std over seeds, and (2) the mean squared error ||u_theta(x, t, r) - u*(x, t, r)||^2 on points x
drawn from the true p_t, as a function of the gap r - t (gap 0 is the boundary u(x, t, t) = v*).

Run:    python toy_2d.py            (3 targets x 3 seeds x 4 variants; about 3 min on a 2-core CPU)
        python toy_2d.py --quick    (smoke test, well under 30 s)
Writes: <out-dir>/toy_2d.png, <out-dir>/toy_2d.json, and prints a markdown table.

Time convention as in mvp.py and the paper: noise at t = 0, data at t = 1,
a_t = (1 - t) eps + t a1, v = a1 - eps.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

import mvp

GAPS = (0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)  # the r - t values at which u* error is measured


# ================================================================================================
# Arguments
# ================================================================================================
@dataclass
class ToyArgs:
    seeds: int = field(default=3, metadata=dict(help="seeds per (target, variant); seeds are 0..seeds-1"))
    steps: int = field(default=600, metadata=dict(help="gradient steps per training run (same for every variant)"))
    batch_size: int = field(default=512, metadata=dict(help="minibatch size (fresh target samples every step)"))
    lr: float = field(default=3e-3, metadata=dict(help="Adam learning rate (decayed linearly to 0)"))
    hidden_dim: int = field(default=128, metadata=dict(help="width of the mean-velocity MLP"))
    num_layers: int = field(default=3, metadata=dict(help="hidden layers of the mean-velocity MLP"))
    ivc_coef: float = field(default=1.0, metadata=dict(help="lambda of the mvp variant"))
    equal_frac: float = field(default=0.5, metadata=dict(help="fraction of r = t rows in the meanflow variant"))
    eval_samples: int = field(default=16384, metadata=dict(help="samples per distance (per state for the conditional target)"))
    eval_points: int = field(default=1024, metadata=dict(help="points x ~ p_t per gap for the u* error"))
    ode_steps: int = field(default=100, metadata=dict(help="RK4 steps per unit time when integrating the true flow"))
    targets: str = field(default="ring8,checkerboard,rotating3", metadata=dict(help="comma-separated target names"))
    out_dir: str = field(default="toy_out", metadata=dict(help="where toy_2d.png and toy_2d.json go"))
    quick: bool = field(default=False, metadata=dict(help="tiny budgets for a smoke test"))
    sampler_study: bool = field(default=False, metadata=dict(help="instead: MVP trained with each (t, r) sampler of SAMPLERS, a table"))


QUICK = dict(seeds=2, steps=40, batch_size=256, eval_samples=2048, eval_points=256, ode_steps=40)


def parse_args(argv=None) -> ToyArgs:
    """Flags with dashes built from ToyArgs; --quick overrides the budgets it names in QUICK."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(ToyArgs):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
        else:
            kind = {"int": int, "float": float, "str": str}[f.type]
            parser.add_argument(flag, type=kind, default=f.default, help=f.metadata["help"] + f" (default {f.default})")
    args = ToyArgs(**vars(parser.parse_args(argv)))
    if args.quick:
        args = dataclasses.replace(args, **QUICK)
    unknown = set(args.targets.split(",")) - set(TARGETS)
    if unknown:
        parser.error(f"unknown --targets {sorted(unknown)}; choose from {sorted(TARGETS)}")
    if args.seeds < 1 or args.steps < 1:
        parser.error("--seeds and --steps must be >= 1")
    if not 0.0 <= args.equal_frac <= 1.0 or args.ivc_coef < 0:
        parser.error("--equal-frac must be in [0, 1] and --ivc-coef >= 0")
    return args


# ================================================================================================
# Targets: isotropic Gaussian mixtures sum_k w_k N(m_k(s), std_k^2 I)
# ================================================================================================
@dataclass
class MixtureTarget:
    """A 2D Gaussian mixture whose means may rotate with a 1-D state s in [-1, 1].

    The targets span about [-5, 5]^2, the usual scale of 2D flow toys, with modes ~10 std apart.
    (Scaled into [-1, 1]^2, where mvp.one_step's clip would be harmless, the modes sit ~0.5 apart
    inside the unit noise, and at this script's budget even 10-step flow matching blurred them.)
    """
    name: str
    means: torch.Tensor  # (K, 2) at s = 0
    weights: torch.Tensor  # (K,)
    stds: torch.Tensor  # (K,)
    rotation_per_state: float = 0.0  # means are rotated by this angle * s; 0: unconditional

    @property
    def conditional(self) -> bool:
        return self.rotation_per_state != 0.0

    def means_at(self, s):
        """m_k(s) for each row's state s (N, 1) -> (N, K, 2)."""
        angle = (self.rotation_per_state * s).to(self.means.dtype)  # (N, 1)
        cos, sin = torch.cos(angle)[:, :, None], torch.sin(angle)[:, :, None]  # (N, 1, 1)
        mx, my = self.means[None, :, 0:1], self.means[None, :, 1:2]  # (1, K, 1) each
        return torch.cat([cos * mx - sin * my, sin * mx + cos * my], dim=-1)

    def sample_states(self, n: int, generator):
        """s ~ U(-1, 1) for the conditional target; s = 0 (obs of zeros) for the others."""
        if not self.conditional:
            return torch.zeros(n, 1)
        return 2 * torch.rand(n, 1, generator=generator) - 1

    def sample(self, s, generator):
        """a1 ~ p(a | s), one draw per row of s (N, 1) -> (N, 2)."""
        k = torch.multinomial(self.weights, s.shape[0], replacement=True, generator=generator)  # (N,)
        m = self.means_at(s)[torch.arange(s.shape[0]), k]  # (N, 2)
        return m + self.stds[k, None] * torch.randn(m.shape, generator=generator, dtype=m.dtype)

    def double(self) -> MixtureTarget:
        """The same target in float64, for the ground-truth flow."""
        return dataclasses.replace(self, means=self.means.double(), weights=self.weights.double(),
                                   stds=self.stds.double())


def ring8() -> MixtureTarget:
    """8 equal Gaussians on a circle of radius 4 (neighbours 3.1 apart, std 0.3)."""
    angles = torch.arange(8) * (2 * math.pi / 8)
    means = 4.0 * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    return MixtureTarget("ring8", means, torch.full((8,), 1 / 8), torch.full((8,), 0.3))


def checkerboard() -> MixtureTarget:
    """The 8 'black' cells of a 4 x 4 checkerboard on [-3, 3]^2, one Gaussian each (diagonal
    neighbours 2.8 apart, std 0.3)."""
    centres = [-3.0, -1.0, 1.0, 3.0]
    means = torch.tensor([[x, y] for i, x in enumerate(centres) for j, y in enumerate(centres) if (i + j) % 2 == 0])
    return MixtureTarget("checkerboard", means, torch.full((8,), 1 / 8), torch.full((8,), 0.3))


def rotating3() -> MixtureTarget:
    """Conditional: 3 unequal Gaussians (weights 0.5, 0.3, 0.2, std 0.3) on a circle of radius 4,
    rotated by (pi / 3) * s, so +-60 degrees over s in [-1, 1]. The state s is the network's obs
    (obs_dim = 1), as the policy depends on s. (A rotation by pi * s was not learned at this budget:
    every variant, 10-step flow matching included, drew the same ring for every s.)"""
    angles = torch.arange(3) * (2 * math.pi / 3)
    means = 4.0 * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    return MixtureTarget("rotating3", means, torch.tensor([0.5, 0.3, 0.2]), torch.full((3,), 0.3), math.pi / 3)


TARGETS = {"ring8": ring8, "checkerboard": checkerboard, "rotating3": rotating3}


# ================================================================================================
# Ground truth: the marginal velocity v*(x, t) in closed form, the mean velocity u*(x, t, r) by RK4
# ================================================================================================
def true_velocity(target: MixtureTarget, s, x, t):
    """v*(x, t | s) = E[a1 - eps | a_t = x] for a Gaussian-mixture target (float64 target expected).

    Given component k, a_t ~ N(t m_k, sigma_k(t)^2 I) with sigma_k(t)^2 = (1 - t)^2 + t^2 std_k^2, and
    E[a1 - eps | a_t = x, k] = m_k + (sigma_k' / sigma_k) (x - t m_k), where sigma_k sigma_k' =
    -(1 - t) + t std_k^2. The marginal velocity averages these over the posterior p(k | a_t = x).
    x: (N, 2), t and s: (N, 1) -> (N, 2).
    """
    means = target.means_at(s)  # (N, K, 2)
    var = (1 - t) ** 2 + t ** 2 * target.stds ** 2  # (N, K), sigma_k(t)^2
    diff = x[:, None, :] - t[:, :, None] * means  # (N, K, 2), x - t m_k
    log_post = target.weights.log() - diff.square().sum(-1) / (2 * var) - var.log()  # (N, K); 2D: log det = 2 log sigma
    post = torch.softmax(log_post, dim=1)  # p(k | a_t = x)
    v_k = means + ((-(1 - t) + t * target.stds ** 2) / var)[:, :, None] * diff  # Eq. per-component velocity
    return (post[:, :, None] * v_k).sum(dim=1)  # Eq. marginal velocity


def flow_map(target: MixtureTarget, s, x, t, r, ode_steps: int):
    """X_r from dX/dtau = v*(X, tau), X_t = x, by classical RK4 (float64).

    ode_steps is per unit time: every row takes ceil(ode_steps * longest r - t in the batch) steps of
    its own size, so the step size is at most 1 / ode_steps and short gaps cost few steps."""
    num_steps = max(1, math.ceil(ode_steps * (r - t).max().item()))
    h = (r - t) / num_steps  # (N, 1): each row has its own interval
    X, tau = x, t
    for _ in range(num_steps):
        k1 = true_velocity(target, s, X, tau)
        k2 = true_velocity(target, s, X + 0.5 * h * k1, tau + 0.5 * h)
        k3 = true_velocity(target, s, X + 0.5 * h * k2, tau + 0.5 * h)
        k4 = true_velocity(target, s, X + h * k3, tau + h)
        X, tau = X + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), tau + h
    return X


def true_mean_velocity(target: MixtureTarget, s, x, t, r, ode_steps: int):
    """u*(x, t, r) = (X_r - x) / (r - t), the mean of v* along the true path; u*(x, t, t) = v*(x, t)."""
    gap = r - t
    u = (flow_map(target, s, x, t, r, ode_steps) - x) / gap.clamp_min(1e-12)  # Eq. mean velocity
    return torch.where(gap > 0, u, true_velocity(target, s, x, t))  # Eq. boundary: empty interval


def draw_from_p_t(target: MixtureTarget, n: int, t, generator):
    """Points x ~ p_t(. | s) by the interpolation itself: x = (1 - t) eps + t a1, with their states."""
    s = target.sample_states(n, generator).double()
    a1 = target.double().sample(s, generator)
    eps = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return s, (1 - t) * eps + t * a1


def truth_on_gap_grid(target: MixtureTarget, n: int, ode_steps: int, generator) -> list[dict]:
    """For each gap g in GAPS: t ~ U(0, 1 - g), r = t + g, x ~ p_t, and u*(x, t, r). Computed once per
    target and shared by every variant and seed, so their errors are measured on the same points."""
    tgt64, grid = target.double(), []
    for g in GAPS:
        t = (1 - g) * torch.rand(n, 1, generator=generator, dtype=torch.float64)
        s, x = draw_from_p_t(target, n, t, generator)
        u_star = true_mean_velocity(tgt64, s, x, t, t + g, ode_steps)
        grid.append(dict(gap=g, s=s, x=x, t=t, r=t + g, u_star=u_star, v_star=true_velocity(tgt64, s, x, t)))
    return grid


# ================================================================================================
# Distance between sample sets: sliced Wasserstein-2 with evenly spaced directions
# ================================================================================================
def sliced_wasserstein(x, y, num_directions: int = 32):
    """SW_2(x, y) = sqrt(mean_theta W_2^2(theta . x, theta . y)) for equal-size 2D sample sets.

    In 1D, W_2 between two empirical sets of the same size pairs their sorted values. Directions are
    evenly spaced on [0, pi), so there is no Monte-Carlo noise over directions, and a shift by d gives
    exactly |d| / sqrt(2) (the mean of cos^2 over the directions is 1/2).
    """
    assert x.shape == y.shape and x.shape[1] == 2, (x.shape, y.shape)
    angles = torch.arange(num_directions, dtype=x.dtype) * (math.pi / num_directions)
    theta = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)  # (L, 2)
    # (L, N): one row per direction, sorted along the contiguous last axis (sorting (N, L) along
    # dim 0 is several times slower on CPU).
    px, py = (theta @ x.T).sort(dim=1).values, (theta @ y.T).sort(dim=1).values
    return (px - py).square().mean().sqrt()  # Eq. SW_2


# ================================================================================================
# Variants: each is a loss (what trains) and a sampler (how noise becomes a sample)
# ================================================================================================
TIME_SAMPLER = dict(sampler=mvp.Args.time_sampler, mu=mvp.Args.time_mu, sigma=mvp.Args.time_sigma)  # mvp.py's defaults


def mean_flow_loss_fn(ivc_coef: float, equal_frac: float, **sampler):
    """mvp.policy_loss with a given lambda and fraction of r = t rows; chunk_len = 1 for 2D actions.
    `sampler` overrides mvp.sample_times' settings (sampler=..., one_step_frac=...)."""
    time_kw = dict(TIME_SAMPLER, equal_frac=equal_frac, **sampler)

    def loss_fn(net, obs, a1, generator):
        valid = torch.ones(a1.shape[0], 1)  # (B, chunk_len = 1): no episode ends in the toy
        return mvp.policy_loss(net, obs, a1, valid, ivc_coef, 1, time_kw, generator)[0]
    return loss_fn


def flow_matching_loss(net, obs, a1, generator):
    """mvp.flow_matching_loss: E ||u(a_t, t, t) - v||^2 with t ~ U(0, 1), i.e. L_IVC alone."""
    valid = torch.ones(a1.shape[0], 1)
    return mvp.flow_matching_loss(net, obs, a1, valid, 1, generator)[0]


@torch.no_grad()
def one_step_unclipped(net, obs, eps):
    """a = eps + u_theta(eps, 0, 1 | s): mvp.one_step without its final clip to [-1, 1].

    The clip is there because robot actions are bounded; the toy targets span [-5, 5] (see
    MixtureTarget), so clipping would cut them off. Everything else is mvp.one_step's formula, and
    the tests check that clipping this gives mvp.one_step exactly."""
    zeros = torch.zeros(eps.shape[0], 1)
    return eps + net(obs, eps, zeros, zeros + 1)  # Eq. one-step sample


@torch.no_grad()
def euler(net, obs, eps, num_steps: int):
    """mvp.euler_sample without its final clip (see one_step_unclipped): integrate the learned
    instantaneous velocity u(a, t, t) from t = 0 to 1 in num_steps Euler steps. With 1 step this is
    eps + v(eps, 0)."""
    a, dt = eps, 1.0 / num_steps
    for i in range(num_steps):
        t = torch.full((eps.shape[0], 1), i * dt)
        a = a + dt * net(obs, a, t, t)
    return a


@dataclass
class Variant:
    name: str
    loss_fn: object  # (net, obs, a1, generator) -> scalar loss
    samplers: dict  # sample name -> (net, obs, eps) -> samples (N, 2)
    has_mean_velocity: bool  # False for flow matching: u(x, t, r) is only trained at r = t


def make_variants(args: ToyArgs) -> list[Variant]:
    """The four variants of the module docstring. Same steps, not the same compute: the mean-flow
    variants pay a JVP and a second forward per step (mvp.policy_loss evaluates L_IVC even at lambda
    = 0), flow matching one forward."""
    return [
        Variant("mf", mean_flow_loss_fn(0.0, 0.0), {"mf": one_step_unclipped}, True),
        Variant("mvp", mean_flow_loss_fn(args.ivc_coef, 0.0), {"mvp": one_step_unclipped}, True),
        Variant("meanflow", mean_flow_loss_fn(0.0, args.equal_frac), {"meanflow": one_step_unclipped}, True),
        Variant("fm", flow_matching_loss,
                {"fm_1step": lambda n, o, e: euler(n, o, e, 1), "fm_10step": lambda n, o, e: euler(n, o, e, 10)}, False),
    ]


# ================================================================================================
# Training and evaluation of one (target, variant, seed)
# ================================================================================================
def train(target: MixtureTarget, variant: Variant, seed: int, args: ToyArgs) -> mvp.MeanVelocityNet:
    """Fresh target samples each step (the toy has infinite data), Adam with linear decay to 0."""
    torch.manual_seed(seed)  # same seed -> same initial weights for every variant
    gen = torch.Generator().manual_seed(seed)
    net = mvp.MeanVelocityNet(obs_dim=1, act_dim=2, hidden_dim=args.hidden_dim, num_layers=args.num_layers)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / args.steps)  # short runs end cleaner with decay
    for _ in range(args.steps):
        obs = target.sample_states(args.batch_size, gen)
        loss = variant.loss_fn(net, obs, target.sample(obs, gen), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net


def eval_states(target: MixtureTarget) -> list[float]:
    """States at which samples are compared: three states in [-1, 1] if conditional, else just s = 0."""
    return [-0.5, 0.0, 0.5] if target.conditional else [0.0]


@torch.no_grad()
def distances(net, variant: Variant, target: MixtureTarget, args: ToyArgs, eval_seed: int) -> dict:
    """SW_2 between samples and fresh target samples, averaged over eval_states. The same noise
    (eval_seed) is used for every variant and seed."""
    gen = torch.Generator().manual_seed(eval_seed)
    out = {name: [] for name in variant.samplers}
    for s_val in eval_states(target):
        obs = torch.full((args.eval_samples, 1), s_val)
        eps = torch.randn(args.eval_samples, 2, generator=gen)
        ref = target.sample(obs, gen)
        for name, sampler in variant.samplers.items():
            out[name].append(sliced_wasserstein(sampler(net, obs, eps), ref).item())
    return {name: sum(v) / len(v) for name, v in out.items()}


def distance_floor(target: MixtureTarget, args: ToyArgs, eval_seed: int, repeats: int = 3) -> list[float]:
    """SW_2 between two independent target sample sets, `repeats` times: what a perfect sampler would
    score, and (its spread) how much of a difference between variants is sampling noise."""
    gen = torch.Generator().manual_seed(eval_seed + 1)
    out = []
    for _ in range(repeats):
        vals = []
        for s_val in eval_states(target):
            obs = torch.full((args.eval_samples, 1), s_val)
            vals.append(sliced_wasserstein(target.sample(obs, gen), target.sample(obs, gen)).item())
        out.append(sum(vals) / len(vals))
    return out


@torch.no_grad()
def mean_velocity_errors(net, grid: list[dict], instantaneous_only: bool) -> list[float]:
    """Mean over points of ||u_theta(x, t, r) - u*(x, t, r)||^2, one value per gap.

    For flow matching (instantaneous_only) the network is evaluated at r = t: its v(x, t), used as
    a one-step Euler estimate of the mean velocity, which is what its 1-step sampler does."""
    errs = []
    for g in grid:
        r = g["t"] if instantaneous_only else g["r"]
        u = net(g["s"].float(), g["x"].float(), g["t"].float(), r.float()).double()
        errs.append((u - g["u_star"]).square().sum(-1).mean().item())
    return errs


# ================================================================================================
# Report: table, JSON, figure
# ================================================================================================
def mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / max(len(values) - 1, 1))  # sample std


SAMPLE_LABELS = {"mf": "L_MF only, 1 step", "mvp": "MVP, 1 step", "meanflow": "MeanFlow, 1 step",
                 "fm_1step": "flow matching, 1 Euler step", "fm_10step": "flow matching, 10 Euler steps"}
# Which variant's u* error goes with which sampler row (fm_10step uses the same network as fm_1step).
ERROR_OF_SAMPLER = {"mf": "mf", "mvp": "mvp", "meanflow": "meanflow", "fm_1step": "fm"}


def markdown_table(results: dict) -> str:
    rows = ["| target | sampler | SW2 to target (mean ± std) | u* MSE at r-t=0 | u* MSE at r-t=0.5 | u* MSE at r-t=1 |",
            "| --- | --- | --- | --- | --- | --- |"]
    for tname, res in results.items():
        m, s = mean_std(res["sw_floor"])
        rows.append(f"| {tname} | (floor: target vs. fresh target samples) | {m:.3f} ± {s:.3f} | | | |")
        for sname, label in SAMPLE_LABELS.items():
            m, s = mean_std(res["sw"][sname])
            err = res["u_err_summary"].get(ERROR_OF_SAMPLER.get(sname))
            cells = [f"{err[g]['mean']:.4f} ± {err[g]['std']:.4f}" for g in ("0.0", "0.5", "1.0")] if err else ["", "", ""]
            if sname == "fm_1step":
                cells[1:] = [c + " (v as proxy)" for c in cells[1:]]
            rows.append(f"| {tname} | {label} | {m:.3f} ± {s:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(results: dict, samples: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(SAMPLE_LABELS)
    ncols = len(names) + 2  # target, one column per sampler, error curves
    fig, axes = plt.subplots(len(results), ncols, figsize=(2.35 * ncols + 1.2, 2.5 * len(results)), squeeze=False,
                             gridspec_kw=dict(width_ratios=[1] * (ncols - 1) + [2.0]))
    colors = {"mf": "tab:red", "mvp": "tab:blue", "meanflow": "tab:green", "fm": "tab:gray"}
    curve_labels = {"mf": "L_MF only", "mvp": "MVP", "meanflow": "MeanFlow", "fm": "flow matching: v(x,t) as proxy"}
    for row, (tname, res) in enumerate(results.items()):
        panels = [("target", samples[tname]["target"])] + [(n, samples[tname][n]) for n in names]
        for col, (name, by_state) in enumerate(panels):
            ax = axes[row, col]
            for i, (s_val, pts) in enumerate(by_state.items()):
                ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.3, color=f"C{i}" if len(by_state) > 1 else "k",
                           label=f"s={s_val:+.1f}", rasterized=True)
            ax.set_xlim(-5.5, 5.5), ax.set_ylim(-5.5, 5.5), ax.set_aspect("equal")
            ax.set_xticks([]), ax.set_yticks([])
            if name == "target":
                ax.set_title(f"{tname}: target", fontsize=9)
                ax.set_ylabel(tname, fontsize=10)
                if len(by_state) > 1:
                    ax.legend(fontsize=6, markerscale=5, loc="lower left", handletextpad=0.1, borderpad=0.2)
            else:
                m, s = mean_std(res["sw"][name])
                ax.set_title(f"{SAMPLE_LABELS[name]}\nSW2 {m:.3f} ± {s:.3f}", fontsize=8)
        ax = axes[row, -1]
        gaps = list(GAPS)
        for name, color in colors.items():
            curve = res["u_err_summary"][name]
            mu = [curve[str(g)]["mean"] for g in gaps]
            sd = [curve[str(g)]["std"] for g in gaps]
            ax.plot(gaps, mu, "s--" if name == "fm" else "o-", color=color, ms=3, label=curve_labels[name])
            ax.fill_between(gaps, [max(a - b, 1e-6) for a, b in zip(mu, sd)], [a + b for a, b in zip(mu, sd)],
                            color=color, alpha=0.15)
        ax.plot(gaps, [res["true_v_as_proxy"][str(g)] for g in gaps], ":", color="k", label="true v*(x,t) as proxy")
        ax.set_yscale("log")
        # Zoom on the mean-flow variants; the two proxies grow ~30x larger and leave through the top.
        mf_curves = [res["u_err_summary"][n][str(g)]["mean"] for n in ("mf", "mvp", "meanflow") for g in gaps]
        ax.set_ylim(min(mf_curves + [res["u_err_summary"]["fm"]["0.0"]["mean"]]) / 2, max(mf_curves) * 5)
        ax.set_xlabel("r - t", fontsize=8)
        ax.set_ylabel("E ||u(x,t,r) - u*(x,t,r)||^2", fontsize=8)
        ax.set_title(f"{tname}: error of u vs. true u* (± std, seeds)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, which="both")
        if row == 0:
            ax.legend(fontsize=6, loc="lower right")
    fig.suptitle("Samples of seed 0 (SW2 to the target: mean ± std over seeds) and the mean-velocity error on "
                 "x ~ p_t against r - t (r - t = 1 is the one-step map)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ================================================================================================
# The (t, r) sampler study: MVP with each sampler, same seeds and steps
# ================================================================================================
SAMPLERS = {"uniform (sorted, default)": {}, "logit_normal": dict(sampler="logit_normal"),
            "gap_uniform": dict(sampler="gap_uniform"), "uniform + 25% (0, 1) rows": dict(one_step_frac=0.25)}


def sampler_study(args: ToyArgs) -> dict:
    """SW2 of one-step samples and u* error at every gap for MVP (lambda = --ivc-coef) under each sampler."""
    eval_seed, out = 12345, {}
    for target in [TARGETS[n]() for n in args.targets.split(",")]:
        grid = truth_on_gap_grid(target, args.eval_points, args.ode_steps, torch.Generator().manual_seed(eval_seed))
        out[target.name] = {"floor": distance_floor(target, args, eval_seed)}
        for name, kw in tqdm(SAMPLERS.items(), desc=target.name, unit="sampler"):
            variant = Variant(name, mean_flow_loss_fn(args.ivc_coef, 0.0, **kw), {name: one_step_unclipped}, True)
            nets = [train(target, variant, seed, args) for seed in range(args.seeds)]
            out[target.name][name] = dict(sw=[distances(n, variant, target, args, eval_seed)[name] for n in nets],
                                          u_err=[mean_velocity_errors(n, grid, False) for n in nets])
    rows = ["| target | (t, r) sampler | SW2 one-step (mean ± std) | " + " | ".join(f"u* MSE r-t={g}" for g in GAPS) + " |",
            "| --- | --- | --- | " + " | ".join("---" for _ in GAPS) + " |"]
    for tname, res in out.items():
        rows.append(f"| {tname} | (floor) | {'%.3f ± %.3f' % mean_std(res['floor'])} | " + " | ".join("" for _ in GAPS) + " |")
        for name in SAMPLERS:
            errs = [mean_std([e[i] for e in res[name]["u_err"]]) for i in range(len(GAPS))]
            rows.append(f"| {tname} | {name} | {'%.3f ± %.3f' % mean_std(res[name]['sw'])} | "
                        + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in errs) + " |")
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "samplers.json"), "w") as f:
        json.dump(dict(config=dataclasses.asdict(args), gaps=list(GAPS), results=out), f, indent=1)
    return dict(results=out, table="\n".join(rows))


# ================================================================================================
# Main
# ================================================================================================
def reference_numbers(target: MixtureTarget, grid: list[dict], args: ToyArgs, eval_seed: int) -> dict:
    """Numbers that need no training: the SW floor, how far v* is from u* (the error of a perfect
    instantaneous velocity used as a one-step estimate), and a check of the RK4 integration."""
    coarse = [true_mean_velocity(target.double(), g["s"], g["x"], g["t"], g["r"], max(args.ode_steps // 2, 1))
              for g in grid]  # the same u* with half the RK4 steps: their difference bounds the error
    return dict(conditional=target.conditional,
                sw_floor=distance_floor(target, args, eval_seed),
                true_v_as_proxy={str(g["gap"]): (g["v_star"] - g["u_star"]).square().sum(-1).mean().item() for g in grid},
                ode_check_max_abs_diff=max((c - g["u_star"]).abs().max().item() for c, g in zip(coarse, grid)))


def summarize_curves(u_err: dict) -> dict:
    """{variant: [per-seed list over GAPS]} -> {variant: {gap: {mean, std}}}."""
    return {name: {str(g): dict(zip(("mean", "std"), mean_std([curve[i] for curve in curves])))
                   for i, g in enumerate(GAPS)} for name, curves in u_err.items()}


def run(args: ToyArgs) -> dict:
    t_start = time.time()
    os.makedirs(args.out_dir, exist_ok=True)
    targets = [TARGETS[n]() for n in args.targets.split(",")]
    variants = make_variants(args)
    eval_seed = 12345  # the same eval noise and points for every variant and seed
    results, samples = {}, {}
    bar = tqdm(total=len(targets) * args.seeds * len(variants), desc="training", unit="run")
    for target in targets:
        grid = truth_on_gap_grid(target, args.eval_points, args.ode_steps, torch.Generator().manual_seed(eval_seed))
        res = reference_numbers(target, grid, args, eval_seed)
        res.update(sw={n: [] for n in SAMPLE_LABELS}, u_err={v.name: [] for v in variants})
        gen = torch.Generator().manual_seed(eval_seed)
        samples[target.name] = {"target": {s: target.sample(torch.full((2000, 1), s), gen).numpy()
                                           for s in scatter_states(target)}}
        for seed in range(args.seeds):
            for variant in variants:
                bar.set_postfix_str(f"{target.name} seed {seed} {variant.name}")
                net = train(target, variant, seed, args)
                for name, value in distances(net, variant, target, args, eval_seed).items():
                    res["sw"][name].append(value)
                res["u_err"][variant.name].append(mean_velocity_errors(net, grid, not variant.has_mean_velocity))
                if seed == 0:
                    samples[target.name].update(scatter_samples(net, variant, target))
                bar.update(1)
        res["u_err_summary"] = summarize_curves(res["u_err"])
        results[target.name] = res
    bar.close()
    plot(results, samples, os.path.join(args.out_dir, "toy_2d.png"))
    report = dict(config=dataclasses.asdict(args), gaps=list(GAPS), time_sampler=TIME_SAMPLER,
                  seconds=round(time.time() - t_start, 1), results=results)
    with open(os.path.join(args.out_dir, "toy_2d.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


def scatter_states(target: MixtureTarget) -> list[float]:
    return [-0.5, 0.5] if target.conditional else [0.0]


@torch.no_grad()
def scatter_samples(net, variant: Variant, target: MixtureTarget, n: int = 2000) -> dict:
    """A few thousand samples per sampler for the figure (numpy, keyed by state)."""
    gen = torch.Generator().manual_seed(0)
    out = {name: {} for name in variant.samplers}
    for s_val in scatter_states(target):
        obs, eps = torch.full((n, 1), s_val), torch.randn(n, 2, generator=gen)
        for name, sampler in variant.samplers.items():
            out[name][s_val] = sampler(net, obs, eps).numpy()
    return out


def main(argv=None):
    args = parse_args(argv)
    # Networks this small run fastest on one core without intra-op threads, and the toy should not
    # crowd out other work on a small machine. Restored afterwards, so importing or calling main()
    # from the tests leaves the process as it was.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = sampler_study(args) if args.sampler_study else run(args)
    finally:
        torch.set_num_threads(threads)
    if args.sampler_study:
        print(report["table"] + f"\n\n{args.seeds} seeds x {args.steps} steps; wrote {args.out_dir}/samplers.json")
        return report
    print(markdown_table(report["results"]))
    print(f"\nSW2: sliced Wasserstein-2 over {args.eval_samples} samples, 32 directions; u* MSE on "
          f"{args.eval_points} points x ~ p_t per gap. {args.seeds} seeds x {args.steps} steps, "
          f"{report['seconds']:.0f} s. Wrote {args.out_dir}/toy_2d.png and toy_2d.json")


if __name__ == "__main__":
    main()
