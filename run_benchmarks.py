"""MVP against its baselines, side by side, in the same code: speed and success.

The baselines are options of mvp.py that share the critic, chunking and best-of-N selection; only
the policy's loss and sampler differ:
    mvp        MVP (one-step mean flow, L_MF + L_IVC)
    mvp-noivc  MVP without IVC (--ivc-coef 0), the paper's ablation
    flow10     Q-chunking's flow-matching policy, 10 Euler steps (--policy flow --flow-steps 10)
    flow1      its one-step variant (--flow-steps 1)

Commands:
    python run_benchmarks.py speed                        # throughput and latency table, this device
    python run_benchmarks.py latency                      # one chunk: eager torch against the ONNX graph, 1 thread
    python run_benchmarks.py graph-check                  # CUDA: graphed training matches eager, fresh draws
    python run_benchmarks.py share --processes 1 2 4      # aggregate updates/s of runs sharing one GPU
    python run_benchmarks.py suite --preset cpu --tasks cube-double-task1 --seeds 0 1 --methods mvp flow10
    python run_benchmarks.py suite --preset paper --tasks cube-double-task4 --seeds 0 1 2 3 4 --dry-run
    python run_benchmarks.py suite ... --launcher slurm --slurm-partition gpu   # one SLURM job per run
    python run_benchmarks.py suite ... --extra "--tau 0.02 --eval-episodes 20"  # mvp.py flags, one quoted string
    python run_benchmarks.py envs                         # robomimic env steps/s per task
    python run_benchmarks.py plot runs/RUN [runs/RUN2 ...]    # one run's (or several runs') curves as a figure
"""
from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

import mvp
import prepare_ogbench

HERE = os.path.dirname(os.path.abspath(__file__))

METHODS = {
    "mvp": [],
    "mvp-noivc": ["--ivc-coef", "0"],
    "flow10": ["--policy", "flow", "--flow-steps", "10"],
    "flow1": ["--policy", "flow", "--flow-steps", "1"],
    # MVP with other (t, r) samplers [choice]: MeanFlow's logit-normal, every gap r - t equally likely,
    # and a quarter of the L_MF rows on the one-step map (t, r) = (0, 1) that acting uses
    "mvp-logitnormal": ["--time-sampler", "logit_normal"],
    "mvp-gap": ["--time-sampler", "gap_uniform"],
    "mvp-onestep": ["--one-step-frac", "0.25"],
}
SPEED_METHODS = ["mvp", "mvp-noivc", "flow10", "flow1"]  # the samplers cost the same as mvp
# how the update runs: eager kernels, the whole update replayed as one CUDA graph, and that with TF32 matmuls
MODES = {
    "eager": ["--cuda-graph", "off", "--matmul-precision", "highest"],
    "graph": ["--cuda-graph", "auto", "--matmul-precision", "highest"],
    "graph-tf32": ["--cuda-graph", "auto", "--matmul-precision", "high"],
    "graph-tf32-compile": ["--cuda-graph", "auto", "--matmul-precision", "high", "--compile"],
}
# each mode again with the critic target's best-of-N selection in bfloat16 (--select-dtype)
MODES.update({f"{k}-bf16": v + ["--select-dtype", "bfloat16"] for k, v in list(MODES.items())})
PRESETS = {
    # the spec's protocol: mvp.py's defaults (1M offline + 1M online, 4x512, batch 256, N = 32, 50 eval episodes)
    "paper": [],
    # finishes on a 2-core CPU in about 1.5 h per run: small networks, 20k + 20k steps, 20 eval episodes.
    # Not comparable with the paper's numbers; it shows the pipeline and the relative ordering only.
    "cpu": ["--hidden-dim", "256", "--num-layers", "2", "--offline-steps", "20000", "--online-steps", "20000",
            "--start-training", "2000", "--eval-interval", "10000", "--eval-episodes", "20", "--threads", "1"],
    # the CPU learning check on cube-single (the ladder's first rung): offline only, 150 + 15 generated play
    # episodes, 2x256 networks, paper batch and N; 15k steps (MVP about 40 min per run), or 6k with -short
    "cube-single-cpu": ["--hidden-dim", "256", "--num-layers", "2", "--offline-steps", "15000", "--online-steps", "0",
                        "--eval-interval", "5000", "--eval-episodes", "20", "--dataset-episodes", "150",
                        "--threads", "1"],
}
PRESETS["cube-single-cpu-short"] = PRESETS["cube-single-cpu"] + ["--offline-steps", "6000", "--eval-interval", "2000"]
# success at the end of 1M offline + 1M online steps, from the spec's table (QC = flow10 here)
REFERENCE = {
    "cube-double-task4": {"flow10": 0.93, "mvp": 0.95},
    "cube-triple-task2": {"flow10": 0.82, "mvp": 0.88},
    "cube-triple-task3": {"flow10": 0.69, "mvp": 0.71},
    "cube-triple-task4": {"flow10": 0.46, "mvp": 0.52, "mvp-noivc": 0.30},
    "lift": {"flow10": 1.00, "mvp": 1.00},
    "can": {"flow10": 0.94, "mvp": 0.92},
    "square": {"flow10": 0.92, "mvp": 0.93},
}


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.get_num_threads()} threads"


# ================================================================================================
# speed: one process, one device, every method measured side by side
# ================================================================================================
def method_args(method: str, base: list[str]) -> mvp.Args:
    return mvp.parse_args(["--env", "cube-double-task1", *base, *METHODS[method]])


def synthetic_buffer(obs_dim: int, action_dim: int, rows: int, capacity: int, device) -> mvp.ReplayBuffer:
    """Random rows of the right shapes: throughput does not depend on the values."""
    rng = np.random.default_rng(0)
    data = dict(observations=rng.standard_normal((rows, obs_dim), dtype=np.float32),
                actions=rng.uniform(-1, 1, (rows, action_dim)).astype(np.float32),
                rewards=-np.ones(rows, np.float32), masks=np.ones(rows, np.float32),
                terminals=(np.arange(rows) % 1000 == 999).astype(np.float32),
                next_observations=rng.standard_normal((rows, obs_dim), dtype=np.float32))
    return mvp.ReplayBuffer(data, capacity, device)


def train_step_fn(learner, buf, args, gen, device):
    """mvp.train_step on buffer chunks, compiled or replayed as a CUDA graph as args say (what mvp.train runs)."""
    return mvp.make_train_step(learner, buf, mvp.buffer_target, mvp.hyperparams(args), gen, args.compile,
                               mvp.use_cuda_graph(args, device))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # timers must see finished kernels


def time_updates(learner, buf, args, gen, device, seconds: float, min_iters: int = 3, start_at: float = 0.0) -> float:
    """Offline updates per second over at least `seconds`, after warm-up (and recording, with CUDA graphs);
    timing starts no earlier than the wall-clock time `start_at` (share's processes start together)."""
    step = train_step_fn(learner, buf, args, gen, device)
    for _ in range(5):
        step()
    sync(device)
    time.sleep(max(0.0, start_at - time.time()))
    start, n = time.perf_counter(), 0
    while n < min_iters or time.perf_counter() - start < seconds:
        step()
        n += 1
    sync(device)
    return n / (time.perf_counter() - start)


def time_online(learner, env, buf, args, gen, device, seconds: float, min_iters: int = 3) -> float:
    """Online env steps per second: best-of-N chunk every h steps, env step, buffer add, one update."""
    obs, _ = env.reset(seed=0)
    queue, actor = [], mvp.Actor(learner, device, mvp.use_cuda_graph(args, device))
    step = train_step_fn(learner, buf, args, gen, device)
    for _ in range(5):
        step()
    sync(device)
    start, n = time.perf_counter(), 0
    while n < min_iters or time.perf_counter() - start < seconds:
        if not queue:
            queue = list(actor(obs, args.num_candidates, args.chunk_len, gen))
        action = queue.pop(0)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        buf.add(obs, action, reward, 1.0 - float(terminated), float(terminated or truncated), next_obs)
        obs = next_obs
        if terminated or truncated:
            obs, _ = env.reset()
            queue = []
        step()
        n += 1
    sync(device)
    return n / (time.perf_counter() - start)


