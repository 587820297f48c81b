"""Toy 2D: what the instantaneous velocity constraint (IVC) changes, on targets whose flow is known.

MVP trains u_theta(a_t, t, r | s), the *mean* velocity of the noise-to-action flow over [t, r], so
one call maps noise to an action: a = eps + u(eps, 0, 1 | s). The mean-flow identity L_MF fixes u
only up to a term C(a, r) / (r - t); the IVC term L_IVC pins the boundary u(a, t, t) = v(a, t).
This script trains the network and losses of mvp.py (imported, not copied) on 2D Gaussian mixtures,
where the true marginal velocity v*(x, t) has a closed form and the true mean velocity u*(x, t, r)
follows from integrating it finely, and compares variants trained with the same seeds, steps and
network:

    mf               L_MF only, r != t on every row (lambda = 0, the paper's ablation)
    mvp              L_MF + lambda * L_IVC with lambda = 1 (the paper's method)
    meanflow         L_MF with a fraction of rows at r = t and no separate IVC term (MeanFlow's boundary)
    fm               plain flow matching on u(a_t, t, t), sampled with 1 and with 10 Euler steps
    mvp_logitnormal, mvp_gap, mvp_onestep
                     MVP with mvp.py's other (t, r) samplers: logit-normal, r - t ~ U(0, 1), and a
                     quarter of the rows on the one-step map (t, r) = (0, 1)

It reports (1) the sliced Wasserstein-2 distance between one-step samples and the target, mean and
std over seeds, with SW2 during training to show where it flattens, (2) the error of u against the
truth: at the boundary u(x, t, t) against v*, and u(x, 0, r) against u*(x, 0, r) for each r (t held
at 0, so r = 1 is the one-step map), and (3) a picture of the boundary with and without IVC.

Run:    python toy_2d.py --quick    (ring8, 1 seed, mf and mvp, 2,000 steps, 1 process: about 45 s of one core;
                                     the error of u at r - t = 0 without and with IVC, a figure and a number)
        python toy_2d.py            (ring8, 3 seeds, mf/mvp/meanflow/fm, 2 worker processes; about 5 min on 2 cores)
        python toy_2d.py --full     (every target and variant)
        python toy_2d.py --smoke    (tiny budgets for the tests, well under 30 s: noise clouds, nothing to read)
Writes: <out-dir>/toy_2d.png, <out-dir>/toy_2d_ivc.png, <out-dir>/toy_2d.json, and prints a markdown table and,
where mf and mvp both ran, a headline line: the error of u at r - t = 0 without and with IVC.

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

GAPS = (0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)  # the r - t values at which u* error is measured, from t = 0
TARGET_NAMES = ("ring8", "checkerboard", "rotating3")  # the builders are below, in TARGETS
VARIANT_NAMES = ("mf", "mvp", "meanflow", "fm", "mvp_logitnormal", "mvp_gap", "mvp_onestep")  # make_variants


# ================================================================================================
# Arguments
# ================================================================================================
@dataclass
class ToyArgs:
    seeds: int = field(default=3, metadata=dict(help="seeds per (target, variant); seeds are 0..seeds-1"))
    steps: int = field(default=4000, metadata=dict(help="gradient steps per training run (same for every variant)"))
    batch_size: int = field(default=512, metadata=dict(help="minibatch size (fresh target samples every step)"))
    lr: float = field(default=3e-3, metadata=dict(help="Adam learning rate (decayed linearly to 0)"))
    hidden_dim: int = field(default=128, metadata=dict(help="width of the mean-velocity MLP"))
    num_layers: int = field(default=3, metadata=dict(help="hidden layers of the mean-velocity MLP"))
    ivc_coef: float = field(default=1.0, metadata=dict(help="lambda of the mvp variants"))
    equal_frac: float = field(default=0.5, metadata=dict(help="fraction of r = t rows in the meanflow variant"))
    eval_samples: int = field(default=16384,
                              metadata=dict(help="samples per distance (per state for the conditional target)"))
    eval_points: int = field(default=1024, metadata=dict(help="points per probe set for the u* error"))
    ode_steps: int = field(default=100, metadata=dict(help="RK4 steps per unit time when integrating the true flow"))
    targets: str = field(default="ring8",
                         metadata=dict(help=f"comma-separated target names: {', '.join(TARGET_NAMES)}"))
    variants: str = field(default="mf,mvp,meanflow,fm",
                          metadata=dict(help=f"comma-separated variants: {', '.join(VARIANT_NAMES)}"))
    full: bool = field(default=False,
                       metadata=dict(help="the full grid: every target and variant (overrides --targets, --variants)"))
    workers: int = field(default=2, metadata=dict(help="training processes (1: train in this process)"))
    curve_points: int = field(default=8, metadata=dict(help="SW2 evaluations during each training run (0: none)"))
    out_dir: str = field(default="toy_out", metadata=dict(help="where toy_2d.png, toy_2d_ivc.png and toy_2d.json go"))
    quick: bool = field(default=False, metadata=dict(
        help="the first look: ring8, 1 seed, mf and mvp, 2,000 steps, in this process (about 45 s of one core)"))
    smoke: bool = field(default=False, metadata=dict(help="tiny budgets for the tests' smoke runs, in this process"))

    @property
    def target_list(self) -> list[str]:
        return list(TARGET_NAMES) if self.full else self.targets.split(",")

    @property
    def variant_list(self) -> list[str]:
        return list(VARIANT_NAMES) if self.full else self.variants.split(",")


# --quick: the smallest run that shows IVC's effect (the short-interval error of u) and the ring. At 2,000
# steps one seed gives the SW2 of docs/results.md's budgets check (0.179 / 0.174 for mf / mvp).
QUICK = dict(targets="ring8", variants="mf,mvp", seeds=1, steps=2000, workers=1)
# --smoke: tiny budgets for the tests; every sample panel is a noise cloud.
SMOKE = dict(seeds=2, steps=40, batch_size=256, eval_samples=2048, eval_points=256, ode_steps=40, workers=1,
             curve_points=2)


def parse_args(argv=None) -> ToyArgs:
    """Flags with dashes built from ToyArgs; --quick and --smoke set the budgets they name in QUICK and SMOKE,
    except where a flag is given."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(ToyArgs):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
        else:
            kind = {"int": int, "float": float, "str": str}[f.type]
            parser.add_argument(flag, type=kind, default=f.default, help=f.metadata["help"] + f" (default {f.default})")
    args = ToyArgs(**vars(parser.parse_args(argv)))
    if args.quick and args.smoke:
        parser.error("--quick and --smoke are two budgets; give one")
    if args.quick or args.smoke:  # the budgets of QUICK or SMOKE, for the flags not given
        parser.set_defaults(**{f.name: None for f in dataclasses.fields(ToyArgs)})  # a second parse: None = not given
        given = {k for k, v in vars(parser.parse_args(argv)).items() if v is not None}
        budget = QUICK if args.quick else SMOKE
        args = dataclasses.replace(args, **{k: v for k, v in budget.items() if k not in given})
    for name, given, known in [("targets", args.target_list, TARGET_NAMES),
                               ("variants", args.variant_list, VARIANT_NAMES)]:
        unknown = set(given) - set(known)
        if unknown:
            parser.error(f"unknown --{name} {sorted(unknown)}; choose from {', '.join(known)}")
    if args.seeds < 1 or args.steps < 1 or args.workers < 1:
        parser.error("--seeds, --steps and --workers must be >= 1")
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


