"""The part of mvp.py's plumbing that knows nothing of the method, for any PyTorch training script: a step
replayed as one CUDA graph, and what makes a run resumable and safe to interrupt (seeds and every random stream's
state; atomic checkpoint files, the newest two kept, the newest good one loaded with weights_only=True; run-directory
and disk checks made before training; CSV logs written through; Ctrl-C and SIGTERM handlers; worker processes that
leave those signals to the parent), and what keeps two processes apart: one owner per run folder (an flock), one
producer per file (a lock others wait on), temporary names unique to their writer, a full disk as one line. It
imports only the standard library, NumPy and torch, never mvp.py."""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import errno
import fcntl
import glob
import io
import itertools
import json
import os
import random
import re
import shutil
import signal
import time
import zipfile
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


def dataclass_parser(cls, description: str, titles: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """One flag per field of a dataclass whose metadata holds help (None: no flag), choices and range; dashes for
    underscores, store_true for bools (with `from __future__ import annotations`, field types are strings); a
    default of None is left to the help text to explain.
    titles: --help's sections in order, keyed by the name of the class that declares a field, or "how" for fields
    whose metadata says how=True; the flags follow that order."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    owner = {name: k.__name__ for k in reversed(cls.__mro__) for name in getattr(k, "__annotations__", {})}
    keys = list(titles or {})
    sections = {key: parser.add_argument_group(title) for key, title in (titles or {}).items()}

    def section(f):
        key = "how" if f.metadata.get("how") else owner[f.name]
        return key if key in sections else None
    flagged = [f for f in dataclasses.fields(cls) if f.metadata.get("help")]
    for f in sorted(flagged, key=lambda f: keys.index(section(f)) if section(f) else len(keys)):
        meta, flag, group = f.metadata, "--" + f.name.replace("_", "-"), sections.get(section(f), parser)
        if f.type == "bool":
            group.add_argument(flag, action="store_true", help=meta["help"])
        else:
            kind = {"int": int, "float": float, "str": str}[f.type.split(" ")[0]]
            group.add_argument(flag, type=kind, default=f.default, choices=meta.get("choices"),
                               help=meta["help"] + ("" if f.default is None else f" (default {f.default})"))
    return parser


def out_of_range(values) -> list[str]:
    """'--flag must be >= 1 (got 0)' for each field of a dataclass instance outside its metadata's range."""
    problems = []
    for f in dataclasses.fields(values):
        spec, value = f.metadata.get("range"), getattr(values, f.name)
        if spec and value is not None and not in_range(value, spec):
            bound = spec.replace("[", ">= ").replace("(", "> ").split(",")[0] if spec.endswith("inf)") else "in " + spec
            problems.append(f"--{f.name.replace('_', '-')} must be {bound} (got {value})")
    return problems


def pick_device(name: str, threads: int = 0, matmul_precision: str = "high") -> torch.device:
    """The one place that decides CPU vs CUDA, torch's CPU threads (on 2 busy cores 1 thread ran 7x faster
    than 2: multi-threaded kernels stall waiting for each other) and whether CUDA matmuls may use TF32."""
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


def out_of_memory(e: BaseException) -> str | None:
    """'Tried to allocate 2.00 GiB' (or 'allocation failed') if e is torch running out of memory, else None:
    torch.OutOfMemoryError on CUDA, the allocator's RuntimeError on CPU."""
    if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
        return None
    tried = re.search(r"[Tt]ried to allocate [0-9.]+ ?[A-Za-z]+", str(e))
    return tried[0].strip() if tried else "allocation failed"


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
    with written(path) as tmp, open(tmp, "wb") as f:
        torch.save(dict(state, format=CHECKPOINT_FORMAT), f)
        f.flush()
        os.fsync(f.fileno())
    for old in sorted(glob.glob(os.path.join(os.path.dirname(path), "resume-*.pt")))[:-keep] if keep else []:
        with contextlib.suppress(FileNotFoundError):
            os.remove(old)


def load_checkpoint(path: str, keys: tuple = ()) -> dict:
    """A checkpoint, its zip's CRCs checked first (torch.load reads a flipped byte in tensor data without a word).
    keys: what this version writes in every checkpoint; one lacking any is a one-line SystemExit naming them."""
    with zipfile.ZipFile(path) as z:  # torch.save writes a zip archive; a truncated or garbage file is no zip
        bad = z.testzip()
    if bad is not None:
        raise zipfile.BadZipFile(f"{bad} inside it fails its CRC check")  # corrupt, as a cut-short file is
    state = torch.load(path, map_location="cpu", weights_only=True)  # cannot run code, unlike pickle
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"not a checkpoint of this version of mvp.py (format {CHECKPOINT_FORMAT})")
    if missing := [k for k in keys if k not in state]:
        raise SystemExit(f"error: {path} is a format-{CHECKPOINT_FORMAT} checkpoint without {', '.join(missing)}, "
                         f"which this version of mvp.py writes in every checkpoint (it has: "
                         f"{', '.join(sorted(state))}); use the version that wrote it, or start a new run")
    return state