def time_calls(fn, device, calls: int, warmup: int = 1) -> list[float]:
    """Milliseconds of each of `calls` calls of fn (after `warmup` untimed calls), device work included."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(calls):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        out.append(1e3 * (time.perf_counter() - start))
    return out


def time_latency(learner, obs, args, device, gen, calls: int) -> list[float]:
    """Milliseconds to pick one action chunk for one observation (best-of-N, N candidates)."""
    actor = mvp.Actor(learner, device, mvp.use_cuda_graph(args, device))
    act = lambda: actor(obs, args.num_candidates, args.chunk_len, gen)
    return time_calls(act, device, calls)


@torch.no_grad()
def time_parts(learner, obs, args, device, calls: int) -> tuple[float, float]:
    """Median ms of one policy network call and one critic-ensemble call on the N candidate rows of
    one observation: the two pieces an action costs (flow-K makes K policy calls, MVP one)."""
    N = args.num_candidates
    obs_rep = torch.as_tensor(obs, dtype=torch.float32, device=device)[None].expand(N, -1)
    a = torch.zeros(N, learner.policy.act_dim, device=device)
    t = torch.zeros(N, 1, device=device)
    return (statistics.median(time_calls(lambda: learner.policy(obs_rep, a, t, t), device, calls)),
            statistics.median(time_calls(lambda: learner.critic(obs_rep, a), device, calls)))


def latency_ceiling(policy_ms: float, critic_ms: float, steps: int = 10, per_run_ms: float = 0.0,
                    first_policy_ms: float | None = None) -> float:
    """Largest flow-K / one-step latency ratio possible when both score N candidates with the same
    critic: (K p + c) / (p + c), reached only if nothing else cost time. Where p and c were each timed as
    a run of their own graph, each holds the runtime's cost of one run, o, which a whole acting step pays
    once: then (K (p - o) + (c - o) + o) / ((p - o) + (c - o) + o). first_policy_ms: a policy call that
    follows a critic call (its weights out of cache), where it costs more than the K - 1 that follow it."""
    p, c, o = policy_ms - per_run_ms, critic_ms - per_run_ms, per_run_ms
    first = p if first_policy_ms is None else first_policy_ms - per_run_ms
    return (first + (steps - 1) * p + c + o) / (first + c + o)


def speed(opts) -> dict:
    device = mvp.pick_device(opts.device, opts.threads)
    modes = opts.modes or (["eager", "graph", "graph-tf32"] if device.type == "cuda" else ["eager"])
    if device.type != "cuda" and set(modes) - {"eager", "eager-bf16"}:
        raise SystemExit("error: on a CPU --modes can only be eager and eager-bf16 (the others use CUDA graphs)")
    env = prepare_ogbench.make_env(mvp.resolve_env_name("cube-double-task1"))
    obs_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
    obs0, _ = env.reset(seed=0)
    base = ["--hidden-dim", str(opts.hidden_dim), "--num-layers", str(opts.num_layers),
            "--batch-size", str(opts.batch_size), "--num-candidates", str(opts.num_candidates)]
    rows = [(m, mode) for mode in modes for m in opts.methods]
    results = {f"{m} {mode}": dict(updates_per_s=[], online_steps_per_s=[], latency_ms=[]) for m, mode in rows}
    parts = dict(policy_call_ms=[], critic_call_ms=[])
    for rep in range(opts.repeats):  # methods and modes interleaved in each repeat, so drifts hit all alike
        for m, mode in rows:
            args = method_args(m, base + MODES[mode])
            mvp.pick_device(opts.device, opts.threads, args.matmul_precision)  # TF32 on or off for this row
            gen = mvp.seed_everything(rep, device)
            learner = mvp.make_learner(obs_dim, action_dim * args.chunk_len, args, device)
            buf = synthetic_buffer(obs_dim, action_dim, 20_000, 20_000 + 100_000, device)
            r = results[f"{m} {mode}"]
            r["updates_per_s"].append(time_updates(learner, buf, args, gen, device, opts.seconds))
            r["online_steps_per_s"].append(time_online(learner, env, buf, args, gen, device, opts.seconds))
            r["latency_ms"] += time_latency(learner, obs0, args, device, gen, opts.latency_calls)
            if (m, mode) == rows[0]:  # the networks are the same for every method
                p_ms, c_ms = time_parts(learner, obs0, args, device, opts.latency_calls)
                parts["policy_call_ms"].append(p_ms)
                parts["critic_call_ms"].append(c_ms)
            print(f"[speed] repeat {rep + 1}/{opts.repeats} {m} {mode}: {r['updates_per_s'][-1]:.2f} upd/s, "
                  f"{r['online_steps_per_s'][-1]:.2f} env steps/s, latency {statistics.median(r['latency_ms']):.3f} ms",
                  flush=True)
    table = {}
    for key, r in results.items():
        lat = np.array(r["latency_ms"])
        table[key] = dict(updates_per_s=statistics.median(r["updates_per_s"]),
                          online_steps_per_s=statistics.median(r["online_steps_per_s"]),
                          latency_ms_mean=float(lat.mean()), latency_ms_p95=float(np.percentile(lat, 95)))
    for m, mode in rows:  # ratios against flow10 in the same mode, from the same run
        row, ref = table[f"{m} {mode}"], table.get(f"flow10 {mode}")
        if ref:
            row["updates_ratio_vs_flow10"] = row["updates_per_s"] / ref["updates_per_s"]
            row["online_ratio_vs_flow10"] = row["online_steps_per_s"] / ref["online_steps_per_s"]
            row["latency_speedup_vs_flow10"] = ref["latency_ms_mean"] / row["latency_ms_mean"]
        row["updates_ratio_vs_eager"] = row["updates_per_s"] / table[f"{m} {modes[0]}"]["updates_per_s"]
    out = dict(machine=machine_name(device), device=str(device), torch=torch.__version__,
               config=dict(hidden_dim=opts.hidden_dim, num_layers=opts.num_layers, batch_size=opts.batch_size,
                           num_candidates=opts.num_candidates, chunk_len=5, repeats=opts.repeats, modes=modes,
                           seconds_per_measure=opts.seconds, latency_calls_per_repeat=opts.latency_calls),
               results=table, raw=results)
    p_ms, c_ms = statistics.median(parts["policy_call_ms"]), statistics.median(parts["critic_call_ms"])
    out["latency_parts"] = dict(policy_call_ms=p_ms, critic_call_ms=c_ms,
                                flow10_latency_ratio_ceiling=latency_ceiling(p_ms, c_ms, 10))
    return write_table(opts.out_dir, "speed", out, speed_markdown(out))


def write_table(out_dir: str, name: str, out: dict, md: str) -> dict:
    """<out_dir>/<name>.json and <name>.md, and the markdown printed; returns out."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(out, f, indent=1)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(md)
    print(md)
    return out


