"""The part of mvp.py's plumbing that knows nothing of the method, for any PyTorch training script: a step
replayed as one CUDA graph, and what makes a run resumable and safe to interrupt (seeds and every random stream's
state; atomic checkpoint files, the newest two kept, the newest good one loaded with weights_only=True; run-directory
and disk checks made before training; CSV logs written through; Ctrl-C and SIGTERM handlers; worker processes that
leave those signals to the parent). It imports only the standard library, NumPy and torch, never mvp.py."""
from __future__ import annotations

import csv
import glob
import itertools
import os
import random
import re
import shutil
import signal
from typing import Callable

import numpy as np
import torch

CHECKPOINT_FORMAT = 2  # 1: before the final checkpoint.pt and the resume ones shared one format
KEEP_CHECKPOINTS = 2  # the newest two, so a checkpoint cut short by a kill always has a good predecessor


class CUDAGraphed:
    """Runs fn() eagerly `warmup` times on a side stream, then records one call and replays it: an eager update
    of mvp.py is about 380 kernel launches (one H100: 12.9 ms wall, 2.9 ms GPU), a replay one. fn must keep its
    tensors' addresses, never sync (.item(), data-dependent shapes) and draw only from `generator`."""

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


def in_range(x: float, spec: str) -> bool:
    """x in an interval written "[lo, hi)", "(0, 1]", ... (the ranges of mvp.py's Args)."""
    lo, hi = (float(v) for v in spec[1:-1].split(","))
    return (lo <= x if spec[0] == "[" else lo < x) and (x <= hi if spec[-1] == "]" else x < hi)


def seed_everything(seed: int, device) -> torch.Generator:
    """Seeds Python's, NumPy's and torch's global streams; returns the run's own generator on `device`."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator(device=device).manual_seed(seed)


def rng_states(gen: torch.Generator, device) -> dict:
    """Every random stream the run draws from, as tensors and plain values (weights_only-loadable)."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return dict(torch=torch.get_rng_state(), gen=gen.get_state(),
                cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                numpy=[name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
                python=[version, list(internal), gauss])


