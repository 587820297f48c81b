"""Issue #36: one ONNX graph of the acting step (export_onnx.py), its torch-free runner (onnx_policy.py), the proofs
that it is the same policy, and run_benchmarks.py latency. Its own helpers and fixtures.
"""
import contextlib
import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import export_onnx
import mvp
import onnx_policy
import prepare_ogbench
import prepare_robomimic
import run_benchmarks
import run_utils
from tests.helpers import HERE

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