def speed_markdown(out: dict) -> str:
    c = out["config"]
    nan = float("nan")
    lines = [f"Machine: {out['machine']} ({out['device']}, torch {out['torch']}). "
             f"Networks {c['num_layers']}x{c['hidden_dim']}, batch {c['batch_size']}, N = {c['num_candidates']}, "
             f"h = 5; median of {c['repeats']} repeats; ratios against flow10 in the same mode, from the same run.", "",
             f"| method | mode | offline updates/s | x flow10 | x {c['modes'][0]} | online env steps/s (1 update/step) "
             "| x flow10 | action latency mean / p95 (ms) | speed-up vs flow10 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, r in out["results"].items():
        m, mode = key.split(" ")
        lines.append(f"| {m} | {mode} | {r['updates_per_s']:.2f} | {r.get('updates_ratio_vs_flow10', nan):.2f} "
                     f"| {r['updates_ratio_vs_eager']:.2f} "
                     f"| {r['online_steps_per_s']:.2f} | {r.get('online_ratio_vs_flow10', nan):.2f} "
                     f"| {r['latency_ms_mean']:.3f} / {r['latency_ms_p95']:.3f} "
                     f"| {r.get('latency_speedup_vs_flow10', nan):.2f} |")
    if "latency_parts" in out:
        lp = out["latency_parts"]
        lines += ["",
                  f"Latency parts ({c['modes'][0]}, median, {c['num_candidates']} candidate rows of one observation): "
                      f"one policy network call {lp['policy_call_ms']:.2f} ms, one critic-ensemble call "
                      f"{lp['critic_call_ms']:.2f} ms. "
                      f"Both methods pay the critic call, so flow10 / MVP latency cannot exceed (10 p + c) / (p + c) = "
                      f"{lp['flow10_latency_ratio_ceiling']:.2f} on this device."]
    return "\n".join(lines) + "\n"


# ================================================================================================
# latency: one observation's chunk from eager torch against the exported graph in onnxruntime
# ================================================================================================
def step_macs(learner, num_candidates: int, policy_calls: int) -> int:
    """Multiply-adds of one acting step, from the layer shapes: N rows through the policy `policy_calls` times
    (flow-K: K, MVP: 1), then once through the K critics (EnsembleLinear weights are (K, in, out))."""
    policy = sum(m.weight.numel() for m in learner.policy.modules() if isinstance(m, torch.nn.Linear))
    critic = sum(m.weight.numel() for m in learner.critic.modules() if isinstance(m, mvp.EnsembleLinear))
    return num_candidates * (policy_calls * policy + critic)


# how one chunk is computed: mvp.act, or the exported step through onnx_policy.OnnxPolicy.act, its critic
# layers split member by member and constants folded (export_onnx's default) or as exported (a batched MatMul per
# critic layer)
PARTS = ("policy", "critic", "run")  # a policy call, a critic-ensemble call, onnxruntime's cost of one run
RUNTIMES = {"eager": "torch eager", "onnx": "onnxruntime", "onnx-batched": "onnxruntime, as exported"}
# untimed calls before each row's round: after another row's round the first calls of a 2x256 step ran 1.9-2.2,
# 1.6-1.8, 1.4-1.6, ... 1.05x the median (the 8th; two one-off measurements with exported flow10 4x512 rounds between
# them): caches and predictors filled by the other graph; so each round times the step as back-to-back calls run it
WARMUP = 10
MATMUL = 1024  # the size of the square float32 products that measure the core's matmul rate


def part_calls(learner, obs, args, runtime: str, folder: str) -> dict:
    """The two pieces an action costs, as calls to time: one policy network call and one critic-ensemble call
    on the N candidate rows of one observation (flow-K makes K policy calls, MVP one), eagerly (as time_parts)
    or exported alone and run in onnxruntime on one thread."""
    import export_onnx
    import onnx_policy
    N, A = args.num_candidates, learner.policy.act_dim
    obs_rep, a, t = np.repeat(np.asarray(obs, np.float32)[None], N, axis=0), np.zeros((N, A), np.float32), \
        np.zeros((N, 1), np.float32)
    feeds = {"policy": dict(obs=obs_rep, a=a, t=t, r=t), "critic": dict(obs=obs_rep, a=a)}
    calls = {}
    for name, net in (("policy", learner.policy), ("critic", learner.critic)):
        inputs = tuple(torch.from_numpy(v) for v in feeds[name].values())
        if runtime == "eager":
            calls[name] = torch.no_grad()(functools.partial(net, *inputs))
            continue
        path = os.path.join(folder, f"{name}_{runtime}.onnx")
        export_onnx.export_module(net, inputs, list(feeds[name]), ["out"], path, rewrite=runtime == "onnx")
        calls[name] = functools.partial(onnx_policy.session(path, threads=1).run, None, feeds[name])
    if runtime != "eager":  # onnxruntime's own cost of one run: a graph that returns the critic's inputs as they are
        import onnx
        from onnx import helper
        value = lambda name, v: helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(v.shape))
        graph = helper.make_graph([helper.make_node("Identity", [k], [f"{k}_out"]) for k in feeds["critic"]], "run",
                                  [value(k, v) for k, v in feeds["critic"].items()],
                                  [value(f"{k}_out", v) for k, v in feeds["critic"].items()])
        path = os.path.join(folder, f"run_{runtime}.onnx")
        onnx.save(helper.make_model(graph), path)
        calls["run"] = functools.partial(onnx_policy.session(path, threads=1).run, None, feeds["critic"])
    return calls


def latency(opts) -> dict:
    """p50 / p99 / max ms of one best-of-N action chunk for one observation: eager torch (mvp.act) against
    the exported step in onnxruntime (onnx_policy.OnnxPolicy.act), both on one thread, every method and network
    size in one process, calls interleaved in rounds so a busy machine's drifts hit all rows alike."""
    import tempfile
    import export_onnx
    import onnx_policy
    export_onnx.need_onnx(runtime=True)
    import onnxruntime
    device = mvp.pick_device("cpu", opts.threads)
    env = prepare_ogbench.make_env(mvp.resolve_env_name("cube-double-task1"))
    obs_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
    obs0, _ = env.reset(seed=0)
    # the core's float32 matmul rate, timed in the same rounds as the steps (so under the same load): what the
    # step's multiply-adds could run at, were each of them part of one large matmul
    mm = functools.partial(torch.mm, torch.randn(MATMUL, MATMUL), torch.randn(MATMUL, MATMUL))
    rows, fns, parts, mm_ms, folder = {}, {}, {}, [], tempfile.mkdtemp(prefix="latency-")
    for size in opts.sizes:
        layers, width = (int(x) for x in size.split("x"))
        for m in opts.methods:
            args = method_args(m, ["--hidden-dim", str(width), "--num-layers", str(layers), "--num-candidates",
                                   str(opts.num_candidates), "--device", "cpu"])
            mvp.seed_everything(0, device)
            learner = mvp.make_learner(obs_dim, action_dim * args.chunk_len, args, device)
            meta = dict(task="cube-double-task1 (random networks)", obs_dim=str(obs_dim), action_dim=str(action_dim),
                        chunk_len=str(args.chunk_len), num_candidates=str(args.num_candidates), method=m)
            macs = step_macs(learner, args.num_candidates, args.flow_steps if args.policy == "flow" else 1)
            for runtime in opts.runtimes:
                if runtime == "eager":
                    gen = torch.Generator().manual_seed(0)
                    fns[size, m, runtime] = functools.partial(mvp.act, learner, obs0, args.num_candidates,
                                                              args.chunk_len, gen)
                else:
                    path = os.path.join(folder, f"{m}_{size}_{runtime}.onnx")
                    export_onnx.export_policy(learner, args, obs_dim, path, meta, rewrite=runtime == "onnx")
                    fns[size, m, runtime] = functools.partial(onnx_policy.OnnxPolicy(path, seed=0).act, obs0)
                rows[size, m, runtime] = dict(networks=size, method=m, runtime=RUNTIMES[runtime], times=[], in_round=[],
                                              macs=macs)
                if (size, runtime) not in parts:  # the networks' shapes are the same for every method
                    parts[size, runtime] = {k: [] for k in PARTS + ("policy_alt", "critic_alt")}
                    for k, fn in part_calls(learner, obs0, args, runtime, folder).items():
                        fns[size, k, runtime] = fn
            print(f"[latency] {size} {m}: exported and loaded", flush=True)
    done = 0
    while done < opts.calls:  # rounds: every row (and part) gets `round` calls before any gets more
        n = min(opts.round, opts.calls - done)
        for (size, m, runtime), fn in fns.items():
            times = time_calls(fn, device, n, WARMUP)
            if m in PARTS:
                parts[size, runtime][m].extend(times)
            else:  # and each call against its round's median: the tail without the machine's drift over seconds
                rows[size, m, runtime]["times"].extend(times)
                rows[size, m, runtime]["in_round"].extend(np.array(times) / statistics.median(times))
        for (size, runtime), times in parts.items():  # and in alternation, each call after the other network's
            for i in range(WARMUP + n):
                for k in ("policy", "critic"):
                    t = time_calls(fns[size, k, runtime], device, 1, warmup=0)
                    times[k + "_alt"] += t if i >= WARMUP else []
        mm_ms += time_calls(mm, device, 4)
        done += n
        print(f"[latency] {done}/{opts.calls} calls per row", flush=True)
    rate = 2 * MATMUL ** 3 / (statistics.median(mm_ms) / 1e3) / 1e9  # GFLOP/s
    for (size, m, runtime), r in rows.items():
        t, in_round = np.array(r.pop("times")), np.array(r.pop("in_round"))
        r.update(calls=len(t), p50_ms=float(np.percentile(t, 50)), p99_ms=float(np.percentile(t, 99)),
                 max_ms=float(t.max()), ideal_ms=1e3 * r["macs"] / (rate * 1e9 / 2))  # a multiply-add is 2 flops
        r["p99_over_p50"], r["x_ideal"] = r["p99_ms"] / r["p50_ms"], r["p50_ms"] / r["ideal_ms"]
        r["p99_over_p50_in_round"] = float(np.percentile(in_round, 99) / np.percentile(in_round, 50))
        eager = rows.get((size, m, "eager"))
        r["speedup_vs_eager"] = eager["p50_ms"] / r["p50_ms"] if eager else float("nan")
    leads = []
    for (size, runtime), times in parts.items():
        p_ms, c_ms = statistics.median(times["policy"]), statistics.median(times["critic"])
        o_ms = statistics.median(times["run"]) if times["run"] else 0.0  # eager: calls in the step are calls alone
        pa_ms, ca_ms = statistics.median(times["policy_alt"]), statistics.median(times["critic_alt"])
        lead = dict(networks=size, runtime=RUNTIMES[runtime], policy_call_ms=p_ms, critic_call_ms=c_ms,
                    per_run_ms=o_ms, ceiling=latency_ceiling(p_ms, c_ms, 10, o_ms), policy_alt_ms=pa_ms,
                    critic_alt_ms=ca_ms, ceiling_in_step=latency_ceiling(p_ms, ca_ms, 10, o_ms, pa_ms))
        if {"mvp", "flow10"} <= set(opts.methods):
            lead["flow10_over_mvp"] = rows[size, "flow10", runtime]["p50_ms"] / rows[size, "mvp", runtime]["p50_ms"]
            lead["x_ceiling"] = lead["flow10_over_mvp"] / lead["ceiling"]
            lead["x_ceiling_in_step"] = lead["flow10_over_mvp"] / lead["ceiling_in_step"]
        leads.append(lead)
    out = dict(machine=machine_name(device), torch=torch.__version__, onnxruntime=onnxruntime.__version__,
               config=dict(env="cube-double-task1", obs_dim=obs_dim, action_dim=action_dim, chunk_len=5,
                           num_candidates=opts.num_candidates, threads=opts.threads, calls=opts.calls,
                           round=opts.round, warmup=WARMUP, sizes=opts.sizes, methods=opts.methods,
                           runtimes=opts.runtimes),
               matmul_gflops=rate, rows=list(rows.values()), leads=leads)
    out["aims"] = latency_aims(out)
    shutil.rmtree(folder, ignore_errors=True)
    return write_table(opts.out_dir, "latency", out, latency_markdown(out))


