"""Export a trained MVP policy (or a flow baseline) as one ONNX graph of the whole acting step, and check
that the graph is the same policy as mvp.py's.

    python export_onnx.py runs/<run>/checkpoint.pt            # -> runs/<run>/checkpoint.onnx, checked on 1,000 states
    python export_onnx.py runs/<run>/checkpoints/resume-0000050000.pt --out policy.onnx
    python export_onnx.py runs/<run>/checkpoint.pt --check-episodes 10   # and on mvp.py --eval-only's episodes

The graph, inputs -> outputs (B dynamic, N as trained, A = h * action_dim):
    obs   (B, obs_dim) float32   ->  chunk  (B, h, action_dim): the chosen candidate, to execute open loop
    noise (B, N, A)    float32   ->  scores (B, N): mean_k Q_k(s, a_i) of every candidate
Inside: the N one-step candidates (a flow baseline's Euler steps unrolled), the critic ensemble's mean score, the
argmax, the chosen chunk. noise[b, i] is candidate i of state b: mvp.best_of_n's eps is noise.reshape(B * N, A),
so the caller owns the random numbers and the same numbers give mvp.py's chunk. What a deployer needs (task,
sizes, h, N, method, the checkpoint) travels in the file's metadata_props; onnx_policy.py runs it without torch.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import time
import warnings

import numpy as np
import torch
import torch.nn as nn

import mvp
from run_utils import load_checkpoint

INSTALL = "pip install onnx==1.23.2 onnxscript==0.7.2 onnxruntime==1.32.0 (as pinned in requirements.txt)"
TIE_TOL = 1e-5  # top-two scores closer than this (relative to the top score) are a tie that rounding may flip


# ---- the graph: mvp.best_of_n with the noise as an input -------------------------------------------------------
class ActingStep(nn.Module):
    """(obs, noise) -> (chunk, scores): best-of-N selection from the learner's own sampler and critic."""

    def __init__(self, learner: mvp.Learner, chunk_len: int):
        super().__init__()
        self.policy, self.critic, self.sample = learner.policy, learner.critic, learner.sample
        self.chunk_len = chunk_len

    def forward(self, obs, noise):
        B, N, A = noise.shape
        obs_rep = obs.repeat_interleave(N, dim=0)  # (B * N, obs_dim), row b * N + i is candidate i of state b
        cand = self.sample(self.policy, obs_rep, noise.reshape(B * N, A))  # (B * N, A), one_step or euler_sample
        scores = self.critic(obs_rep, cand).mean(dim=0).view(B, N)  # mean over the K members, then (B, N)
        best = scores.argmax(dim=1)  # (B,); ONNX's ArgMax, like torch's, keeps the first of equal maxima
        chunk = cand.view(B, N, A)[torch.arange(B, device=obs.device), best]  # (B, A)
        return chunk.view(B, self.chunk_len, A // self.chunk_len), scores


def method_name(args: mvp.Args) -> str:
    return "mvp" if args.policy == "mvp" else f"flow{args.flow_steps}"  # the names of run_benchmarks.METHODS


# ---- reading a checkpoint --------------------------------------------------------------------------------------
def load_policy(path: str) -> tuple[mvp.Learner, dict, mvp.Args]:
    """The learner of a checkpoint.pt or resume-*.pt on the CPU (policy and critic loaded), the checkpoint and
    its args; a SystemExit naming the problem for a file that is missing, unreadable or holds no policy."""
    fix = "pass a run's checkpoint.pt or checkpoints/resume-*.pt"
    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint {path} does not exist; {fix}")
    try:
        ckpt = load_checkpoint(path)
    except ValueError as e:  # a torch file, but not one of mvp.py's
        raise SystemExit(f"error: {path} is not a policy checkpoint: {e}; {fix}")
    except Exception as e:
        raise SystemExit(f"error: checkpoint {path} is truncated or corrupt ({type(e).__name__}: {str(e)[:160]}); "
                         f"{fix} (a run keeps its two newest in checkpoints/)")
    missing = [k for k in ("args", "env_name", "obs_dim", "action_dim", "policy", "critic") if k not in ckpt]
    if missing:
        raise SystemExit(f"error: {path} holds no policy (it lacks {', '.join(missing)}); {fix}")
    args = mvp.saved_args(ckpt)
    args.device, args.cuda_graph = "cpu", "off"  # exported from CPU float32 copies, whatever the run trained on
    learner = mvp.make_learner(ckpt["obs_dim"], ckpt["action_dim"] * args.chunk_len, args, torch.device("cpu"))
    try:
        learner.policy.load_state_dict(ckpt["policy"])
        learner.critic.load_state_dict(ckpt["critic"])
    except RuntimeError as e:
        raise SystemExit(f"error: the networks in {path} do not match its own args ({str(e).splitlines()[0]}); "
                         f"{fix}")
    learner.policy.eval()
    learner.critic.eval()
    return learner, ckpt, args


def metadata(ckpt: dict, args: mvp.Args, checkpoint: str) -> dict[str, str]:
    """What a deployer needs, as ONNX metadata_props (strings): onnx_policy.py checks inputs against it."""
    with open(checkpoint, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    pos = ckpt.get("pos") or {}
    meta = dict(task=ckpt["env_name"], obs_dim=ckpt["obs_dim"], action_dim=ckpt["action_dim"], chunk_len=args.chunk_len,
                num_candidates=args.num_candidates, method=method_name(args), policy=args.policy,
                flow_steps=args.flow_steps if args.policy == "flow" else 0, hidden_dim=args.hidden_dim,
                num_layers=args.num_layers, num_critics=args.num_critics, seed=args.seed,
                checkpoint=os.path.basename(checkpoint), checkpoint_sha256=digest,
                trained_steps=json.dumps(dict(offline=pos.get("offline"), online=pos.get("online"))),
                env_args=ckpt.get("env_args") or "null",
                inputs="obs (B, obs_dim) float32; noise (B, N, A) float32 standard normal, A = chunk_len * action_dim, "
                       "noise[b, i] = candidate i of state b (mvp.best_of_n's eps = noise.reshape(B * N, A))",
                outputs="chunk (B, chunk_len, action_dim) float32 in [-1, 1]; scores (B, N) float32, the critic "
                        "ensemble's mean Q of each candidate (chunk is the argmax's)",
                exporter=f"export_onnx.py, torch {torch.__version__}")
    return {k: str(v) for k, v in meta.items()}


# ---- writing the graph -----------------------------------------------------------------------------------------
def need_onnx(runtime: bool = False):
    """onnx and onnxscript (the exporter's), onnxruntime (the checks'), or a SystemExit saying what to install."""
    import importlib
    for name in ("onnx", "onnxscript") + (("onnxruntime",) if runtime else ()):
        try:
            importlib.import_module(name)
        except ImportError:
            raise SystemExit(f"error: {name} is not installed; export_onnx.py needs it: {INSTALL}") from None


@contextlib.contextmanager
def quiet_exporter():
    """torch.onnx's warnings (torchvision absent, deprecations in torch.export) say nothing about this graph."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def check_writable(path: str):
    try:
        with open(path + ".tmp", "wb"):
            pass
    except OSError as e:
        raise SystemExit(f"error: cannot write {path} ({e.strerror}); pass an --out in a writable folder")


def drop_unread(graph):
    """Removes the nodes and initializers that no graph output depends on any more."""
    wanted, kept = {o.name for o in graph.output}, []
    for node in reversed(list(graph.node)):
        if wanted & set(node.output):
            kept.append(node)
            wanted.update(node.input)
    inits = [i for i in graph.initializer if i.name in wanted]
    del graph.initializer[:], graph.node[:]
    graph.initializer.extend(inits)
    graph.node.extend(reversed(kept))


MEMBERWISE = {"Gelu", "Relu", "Tanh", "Sigmoid", "LayerNormalization", "Add", "Sub", "Mul", "Div"}  # per element


def split_ensemble_matmuls(model) -> int:
    """Rewrites the critic ensemble member by member. Each MatMul of activations (K, rows, in) by a constant
    (K, in, out) weight (EnsembleLinear's baddbmm) becomes K Gemms of (rows, in) by (in, out), each with its
    member's bias where the MatMul's one reader adds a constant (K, 1, out); the GELUs, LayerNorms and per-member
    affines between layers run on each member's (rows, hidden) as well, and the members are stacked back into
    (K, rows, out) only where another op reads them (the mean over K). The same products, member by member:
    onnxruntime runs a batched MatMul of 32 rows at about half the rate of single ones (one thread, 4x512, the
    MVP step: 3.6 ms batched, 2.6 ms split). Returns how many MatMuls it split."""
    from onnx import helper, numpy_helper
    graph = model.graph
    consts = {w.name: numpy_helper.to_array(w) for w in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    readers = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    added, nodes, members, stacked, skip, split = {}, [], {}, set(), set(), 0

    def const(name: str, value) -> str:
        added[name] = np.ascontiguousarray(value)
        return name

    def stack(name: str):  # (K, rows, out) from the members' outputs, written before its first reader
        if name in members and name not in stacked:
            parts = [f"{name}_stack{k}" for k in range(len(members[name]))]
            nodes.extend(helper.make_node("Unsqueeze", [m, const("member_axis", np.array([0]))], [part])
                         for m, part in zip(members[name], parts))
            nodes.append(helper.make_node("Concat", parts, [name], axis=0))
            stacked.add(name)

    def member_view(name: str, k: int, K: int) -> str | None:  # what member k reads for input `name`
        if name in members:
            return members[name][k]
        c = consts.get(name)
        if c is not None and c.ndim <= 2:
            return name  # broadcasts alike against each member's (rows, hidden)
        if c is not None and c.ndim == 3 and c.shape[0] in (1, K):
            return const(f"{name}_member{k}", c[k if c.shape[0] == K else 0])  # (1, hidden)
        return None

    def unexpanded(x: str) -> str | None:  # x0 where x = Expand(Unsqueeze(x0, [0]), [K, 1, 1]): K copies of x0
        expand = producer.get(x)
        if expand is None or expand.op_type != "Expand" or expand.input[0] not in producer:
            return None
        shape = consts.get(expand.input[1])
        if shape is None or shape.tolist()[1:] != [1, 1]:  # only the new leading axis is broadcast
            return None
        up = producer[expand.input[0]]
        ok = up.op_type == "Unsqueeze" and up.input[1] in consts and consts[up.input[1]].tolist() == [0]
        return up.input[0] if ok else None

    for node in graph.node:
        if id(node) in skip:
            continue
        w = consts.get(node.input[1]) if node.op_type == "MatMul" else None
        if w is not None and w.ndim == 3:  # an ensemble layer
            K, out, bias = w.shape[0], node.output[0], None
            after = readers.get(out, [])
            if len(after) == 1 and after[0].op_type == "Add":
                other = next(i for i in after[0].input if i != out)
                if other in consts and consts[other].shape == (K, 1, w.shape[2]):
                    bias, out = consts[other], after[0].output[0]
                    skip.add(id(after[0]))
            x, x0 = node.input[0], unexpanded(node.input[0])
            members[out] = []
            for k in range(K):
                name = f"{out}_member{k}"
                if x in members or x0 is not None:
                    inp = members[x][k] if x in members else x0
                else:
                    inp = name + "_in"
                    nodes.append(helper.make_node("Gather", [x, const(name + "_index", np.array(k))], [inp], axis=0))
                ins = [inp, const(name + "_weight", w[k])] + ([const(name + "_bias", bias[k, 0])]
                                                              if bias is not None else [])
                nodes.append(helper.make_node("Gemm", ins, [name]))
                members[out].append(name)
            split += 1
            continue
        reads = [i for i in node.input if i in members]
        K = len(members[reads[0]]) if reads else 0
        views = [[member_view(i, k, K) for i in node.input] for k in range(K)]
        last_axis = all(a.i == -1 for a in node.attribute if a.name == "axis")  # LayerNorm over the last axis
        if reads and node.op_type in MEMBERWISE and last_axis and all(None not in v for v in views):
            members[node.output[0]] = [f"{node.output[0]}_member{k}" for k in range(K)]
            for v, name in zip(views, members[node.output[0]]):
                nodes.append(helper.make_node(node.op_type, v, [name]))
                nodes[-1].attribute.extend(node.attribute)
            continue
        for name in reads:
            stack(name)
        nodes.append(node)
    for out in graph.output:
        stack(out.name)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in added.items())
    drop_unread(graph)  # the batched layers, and the copies of weights nothing reads
    return split


def fold_constants(model) -> dict[str, int]:
    """Three exact-up-to-rounding folds that leave onnxruntime fewer, cheaper nodes (at 2x256 a node's dispatch
    costs about what its arithmetic does):
    - a LayerNormalization followed only by a Mul and an Add of constant per-feature vectors (the critic's
      per-member affine, once split) takes them as its own scale and bias;
    - Concat inputs that are a constant broadcast, one column wide (one_step's t = 0 and r = 1, an Euler
      step's t), leave the Concat when a Gemm is its one reader: their columns of the weight fold into its bias;
    - the mean over K split critic heads (K Gemms of (rows, hidden) by (hidden, 1), stacked, squeezed,
      ReduceMean over K) becomes one Gemm of the members' concatenated features by the stacked head weights / K.
    Returns how many of each it folded."""
    from onnx import helper, numpy_helper, shape_inference
    graph = model.graph
    consts = {w.name: numpy_helper.to_array(w) for w in graph.initializer}
    width = {}  # the static last dimension of each value, where shape inference knows it
    for v in list(shape_inference.infer_shapes(model).graph.value_info) + list(graph.input):
        dims = v.type.tensor_type.shape.dim
        if dims and dims[-1].HasField("dim_value"):
            width[v.name] = dims[-1].dim_value
    producer = {o: n for n in graph.node for o in n.output}
    readers = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    only_reader = lambda name: readers[name][0] if len(readers.get(name, [])) == 1 else None
    folded = dict(layernorm_affine=0, constant_columns=0, mean_of_heads=0)

    def const(name: str, value, dtype=np.float32) -> str:
        consts[name] = np.ascontiguousarray(value, dtype=dtype)
        graph.initializer.append(numpy_helper.from_array(consts[name], name))
        return name

    def vector(node, x: str, features: int):  # the constant other operand of node, as (features,), or None
        other = next((i for i in node.input if i != x), None)
        c = consts.get(other)
        return None if c is None or c.size != features or c.shape[-1] != features else c.reshape(features)

    def scalar_value(name: str):  # the value every entry of `name` has, where the graph makes it a constant
        if name in consts:
            return float(consts[name].reshape(())) if consts[name].size == 1 else None
        node = producer.get(name)
        if node is not None and node.op_type == "Expand":
            return scalar_value(node.input[0])
        if node is not None and node.op_type in ("Add", "Mul"):
            a, b = (scalar_value(i) for i in node.input)
            if a is not None and b is not None:
                return a + b if node.op_type == "Add" else a * b
        return None

    for node in list(graph.node):
        if node.op_type == "LayerNormalization" and len(node.input) >= 2 and node.input[1] in consts:
            features = consts[node.input[1]].size
            mul = only_reader(node.output[0])
            add = only_reader(mul.output[0]) if mul is not None and mul.op_type == "Mul" else None
            if add is None or add.op_type != "Add":
                continue
            scale, shift = vector(mul, node.output[0], features), vector(add, mul.output[0], features)
            if scale is None or shift is None:
                continue
            bias = consts[node.input[2]] if len(node.input) > 2 and node.input[2] else np.zeros(features)
            name = node.output[0]
            node.input[:] = [node.input[0], const(name + "_scale", consts[node.input[1]] * scale),
                             const(name + "_bias", bias * scale + shift)]
            node.output[0] = producer[add.output[0]] = add.output[0]
            graph.node.remove(mul)
            graph.node.remove(add)
            folded["layernorm_affine"] += 1
        elif node.op_type == "Concat" and (gemm := only_reader(node.output[0])) is not None:
            attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
            fixed = [(i, scalar_value(x)) for i, x in enumerate(node.input) if width.get(x) == 1]
            fixed = [(i, v) for i, v in fixed if v is not None]
            ok = gemm.op_type == "Gemm" and gemm.input[0] == node.output[0] and attrs.get("transB") == 1 \
                and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and gemm.input[1] in consts
            if not ok or not fixed or len(fixed) == len(node.input) or any(x not in width for x in node.input):
                continue
            starts = np.cumsum([0] + [width[x] for x in node.input])
            w = consts[gemm.input[1]]  # (out, in)
            b = consts[gemm.input[2]] if len(gemm.input) > 2 else np.zeros(w.shape[0], np.float32)
            b = b + sum(v * w[:, starts[i]] for i, v in fixed)
            keep = [i for i in range(len(node.input)) if i not in dict(fixed)]
            cols = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in keep])
            node.input[:] = [node.input[i] for i in keep]
            name = gemm.output[0]
            gemm.input[:] = [node.output[0], const(name + "_weight", w[:, cols]), const(name + "_bias", b)]
            folded["constant_columns"] += len(fixed)
        elif node.op_type == "ReduceMean":
            squeeze = producer.get(node.input[0])
            stack = producer.get(squeeze.input[0]) if squeeze is not None and squeeze.op_type == "Squeeze" else None
            if stack is None or stack.op_type != "Concat" or any(only_reader(x) is None for x in
                                                                  (squeeze.input[0], stack.output[0])):
                continue
            ups = [producer.get(x) for x in stack.input]
            heads = [producer.get(u.input[0]) if u is not None and u.op_type == "Unsqueeze" else None for u in ups]
            axes = consts.get(node.input[1]) if len(node.input) > 1 else None
            kept_dims = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
            squeezed = consts.get(squeeze.input[1]) if len(squeeze.input) > 1 else None  # (K, rows, 1) -> (K, rows)
            if squeezed is None or squeezed.tolist() not in ([-1], [2]) or kept_dims != 0:
                continue
            if axes is None or axes.tolist() != [0] or any(h is None or h.op_type != "Gemm" or len(h.input) < 3
                                                           or h.attribute or h.input[1] not in consts for h in heads):
                continue
            K = len(heads)
            if any(consts[h.input[1]].shape[1] != 1 or only_reader(h.output[0]) is None for h in heads):
                continue
            name = node.output[0]
            joined = helper.make_node("Concat", [h.input[0] for h in heads], [name + "_features"], axis=-1)
            w = np.concatenate([consts[h.input[1]] for h in heads]) / K  # (K * hidden, 1)
            b = np.mean([consts[h.input[2]] for h in heads], axis=0)
            gemm = helper.make_node("Gemm", [name + "_features", const(name + "_weight", w), const(name + "_bias", b)],
                                    [name + "_rows"])
            flat = helper.make_node("Squeeze", [name + "_rows", const(name + "_axis", [1], np.int64)], [name])
            at = list(graph.node).index(node)
            graph.node.remove(node)
            for k, new in enumerate((joined, gemm, flat)):
                graph.node.insert(at + k, new)
            folded["mean_of_heads"] += 1
    drop_unread(graph)
    del graph.value_info[:]  # shapes of rewritten values (a narrower Concat); onnxruntime infers them again
    return folded


def export_module(module: nn.Module, example: tuple, input_names: list[str], output_names: list[str], path: str,
                  meta: dict[str, str] | None = None, batch_inputs: int = 0, rewrite: bool = True) -> str:
    """torch.onnx.export's dynamo exporter -> one self-contained .onnx file (weights inside), written atomically,
    with `meta` as its metadata_props and (rewrite) the critic ensemble's layers member by member, then
    fold_constants' folds. The first `batch_inputs` inputs share a dynamic leading dimension, B."""
    import onnx
    check_writable(path)
    batch = torch.export.Dim("batch")
    shapes = [{0: batch} if i < batch_inputs else None for i in range(len(example))] if batch_inputs else None
    try:
        with quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(module, example, dynamo=True, input_names=input_names,
                                        output_names=output_names, dynamic_shapes=shapes, external_data=False,
                                        verbose=False)
        model = program.model_proto
        if rewrite:
            split_ensemble_matmuls(model)
            fold_constants(model)
        onnx.helper.set_model_props(model, meta or {})
        onnx.checker.check_model(model)
        onnx.save(model, path + ".tmp")
    except Exception as e:  # the exporter's own traceback says nothing a user can act on
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        raise SystemExit(f"error: the ONNX export failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                         f"check the versions against requirements.txt: {INSTALL}")
    os.replace(path + ".tmp", path)
    return path


def export_policy(learner: mvp.Learner, args: mvp.Args, obs_dim: int, path: str, meta: dict[str, str],
                  rewrite: bool = True) -> str:
    """The acting step of `learner` at N = args.num_candidates as `path`."""
    example = (torch.zeros(2, obs_dim), torch.zeros(2, args.num_candidates, learner.policy.act_dim))
    return export_module(ActingStep(learner, args.chunk_len).eval(), example, ["obs", "noise"], ["chunk", "scores"],
                         path, meta, batch_inputs=2, rewrite=rewrite)


# ---- the checks: the same chunks as mvp.best_of_n on states, the same episodes as mvp.py --eval-only -------------
def top_two_gap(q: torch.Tensor) -> torch.Tensor:
    """Best minus second-best score per state (B,), relative to max(1, |best|); inf for N = 1 (no tie possible)."""
    if q.shape[1] < 2:
        return torch.full(q.shape[:1], float("inf"))
    top = q.topk(2, dim=1).values
    return (top[:, 0] - top[:, 1]) / top[:, 0].abs().clamp(min=1.0)


@torch.no_grad()
def state_parity(learner: mvp.Learner, policy, obs: np.ndarray, seed: int = 0,
                 batch_sizes: tuple = (1, 2, 7, 64, 256)) -> dict:
    """The exported step (policy: an onnx_policy.OnnxPolicy) against mvp.best_of_n on the same states and noise.

    States go in batches of cycling sizes (B is dynamic), each batch's noise drawn by best_of_n from its own seed
    and drawn again, identically, for the graph. Reports the largest chunk difference where both pick the same
    candidate, the largest score difference (absolute, and relative to max(1, |Q|)), and argmax flips: at ties
    (top-two scores within TIE_TOL, where rounding may decide) and elsewhere (which only a wrong graph makes)."""
    N, A = policy.num_candidates, policy.act_dim
    rows, start, part = [], 0, 0
    while start < len(obs):
        o = torch.as_tensor(obs[start:start + batch_sizes[part % len(batch_sizes)]], dtype=torch.float32)
        B, s = len(o), seed + part
        gen = torch.Generator().manual_seed(s)
        a_star, q = mvp.best_of_n(learner.policy, learner.critic, o, N, gen, learner.sample)
        noise = torch.randn(B * N, A, generator=torch.Generator().manual_seed(s)).view(B, N, A)  # best_of_n's eps
        chunk, scores = policy.act_batch(o.numpy(), noise.numpy())
        rows.append((a_star, q, torch.from_numpy(chunk).reshape(B, A), torch.from_numpy(scores)))
        start, part = start + B, part + 1
    a_star, q, chunk, scores = (torch.cat(x) for x in zip(*rows))
    flip = q.argmax(dim=1) != scores.argmax(dim=1)
    tie = top_two_gap(q) <= TIE_TOL
    same = ~flip
    return dict(states=len(q), num_candidates=N,
                max_abs_chunk=float((chunk[same] - a_star[same]).abs().max()) if same.any() else float("nan"),
                max_abs_scores=float((scores - q).abs().max()),
                max_rel_scores=float(((scores - q).abs() / q.abs().clamp(min=1.0)).max()),
                argmax_mismatches=int((flip & ~tie).sum()), argmax_mismatch_frac=float((flip & ~tie).float().mean()),
                ties=int(tie.sum()), tie_flips=int((flip & tie).sum()),
                best_not_first_frac=float((q.argmax(dim=1) != 0).float().mean()))  # the critic does choose


class Recorder:
    """An env that notes every action it is given (mvp.run_episode's, here); `nudge` is added to the first."""

    def __init__(self, env, nudge: float = 0.0):
        self.env, self.nudge, self.actions = env, nudge, []

    def reset(self, **kwargs):
        self.actions = []
        return self.env.reset(**kwargs)

    def step(self, action):
        action = np.array(action, dtype=np.float32) + (0.0 if self.actions else self.nudge)
        self.actions.append(action)
        return self.env.step(action)


def max_gap(a: list, b: list, upto: int | None = None) -> np.ndarray:
    """Per-step largest difference of two action sequences, over their common length (or the first `upto`)."""
    n = min(len(a), len(b), len(a) if upto is None else upto)
    return np.abs(np.stack(a[:n]) - np.stack(b[:n])).max(axis=1) if n else np.zeros(0)


@torch.no_grad()
def episode_parity(learner: mvp.Learner, policy, env, seeds: list[int], discount: float = 0.99,
                   tol: float = 1e-5, nudge: float = 2.0 ** -23) -> list[dict]:
    """Each seed's episode by mvp.run_episode (what mvp.py --eval-only runs: the candidate noise from
    an Actor's eval_generator seeded with the episode's seed, torch.randn(N, A) per chunk) and by the exported step
    through `policy` (onnx_policy.OnnxPolicy), fed the same numbers.

    Per episode: success and steps of both; at every chunk of the ONNX episode, mvp.best_of_n on the very same
    observation and noise: the largest chunk difference there, and argmax flips (at ties or not). The two
    episodes' actions step for step drift apart however small the difference, since contact dynamics amplify
    it: as a yardstick, mvp.run_episode again with its first action moved by `nudge` (one float32 ulp at 1)."""
    N, A, h, cpu = policy.num_candidates, policy.act_dim, policy.chunk_len, torch.device("cpu")
    out = []
    for seed in seeds:
        runs = {}
        for name, shift in (("torch", 0.0), ("nudged", nudge)):
            rec = Recorder(env, shift)
            actor = mvp.Actor(learner, cpu)
            ep = mvp.run_episode(actor, rec, seed, N, h, discount, actor.eval_generator.manual_seed(seed))
            runs[name] = (rec.actions, ep["success_rate"])
        gen, ref_gen = torch.Generator().manual_seed(seed), torch.Generator()
        obs, _ = env.reset(seed=seed)
        queue, actions, info, done, flips, tie_flips, first_flip, same_obs = [], [], {}, False, 0, 0, None, 0.0
        while not done:
            if not queue:
                state = gen.get_state()
                noise = torch.randn(N, A, generator=gen)  # the draw best_of_n makes for one state
                chunk, scores = policy.act_batch(np.asarray(obs)[None], noise.numpy()[None])
                obs_t = torch.as_tensor(np.asarray(obs, dtype=np.float32))[None]
                a_star, q = mvp.best_of_n(learner.policy, learner.critic, obs_t, N, ref_gen.set_state(state),
                                          learner.sample)
                if int(q.argmax()) == int(scores.argmax()):
                    same_obs = max(same_obs, float(np.abs(chunk.reshape(1, A) - a_star.numpy()).max()))
                else:
                    tie = bool(top_two_gap(q)[0] <= TIE_TOL)
                    flips, tie_flips = flips + (not tie), tie_flips + tie
                    first_flip = len(actions) if first_flip is None else first_flip
                queue = list(chunk[0])
            actions.append(queue.pop(0))
            obs, _, terminated, truncated, info = env.step(actions[-1])
            done = terminated or truncated
        drift = max_gap(actions, runs["torch"][0], first_flip)
        over = np.flatnonzero(drift > tol)
        out.append(dict(seed=seed, steps=len(actions), steps_torch=len(runs["torch"][0]),
                        success=float(info.get("success", 0.0)), success_torch=runs["torch"][1],
                        max_abs_chunk_same_obs=same_obs, argmax_mismatches=flips, tie_flips=tie_flips,
                        first_flip_step=first_flip, max_abs_action=float(drift.max(initial=0.0)),
                        first_step_over_tol=int(over[0]) if len(over) else None,
                        max_abs_action_nudged=float(max_gap(runs["nudged"][0], runs["torch"][0]).max(initial=0.0)),
                        success_nudged=runs["nudged"][1]))
    return out


def check_states(ckpt: dict, n: int, seed: int = 0, env=None) -> tuple[np.ndarray, str]:
    """n observations spread over the run's training data (all of it if it has fewer; where the file is gone,
    seeded episodes of random actions in `env`, by default the checkpoint's), and where they came from."""
    source, name = (ckpt.get("dataset") or {}).get("source"), ckpt["env_name"]
    obs = None
    if source and os.path.isfile(source):
        if source.endswith(".npz"):
            with np.load(source, allow_pickle=False) as f:
                obs = f["observations"]
        else:
            import prepare_robomimic
            obs = prepare_robomimic.read_robomimic_hdf5(source, name)[0]["observations"]
    if obs is not None:  # all of them where the data has fewer than n
        rows = np.unique(np.linspace(0, len(obs) - 1, min(n, len(obs))).astype(int))
        return np.asarray(obs[rows], dtype=np.float32), f"training data {source}"
    env, rng, states = env or mvp.env_from_checkpoint(ckpt), np.random.default_rng(seed), []
    while len(states) < n:
        o, _ = env.reset(seed=seed + len(states))
        done = False
        while not done and len(states) < n:
            states.append(o)
            o, _, terminated, truncated, _ = env.step(rng.uniform(-1, 1, env.action_space.shape))
            done = terminated or truncated
    return np.asarray(states, dtype=np.float32), "env episodes of random actions (the training data was not found)"


# ---- command line ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export an MVP checkpoint's acting step as one ONNX graph, and check it.")
    p.add_argument("checkpoint", help="a run's checkpoint.pt or checkpoints/resume-*.pt")
    p.add_argument("--out", default=None, help="the .onnx file to write (default: the checkpoint's name, .onnx)")
    p.add_argument("--check-states", type=int, default=1000,
                   help="compare with mvp.best_of_n on this many training states (0: skip) (default 1000)")
    p.add_argument("--check-episodes", type=int, default=0,
                   help="and on this many episodes of mvp.py --eval-only, step for step (default 0)")
    p.add_argument("--seed", type=int, default=0, help="--eval-only's --seed: episode seeds 10000 * (seed + 1) + i")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of torch and onnxruntime (default 1)")
    return p


def main(argv=None) -> dict:
    opts = build_parser().parse_args(argv)
    checking = opts.check_states > 0 or opts.check_episodes > 0
    need_onnx(runtime=checking)
    torch.set_num_threads(opts.threads)
    learner, ckpt, args = load_policy(opts.checkpoint)
    out = opts.out or os.path.splitext(opts.checkpoint)[0] + ".onnx"
    start = time.time()
    export_policy(learner, args, ckpt["obs_dim"], out, metadata(ckpt, args, opts.checkpoint))
    print(f"[export] {ckpt['env_name']}, {method_name(args)} {args.num_layers}x{args.hidden_dim}, N = "
          f"{args.num_candidates}, h = {args.chunk_len}: wrote {out} ({os.path.getsize(out) / 2**20:.1f} MiB) in "
          f"{time.time() - start:.1f} s")
    report = dict(onnx=out)
    if not checking:
        return report
    from onnx_policy import OnnxPolicy
    policy = OnnxPolicy(out, threads=opts.threads)
    if opts.check_states:
        obs, source = check_states(ckpt, opts.check_states, opts.seed)
        report["states"] = dict(state_parity(learner, policy, obs, opts.seed), source=source)
        print(f"[check] {json.dumps(report['states'])}")
    if opts.check_episodes:
        seeds = [10_000 * (opts.seed + 1) + i for i in range(opts.check_episodes)]  # as mvp.evaluate's
        report["episodes"] = episode_parity(learner, policy, mvp.env_from_checkpoint(ckpt), seeds, args.discount)
        for ep in report["episodes"]:
            print(f"[check] episode {json.dumps(ep)}")
    problems = check_problems(report)
    if problems:
        raise SystemExit(f"error: {out} is not the same policy as {opts.checkpoint}: {'; '.join(problems)}")
    print(f"[check] {out} acts as {opts.checkpoint} does")
    return report


def check_problems(report: dict, tol: float = 1e-4) -> list[str]:
    """What in a report says the graph is another policy: a chunk or a score off by more than tol, an argmax
    flip away from a tie on more than 0.1% of states or in any episode, a success that differs."""
    problems = []
    if s := report.get("states"):
        if not s["max_abs_chunk"] <= tol or not s["max_rel_scores"] <= tol:
            problems.append(f"chunks differ by {s['max_abs_chunk']:.3g}, scores by {s['max_rel_scores']:.3g} "
                            f"(relative), more than {tol:g}")
        if s["argmax_mismatch_frac"] > 0.001:
            problems.append(f"{s['argmax_mismatches']} of {s['states']} states pick another candidate (not at a tie)")
    for ep in report.get("episodes", []):
        if ep["argmax_mismatches"] or not ep["max_abs_chunk_same_obs"] <= tol:
            problems.append(f"episode seed {ep['seed']}: {ep['argmax_mismatches']} chunks picked another candidate, "
                            f"chunks differ by {ep['max_abs_chunk_same_obs']:.3g} on the same observation")
        # drift alone may decide a borderline episode: only where one ulp did not, a different success counts
        if not ep["tie_flips"] and ep["success_nudged"] == ep["success_torch"] != ep["success"]:
            problems.append(f"episode seed {ep['seed']}: success {ep['success']}, mvp.py's {ep['success_torch']}")
    return problems


if __name__ == "__main__":
    main()