def truth_probes(target: MixtureTarget, n: int, ode_steps: int, generator) -> list[dict]:
    """Points where the learned u is compared with the truth, computed once per target and shared by
    every variant and seed. First the boundary: t ~ U(0, 1), r = t, x ~ p_t, where u* = v*. Then, for
    each gap g in GAPS, t held at 0 and r = g: x is the noise itself and u*(x, 0, g) is the mean
    velocity that carries it to time g, so g = 1 is exactly the map the one-step sampler uses. (With
    t ~ U(0, 1 - g) instead, t and the gap would change together along the curve.)"""
    tgt64, probes = target.double(), []
    for name, t_fn, gap in [("boundary", lambda: torch.rand(n, 1, generator=generator, dtype=torch.float64), 0.0)] + \
                           [(f"t=0, r-t={g}", lambda: torch.zeros(n, 1, dtype=torch.float64), g) for g in GAPS]:
        t = t_fn()
        s, x = draw_from_p_t(target, n, t, generator)
        u_star = true_mean_velocity(tgt64, s, x, t, t + gap, ode_steps)
        probes.append(dict(name=name, gap=gap, s=s, x=x, t=t, r=t + gap, u_star=u_star,
                           v_star=true_velocity(tgt64, s, x, t)))
    return probes


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
def mean_flow_loss_fn(ivc_coef: float, equal_frac: float, **sampler):
    """mvp.policy_loss with a given lambda and fraction of r = t rows; chunk_len = 1 for 2D actions.
    `sampler` overrides other fields of mvp.TimeSampler, mvp.py's defaults (kind=..., one_step_frac=...)."""
    times = mvp.TimeSampler(equal_frac=equal_frac, **sampler)

    def loss_fn(net, obs, a1, generator):
        valid = torch.ones(a1.shape[0], 1)  # (B, chunk_len = 1): no episode ends in the toy
        return mvp.policy_loss(net, obs, a1, valid, 1, generator, ivc_coef=ivc_coef, times=times)[0]
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
    samplers: dict  # sample name -> (label, (net, obs, eps) -> samples (N, 2)); the last one is the curve's
    has_mean_velocity: bool  # False for flow matching: u(x, t, r) is only trained at r = t