def load_state_dicts(objects: dict, state: dict, source: str):
    """objects[k].load_state_dict(state[k]) for modules and optimizers; a module whose tensors' names or shapes
    differ from the checkpoint's (or any other refusal) is a one-line SystemExit saying what differs."""
    for k, obj in objects.items():
        want, got, problem = obj.state_dict(), state.get(k), None
        if not isinstance(got, dict):
            problem = f"its {k} is a {type(got).__name__}, not a state dict"
        elif isinstance(obj, torch.nn.Module):
            missing, extra = [n for n in want if n not in got], [n for n in got if n not in want]
            shapes = [f"{n} {tuple(got[n].shape)}, this version's {tuple(v.shape)}" for n, v in want.items()
                      if n in got and (not torch.is_tensor(got[n]) or got[n].shape != v.shape)]
            if missing:
                problem = f"its {k} lacks {', '.join(missing[:3])}"
            elif extra:
                problem = f"its {k} has {', '.join(extra[:3])}, which this version's does not"
            elif shapes:
                problem = f"its {k} has {shapes[0]}"
        if problem is None:
            try:
                obj.load_state_dict(got)
                continue
            except Exception as e:
                problem = f"its {k}: {str(e).strip().splitlines()[0][:200]}"
        raise SystemExit(f"error: {source} is a format-{CHECKPOINT_FORMAT} checkpoint that does not match what this "
                         f"version of mvp.py writes ({problem}); use the version that wrote it, or start a new run")


def read_checkpoint(path: str, keys: tuple = ()) -> dict:
    """load_checkpoint, or a one-line SystemExit saying the file is missing, truncated or corrupt."""
    try:
        return load_checkpoint(path, keys)
    except FileNotFoundError:
        raise SystemExit(f"error: checkpoint {path} does not exist")
    except Exception as e:
        raise SystemExit(f"error: checkpoint {path} is truncated or corrupt ({type(e).__name__}: {e})")


def newest_checkpoint(run_dir: str, keys: tuple = ()) -> tuple[str, dict]:
    """The newest readable checkpoint of a run; a truncated or corrupt one is reported and skipped."""
    folder = os.path.join(run_dir, "checkpoints")
    paths = sorted(glob.glob(os.path.join(folder, "resume-*.pt")), reverse=True)
    for path in paths:
        try:
            return path, load_checkpoint(path, keys)
        except Exception as e:
            print(f"[mvp] checkpoint {path} is truncated or corrupt ({type(e).__name__}: {str(e)[:200]}); "
                  f"falling back to the previous one", flush=True)
    raise SystemExit(f"error: every checkpoint in {folder} is truncated or corrupt" if paths else
                     f"error: no checkpoint in {folder}: nothing to resume (checkpoints are written every "
                     f"--save-interval steps or --save-minutes, and on Ctrl-C or SIGTERM)")


def check_run_dir(run_dir: str, fresh: bool) -> str | None:
    """Fail before training, not hours later, if the run directory cannot be written. A fresh run never writes
    over another run's checkpoints; logs left by one that died before its first checkpoint go. Returns the
    outermost folder this call created (None if it created none), for the caller to remove if it stops early.
    First of all it takes the folder for this process (lock_run_dir): a second run there stops, changing nothing."""
    created = os.path.abspath(run_dir)
    while not os.path.exists(os.path.dirname(created)):
        created = os.path.dirname(created)
    created = None if os.path.exists(created) else created
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: cannot write to the run directory {run_dir} ({e.strerror or e}); "
                         f"pass a writable --run-dir")
    lock_run_dir(run_dir)
    if fresh and os.path.exists(os.path.join(run_dir, "summary.json")):
        raise SystemExit(f"error: the run directory {run_dir} already holds a finished run; pass another --run-dir")
    if fresh and glob.glob(os.path.join(run_dir, "checkpoints", "resume-*.pt")):
        raise SystemExit(f"error: the run directory {run_dir} already holds a resumable run; continue it with "
                         f"`python mvp.py --resume {run_dir}`, or pass another --run-dir")
    if fresh and glob.glob(os.path.join(run_dir, "*.csv")):
        print(f"[mvp] {run_dir} has the logs of a run that left no checkpoint: starting it over", flush=True)
        for path in glob.glob(os.path.join(run_dir, "*.csv")):
            os.remove(path)
    try:
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
            lock_run_dir(path)
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
        raise SystemExit(f"error: {run_dir} has {size_text(free)} free, but this run's checkpoints need about "
                         f"{size_text(need)}. Free some space or pass another --run-dir.")


