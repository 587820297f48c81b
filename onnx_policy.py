"""Run an exported MVP policy without torch: numpy and onnxruntime only, in a file to copy robot-side.

export_onnx.py writes the whole acting step as one ONNX graph: N candidates from the policy, the critic
ensemble's mean score per candidate, the argmax, the chosen chunk. This file loads it, checks what it is
given against the sizes stored in the file, draws the candidates' noise (or takes the caller's) and returns
the chunk to execute open loop:

    from onnx_policy import OnnxPolicy
    policy = OnnxPolicy("policy.onnx", seed=0)   # one CPU thread, sequential (the latency that was measured)
    chunk = policy.act(obs)                      # (h, action_dim): the next h actions
    chunks, scores = policy.act_batch(obs_batch) # (B, h, action_dim) and the candidates' scores (B, N)
    OnnxPolicy("policy.onnx", expect_task="cube-double-play-singletask-task4-v0")  # refuses another task's file

Noise is standard normal float32 of shape (B, N, A), A = h * action_dim; candidate i of state b reads
noise[b, i], the layout of mvp.best_of_n (whose eps is noise.reshape(B * N, A)), so the same numbers give the
same chunk as mvp.py.
"""
from __future__ import annotations

import numpy as np

REQUIRED = ("task", "obs_dim", "action_dim", "chunk_len", "num_candidates", "method")  # metadata_props keys


def session(path: str, threads: int = 1):
    """An onnxruntime CPU session of `path` on `threads` intra-op threads, ops run one after another."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError("onnx_policy needs onnxruntime: pip install onnxruntime==1.32.0 (as requirements.txt pins "
                          "it)") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # 1: no thread pool to wake, steady latency on a busy CPU
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ValueError(f"cannot load {path} as an ONNX model ({type(e).__name__}: {str(e)[:200]}); "
                         f"export one with: python export_onnx.py CHECKPOINT --out {path}") from None


class OnnxPolicy:
    """An exported policy's acting step; `metadata` holds what the file says about itself (all strings)."""

    def __init__(self, path: str, seed: int | None = None, threads: int = 1, expect_task: str | None = None):
        """expect_task: the task the caller runs (as the metadata's task names it); a file of another is refused."""
        self.session = session(path, threads)
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        missing = [k for k in REQUIRED if k not in self.metadata]
        if missing:
            raise ValueError(f"{path} is not a policy written by export_onnx.py (its metadata lacks "
                             f"{', '.join(missing)}); export one with: python export_onnx.py CHECKPOINT")
        if expect_task is not None and self.metadata["task"] != expect_task:
            raise ValueError(f"{path} is a policy for {self.metadata['task']}, not {expect_task}: its observations "
                             f"mean other things; export one of a {expect_task} run: python export_onnx.py CHECKPOINT")
        self.obs_dim, self.action_dim, self.chunk_len, self.num_candidates = (
            int(self.metadata[k]) for k in ("obs_dim", "action_dim", "chunk_len", "num_candidates"))
        self.act_dim = self.chunk_len * self.action_dim  # A: one candidate is a flattened chunk
        self.rng = np.random.default_rng(seed)  # the candidates' noise, unless the caller passes it

    def act(self, obs, noise=None) -> np.ndarray:
        """The chunk (h, action_dim) for one observation (obs_dim,); noise (N, A) or drawn here."""
        obs = self._array(obs, "observation", (self.obs_dim,))[None]
        noise = (self.rng.standard_normal((1, self.num_candidates, self.act_dim), dtype=np.float32) if noise is None
                 else self._array(noise, "noise", (self.num_candidates, self.act_dim))[None])
        return self.session.run(["chunk"], {"obs": obs, "noise": noise})[0][0]

    def act_batch(self, obs, noise=None) -> tuple[np.ndarray, np.ndarray]:
        """Chunks (B, h, action_dim) and the candidates' mean critic scores (B, N) for observations (B, obs_dim);
        noise (B, N, A), or drawn from this policy's numpy Generator."""
        obs = self._array(obs, "observations", (None, self.obs_dim))
        shape = (obs.shape[0], self.num_candidates, self.act_dim)
        noise = (self.rng.standard_normal(shape, dtype=np.float32) if noise is None
                 else self._array(noise, "noise", shape))
        chunk, scores = self.session.run(["chunk", "scores"], {"obs": obs, "noise": noise})
        return chunk, scores

    def _array(self, x, what: str, shape: tuple) -> np.ndarray:
        """x as a C-contiguous float32 array of `shape` (None: any size), or a ValueError that says what to pass."""
        x = np.asarray(x)
        if x.dtype.kind != "f":  # float64 from a simulator is fine; ints, bools or objects are a mistake upstream
            raise ValueError(f"{what} has dtype {x.dtype}; pass floating-point values, e.g. "
                             f"np.asarray(x, dtype=np.float32)")
        if x.ndim != len(shape) or any(want is not None and got != want for got, want in zip(x.shape, shape)):
            want = "(" + ", ".join("B" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
            fix = ("pass the observation the policy was trained on" if what.startswith("observation") else
                   "pass standard normal noise of that shape, or none to have it drawn here")
            raise ValueError(f"{what} has shape {x.shape}, but this policy ({self.metadata['task']}, "
                             f"{self.metadata['method']}) takes {want}: obs_dim {self.obs_dim}, N "
                             f"{self.num_candidates}, A = h * action_dim = {self.act_dim}; {fix}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise ValueError(f"{what} holds NaN or inf values; the critic cannot rank candidates on them")
        return x
