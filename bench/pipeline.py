"""Denoising step of one full-size expert: BF16 vs W4A4 (real kernels) vs diffusers BF16, plus the pipeline.

    python -m bench.pipeline [--res 480p[,720p]] [--iters 5] [--quick] [--skip-bf16] [--skip-w4a4]
                             [--skip-artifact] [--skip-diffusers] [--skip-pipeline] [--skip-t5] [--skip-vae]
                             [--pipeline-experts w4a4,bf16] [--pipeline-steps 40] [--pipeline-placement auto]
                             [--pipeline-budget-s S] [--budget-s S]

Everything runs with random weights of the exact full-size shapes (speed and memory do not depend on the values):

* ``bf16``      our expert (``wanjax.config.I2V_A14B``, 14,288,901,184 params) with random bf16 weights made on the
                device, one forward ``x [1, F, H, W, 36]``, ``t [1]``, ``context [1, 512, 4096]``, cuDNN attention.
* ``w4a4``      the same expert with every block Linear (400 layers) replaced by a ``QLinear`` with the structure of
                the ``default`` recipe in ``real`` mode: int4 per-channel packed weights, a smoothing vector, a
                rank-32 bf16 low-rank branch, bias, per-bin activation clip tables (the seed's timestep bins, 3 per
                expert). No calibration: the weights are the bf16 expert's (same keys), folded with a random
                smoothing vector, minus random bf16 low-rank factors, then RTN per output channel, all jitted on
                the device (:func:`build_w4a4_expert`). Same jitted call as ``bf16``; the rel-L2 of its output
                against the bf16 output is reported (large: RTN, no calibration, 40 random layers). Then the
                artifact path: ``save_artifact`` -> ``load_artifact`` -> one forward, compared bit-exactly.
* ``diffusers`` diffusers ``WanTransformer3DModel`` BF16 (modules of ``_keep_in_fp32_modules`` in fp32, as
                ``from_pretrained(torch_dtype=bfloat16)`` loads it), default attention (torch SDPA), random init
                made on the device, eager (``--diffusers-compile`` adds ``torch.compile``).
* ``pipeline``  the 480p I2V pipeline (:mod:`bench.pipeline_phase`) with both W4A4 experts, in stage order:
                UMT5-XXL encode of (prompt, negative) and release -> both experts + VAE -> VAE encode of the
                condition -> ``--pipeline-steps`` guided steps through ``WanI2VPipeline.denoise`` (CFG batch 2; 2
                steps: one per expert; 40: a full generation) -> chunked VAE decode; time of each stage and step
                (warm step time per expert), peak memory so far after each stage, full generation wall time.
                ``--pipeline-experts w4a4,bf16`` adds the phase ``pipeline_bf16``: the same with both BF16 experts
                (``--pipeline-placement auto`` swaps the inactive expert to host memory when the two do not fit).
                The denoise loop stops cleanly at the phase's time budget and extrapolates the rest (labelled).

Each phase runs in its own subprocess (``--phase NAME``), so that its ``peak_bytes_in_use`` is its own and the torch
phase starts after JAX has released the GPU; the default BFC allocator with preallocation is kept
(``peak_bytes_in_use`` counts the bytes the allocator handed out, not the preallocated pool; compile-time
autotuning scratch goes through it too, so XLA's own ``memory_analysis`` of each compiled forward is also reported).
A phase that fails or runs past its time share is reported as such; the others still run. ``--inprocess`` runs all
phases in this process (CPU tests). Results: ``<results-dir>/pipeline_<res>.json`` (and ``$OUT``), and a markdown
table at the end.

Modules: this one orchestrates (flags, phase order, time budget); `bench.random_weights` (random weights),
`bench.w4a4_expert` (the W4A4 expert), `bench.dit_step` (resolutions, inputs, the timed forward),
`bench.expert_phases` (bf16 / w4a4 phases, artifact round trip), `bench.diffusers_phase`, `bench.pipeline_phase`
(the pipeline phases), `bench.phase_runner` (child processes, result records), `bench.pipeline_report` (summary,
tables).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

from bench.diffusers_phase import phase_diffusers
from bench.dit_step import RES
from bench.expert_phases import phase_bf16, phase_w4a4
from bench.layout import ROOT, ensure_package_layout
from bench import phase_runner, pipeline_variants
from bench.phase_runner import log
from bench.pipeline_phase import PIPELINE_PHASES, phase_pipeline, phase_pipeline_bf16
from bench.pipeline_report import summarize, table

PHASES = ("bf16", "w4a4", "diffusers", "pipeline", "pipeline_bf16")
#: share of --budget-s each phase may use at least, if the run has the time (a phase also gets what the phases after
#: it do not need by their shares; the run as a whole never exceeds the budget)
PHASE_SHARE = {"bf16": 0.3, "w4a4": 0.5, "diffusers": 0.3, "pipeline": 0.45, "pipeline_bf16": 0.45}
PHASE_FNS = {
    "bf16": phase_bf16,
    "w4a4": phase_w4a4,
    "diffusers": phase_diffusers,
    "pipeline": phase_pipeline,
    "pipeline_bf16": phase_pipeline_bf16,
}


def run_child(phase: str, argv: list[str], workdir: str, timeout: float) -> dict:
    """``python -m bench.pipeline ARGV --phase PHASE`` in a child process (`bench.phase_runner.run_child`)."""
    return phase_runner.run_child("bench.pipeline", phase, argv, workdir, timeout)


def run_inprocess(phase: str, args, workdir: str, timeout: float | None = None) -> dict:
    """The phase ``phase`` in this process (`bench.phase_runner.run_inprocess`)."""
    return phase_runner.run_inprocess(PHASE_FNS[phase], phase, args, workdir, timeout)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="I2V_A14B", choices=["I2V_A14B", "TINY"])
    ap.add_argument("--res", default="480p", help="comma list of " + ", ".join(RES))
    ap.add_argument("--iters", type=int, default=5, help="timed forwards per variant (after one warm-up)")
    ap.add_argument("--iters-720p", type=int, default=2)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="2 iterations, no artifact round trip, no T5")
    for p in ("bf16", "w4a4", "artifact", "diffusers", "pipeline", "t5", "vae"):
        ap.add_argument(f"--skip-{p}", action="store_true")
    ap.add_argument("--diffusers-compile", action="store_true", help="also time torch.compile(diffusers model)")
    ap.add_argument(
        "--cfg-mode",
        default="batch2",
        choices=["batch2", "twopass"],
        help="pipeline phase: CFG as the pipeline does it (batch 2) or cond/uncond one after the other",
    )
    ap.add_argument(
        "--pipeline-experts",
        default="w4a4",
        help="pipeline phases to run, in the order given: comma list of " + ", ".join(PIPELINE_PHASES),
    )
    ap.add_argument(
        "--pipeline-steps",
        type=int,
        default=2,
        help="denoise steps (2: one per expert; 40: the official full generation)",
    )
    ap.add_argument(
        "--pipeline-placement",
        default="auto",
        choices=["auto", "device", "swap"],
        help="WanI2VPipeline expert_placement (auto: swap when both experts take > 60%% of the device)",
    )
    ap.add_argument(
        "--pipeline-budget-s",
        type=float,
        default=None,
        help="time budget of each pipeline phase (default: its share of --budget-s); the denoise loop "
        "stops cleanly before a step that would not fit and extrapolates the rest",
    )
    pipeline_variants.add_args(ap)
    ap.add_argument("--budget-s", type=float, default=500.0, help="wall-time budget of the whole run")
    ap.add_argument("--results-dir", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--name", default=None, help="result name (default pipeline_<res>)")
    ap.add_argument("--inprocess", action="store_true", help="run all phases in this process (CPU tests)")
    ap.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.res = [r.strip() for r in args.res.split(",") if r.strip()]
    bad = [r for r in args.res if r not in RES]
    if bad:
        ap.error(f"--res: unknown {bad}; expected {list(RES)}")
    experts = [e.strip() for e in args.pipeline_experts.split(",") if e.strip()]
    if not experts or [e for e in experts if e not in PIPELINE_PHASES] or len(set(experts)) != len(experts):
        ap.error(f"--pipeline-experts: {args.pipeline_experts!r}; expected a comma list of {list(PIPELINE_PHASES)}")
    args.pipeline_experts = experts
    if args.pipeline_steps < 1:
        ap.error("--pipeline-steps must be >= 1")
    if args.pipeline_lora_rank < 0:
        ap.error("--pipeline-lora-rank must be >= 0")
    try:
        pipeline_variants.cache_specs(args.pipeline_cache)
    except ValueError:
        ap.error(f"--pipeline-cache: {args.pipeline_cache!r}; expected a comma list of THRESHOLD[:MAX_SKIPS]")
    if args.quick:
        args.iters, args.iters_720p, args.skip_artifact, args.skip_t5 = 2, 1, True, True
    return args


def _skipped(args, phase: str) -> bool:
    return args.skip_pipeline if phase in PIPELINE_PHASES.values() else getattr(args, f"skip_{phase}")


def phase_timeout(phase: str, left: float, budget: float, later: list[str]) -> float:
    """Seconds ``phase`` may run: at least its share of the budget, and what the ``later`` phases do not need by
    their shares; never past the budget (``left`` seconds are left of it)."""
    keep = sum(PHASE_SHARE[p] for p in later) * budget
    return min(left - 5, max(PHASE_SHARE[phase] * budget, left - keep))


def main(argv=None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.phase:  # child: one phase, result in <workdir>/<phase>.json
        ensure_package_layout()
        PHASE_FNS[args.phase](args, args.workdir)
        return None
    ensure_package_layout()
    t_start = time.perf_counter()
    name = args.name or "pipeline_" + "_".join(args.res)
    workdir = tempfile.mkdtemp(prefix="wanjax_bench_pipeline_")
    results = {
        "name": name,
        "config": args.config,
        "res": args.res,
        "tokens": {r: RES[r][0][0] * RES[r][0][1] * RES[r][0][2] // 4 for r in args.res},
        "settings": {k: v for k, v in vars(args).items() if k not in ("phase", "workdir", "deadline")},
        "notes": [
            "random weights of the exact shapes; speed and memory do not depend on the values",
            "each phase in its own process: peak_bytes_in_use (JAX BFC allocator, preallocation on) and "
            "torch.cuda.max_memory_allocated are that phase's own",
            "W4A4: default-recipe structure (int4 per-channel weights, int4 per-token activations, "
            "smoothing, rank-r bf16 low-rank, bias, per-bin clip tables), RTN of the bf16 weights, "
            "no calibration",
        ],
        "phases": {},
    }
    child_argv = [a for a in argv if a != "--inprocess"]
    order = ["bf16", "w4a4", "diffusers"] + [PIPELINE_PHASES[e] for e in args.pipeline_experts]
    try:
        for n, phase in enumerate(order):
            if _skipped(args, phase):
                results["phases"][phase] = {"skipped": "--skip-" + ("pipeline" if "pipeline" in phase else phase)}
                continue
            left = args.budget_s - (time.perf_counter() - t_start)
            if left < 20:
                results["phases"][phase] = {"skipped": f"time budget spent ({args.budget_s:.0f}s)"}
                continue
            timeout = phase_timeout(phase, left, args.budget_s, [p for p in order[n + 1 :] if not _skipped(args, p)])
            log(f"phase {phase} (up to {timeout:.0f}s)")
            rec = (
                run_inprocess(phase, args, workdir, timeout)
                if args.inprocess
                else run_child(phase, child_argv, workdir, timeout)
            )
            results["phases"][phase] = rec
            for key in ("device", "platform", "jax", "jaxlib", "git_commit"):
                if key in rec:
                    results.setdefault(key, rec[key])
            results["summary"] = summarize(results)
            results["table"] = table(results)
            results["wall_s"] = time.perf_counter() - t_start
            _write(results, name, args.results_dir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results["summary"] = summarize(results)
    results["table"] = table(results)
    results["wall_s"] = time.perf_counter() - t_start
    _write(results, name, args.results_dir)
    print("\n" + results["table"], flush=True)
    log(f"done in {results['wall_s']:.0f}s -> {os.path.join(args.results_dir, name)}.json")
    return results


def _write(results: dict, name: str, results_dir: str) -> None:
    from bench.common import write_result
    from wanjax.io.jsonio import to_jsonable

    write_result(name, to_jsonable(results), out_dirs=(results_dir,))


if __name__ == "__main__":
    main()