def make_variants(args: ToyArgs) -> dict[str, Variant]:
    """Every variant the toy can train, by name. Same steps, not the same compute: the mean-flow
    variants pay a JVP and a second forward per step (mvp.policy_loss evaluates L_IVC even at lambda
    = 0), flow matching one forward. The last three are MVP with the other (t, r) samplers of mvp.py."""
    def mean_flow(name, label, ivc_coef, equal_frac=0.0, **sampler):
        return Variant(name, mean_flow_loss_fn(ivc_coef, equal_frac, **sampler), {name: (label, one_step_unclipped)},
                       True)
    variants = [
        mean_flow("mf", "L_MF only (λ = 0), 1 step", 0.0),
        mean_flow("mvp", f"MVP (λ = {args.ivc_coef:g}), 1 step", args.ivc_coef),
        mean_flow("meanflow", f"MeanFlow ({args.equal_frac:.0%} r = t), 1 step", 0.0, args.equal_frac),
        Variant("fm", flow_matching_loss,
                {"fm_1step": ("flow matching, 1 Euler step", lambda n, o, e: euler(n, o, e, 1)),
                 "fm_10step": ("flow matching, 10 Euler steps", lambda n, o, e: euler(n, o, e, 10))}, False),
        mean_flow("mvp_logitnormal", "MVP, logit-normal (t, r), 1 step", args.ivc_coef, kind="logit_normal"),
        mean_flow("mvp_gap", "MVP, r - t ~ U(0, 1), 1 step", args.ivc_coef, kind="gap_uniform"),
        mean_flow("mvp_onestep", "MVP, 25% of rows at (0, 1), 1 step", args.ivc_coef, one_step_frac=0.25),
    ]
    return {v.name: v for v in variants}