def duration_text(seconds: float) -> str:
    """Seconds in the unit that fits: 40 s, 12 min, 3.1 h, 64 days."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.{0 if unit != 'h' else 1}f} {unit}"
    return f"{seconds:.0f} s"


def plan_line(what: str, data: tuple[str, float] | None, updates: int, rate: Callable[[], float], instead: str,
              untimed: int = 10_000):
    """A run's plan before it spends anything: what it is, the data to make (text, seconds) if any, the updates at
    rate() (timed here, which costs a second or two: not for fewer than `untimed` updates, whose first 200 say
    it); and past a day in all, what to run instead."""
    per_s = rate() if updates >= untimed else None
    took = f"about {duration_text(updates / per_s)} at {per_s:.3g} updates/s (timed here on these sizes; env " \
           f"steps and evaluations add to it)" if per_s else "timed after the first 200"
    print(f"[mvp] plan: {what}. Data: " + (f"{data[0]}, about {duration_text(data[1])}" if data else "on disk")
          + f". Training: {updates:,} updates, {took}", flush=True)
    if (updates / per_s if per_s else 0) + (data[1] if data else 0) > 86400:
        print(f"[mvp] that is more than a day; {instead}", flush=True)


def size_text(n: float) -> str:
    """Bytes in the unit that fits: 0.3 MB, 812.0 MB, 3.25 GB."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


# ---- two processes, one folder or file; a full disk ---------------------------------------------------------------
RUN_LOCK = ".lock"  # in a run folder: its owner holds an flock on it (the OS drops it when the process dies)
_held: dict[str, tuple] = {}  # realpath of a run folder -> (its open lock file, the name it was given), this process's


def _lock(path: str, wait: bool):
    """An open file holding an exclusive flock on `path` (made if missing, this process's pid written in it), or None
    if another process holds it and wait is False. A holder removes the file while still holding it when done, so a
    lock won on a removed file is taken again on the file now at `path`."""
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            f.close()
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            f.truncate(0)
            f.write(f"{os.getpid()}\n")
            f.flush()
            return f
        f.close()


def lock_holder(path: str) -> str:
    """The pid written in a lock file ('unknown' if its holder has not written it yet)."""
    for _ in range(20):
        with contextlib.suppress(OSError), open(path) as f:
            if pid := f.read().strip():
                return pid
        time.sleep(0.05)
    return "unknown"


def lock_run_dir(run_dir: str):
    """Takes the run folder for this process until release_run_dirs() or the process ends (kill -9 included: the OS
    drops an flock with its process, so no stale lock outlives it). Another process holding it is a one-line
    SystemExit, before anything in the folder is read or changed. A no-op if the folder does not exist (yet) or
    this process holds it already."""
    key = os.path.realpath(run_dir)
    path = os.path.join(key, RUN_LOCK)
    if key in _held:
        f = _held[key][0]
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                return
        f.close()  # the folder was removed (and perhaps made again): the old lock holds nothing
        del _held[key]
    if not os.path.isdir(key):
        return
    try:
        f = _lock(path, wait=False)
    except OSError as e:
        raise SystemExit(f"error: cannot write to the run directory {run_dir} ({e.strerror or e}); "
                         f"pass a writable --run-dir")
    if f is None:
        raise SystemExit(f"error: the run directory {run_dir} is in use by another process (pid {lock_holder(path)}); "
                         f"one folder holds one run: wait for that one to end, or pass another --run-dir")
    _held[key] = (f, run_dir)


def release_run_dirs():
    """Gives back the run folders this process holds (their lock files go)."""
    for key, (f, _) in list(_held.items()):
        path = os.path.join(key, RUN_LOCK)
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                os.remove(path)
        f.close()
        del _held[key]


@contextlib.contextmanager
def producing(path: str, waiting: str):
    """One producer of a file at a time: holds an flock on `path` for the block, after waiting for the process that
    holds it, if any (printing `waiting`, whose {pid} names it). The lock file goes when the block ends."""
    f = _lock(path, wait=False)
    if f is None:
        print(waiting.format(pid=lock_holder(path)), flush=True)
        f = _lock(path, wait=True)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)  # while still holding it: a process waiting on this file takes the next one
        f.close()