def set_rng_states(state: dict, gen: torch.Generator, device):
    torch.set_rng_state(state["torch"])
    gen.set_state(state["gen"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(path: str, state: dict, keep: int = 0):
    """Atomic write (temporary file, fsync, rename); keep > 0 then deletes all but the newest `keep` siblings."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        torch.save(dict(state, format=CHECKPOINT_FORMAT), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    for old in sorted(glob.glob(os.path.join(os.path.dirname(path), "resume-*.pt")))[:-keep] if keep else []:
        os.remove(old)


def load_checkpoint(path: str) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)  # cannot run code, unlike pickle
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"not a checkpoint of this version of mvp.py (format {CHECKPOINT_FORMAT})")
    return state


def newest_checkpoint(run_dir: str) -> tuple[str, dict]:
    """The newest readable checkpoint of a run; a truncated or corrupt one is reported and skipped."""
    folder = os.path.join(run_dir, "checkpoints")
    paths = sorted(glob.glob(os.path.join(folder, "resume-*.pt")), reverse=True)
    for path in paths:
        try:
            return path, load_checkpoint(path)
        except Exception as e:
            print(f"[mvp] checkpoint {path} is truncated or corrupt ({type(e).__name__}: {str(e)[:200]}); "
                  f"falling back to the previous one", flush=True)
    raise SystemExit(f"error: every checkpoint in {folder} is truncated or corrupt" if paths else
                     f"error: no checkpoint in {folder}: nothing to resume (checkpoints are written every "
                     f"--save-interval steps or --save-minutes, and on Ctrl-C or SIGTERM)")


def check_run_dir(run_dir: str, fresh: bool) -> str | None:
    """Fail before training, not hours later, if the run directory cannot be written. A fresh run never writes
    over another run's checkpoints; logs left by one that died before its first checkpoint go. Returns the
    outermost folder this call created (None if it created none), for the caller to remove if it stops early."""
    if fresh and os.path.exists(os.path.join(run_dir, "summary.json")):
        raise SystemExit(f"error: the run directory {run_dir} already holds a finished run; pass another --run-dir")
    if fresh and glob.glob(os.path.join(run_dir, "checkpoints", "resume-*.pt")):
        raise SystemExit(f"error: the run directory {run_dir} already holds a resumable run; continue it with "
                         f"`python mvp.py --resume {run_dir}`, or pass another --run-dir")
    if fresh and glob.glob(os.path.join(run_dir, "*.csv")):
        print(f"[mvp] {run_dir} has the logs of a run that left no checkpoint: starting it over", flush=True)
        for path in glob.glob(os.path.join(run_dir, "*.csv")):
            os.remove(path)
    created = os.path.abspath(run_dir)
    while not os.path.exists(os.path.dirname(created)):
        created = os.path.dirname(created)
    created = None if os.path.exists(created) else created
    try:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, ".write_test"), "w") as f:
            f.write("ok")
        os.remove(os.path.join(run_dir, ".write_test"))
    except OSError as e:
        raise SystemExit(f"error: cannot write to the run directory {run_dir} ({e.strerror or e}); "
                         f"pass a writable --run-dir")
    return created


def new_run_dir(base: str) -> str:
    """Creates base, or base-2, base-3, ... if it exists, with os.mkdir, which only one process can win: of two
    runs started in the same second one gets base-2. Returns the folder made (the parent, runs/, may be shared)."""
    for k in itertools.count(1):
        path = base if k == 1 else f"{base}-{k}"
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
        except OSError as e:
            raise SystemExit(f"error: cannot create the run directory {path} ({e.strerror or e}); "
                             f"pass a writable --run-dir")


def check_disk_space(run_dir: str, checkpoint_bytes: int):
    """Refuse to start if the disk cannot hold the checkpoints: the kept ones, one being written, the final one."""
    need, free = (KEEP_CHECKPOINTS + 2) * checkpoint_bytes, shutil.disk_usage(run_dir).free
    if free < need:
        raise SystemExit(f"error: {run_dir} has {free / 1e9:.2f} GB free, but this run's checkpoints need about "
                         f"{need / 1e9:.2f} GB. Free some space or pass another --run-dir.")


def cpu_has_bfloat16() -> bool:
    """Native bfloat16 arithmetic (x86 AVX512-BF16 or AMX, Arm BF16); without it torch emulates bfloat16."""
    try:
        with open("/proc/cpuinfo") as f:
            return bool(re.search(r"\b(avx512_bf16|amx_bf16|bf16)\b", f.read()))
    except OSError:
        return False


def append_csv(path: str, row: dict):
    """One row, with a header if the file is new; written through at once, so a killed run keeps its logs."""
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if f.tell() == 0:
            writer.writeheader()
        writer.writerow(row)


def truncate_csv(path: str, keep: Callable):
    """Drop the rows a killed run wrote after its checkpoint, so a resumed run's logs have no duplicates."""
    if os.path.exists(path):
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if keep(r)]
        with open(path + ".tmp", "w", newline="") as f:
            if rows:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        os.replace(path + ".tmp", path)


def set_stop_handlers(handler) -> dict:
    """Sets the SIGINT and SIGTERM handler (one for both, or the dict a previous call returned); returns the
    previous ones."""
    return {s: signal.signal(s, handler[s] if isinstance(handler, dict) else handler)
            for s in (signal.SIGINT, signal.SIGTERM)}


def map_in_processes(fn: Callable, jobs: list, workers: int, initializer: Callable, initargs: tuple, desc: str) -> list:
    """[fn(job) for job in jobs] in spawned processes, with a progress bar. They ignore Ctrl-C and SIGTERM (sent to
    the whole process group), so the parent decides what a signal means; a second one drops the jobs not started."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp
    from tqdm import tqdm
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=mp.get_context("spawn"), initializer=initializer,
                             initargs=initargs) as pool:
        previous = set_stop_handlers(signal.SIG_IGN)  # inherited by the processes map() starts
        try:
            results = pool.map(fn, jobs)
        finally:
            set_stop_handlers(previous)
        try:
            return list(tqdm(results, total=len(jobs), desc=f"{desc} ({workers} processes)", leave=False,
                             dynamic_ncols=True))
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