# ================================================================================================
# Training one (target, variant, seed), in a worker process
# ================================================================================================
def train(target: MixtureTarget, variant: Variant, seed: int, args: ToyArgs):
    """Fresh target samples each step (the toy has infinite data), Adam with linear decay to 0.

    Returns the network and its learning curve: SW2 of the variant's main sampler (its last), measured
    as the final numbers are, --curve-points times during training, so one can see where it flattens."""
    torch.manual_seed(seed)  # same seed -> same initial weights for every variant
    gen = torch.Generator().manual_seed(seed)
    net = mvp.MeanVelocityNet(obs_dim=1, act_dim=2, hidden_dim=args.hidden_dim, num_layers=args.num_layers)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / args.steps)  # runs end cleaner with decay
    every, curve = max(args.steps // max(args.curve_points, 1), 1), []
    sampler = list(variant.samplers.values())[-1][1]
    for step in range(1, args.steps + 1):
        obs = target.sample_states(args.batch_size, gen)
        loss = variant.loss_fn(net, obs, target.sample(obs, gen), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if args.curve_points and (step % every == 0 or step == args.steps):
            curve.append((step, sample_distance(net, sampler, target, args.eval_samples, CURVE_SEED)))
    return net, curve


def train_job(job: tuple) -> tuple:
    """One (target, variant, seed) for a worker process: the trained weights and the learning curve."""
    target_name, variant_name, seed, args = job
    torch.set_num_threads(1)  # networks this small run fastest on one core without intra-op threads
    net, curve = train(TARGETS[target_name](), make_variants(args)[variant_name], seed, args)
    return job[:3], net.state_dict(), curve


def run_jobs(jobs: list, workers: int):
    """Yield train_job's results as they finish: in this process, or in `workers` spawned processes."""
    if workers <= 1:
        yield from map(train_job, jobs)
        return
    import multiprocessing
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap_unordered(train_job, jobs)


# ================================================================================================
# Evaluation: distances to the target, the error of u against the truth
# ================================================================================================
CURVE_SEED, EVAL_SEED = 777, 12345  # the same evaluation noise and points for every variant and seed


def eval_states(target: MixtureTarget) -> list[float]:
    """States at which samples are compared: three states in [-1, 1] if conditional, else just s = 0."""
    return [-0.5, 0.0, 0.5] if target.conditional else [0.0]


@torch.no_grad()
def sample_distance(net, sampler, target: MixtureTarget, n: int, seed: int) -> float:
    """SW_2 between n samples of `sampler` and n fresh target samples, averaged over eval_states."""
    gen, vals = torch.Generator().manual_seed(seed), []
    for s_val in eval_states(target):
        obs = torch.full((n, 1), s_val)
        eps = torch.randn(n, 2, generator=gen)
        vals.append(sliced_wasserstein(sampler(net, obs, eps), target.sample(obs, gen)).item())
    return sum(vals) / len(vals)


def distance_floor(target: MixtureTarget, args: ToyArgs, repeats: int = 10) -> list[float]:
    """SW_2 between two independent target sample sets, `repeats` times: what a perfect sampler would
    score, and (its spread) how much of a difference between variants is sampling noise. On the
    mixtures most of it is the multinomial noise of how many samples land in each mode: moving the
    surplus of one mode to another costs a mode spacing per sample."""
    gen = torch.Generator().manual_seed(EVAL_SEED + 1)
    out = []
    for _ in range(repeats):
        vals = []
        for s_val in eval_states(target):
            obs = torch.full((args.eval_samples, 1), s_val)
            vals.append(sliced_wasserstein(target.sample(obs, gen), target.sample(obs, gen)).item())
        out.append(sum(vals) / len(vals))
    return out


@torch.no_grad()
def mean_velocity_errors(net, probes: list[dict], instantaneous_only: bool) -> list[float]:
    """Mean over points of ||u_theta(x, t, r) - u*(x, t, r)||^2, one value per probe set.

    For flow matching (instantaneous_only) the network is evaluated at r = t: its v(x, t), used as
    a one-step Euler estimate of the mean velocity, which is what its 1-step sampler does."""
    errs = []
    for p in probes:
        r = p["t"] if instantaneous_only else p["r"]
        u = net(p["s"].float(), p["x"].float(), p["t"].float(), r.float()).double()
        errs.append((u - p["u_star"]).square().sum(-1).mean().item())
    return errs


IVC_TIMES = (0.2, 0.5, 0.8)  # times t of the boundary maps u(x, t, t) against v*(x, t) in the IVC figure


@torch.no_grad()
def boundary_maps(net, target: MixtureTarget, n: int = 81, extent: float = 5.5) -> dict:
    """On an n x n grid of x, at each t in IVC_TIMES: ||u(x, t, t) - v*(x, t)||, and the density p_t(x)
    for contours (unconditional targets, s = 0). a_t = (1 - t) eps + t a1 with a1 from component k is
    N(t m_k, ((1 - t)^2 + t^2 std_k^2) I), so p_t is a Gaussian mixture too."""
    tgt64, axis = target.double(), torch.linspace(-extent, extent, n, dtype=torch.float64)
    x = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), dim=-1).reshape(-1, 2)
    s, out = torch.zeros(x.shape[0], 1, dtype=torch.float64), {}
    for t_val in IVC_TIMES:
        t = torch.full((x.shape[0], 1), t_val, dtype=torch.float64)
        u = net(s.float(), x.float(), t.float(), t.float()).double()
        err = (u - true_velocity(tgt64, s, x, t)).norm(dim=-1)
        var = (1 - t_val) ** 2 + t_val ** 2 * tgt64.stds ** 2  # (K,)
        d2 = (x[:, None, :] - t_val * tgt64.means[None]).square().sum(-1)  # (N, K)
        density = (tgt64.weights * torch.exp(-d2 / (2 * var)) / (2 * math.pi * var)).sum(-1)
        out[t_val] = dict(err=err.reshape(n, n).numpy(), density=density.reshape(n, n).numpy())
    return dict(extent=extent, maps=out)


@torch.no_grad()
def boundary_error_at(net, target: MixtureTarget, t_val: float, n: int = 4096) -> float:
    """E_{x ~ p_t} ||u(x, t, t) - v*(x, t)||^2 at one time t, on fixed points."""
    t = torch.full((n, 1), t_val, dtype=torch.float64)
    s, x = draw_from_p_t(target, n, t, torch.Generator().manual_seed(EVAL_SEED))
    u = net(s.float(), x.float(), t.float(), t.float()).double()
    return (u - true_velocity(target.double(), s, x, t)).square().sum(-1).mean().item()