def latency_aims(out: dict) -> list[dict]:
    """The issue's aims for the exported step (split critic), each with the figure measured and whether it is met."""
    aims, onnx = [], RUNTIMES["onnx"]
    for r in out["rows"]:
        if r["runtime"] == onnx and r["networks"] == "4x512":
            aims.append(dict(aim=f"{r['method']} 4x512: exported p50 within 1.25x of multiply-adds / matmul rate",
                             value=r["x_ideal"], met=r["x_ideal"] <= 1.25))
        if r["runtime"] == onnx and r["networks"] == "2x256":
            aims.append(dict(aim=f"{r['method']} 2x256: exported p50 at least 2x faster than eager",
                             value=r["speedup_vs_eager"], met=r["speedup_vs_eager"] >= 2.0))
    for r in out["rows"]:
        aims.append(dict(aim=f"{r['method']} {r['networks']} {r['runtime']}: p99 within 1.5x of p50",
                         value=r["p99_over_p50"], met=r["p99_over_p50"] <= 1.5))
        if r["runtime"] == onnx:
            aims.append(dict(aim=f"{r['method']} {r['networks']} {r['runtime']}: the same, each call against its "
                                 f"round's median", value=r["p99_over_p50_in_round"],
                             met=r["p99_over_p50_in_round"] <= 1.5))
    for lead in out["leads"]:
        if lead["runtime"] == onnx and "x_ceiling" in lead:
            aims.append(dict(aim=f"{lead['networks']}: exported flow10 / mvp within 10% of (10 p + c) / (p + c)",
                             value=lead["x_ceiling"], met=lead["x_ceiling"] >= 0.9))
            aims.append(dict(aim=f"{lead['networks']}: the same, p and c as in the step (first policy call and the "
                                 f"critic's timed in alternation)", value=lead["x_ceiling_in_step"],
                             met=lead["x_ceiling_in_step"] >= 0.9))
    return aims