def is_disk_full(e: BaseException | None) -> bool:
    """e, or what it was raised while handling, is 'no space left on device' (torch.save raises a RuntimeError
    while handling its file's OSError)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        e = e.__cause__ or e.__context__
    return False


def disk_full(path: str) -> SystemExit:
    """The one line a run stops with when writing `path` finds the disk full: how much is free where, its newest
    checkpoint (a file with its final name is always whole), and how to go on."""
    real = os.path.realpath(path)
    run_dir = next((name for key, (_, name) in _held.items() if real.startswith(key + os.sep)), os.path.dirname(path))
    try:
        free = size_text(shutil.disk_usage(run_dir).free)
    except OSError:
        free = "an unknown amount"
    newest = sorted(glob.glob(os.path.join(run_dir, "checkpoints", "resume-*.pt")))
    then = (f"the newest good checkpoint is {newest[-1]}: free space, then python mvp.py --resume {run_dir}" if newest
            else "no checkpoint was written yet: free space, then start the run again")
    return SystemExit(f"error: no space left on the device writing {path} ({free} free in {run_dir}); {then}")


@contextlib.contextmanager
def written(path: str):
    """Yields a temporary name for writing `path` whole: unique to this process (path.<pid>.tmp), renamed to `path`
    when the block ends, removed if it fails; a full disk is disk_full's one line."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if is_disk_full(e):
            raise disk_full(path) from None
        raise


def write_json(path: str, obj):
    """json.dump(obj, indent=1) to `path`, atomically (written())."""
    with written(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def start_parts(parts: str, settings: dict):
    """The folder of a resumable generation's finished parts: kept if its settings.json holds these settings, else
    emptied and marked with them (a missing or cut-short marker means nothing in it can be trusted)."""
    marker = os.path.join(parts, "settings.json")
    try:
        with open(marker) as f:
            if json.load(f) == settings:
                return
    except (OSError, ValueError):
        pass
    shutil.rmtree(parts, ignore_errors=True)
    os.makedirs(parts)
    write_json(marker, settings)


def cpu_has_bfloat16() -> bool:
    """Native bfloat16 arithmetic (x86 AVX512-BF16 or AMX, Arm BF16); without it torch emulates bfloat16."""
    try:
        with open("/proc/cpuinfo") as f:
            return bool(re.search(r"\b(avx512_bf16|amx_bf16|bf16)\b", f.read()))
    except OSError:
        return False


def append_csv(path: str, row: dict):
    """One row, with a header if the file is new; written through at once, so a killed run keeps its logs. A failed
    write leaves the file as it was, without half a row (a full disk: disk_full's one line)."""
    size = os.path.getsize(path) if os.path.exists(path) else 0
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(row))
    if size == 0:
        writer.writeheader()
    writer.writerow(row)
    try:
        with open(path, "a", newline="") as f:
            f.write(text.getvalue())
    except OSError as e:
        with contextlib.suppress(OSError):
            os.truncate(path, size)
        if is_disk_full(e):
            raise disk_full(path) from None
        raise


def truncate_csv(path: str, keep: Callable):
    """Drop the rows a killed run wrote after its checkpoint, so a resumed run's logs have no duplicates."""
    if os.path.exists(path):
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if keep(r)]
        with written(path) as tmp, open(tmp, "w", newline="") as f:
            if rows:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)


def set_stop_handlers(handler) -> dict:
    """Sets the SIGINT and SIGTERM handler (one for both, or the dict a previous call returned); returns the
    previous ones."""
    return {s: signal.signal(s, handler[s] if isinstance(handler, dict) else handler)
            for s in (signal.SIGINT, signal.SIGTERM)}


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM (`kill`, Slurm's time limit) asks a loop to stop after its current step, so it can
    save first; a second one aborts at once. Installed on creation; restore() puts the previous handlers back."""

    def __init__(self):
        self.signal, self.previous = 0, set_stop_handlers(self.on_signal)

    def on_signal(self, signum, frame):
        if self.signal:
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n[mvp] {signal.Signals(signum).name}: saving a checkpoint after this step (again to abort without "
              f"saving)", flush=True)

    def restore(self):
        set_stop_handlers(self.previous)

    def exit(self, resume_hint: str):
        print(f"[mvp] stopped by {'Ctrl-C' if self.signal == signal.SIGINT else 'SIGTERM'}. Resume with: "
              f"{resume_hint}", flush=True)
        raise SystemExit(128 + self.signal)  # 130 for Ctrl-C, 143 for SIGTERM, as the shell reports them


def calls_per_second(fn: Callable, calls: int = 3) -> float:
    """fn() once to warm up, then the rate of `calls` more; fn must return a value whose float() waits for the
    device (a loss), so the time includes the work."""
    float(fn())
    began = time.perf_counter()
    for _ in range(calls):
        float(fn())
    return calls / (time.perf_counter() - began)


def eval_processes(requested: int, device) -> int:
    """--eval-workers -1: none on CPU; with CUDA one per spare core (at most 16), as MuJoCo's stepping dominates."""
    return requested if requested >= 0 else min(16, (os.cpu_count() or 1) - 1) if device.type == "cuda" else 0


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