def scatter_states(target: MixtureTarget) -> list[float]:
    return [-0.5, 0.5] if target.conditional else [0.0]


@torch.no_grad()
def scatter_samples(net, variant: Variant, target: MixtureTarget, n: int = 2000) -> dict:
    """A few thousand samples per sampler for the figure (numpy, keyed by state)."""
    gen = torch.Generator().manual_seed(0)
    out = {name: {} for name in variant.samplers}
    for s_val in scatter_states(target):
        obs, eps = torch.full((n, 1), s_val), torch.randn(n, 2, generator=gen)
        for name, (_, sampler) in variant.samplers.items():
            out[name][s_val] = sampler(net, obs, eps).numpy()
    return out


# ================================================================================================
# Report: table, JSON, figures
# ================================================================================================
def mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / max(len(values) - 1, 1))  # sample std


def fmt(values: list[float], digits: int = 3) -> str:
    return "%.*f ± %.*f" % (digits, mean_std(values)[0], digits, mean_std(values)[1])


def markdown_table(results: dict, variants: dict) -> str:
    """One row per sampler: SW2 of its samples, and its network's errors against the truth."""
    rows = ["| target | sampler | SW2 to target | boundary error, t ~ U(0, 1) | u* error, t = 0, r = 0.5 "
            "| u* error, t = 0, r = 1 |",
            "| --- | --- | --- | --- | --- | --- |"]
    col = {g: 1 + GAPS.index(g) for g in (0.5, 1.0)}  # probe 0 is the boundary
    for tname, res in results.items():
        rows.append(f"| {tname} | (floor: target vs fresh target samples) | {fmt(res['sw_floor'])} | | | |")
        for variant in variants.values():
            errs = res["u_err"][variant.name]
            proxy = "" if variant.has_mean_velocity else " (v as proxy)"
            cells = [fmt([e[0] for e in errs])] + [fmt([e[col[g]] for e in errs]) + proxy for g in (0.5, 1.0)]
            for sname, (label, _) in variant.samplers.items():  # a second sampler of the same network: no error cells
                rows.append(f"| {tname} | {label} | {fmt(res['sw'][sname])} | " + " | ".join(cells) + " |")
                cells = ["", "", ""]
    return "\n".join(rows)


def headline(results: dict) -> str | None:
    """One line for the first target where mf and mvp both ran: the error of u(x, 0, 0) against v*(x, 0),
    where L_MF alone leaves u free and IVC pins it, and the two one-step SW2s (means over seeds)."""
    tname, res = next(iter(results.items()))
    if not {"mf", "mvp"} <= set(res["u_err"]):
        return None
    col = 1 + GAPS.index(0.0)  # probe 0 is the boundary over t ~ U(0, 1); then t = 0 and r - t in GAPS
    err = {v: mean_std([e[col] for e in res["u_err"][v]])[0] for v in ("mf", "mvp")}
    sw = {v: mean_std(res["sw"][v])[0] for v in ("mf", "mvp")}
    floor = mean_std(res["sw_floor"])[0]
    return (f"{tname}: error of u at r - t = 0 (t = 0) {err['mf']:.2f} without IVC (L_MF only), {err['mvp']:.2f} "
            f"with IVC (MVP); one-step SW2 {sw['mf']:.3f} and {sw['mvp']:.3f} (floor {floor:.3f})")


COLORS = {"mf": "tab:red", "mvp": "tab:blue", "meanflow": "tab:green", "fm": "tab:gray",
          "mvp_logitnormal": "tab:purple", "mvp_gap": "tab:orange", "mvp_onestep": "tab:brown"}
SCATTER = ("mf", "mvp", "meanflow", "fm_1step", "fm_10step")  # sample panels, where they were trained


# The figures are shown in markdown pages about 880 px wide. Drawn FIG_WIDTH inches wide at FIG_DPI
# (1700 px, sharp when scaled down), one point of font is shown as 880 / (72 * 10) = 1.2 px there, so
# the 8 to 10 pt text below reads as 10 to 12 px.
FIG_WIDTH, FIG_DPI = 10.0, 170