def latency_markdown(out: dict) -> str:
    c = out["config"]
    lines = [f"Machine: {out['machine']}; torch {out['torch']}, onnxruntime {out['onnxruntime']}. One observation "
             f"of {c['env']} (obs {c['obs_dim']}, actions {c['action_dim']}, h = {c['chunk_len']}), N = "
             f"{c['num_candidates']}, {c['threads']} CPU thread (torch; onnxruntime one intra-op thread, "
             f"sequential); {c['calls']} calls per row, and per policy call p and critic-ensemble call c (medians), "
             f"interleaved in rounds of {c['round']}, each after {c['warmup']} untimed calls. Float32 matmul "
             f"rate in the same rounds: {out['matmul_gflops']:.1f} GFLOP/s ({MATMUL}^3 products, one thread, median "
             f"of 4 per round); ideal = multiply-adds / that rate. In-round p99 / p50: of each call's time over its "
             f"round's median (the machine's drift between rounds left out). o: onnxruntime's cost of one run (a "
             f"graph returning its inputs), held in p and c each but paid once per step. In alternation: a policy "
             f"call, then a critic call, each timed, as MVP's step runs them (each finds its weights where the other "
             f"network's call left the caches); flow10's other nine policy calls follow a policy call.", "",
             "| networks | method | runtime | p50 (ms) | p99 (ms) | max (ms) | p99 / p50 | in-round p99 / p50 "
             "| x eager at p50 | multiply-adds (M) | ideal (ms) | p50 / ideal |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in out["rows"]:
        lines.append(f"| {r['networks']} | {r['method']} | {r['runtime']} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} "
                     f"| {r['max_ms']:.3f} | {r['p99_over_p50']:.2f} | {r['p99_over_p50_in_round']:.2f} "
                     f"| {r['speedup_vs_eager']:.2f} "
                     f"| {r['macs'] / 1e6:.1f} | {r['ideal_ms']:.3f} | {r['x_ideal']:.2f} |")
    lines += ["", "| networks | runtime | policy call p (ms) | critic-ensemble call c (ms) | one run o (ms) "
              "| ceiling (10 p + c) / (p + c), o paid once | flow10 / mvp at p50 | x ceiling "
              "| p, c in alternation (ms) | ceiling, the first p and c in alternation | x that ceiling |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    nan = float("nan")
    for lead in out["leads"]:
        lines.append(f"| {lead['networks']} | {lead['runtime']} | {lead['policy_call_ms']:.3f} "
                     f"| {lead['critic_call_ms']:.3f} | {lead['per_run_ms']:.3f} | {lead['ceiling']:.2f} "
                     f"| {lead.get('flow10_over_mvp', nan):.2f} | {lead.get('x_ceiling', nan):.2f} "
                     f"| {lead['policy_alt_ms']:.3f}, {lead['critic_alt_ms']:.3f} | {lead['ceiling_in_step']:.2f} "
                     f"| {lead.get('x_ceiling_in_step', nan):.2f} |")
    lines += ["", "| aim | measured | met |", "| --- | --- | --- |"]
    lines += [f"| {a['aim']} | {a['value']:.2f} | {'yes' if a['met'] else 'no'} |" for a in out["aims"]]
    return "\n".join(lines) + "\n"


# ================================================================================================
# graph-check: CUDA graphs replay what eager code computes; share: several runs on one GPU
# ================================================================================================
def graph_check(opts) -> dict:
    """Train the same learner from the same seed eagerly and with CUDA graphs (with --compile: graphs of
    the compiled step), `updates` steps each, in full fp32, and compare losses and parameters; report how
    far a TF32 graphed run drifts from the fp32 one; then check that replays draw fresh random numbers,
    the same ones eager code draws from the same generator state."""
    device = mvp.pick_device(opts.device)
    if device.type != "cuda":
        raise SystemExit("error: graph-check compares CUDA graphs with eager code and needs a CUDA device")
    obs_dim, action_dim = 40, 5  # cube-double's sizes; the values are synthetic
    base = ["--hidden-dim", str(opts.hidden_dim), "--num-layers", str(opts.num_layers), "--batch-size",
            str(opts.batch_size)]
    report = {}
    fast = ["--compile"] if opts.compile else []
    for m in opts.methods:
        runs = {}
        for mode in ("eager", "graph", "graph-tf32"):
            args = method_args(m, base + MODES[mode] + (fast if mode != "eager" else []))
            mvp.pick_device(opts.device, 0, args.matmul_precision)
            gen = mvp.seed_everything(0, device)
            learner = mvp.make_learner(obs_dim, action_dim * args.chunk_len, args, device)
            buf = synthetic_buffer(obs_dim, action_dim, 20_000, 20_000, device)
            step = train_step_fn(learner, buf, args, gen, device)
            keys = sorted(step())  # the logged quantities (this first step is part of the run in every mode)
            losses = torch.stack([torch.stack([v for _, v in sorted(step().items())]).clone()
                                  for _ in range(opts.updates)])
            params = torch.cat([p.detach().flatten() for p in [*learner.policy.parameters(),
                                                               *learner.critic.parameters()]])
            runs[mode] = losses.cpu().double(), params.cpu().double()
        (le, pe), (lg, pg), (lt, pt) = runs["eager"], runs["graph"], runs["graph-tf32"]
        loss_rel = ((lg - le).abs() / le.abs().clamp_min(1e-3)).max(dim=1).values  # worst logged quantity, per step
        tf32_rel = ((lt - le).abs() / le.abs().clamp_min(1e-3))[-20:].mean(dim=0)  # per logged quantity, last 20 steps
        report[m] = dict(updates=opts.updates, compile=opts.compile,
                         max_rel_loss_diff_first10=float(loss_rel[:10].max()),
                         max_rel_loss_diff=float(loss_rel.max()),
                         max_abs_param_diff=float((pg - pe).abs().max()), param_scale=float(pe.abs().max()),
                         tf32_mean_rel_diff_last20=dict(zip(keys, tf32_rel.tolist())),
                         tf32_max_abs_param_diff=float((pt - pe).abs().max()))
        print(f"[graph-check] {m}: {json.dumps(report[m])}", flush=True)
    # fresh draws: three replays of a recorded sampler against three eager calls from the same state
    buf = synthetic_buffer(obs_dim, action_dim, 20_000, 20_000, device)
    gen = mvp.seed_everything(1, device)
    eager = [buf.sample_chunks(256, 5, 0.99, gen)["obs"].clone() for _ in range(3)]
    gen.manual_seed(1)
    sampler = mvp.CUDAGraphed(lambda: buf.sample_chunks(256, 5, 0.99, gen)["obs"], gen, warmup=1)
    replays = [sampler().clone() for _ in range(3)]
    report["draws"] = dict(replays_equal_eager=all(torch.equal(a, b) for a, b in zip(eager, replays)),
                           replays_differ=not torch.equal(replays[1], replays[2]))
    print(f"[graph-check] draws: {json.dumps(report['draws'])}", flush=True)
    ok = report["draws"]["replays_equal_eager"] and report["draws"]["replays_differ"] and all(
        report[m]["max_rel_loss_diff_first10"] < opts.tol for m in opts.methods)
    report["ok"] = ok
    os.makedirs(opts.out_dir, exist_ok=True)
    with open(os.path.join(opts.out_dir, "graph_check.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"[graph-check] {'PASSED' if ok else 'FAILED'} (tolerance {opts.tol} on the first 10 updates' losses)")
    return report


def rate_worker(opts):
    """One of `share`'s processes: warm up (and record), wait for the common start, time updates."""
    device = mvp.pick_device(opts.device, opts.threads)
    args = method_args(opts.method, MODES[opts.mode])
    mvp.pick_device(opts.device, opts.threads, args.matmul_precision)
    gen = mvp.seed_everything(0, device)
    learner = mvp.make_learner(40, 25, args, device)
    buf = synthetic_buffer(40, 5, 20_000, 20_000, device)
    rate = time_updates(learner, buf, args, gen, device, opts.seconds, start_at=opts.start_at)
    late = time.time() - opts.seconds - opts.start_at  # > 0: began timing after the others (or overran the window)
    print(json.dumps(dict(updates_per_s=rate, late_s=max(late, 0.0))), flush=True)


def share(opts) -> dict:
    """Aggregate updates/s of 1, 2, 4 ... processes training at once on one device."""
    table = {}
    for procs in opts.processes:
        start_at = time.time() + opts.startup
        cmd = [sys.executable, os.path.abspath(__file__), "_rate", "--method", opts.method, "--mode", opts.mode,
               "--seconds", str(opts.seconds), "--start-at", str(start_at), "--device", opts.device, "--threads", "1"]
        ps = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=HERE) for _ in range(procs)]
        outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in ps]
        rates = [o["updates_per_s"] for o in outs]
        table[procs] = dict(per_process=rates, total=sum(rates), late_s=max(o["late_s"] for o in outs))
        each = ", ".join(f"{r:.1f}" for r in rates)
        print(f"[share] {procs} process(es): {sum(rates):.1f} updates/s in all ({each}); "
              f"latest start {table[procs]['late_s']:.1f} s after the common start", flush=True)
    os.makedirs(opts.out_dir, exist_ok=True)
    with open(os.path.join(opts.out_dir, "share.json"), "w") as f:
        json.dump(dict(method=opts.method, mode=opts.mode, seconds=opts.seconds, table=table), f, indent=1)
    return table


# ================================================================================================
# envs: robomimic environment throughput (robosuite rebuilds its model on every reset)
# ================================================================================================
def benchmark_env(task: str, steps: int = 1000, seed: int = 0) -> dict:
    """Env steps/s with uniform random actions after one reset, plus reset time and one capped episode."""
    import prepare_robomimic
    cap = prepare_robomimic.ROBOMIMIC_TASKS[task]["max_episode_steps"]
    env = prepare_robomimic.RobomimicEnv(prepare_robomimic.robomimic_env_args(task), cap, source="benchmark")
    rng = np.random.default_rng(seed)
    t0 = time.time()
    env.reset(seed=seed)
    reset_s = time.time() - t0
    t0, c0 = time.time(), time.process_time()
    for _ in range(steps):
        env.step(rng.uniform(-1, 1, 7))
    steps_per_s, steps_per_cpu_s = steps / (time.time() - t0), steps / (time.process_time() - c0)
    t0 = time.time()
    env.reset(seed=seed + 1)
    done, n = False, 0
    while not done:
        _, _, term, trunc, _ = env.step(rng.uniform(-1, 1, 7))
        done, n = term or trunc, n + 1
    episode_s = time.time() - t0
    env.close()
    return dict(task=task, steps_per_s=round(steps_per_s, 1), steps_per_cpu_s=round(steps_per_cpu_s, 1),
                reset_s=round(reset_s, 3), episode_steps=n, episode_s=round(episode_s, 2))


# ================================================================================================
# suite: one training run per (task, seed, method), as separate processes or SLURM jobs
# ================================================================================================
def run_dir_of(out_dir, task, method, seed):
    return os.path.join(out_dir, task, method, f"seed{seed}")


def suite_commands(opts) -> list[tuple[str, list[str]]]:
    cmds, share = [], []
    named = {a.split("=")[0] for a in opts.extra}
    if opts.launcher == "local" and opts.workers > 1 and "--eval-workers" not in named:
        # runs side by side split the spare cores between their evaluation workers (mvp.py's auto takes them all)
        share = ["--eval-workers", str(min(16, ((os.cpu_count() or 1) - 1) // opts.workers))]
    for task in opts.tasks:
        for method in opts.methods:
            for seed in opts.seeds:
                d = run_dir_of(opts.out_dir, task, method, seed)
                cmd = [sys.executable, os.path.join(HERE, "mvp.py"), "--env", task, "--seed", str(seed),
                       "--run-dir", d, *PRESETS[opts.preset], *METHODS[method], *share, *opts.extra]
                if glob.glob(os.path.join(d, "checkpoints", "resume-*.pt")):
                    cmd += ["--resume", d]  # an interrupted run goes on; mvp.py refuses it if the flags changed
                cmds.append((d, cmd))
    return cmds


def run_logged(run_dir: str, cmd: list[str]) -> int:
    """Run one training process with its output in <run_dir>/stdout.log (also what a SLURM job runs)."""
    os.makedirs(run_dir, exist_ok=True)
    env = dict(os.environ, TQDM_MININTERVAL=os.environ.get("TQDM_MININTERVAL", "30"))  # a line per 30 s in the log
    with open(os.path.join(run_dir, "stdout.log"), "a") as log:
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=HERE, env=env).returncode


def prepare_data(todo: list[tuple[str, list[str]]]):
    """Each OGBench task's data, found, downloaded or generated here once, as its runs would (mvp.load_task), before
    they start: runs side by side, or Slurm jobs, would each find it missing and make it at the same time (and on a
    network file system a lock is not to be trusted). robomimic's files are only read."""
    done = set()
    for _, cmd in todo:
        args = mvp.parse_args(cmd[2:])
        env, generate = mvp.resolve_env_name(args.env), args.generate_data or args.dataset_episodes
        key = (prepare_ogbench.dataset_name(env), args.dataset_dir, bool(generate), args.dataset_episodes,
               args.data_seed)
        if env in mvp.prepare_robomimic.ROBOMIMIC_TASKS or key in done:
            continue
        done.add(key)
        print(f"[suite] the data of {args.env}, once, before its runs start")
        try:
            prepare_ogbench.find_dataset(env, args.dataset_dir, generate, args.dataset_episodes, args.data_seed,
                                         args.data_workers)
        except prepare_ogbench.DataError as e:
            raise SystemExit(f"error: {e}")


INTERRUPTED = (130, 143)  # mvp.py saved after Ctrl-C or SIGTERM (e.g. Slurm's time limit)
DIED = -1  # the exit code reported for a submitit job that died before mvp.py could exit


def job_result(job, run_dir: str) -> int:
    """mvp.py's exit code from a submitit job; a job that died (killed, out of memory, node failure, or
    the job itself failed) is reported in one line with where its logs are, not raised as a traceback."""
    try:
        return job.result()
    except Exception as e:  # submitit's UncompletedJobError or FailedJobError
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [""]
        raised = [line for line in lines if re.match(r"[\w.]+(Error|Exception|Interrupt|Exit)\b", line)]
        reason = (raised[-1] if raised else " ".join(lines[:2]))[:300]  # the job's own exception, else submitit's words
        print(f"[suite] job {job.job_id} died ({type(e).__name__}: {reason}): {run_dir}; submitit's logs are in "
              f"{job.paths.folder}; the same suite command runs it again, from its last checkpoint if it wrote one")
        return DIED


def launch(opts, todo):
    if opts.launcher == "slurm":  # one SLURM job per run, --workers of them at a time (a job array)
        import submitit
        ex = submitit.AutoExecutor(folder=os.path.join(opts.out_dir, "submitit"), cluster="slurm")
        ex.update_parameters(timeout_min=opts.timeout_min, slurm_partition=opts.slurm_partition,
                             gpus_per_node=opts.gpus, cpus_per_task=opts.cpus, slurm_array_parallelism=opts.workers)
        jobs = [ex.submit(run_logged, d, c) for d, c in todo]
        print(f"[suite] submitted {len(jobs)} job(s) to slurm: {', '.join(j.job_id for j in jobs)}")
        codes = [job_result(j, d) for j, (d, _) in zip(jobs, todo)]
    else:  # this machine, --workers runs at a time: plain processes, or submitit's local executor (SLURM's code path)
        from concurrent.futures import ThreadPoolExecutor
        run = lambda dc: run_logged(*dc)
        if opts.launcher == "submitit-local":
            import submitit
            ex = submitit.LocalExecutor(folder=os.path.join(opts.out_dir, "submitit"))
            ex.update_parameters(timeout_min=opts.timeout_min)
            run = lambda dc: job_result(ex.submit(run_logged, *dc), dc[0])
        with ThreadPoolExecutor(opts.workers) as pool:
            codes = list(pool.map(run, todo))
    for (d, _), code in zip(todo, codes):
        if code in INTERRUPTED:
            print(f"[suite] interrupted and saved ({code}): {d}; the same suite command resumes it")
        elif code not in (0, DIED):
            print(f"[suite] FAILED ({code}): {d}, see {os.path.join(d, 'stdout.log')}")

    return codes


def aggregate(out_dir: str, tasks, methods, seeds, steps=None) -> dict:
    """mean +- std of success over seeds, per (task, method), at the chosen global steps (default: last)."""
    table = {}
    for task in tasks:
        for method in methods:
            curves, handoff = {}, {}
            for seed in seeds:
                d = run_dir_of(out_dir, task, method, seed)
                if os.path.exists(os.path.join(d, "eval.csv")):
                    run = run_curves(d)
                    at, success = run["eval"]["success_rate"]  # online steps after the offline ones
                    curves[seed] = dict(zip(at.astype(int).tolist(), success.tolist()))
                    handoff[seed] = run["offline_steps"] if run["online"] else None
            if not curves:
                continue
            all_steps = sorted(set.intersection(*(set(c) for c in curves.values())))
            want = steps or all_steps[-1:]
            cells = {}
            for s in want:
                vals = [c[s] for c in curves.values() if s in c]
                if vals:
                    cells[s] = dict(mean=float(np.mean(vals)), std=float(np.std(vals)), n=len(vals))
            # online: the curve has a step past some seed's hand-off, i.e. an online evaluation (offline ones
            # come at steps up to offline_steps, online ones after it)
            online = any(h is not None and s > h for h in handoff.values() for s in all_steps)
            table[f"{task}/{method}"] = dict(task=task, method=method, cells=cells, online=online,
                                             curve={s: [c[s] for c in curves.values() if s in c] for s in all_steps})
    return table


def table_markdown(table: dict) -> str:
    steps = sorted({s for row in table.values() for s in row["cells"]})
    if not steps:  # a table without step columns would have nothing in it
        return "No results yet: no run has an evaluation to report.\n"
    header = ["task", "method", *(f"step {s:,}" for s in steps), "paper (end)"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in table.values():
        ref = REFERENCE.get(row["task"], {}).get(row["method"])
        cells = [f"{row['cells'][s]['mean']:.2f} ± {row['cells'][s]['std']:.2f} (n={row['cells'][s]['n']})"
                 if s in row["cells"] else "" for s in steps]
        lines.append(f"| {row['task']} | {row['method']} | " + " | ".join(cells) + f" | {'' if ref is None else ref} |")
    return "\n".join(lines) + "\n"


# the x axis of the figures: online steps count after the offline ones, on one axis
STEP_AXIS = dict(offline="offline gradient step", online="step: offline gradient steps, then online env steps")


def plot_curves(table: dict, out_dir: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    for task in sorted({row["task"] for row in table.values()}):
        fig, ax = plt.subplots(figsize=(6, 4))
        rows = [r for r in table.values() if r["task"] == task]
        for i, row in enumerate(rows):
            steps = sorted(row["curve"])
            mean = np.array([np.mean(row["curve"][s]) for s in steps])
            std = np.array([np.std(row["curve"][s]) for s in steps])
            color = f"C{i}"
            n = max(len(v) for v in row["curve"].values())
            # styles keep equal curves visible
            ax.plot(steps, mean, ["-o", "--s", "-.^", ":v"][i % 4], color=color, ms=4,
                    label=f"{row['method']} ({n} seed{'s' if n > 1 else ''}, ± std)")
            ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2)
            ref = REFERENCE.get(task, {}).get(row["method"])
            if ref is not None:
                ax.axhline(ref, color=color, ls="--", lw=1, label=f"{row['method']} paper (2M steps)")
        xlabel = STEP_AXIS["online" if any(row["online"] for row in rows) else "offline"]
        ax.set(title=task, xlabel=xlabel, ylabel="success rate", ylim=(-0.02, 1.02))
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f"curves_{task}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def finished(run_dir: str, cmd: list[str]) -> bool:
    """A run is done when its summary.json covers the steps its command asks for; given more steps, a
    finished run continues from its last checkpoint (suite_commands adds --resume)."""
    path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(path):
        return False
    asked = mvp.parse_args(cmd[2:])
    with open(path) as f:
        done = json.load(f)
    return done["offline_steps"] >= asked.offline_steps and done["online_steps"] >= asked.online_steps


def suite(opts):
    """Launch the runs not finished yet, table and plot what all of them have logged; exit non-zero (after the
    report) if a run launched here did not finish."""
    cmds = suite_commands(opts)
    todo = [(d, c) for d, c in cmds if not finished(d, c)]
    done = f"[suite] {len(cmds)} run(s), {len(cmds) - len(todo)} already finished"
    if opts.report_only and not opts.dry_run:
        print(f"{done}, {len(todo)} not; --report-only: launching nothing, reporting what the runs have logged")
    else:
        print(f"{done}, {len(todo)} to run")
    if opts.dry_run:
        for d, c in todo:
            print(shlex.join(c))  # quoted as a shell reads it back
        return None
    if todo and not opts.report_only and (opts.workers > 1 or opts.launcher == "slurm"):  # one at a time, the first
        prepare_data(todo)  # run makes a task's data and the next ones reuse it; side by side, each would make it
    codes = launch(opts, todo) if todo and not opts.report_only else []
    table = aggregate(opts.out_dir, opts.tasks, opts.methods, opts.seeds, opts.report_steps)
    if any(row["cells"] for row in table.values()):
        write_report(table, opts.out_dir)
    else:
        at = f" at step(s) {', '.join(map(str, opts.report_steps))}" if opts.report_steps else ""
        print(f"[suite] no results yet: no run in {opts.out_dir} has logged an evaluation{at}; wrote nothing")
    failed = [(d, code) for (d, _), code in zip(todo, codes) if code != 0]
    if failed:  # after the report, so that the finished runs are tabled all the same
        what = {**dict.fromkeys(INTERRUPTED, "interrupted, resumable"), DIED: "its job died"}
        lines = [f"  {d}: {what.get(code, 'failed')} (exit {code}), log {os.path.join(d, 'stdout.log')}"
                 for d, code in failed]
        raise SystemExit(f"[suite] {len(failed)} of {len(todo)} run(s) did not finish:\n" + "\n".join(lines))
    return table


def write_report(table: dict, out_dir: str):
    """results.md, results.json and a figure of success curves per task."""
    md = table_markdown(table)
    paths = [os.path.join(out_dir, "results.md"), os.path.join(out_dir, "results.json")]
    with open(paths[0], "w") as f:
        f.write(md)
    with open(paths[1], "w") as f:
        json.dump({k: dict(v, curve={str(s): x for s, x in v["curve"].items()},
                           cells={str(s): x for s, x in v["cells"].items()}) for k, v in table.items()}, f, indent=1)
    paths += plot_curves(table, out_dir)
    print(md)
    print(f"[suite] wrote {', '.join(paths)}")


# ================================================================================================
# plot: what a run logged, as one figure (several runs overlaid: seeds, methods)
# ================================================================================================
PANELS = [  # (title, log, solid column, dashed column (its marks open) or None)
    ("success rate (dashed/open: N = 1 alone)", "eval", "success_rate", "bc_success_rate"),
    ("eval: Q(s0, a*) (dashed/open: discounted return)", "eval", "q0_mean", "disc_return_mean"),
    ("critic loss (TD error)", "train", "critic_loss", None),
    ("Q on the batch (dashed/open: TD target)", "train", "q_mean", "target_mean"),
    ("policy: L_MF (dashed/open: L_IVC; a flow's whole loss)", "train", "mf_loss", "ivc_loss"),
    ("best-of-N gain in Q", "train", "bon_gain", None),
]


def run_curves(run_dir: str) -> dict:
    """{"train"|"eval": {column: (steps, values)}} of a run's CSV logs, its offline_steps, and online: whether it
    logged anything in its online phase; online steps count after the offline ones."""
    import csv
    if not os.path.exists(os.path.join(run_dir, "args.json")):
        raise SystemExit(f"error: {run_dir} is not a run directory of mvp.py (it has no args.json)")
    with open(os.path.join(run_dir, "args.json")) as f:
        offline_steps = json.load(f)["offline_steps"]
    curves = dict(offline_steps=offline_steps, online=os.path.exists(os.path.join(run_dir, "online.csv")))
    for log, names in (("train", ["offline.csv", "online.csv"]), ("eval", ["eval.csv"])):
        rows = []
        for name in names:
            if os.path.exists(os.path.join(run_dir, name)):
                with open(os.path.join(run_dir, name)) as f:
                    for r in csv.DictReader(f):
                        shift = offline_steps if name == "online.csv" or r.get("phase") == "online" else 0
                        curves["online"] |= bool(shift)
                        rows.append({k: float(v) + (shift if k == "step" else 0)
                                     for k, v in r.items() if k != "phase" and v})
        curves[log] = {k: (np.array([r["step"] for r in rows if k in r]), np.array([r[k] for r in rows if k in r]))
                       for k in {k for r in rows for k in r} - {"step"}}  # online.csv has a few more columns
    return curves


def plot_runs(run_dirs: list[str], out: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    drawn = set()  # panels with data
    online = False  # some run drawn has an online phase
    for i, d in enumerate(run_dirs):
        curves = run_curves(d)
        online |= curves["online"]
        label = "/".join(os.path.normpath(d).split(os.sep)[-2:])
        for ax, (_, log, solid, dashed) in zip(axes.flat, PANELS):
            if solid not in curves[log]:
                continue
            for col, style in ((solid, "-"), (dashed, "--")):
                if col in curves[log]:
                    steps, values = curves[log][col]
                    marker = "o" if log == "eval" or len(steps) == 1 else None  # a lone row draws no line
                    ax.plot(steps, values, style, color=f"C{i}", marker=marker, ms=3,
                            mfc="none" if style == "--" else None, label=label if style == "-" else None)
            drawn.add(ax)
            if curves["online"]:
                ax.axvline(curves["offline_steps"], color="gray", ls=":", lw=0.8)  # offline -> online
    for ax, (title, *_) in zip(axes.flat, PANELS):
        ax.set_title(title, fontsize=9)
        if ax not in drawn:  # a note, not empty axes with made-up 0..1 scales
            ax.set(xticks=[], yticks=[])
            ax.text(0.5, 0.5, "nothing logged yet", transform=ax.transAxes, ha="center", va="center", color="gray")
    axes[0, 0].set_ylim(-0.02, 1.02)
    # on the critic loss (every run that trained logs it), else on the success rate (every run that evaluated)
    legend_ax = next((ax for ax in (axes[0, 2], axes[0, 0]) if ax in drawn), None)
    if legend_ax is not None:
        legend_ax.legend(fontsize=7)
    for ax in axes[1]:
        ax.set_xlabel(STEP_AXIS["offline"] if not online else STEP_AXIS["online"] + " (dotted: hand-off)",
                      fontsize=8)  # the online label spans a panel's width at 8 points, not at 10
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"[plot] wrote {out}")
    return out


def network_size(text: str) -> str:
    if not re.fullmatch(r"[1-9][0-9]*x[1-9][0-9]*", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not LAYERSxWIDTH, e.g. 4x512")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="MVP against its baselines: speed and success.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("speed", help="throughput and latency of every method on this device")
    s.add_argument("--methods", nargs="+", default=SPEED_METHODS, choices=list(METHODS))
    s.add_argument("--device", default="auto")
    s.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: default)")
    s.add_argument("--hidden-dim", type=int, default=512)
    s.add_argument("--num-layers", type=int, default=4)
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--num-candidates", type=int, default=32)
    s.add_argument("--modes", nargs="+", default=None, choices=list(MODES),
                   help="how updates run (default: all three on CUDA, eager on CPU)")
    s.add_argument("--repeats", type=int, default=3, help="repeats; medians are reported")
    s.add_argument("--seconds", type=float, default=10.0, help="time per throughput measurement")
    s.add_argument("--latency-calls", type=int, default=50, help="single-observation action calls per repeat")
    s.add_argument("--out-dir", default="bench")
    t = sub.add_parser("latency", help="one chunk's latency: eager torch against the exported ONNX graph, on CPU")
    t.add_argument("--sizes", nargs="+", default=["4x512", "2x256"], type=network_size,
                   help="networks, LAYERSxWIDTH (default 4x512 2x256)")
    t.add_argument("--methods", nargs="+", default=["mvp", "flow10"], choices=list(METHODS))
    t.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=list(RUNTIMES),
                   help="eager: mvp.act; onnx: the exported step; onnx-batched: as the exporter wrote it")
    t.add_argument("--num-candidates", type=int, default=32)
    t.add_argument("--threads", type=int, default=1, help="torch's CPU threads (default 1; onnxruntime: always 1)")
    t.add_argument("--calls", type=int, default=1000,
                   help="timed calls per row, and of one policy and one critic call for the ceiling (default 1000)")
    t.add_argument("--round", type=int, default=100, help="calls per row before the next row's turn (default 100)")
    t.add_argument("--out-dir", default="bench")
    g = sub.add_parser("graph-check", help="CUDA graphs against eager training, same seed (needs CUDA)")
    g.add_argument("--methods", nargs="+", default=["mvp", "flow10"], choices=list(METHODS))
    g.add_argument("--updates", type=int, default=200)
    g.add_argument("--device", default="cuda")
    g.add_argument("--hidden-dim", type=int, default=512)
    g.add_argument("--num-layers", type=int, default=4)
    g.add_argument("--batch-size", type=int, default=256)
    g.add_argument("--compile", action="store_true",
                   help="graph the compiled step (--compile) instead of the plain one")
    g.add_argument("--tol", type=float, default=1e-3,
                   help="largest relative loss difference allowed in the first 10 updates")
    g.add_argument("--out-dir", default="bench")
    h = sub.add_parser("share", help="aggregate updates/s of several processes on one device")
    h.add_argument("--processes", nargs="+", type=int, default=[1, 2, 4])
    h.add_argument("--method", default="mvp", choices=list(METHODS))
    h.add_argument("--mode", default="graph", choices=list(MODES))
    h.add_argument("--device", default="auto")
    h.add_argument("--seconds", type=float, default=10.0)
    h.add_argument("--startup", type=float, default=25.0,
                   help="seconds the processes get to start and record before timing")
    h.add_argument("--out-dir", default="bench")
    r = sub.add_parser("_rate")  # one process of `share`; internal, so no help (and hidden below)
    r.add_argument("--method", default="mvp")
    r.add_argument("--mode", default="graph")
    r.add_argument("--device", default="auto")
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--seconds", type=float, default=10.0)
    r.add_argument("--start-at", type=float, default=0.0)
    e = sub.add_parser("envs", help="robomimic env steps/s, reset time and one capped episode, per task")
    e.add_argument("--tasks", nargs="+", default=["lift", "can", "square"], choices=["lift", "can", "square"])
    e.add_argument("--steps", type=int, default=1000)
    u = sub.add_parser("suite", help="training runs per (task, seed, method), then a table and curves")
    u.add_argument("--tasks", nargs="+", default=["cube-double-task1"])
    u.add_argument("--seeds", nargs="+", type=int, default=[0])
    u.add_argument("--methods", nargs="+", default=["mvp", "flow10"], choices=list(METHODS))
    u.add_argument("--preset", default="cpu", choices=list(PRESETS))
    u.add_argument("--workers", type=int, default=1, help="runs at a time")
    u.add_argument("--report-steps", nargs="+", type=int, default=None,
                   help="global steps for the table (default: last)")
    u.add_argument("--launcher", default="local", choices=["local", "slurm", "submitit-local"])
    u.add_argument("--slurm-partition", default=None)
    u.add_argument("--gpus", type=int, default=1)
    u.add_argument("--cpus", type=int, default=8)
    u.add_argument("--timeout-min", type=int, default=60 * 24)
    u.add_argument("--out-dir", default="suite")
    u.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    u.add_argument("--report-only", action="store_true",
                   help="launch nothing: table and curves of the evaluations written so far")
    # one quoted string: flags after it stay the suite's (a --dry-run there once launched the runs instead)
    u.add_argument("--extra", type=shlex.split, default=[], metavar='"FLAGS"',
                   help='further mvp.py flags for every run, as one quoted string: --extra "--tau 0.02 --compile" '
                        '(a single flag also as --extra=--compile)')
    f = sub.add_parser("plot", help="success, losses and Q of one or more runs from their CSV logs, as one figure")
    f.add_argument("run_dirs", nargs="+", help="run directories of mvp.py (several: overlaid)")
    f.add_argument("--out", default=None,
                   help="PNG to write (default: curves.png in the run directory, or here for several)")
    sub.metavar = "{" + ",".join(c for c in sub.choices if not c.startswith("_")) + "}"  # --help omits _rate
    return p


def main(argv=None):
    p = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if "--extra" in argv:  # the old form, --extra --flag value ..., gets a pointer to the new one
        value = argv[argv.index("--extra") + 1:][:1]
        if value and value[0].startswith("-") and " " not in value[0]:
            p.error('--extra takes one quoted string of mvp.py flags, e.g. --extra "--tau 0.02 --compile" '
                    "(one flag alone: --extra=--compile); the suite's own flags go outside the quotes")
    opts = p.parse_args(argv)
    for name in ("repeats", "latency_calls", "workers", "updates", "calls", "round", "num_candidates"):
        if getattr(opts, name, 1) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if opts.command == "suite":
        for task in opts.tasks:
            try:
                mvp.resolve_env_name(task)
            except ValueError as e:
                p.error(str(e))
    if opts.command == "envs":
        return [print(json.dumps(benchmark_env(t, opts.steps)), flush=True) for t in opts.tasks]
    if opts.command == "plot":
        return plot_runs(opts.run_dirs,
                         opts.out or os.path.join(opts.run_dirs[0] if len(opts.run_dirs) == 1 else ".", "curves.png"))
    commands = {"speed": speed, "suite": suite, "graph-check": graph_check, "share": share, "_rate": rate_worker,
                "latency": latency}
    return commands[opts.command](opts)


if __name__ == "__main__":
    main()
