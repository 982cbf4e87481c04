"""Running benchmark phases: each in its own process (its own peak memory; torch after JAX has released the GPU)
or in this one (CPU tests), with a result file that survives a crash or a timeout of the phase."""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback

from bench.layout import ROOT
from wanjax.io.atomic import write_json_atomic


def log(*a):
    print("[bench.pipeline]", *a, flush=True)


class PhaseRecord(dict):
    """A phase's result dict that rewrites ``<workdir>/<phase>.json`` (atomically) on every ``save()`` (partial
    results survive a crash or a timeout of the phase)."""

    def __init__(self, workdir: str, phase: str):
        super().__init__(phase=phase)
        self.path = os.path.join(workdir, f"{phase}.json")

    def save(self):
        write_json_atomic(self.path, self, indent=1)


def error_text(e: BaseException) -> str:
    """Print the traceback; the exception as one string (type: message, at most 1500 characters)."""
    traceback.print_exc()
    return f"{type(e).__name__}: {str(e)[:1500]}"


def brief(r: dict) -> dict:
    """The headline entries of a result record (for the log)."""
    keep = (
        "compile_s",
        "median_s",
        "first_call_s",
        "peak_bytes_in_use",
        "peak_bytes",
        "rel_l2_vs_bf16",
        "finite",
        "error",
        "s",
    )
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k in keep}


def stream_child(cmd: list[str], timeout: float) -> tuple[int, bool, float, list[str]]:
    """Run ``cmd`` (a ``python -m bench...`` child) from the repo root with its output streamed through; kill its
    process group after ``timeout`` seconds. Returns (return code, timed out, wall seconds, last 15 log lines)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    tail = collections.deque(maxlen=40)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,
    )

    def pump():
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line.rstrip())

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        rc = proc.wait(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    reader.join(timeout=10)
    return rc, timed_out, time.perf_counter() - t0, list(tail)[-15:]


def run_child(module: str, phase: str, argv: list[str], workdir: str, timeout: float) -> dict:
    """Run ``python -m MODULE ARGV --phase PHASE`` with output streamed through; kill its process group after
    ``timeout`` seconds (the child is told the deadline: ``--deadline``, epoch seconds). Returns the phase's JSON
    ``<workdir>/<phase>.json`` (partial if it died) plus rc / timeout / log tail."""
    cmd = [
        sys.executable,
        "-m",
        module,
        *argv,
        "--phase",
        phase,
        "--workdir",
        workdir,
        "--deadline",
        f"{time.time() + max(timeout, 1.0):.3f}",
    ]
    rc, timed_out, wall_s, tail = stream_child(cmd, timeout)
    path = os.path.join(workdir, f"{phase}.json")
    rec = {}
    if os.path.exists(path):
        with open(path) as f:
            rec = json.load(f)
    rec.update(returncode=rc, timed_out=timed_out, wall_s=wall_s, timeout_s=timeout)
    if rc != 0:
        rec["error"] = rec.get("error") or (f"timed out after {timeout:.0f}s" if timed_out else f"exit code {rc}")
        rec["log_tail"] = tail
    return rec


def run_inprocess(fn, phase: str, args, workdir: str, timeout: float | None = None) -> dict:
    """``fn(args, workdir)`` (the phase ``phase``) in this process, with ``args.deadline`` set from ``timeout``; an
    exception is recorded in the result (the phase's partial JSON) instead of raised."""
    t0 = time.perf_counter()
    if timeout is not None:  # the phase's deadline (the pipeline phases stop their denoise loop at it)
        args = argparse.Namespace(**{**vars(args), "deadline": time.time() + timeout})
    try:
        rec = dict(fn(args, workdir))
    except Exception as e:
        path = os.path.join(workdir, f"{phase}.json")
        rec = json.load(open(path)) if os.path.exists(path) else {}
        rec["error"] = error_text(e)
    rec["wall_s"] = time.perf_counter() - t0
    return rec