def panel_grid(num_panels: int) -> tuple[int, int]:
    """(columns, rows) of one target's block: 4 or 3 columns, whichever leaves fewer cells empty."""
    ncols = min((4, 3), key=lambda c: -num_panels % c)
    return ncols, -(-num_panels // ncols)


def plot(results: dict, samples: dict, variants: dict, path: str):
    """Per target, a block of rows: samples of seed 0, the u* error against r - t at t = 0, and SW2
    during training. One legend for every block (a variant has the same colour everywhere)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {s: lab for v in variants.values() for s, (lab, _) in v.samplers.items()}
    panels = ["target"] + [s for s in SCATTER if s in labels]
    ncols, nrows = panel_grid(len(panels) + 2)  # the scatters, then the two line plots in the block's last cells
    row_height = FIG_WIDTH / ncols + 0.4  # a square panel and its two-line title
    fig = plt.figure(figsize=(FIG_WIDTH, row_height * nrows * len(results) + 1.4), layout="constrained")
    fig.get_layout_engine().set(wspace=0.05)  # the scatters have no tick labels to keep them apart
    rows = fig.subfigures(nrows * len(results), 1, squeeze=False)[:, 0]  # each row spaces its own panels
    legend = {}  # label -> handle, from the first block's line plots
    for block, (tname, res) in enumerate(results.items()):
        cells = [(rows[block * nrows + i // ncols], i % ncols + 1) for i in range(nrows * ncols)]
        for (row, col), name in zip(cells, panels):
            ax, by_state = row.add_subplot(1, ncols, col), samples[tname][name]
            for i, (s_val, pts) in enumerate(by_state.items()):
                ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.3, color=f"C{i}" if len(by_state) > 1 else "k",
                           label=f"s={s_val:+.1f}", rasterized=True)
            ax.set_xlim(-5.5, 5.5), ax.set_ylim(-5.5, 5.5), ax.set_aspect("equal")
            ax.set_xticks([]), ax.set_yticks([])
            if name == "target":
                ax.set_title(f"{tname}: target", fontsize=10)
                if len(by_state) > 1:
                    ax.legend(fontsize=8, markerscale=5, loc="lower left", handletextpad=0.1, borderpad=0.2)
            else:
                ax.set_title(f"{labels[name]}\nSW2 {fmt(res['sw'][name])}", fontsize=9)
        ax_err, ax_sw = (row.add_subplot(1, ncols, col) for row, col in cells[-2:])
        for vname, curves in res["u_err"].items():
            mu, sd = zip(*[mean_std([c[1 + i] for c in curves]) for i in range(len(GAPS))])
            ax_err.plot(GAPS, mu, "s--" if vname == "fm" else "o-", color=COLORS[vname], ms=3,
                        label="flow matching: v(x, 0) as proxy" if vname == "fm" else
                        labels[vname].rsplit(",", 1)[0])
            ax_err.fill_between(GAPS, [max(a - b, 1e-6) for a, b in zip(mu, sd)], [a + b for a, b in zip(mu, sd)],
                                color=COLORS[vname], alpha=0.15)
        ax_err.plot(GAPS, res["true_v_as_proxy"], ":", color="k", label="error of u: the true v*(x, 0) as proxy")
        for vname in ("mf", "mvp"):  # IVC's effect in two numbers: the error at r - t = 0, without and with it
            if vname in res["u_err"]:
                y = mean_std([c[1 + GAPS.index(0.0)] for c in res["u_err"][vname]])[0]
                ax_err.annotate(f"{y:.2f}", (0.0, y), xytext=(6, 3), textcoords="offset points", fontsize=9,
                                color=COLORS[vname], fontweight="bold", zorder=5,
                                bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.85))
        ax_err.set_yscale("log")
        mean_flow = [mean_std([c[1 + i] for c in curves])[0] for v, curves in res["u_err"].items() if v != "fm"
                     for i in range(len(GAPS))]
        if mean_flow:  # zoom on the mean-flow variants; the two proxies grow far larger and leave through the top
            ax_err.set_ylim(min(mean_flow) / 2, max(mean_flow) * 5)
        ax_err.set_xlabel("r - t, with t = 0\n(r - t = 1: the one-step map)", fontsize=8)
        ax_err.set_ylabel("E ||u(x, 0, r) - u*(x, 0, r)||^2", fontsize=8)
        ax_err.set_title(f"{tname}: error of u against\nthe true u* (mean ± std, seeds)", fontsize=9)
        for vname, curves in res["curve"].items():
            steps = [s for s, _ in curves[0]]
            if not steps:  # --curve-points 0
                continue
            mu, sd = zip(*[mean_std([c[i][1] for c in curves]) for i in range(len(steps))])
            label = list(variants[vname].samplers.values())[-1][0]  # the sampler of the curve: its last
            ax_sw.plot(steps, mu, "o-", color=COLORS[vname], ms=2,
                       label=label if vname == "fm" else label.rsplit(",", 1)[0])  # one entry per colour
            ax_sw.fill_between(steps, [a - b for a, b in zip(mu, sd)], [a + b for a, b in zip(mu, sd)],
                               color=COLORS[vname], alpha=0.15)
        ax_sw.axhline(mean_std(res["sw_floor"])[0], color="k", ls=":", label="SW2: floor, target vs target")
        ax_sw.set_yscale("log")
        ax_sw.set_xlabel("training step", fontsize=8)
        ax_sw.set_ylabel("SW2 to target", fontsize=8)
        ax_sw.set_title(f"{tname}: SW2 in training\n(mean-flow variants: 1 step)", fontsize=9)
        for ax in (ax_err, ax_sw):
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3, which="both")
            if block == 0:
                for handle, label in zip(*ax.get_legend_handles_labels()):
                    legend.setdefault(label, handle)
    order = sorted(legend, key=lambda lab: legend[lab].get_color() in ("k", "tab:gray"))  # variants first
    fig.legend([legend[lab] for lab in order], order, loc="outside lower center", ncols=3, fontsize=8)
    fig.suptitle("One-step samples of seed 0 (SW2: mean ± std over seeds), the mean-velocity error\non the maps "
                 "that start from noise, and SW2 while training", fontsize=10)
    fig.savefig(path, dpi=FIG_DPI)
    plt.close(fig)


def plot_ivc(ivc: dict, path: str):
    """The picture of what IVC does: for lambda = 0 and lambda = 1 (seed 0), the one-step samples and the
    error of the boundary u(x, t, t) against the true velocity v*(x, t) at a few t, over contours of p_t."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    rows = [v for v in ("mf", "mvp") if v in ivc["maps"]]
    fig, axes = plt.subplots(len(rows), 1 + len(IVC_TIMES), figsize=(FIG_WIDTH, 2.45 * len(rows) + 0.7),
                             squeeze=False, layout="constrained")
    ext = ivc["maps"][rows[0]]["extent"]
    norm = LogNorm(vmin=0.03, vmax=max(m["err"].max() for v in rows for m in ivc["maps"][v]["maps"].values()))
    for row, vname in enumerate(rows):
        pts = ivc["samples"][vname]
        ax = axes[row, 0]
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.3, color="k", rasterized=True)
        ax.set_title(f"{ivc['labels'][vname]}\nSW2 {ivc['sw'][vname]}", fontsize=9)
        for col, (t_val, m) in enumerate(ivc["maps"][vname]["maps"].items(), start=1):
            ax = axes[row, col]
            im = ax.imshow(m["err"], origin="lower", extent=(-ext, ext, -ext, ext), norm=norm, cmap="magma")
            ax.contour(m["density"], levels=4, origin="lower", extent=(-ext, ext, -ext, ext), colors="w",
                       linewidths=0.5)
            ax.set_title(f"|u(x,t,t) - v*(x,t)| at t = {t_val}\nE over p_t of its square: "
                         f"{ivc['mse'][vname][col - 1]:.3f}", fontsize=9)
        for ax in axes[row]:
            ax.set_xlim(-ext, ext), ax.set_ylim(-ext, ext), ax.set_aspect("equal")
            ax.set_xticks([]), ax.set_yticks([])
    cbar = fig.colorbar(im, ax=axes[:, 1:], shrink=0.8)
    cbar.set_label("|u(x, t, t) - v*(x, t)|", fontsize=9)
    cbar.ax.tick_params(labelsize=8)
    fig.suptitle(f"{ivc['target']}: the boundary u(x, t, t) that IVC pins, without (top) and with (bottom) IVC.\n"
                 "White: contours of p_t", fontsize=10)
    fig.savefig(path, dpi=FIG_DPI)
    plt.close(fig)


