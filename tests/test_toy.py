"""toy_2d.py: the distance and the ground-truth flow on known answers, the samplers against mvp.py's, --smoke and
--quick runs, and figures that read where they are shown.
"""
import json
import math
import os
import shlex
import struct

import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.text import Text

import mvp
import toy_2d
from tests.helpers import HERE


# ---------------------------------------------------------------------------------------------
# The distance: sliced Wasserstein-2
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
def test_smoke_run_writes_figures_json_and_table(tmp_path, capsys):
    report = toy_2d.main(["--smoke", "--full", "--out-dir", str(tmp_path)])
    assert (tmp_path / "toy_2d.png").stat().st_size > 10_000 and (tmp_path / "toy_2d_ivc.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "toy_2d.json").read_text())
    assert saved["config"]["smoke"] and saved["gaps"] == list(toy_2d.GAPS)
    variants = toy_2d.make_variants(toy_2d.parse_args(["--smoke"]))
    samplers = {s for v in variants.values() for s in v.samplers}
    for name in ("ring8", "checkerboard", "rotating3"):
        res = saved["results"][name]
        assert set(res["sw"]) == samplers
        assert all(len(v) == 2 and all(math.isfinite(x) and x > 0 for x in v) for v in res["sw"].values())
        assert set(res["u_err"]) == set(toy_2d.VARIANT_NAMES)  # one error list per trained network
        assert all(len(e) == 1 + len(toy_2d.GAPS) for v in res["u_err"].values() for e in v)  # boundary, then gaps
        assert res["true_v_as_proxy"][0] == 0.0  # at r = t the mean velocity is v* itself
        assert all(len(c) == 2 and c[-1][0] == 40 for v in res["curve"].values() for c in v)  # --smoke: 2 points
    ivc = saved["ivc_boundary_mse"]
    assert ivc["times"] == list(toy_2d.IVC_TIMES) and len(ivc["mf"]) == len(ivc["mvp"]) == len(toy_2d.IVC_TIMES)
    table = capsys.readouterr().out
    assert table.count("\n| ") >= 3 * (1 + len(samplers)) and "MVP (λ = 1), 1 step" in table
    assert report["table"] in table


def test_variants_reach_mvp_sample_times(tmp_path, monkeypatch):
    """Each MVP variant's (t, r) sampler settings reach mvp.sample_times, and --variants trains only those named."""
    seen = []
    real = mvp.sample_times
    monkeypatch.setattr(mvp, "sample_times", lambda n, times, *a: seen.append(
        (times.kind, times.one_step_frac, times.equal_frac)) or real(n, times, *a))
    toy_2d.main(["--smoke", "--variants", "mvp,mvp_logitnormal,mvp_gap,mvp_onestep,meanflow", "--out-dir",
                 str(tmp_path)])
    assert set(seen) == {("uniform", 0.0, 0.0), ("logit_normal", 0.0, 0.0), ("gap_uniform", 0.0, 0.0),
                         ("uniform", 0.25, 0.0), ("uniform", 0.0, 0.5)}
    assert set(json.loads((tmp_path / "toy_2d.json").read_text())["results"]["ring8"]["u_err"]) == \
        {"mvp", "mvp_logitnormal", "mvp_gap", "mvp_onestep", "meanflow"}
    with pytest.raises(SystemExit):
        toy_2d.parse_args(["--variants", "mvp,nope"])


def test_worker_processes_train_the_same_networks(tmp_path):
    """Training in spawned worker processes gives exactly what training in this process gives."""
    flags = ["--smoke", "--variants", "mvp,fm", "--curve-points", "0"]
    one = toy_2d.main(flags + ["--out-dir", str(tmp_path / "a")])
    two = toy_2d.main(flags + ["--workers", "2", "--out-dir", str(tmp_path / "b")])
    assert one["results"]["ring8"]["sw"] == two["results"]["ring8"]["sw"]
    assert one["results"]["ring8"]["u_err"] == two["results"]["ring8"]["u_err"]


def test_quick_is_the_readmes_first_look_and_smoke_the_tests_budget(tmp_path, capsys):
    """The README's toy line is --quick: ring8, one seed, L_MF only and MVP, QUICK's steps, in one process, and
    its last line is the headline number (run here at tiny budgets). --smoke is the tests' budget."""
    line, = [c for c in open(os.path.join(HERE, "README.md")).read().splitlines() if c.startswith("python toy_2d.py")]
    quick = toy_2d.parse_args(shlex.split(line.split("#")[0])[2:])
    assert quick.quick and quick.target_list == ["ring8"] and quick.seeds == 1 and quick.workers == 1
    assert quick.variant_list == ["mf", "mvp"] and quick.steps == toy_2d.QUICK["steps"] == 2000
    assert f"{quick.steps:,} steps" in line  # the step count the README states
    assert toy_2d.parse_args(["--quick", "--seeds", "3"]).seeds == 3  # a flag given wins over the budget
    smoke = toy_2d.parse_args(["--smoke"])
    assert {k: getattr(smoke, k) for k in toy_2d.SMOKE} == toy_2d.SMOKE and smoke.steps == 40
    with pytest.raises(SystemExit):
        toy_2d.parse_args(["--quick", "--smoke"])
    report = toy_2d.main(["--quick", "--steps", "20", "--eval-samples", "1024", "--eval-points", "64",
                          "--ode-steps", "10", "--curve-points", "0", "--out-dir", str(tmp_path)])
    col = 1 + toy_2d.GAPS.index(0.0)  # the error of u at r - t = 0, t = 0
    err = {v: report["results"]["ring8"]["u_err"][v][0][col] for v in ("mf", "mvp")}
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == report["headline"]
    assert f"r - t = 0 (t = 0) {err['mf']:.2f} without IVC" in report["headline"]
    assert f"{err['mvp']:.2f} with IVC" in report["headline"]


# ---------------------------------------------------------------------------------------------
# The figures read where they are shown
# ---------------------------------------------------------------------------------------------
SHOWN_WIDTH = 880  # px: the width a README or docs page gives an image


def png_size(path) -> tuple[int, int]:
    """(width, height) in pixels, from the PNG's IHDR chunk."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The default targets and variants at --smoke budgets; each saved figure with the PNG it went to."""
    out, figures = tmp_path_factory.mktemp("toy"), {}
    real = Figure.savefig

    def savefig(fig, path, *args, **kwargs):
        real(fig, path, *args, **kwargs)
        figures[str(path).rsplit("/", 1)[-1]] = fig

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Figure, "savefig", savefig)
        toy_2d.main(["--smoke", "--out-dir", str(out)])
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
def test_toy_figure_is_laid_out_in_rows_readable_at_880_px(smoke_run, name):
    out, figures = smoke_run
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


def test_toy_main_figure_has_two_rows_of_four(smoke_run):
    """The default run: target + 5 sampler scatters + 2 line plots = 8 panels, in 2 rows of 4."""
    _, figures = smoke_run
    assert panel_rows(figures["toy_2d.png"]) == [4, 4]
    assert panel_rows(figures["toy_2d_ivc.png"]) == [4, 4]  # without and with IVC: samples and 3 times


def test_panel_grid_leaves_few_cells_empty():
    assert [toy_2d.panel_grid(n) for n in (4, 5, 6, 7, 8)] == [(4, 1), (3, 2), (3, 2), (4, 2), (4, 2)]