# ================================================================================================
# Main
# ================================================================================================
def reference_numbers(target: MixtureTarget, probes: list[dict], args: ToyArgs) -> dict:
    """Numbers that need no training: the SW floor, how far v* is from u* (the error of a perfect
    instantaneous velocity used as a one-step estimate), and a check of the RK4 integration."""
    coarse = [true_mean_velocity(target.double(), p["s"], p["x"], p["t"], p["r"], max(args.ode_steps // 2, 1))
              for p in probes]  # the same u* with half the RK4 steps: their difference bounds the error
    return dict(conditional=target.conditional, sw_floor=distance_floor(target, args),
                true_v_as_proxy=[(p["v_star"] - p["u_star"]).square().sum(-1).mean().item() for p in probes[1:]],
                ode_check_max_abs_diff=max((c - p["u_star"]).abs().max().item() for c, p in zip(coarse, probes)))


def run(args: ToyArgs) -> dict:
    """Train every (target, seed, variant), in parallel worker processes, and evaluate each in this one."""
    t_start = time.time()
    os.makedirs(args.out_dir, exist_ok=True)
    targets = {n: TARGETS[n]() for n in args.target_list}
    variants = {n: v for n, v in make_variants(args).items() if n in args.variant_list}
    results, samples, probes, ivc = {}, {}, {}, None
    for name, target in targets.items():
        probes[name] = truth_probes(target, args.eval_points, args.ode_steps, torch.Generator().manual_seed(EVAL_SEED))
        res = reference_numbers(target, probes[name], args)
        res.update(sw={s: [None] * args.seeds for v in variants.values() for s in v.samplers},
                   u_err={v: [None] * args.seeds for v in variants}, curve={v: [None] * args.seeds for v in variants})
        results[name] = res
        gen = torch.Generator().manual_seed(EVAL_SEED)
        samples[name] = {"target": {s: target.sample(torch.full((2000, 1), s),
                                                     gen).numpy() for s in scatter_states(target)}}
    jobs = [(t, v, seed, args) for seed in range(args.seeds) for t in targets for v in variants]
    ivc_target = next(iter(targets))
    if not targets[ivc_target].conditional and {"mf", "mvp"} & set(variants):
        ivc = dict(target=ivc_target, maps={}, samples={}, sw={}, mse={}, labels={})
    for (tname, vname, seed), state, curve in tqdm(run_jobs(jobs, args.workers), total=len(jobs), desc="training",
                                                   unit="run"):
        target, variant, res = targets[tname], variants[vname], results[tname]
        net = mvp.MeanVelocityNet(obs_dim=1, act_dim=2, hidden_dim=args.hidden_dim, num_layers=args.num_layers)
        net.load_state_dict(state)
        for sname, (_, sampler) in variant.samplers.items():
            res["sw"][sname][seed] = sample_distance(net, sampler, target, args.eval_samples, EVAL_SEED)
        res["u_err"][vname][seed] = mean_velocity_errors(net, probes[tname], not variant.has_mean_velocity)
        res["curve"][vname][seed] = curve
        if seed == 0:
            samples[tname].update(scatter_samples(net, variant, target))
            if ivc and tname == ivc_target and vname in ("mf", "mvp"):
                ivc["maps"][vname] = boundary_maps(net, target)
                ivc["samples"][vname] = samples[tname][vname][0.0]
                ivc["labels"][vname] = variant.samplers[vname][0]
                ivc["sw"][vname] = "%.3f (seed 0)" % res["sw"][vname][0]
                ivc["mse"][vname] = [boundary_error_at(net, target, t_val) for t_val in IVC_TIMES]
    plot(results, samples, variants, os.path.join(args.out_dir, "toy_2d.png"))
    if ivc:
        plot_ivc(ivc, os.path.join(args.out_dir, "toy_2d_ivc.png"))
    report = dict(config=dataclasses.asdict(args), gaps=list(GAPS), time_sampler=dataclasses.asdict(mvp.TimeSampler()),
                  seconds=round(time.time() - t_start, 1), results=results,
                  ivc_boundary_mse=ivc and dict(times=list(IVC_TIMES), **ivc["mse"]))
    with open(os.path.join(args.out_dir, "toy_2d.json"), "w") as f:
        json.dump(report, f, indent=1)
    report["table"], report["headline"] = markdown_table(results, variants), headline(results)
    return report


def main(argv=None):
    args = parse_args(argv)
    # The training runs in worker processes with one thread each; this process only evaluates. One
    # thread here too, restored afterwards, so calling main() from the tests leaves the process as it was.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = run(args)
    finally:
        torch.set_num_threads(threads)
    print(report["table"])
    print(f"\nSW2: sliced Wasserstein-2 over {args.eval_samples} samples, 32 directions; errors on {args.eval_points} "
          f"points per probe. {args.seeds} seeds x {args.steps} steps, {report['seconds']:.0f} s with "
          f"{args.workers} worker(s). Wrote toy_2d.png, toy_2d.json"
          f"{' and toy_2d_ivc.png' if report['ivc_boundary_mse'] else ''} "
          f"in {args.out_dir}")
    if report["headline"]:  # the number to read with the figure's error panel
        print(report["headline"])
    return report


if __name__ == "__main__":
    main()
