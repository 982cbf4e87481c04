"""Command line: ``wanjax <subcommand> ...``.

One function per subcommand (``cmd_<name>(args) -> int``), registered in `build_parser`. Implemented: ``convert``,
``generate``, ``quantize``, ``eval``.
"""
from __future__ import annotations

import argparse
import sys
import time

_DTYPES = ("bfloat16", "float32", "float16")


def cmd_convert(args: argparse.Namespace) -> int:
    """``wanjax convert SRC DST``: safetensors checkpoint (any supported layout) -> orbax cache directory."""
    import jax.numpy as jnp

    from wanjax.io.errors import CheckpointError
    from wanjax.io.orbax_cache import convert

    t0 = time.perf_counter()
    try:
        out = convert(args.src, args.dst, jnp.dtype(args.dtype), ignore_unknown=args.ignore_unknown,
                      overwrite=args.overwrite, compress=args.compress)
    except (CheckpointError, FileNotFoundError, FileExistsError) as e:
        print(f"wanjax convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.dtype}) in {time.perf_counter() - t0:.1f} s")
    return 0


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert a DiT checkpoint (official / diffusers / ComfyUI safetensors) "
                                       "into a fast-loading orbax cache",
                       description=cmd_convert.__doc__)
    p.add_argument("src", help="expert dir, diffusers transformer dir, *.safetensors.index.json or .safetensors file")
    p.add_argument("dst", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--dtype", default="bfloat16", choices=_DTYPES,
                   help="storage dtype of the large weights (modulation, norms, time embedding, head stay fp32)")
    p.add_argument("--ignore-unknown", action="store_true", help="skip tensors that are not DiT parameters")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--compress", action="store_true",
                   help="zstd-compress the arrays (smaller, slower to load on few cores)")
    p.set_defaults(func=cmd_convert)


def _open_pipeline(args: argparse.Namespace, command: str):
    """`WanI2VPipeline.from_pretrained(args.model)` with ``--dtype`` and ``--mesh``; prints the error and returns
    None on a bad model dir or mesh."""
    import jax.numpy as jnp

    from wanjax.io.errors import CheckpointError
    from wanjax.pipeline import WanI2VPipeline

    mesh = None
    if getattr(args, "mesh", None):
        from wanjax.sharding import make_mesh

        try:
            mesh = make_mesh(*(int(v) for v in args.mesh.split(",")))
        except ValueError as e:
            print(f"wanjax {command}: error: --mesh {args.mesh!r}: {e}", file=sys.stderr)
            return None
    t0 = time.perf_counter()
    try:
        pipe = WanI2VPipeline.from_pretrained(args.model, dtype=jnp.dtype(args.dtype), release_text_encoder=True,
                                              mesh=mesh)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"wanjax {command}: error: {e}", file=sys.stderr)
        return None
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s")
    return pipe


def cmd_generate(args: argparse.Namespace) -> int:
    """``wanjax generate``: image + prompt -> mp4 with the two experts (official defaults: 81 frames, 40 steps,
    shift 5.0, guidance 3.5/3.5, 480p max area, FlowUniPC)."""
    from wanjax.pipeline import GenerationConfig
    from wanjax.video_io import save_mp4, save_pngs

    try:
        guide = tuple(float(g) for g in args.guide.split(","))
        if len(guide) == 1:
            guide = guide * 2
        if len(guide) != 2:
            raise ValueError
    except ValueError:
        print(f"wanjax generate: error: --guide expects 'G' or 'LOW,HIGH', got {args.guide!r}", file=sys.stderr)
        return 2
    if args.int8_weights and not (args.quant and args.quant_mode == "real"):
        print("wanjax generate: error: --int8-weights needs --quant DIR and --quant-mode real", file=sys.stderr)
        return 2
    pipe = _open_pipeline(args, "generate")
    if pipe is None:
        return 2
    if args.quant:
        from wanjax.quant.artifact import ArtifactError, attach_artifact

        try:
            manifest = attach_artifact(pipe, args.quant, mode=args.quant_mode, int8_weights=args.int8_weights)
        except (ArtifactError, FileNotFoundError, ValueError, NotImplementedError) as e:
            print(f"wanjax generate: error: --quant {args.quant}: {e}", file=sys.stderr)
            return 2
        print(f"using the quantized experts of {args.quant} (recipe {manifest.get('recipe', {}).get('name', '?')})")
    if getattr(args, "attention", None):  # after --quant: an explicit backend wins over the recipe's
        from wanjax.model.attention import set_attention_backend

        set_attention_backend(args.attention)
    gen = GenerationConfig(num_frames=args.frames, max_area=args.size, steps=args.steps, shift=args.shift,
                           guide_scale=guide, solver=args.solver, seed=args.seed, fps=args.fps)
    try:
        out = pipe.generate(args.image, args.prompt, args.negative_prompt, gen)
    except (ValueError, FileNotFoundError) as e:
        print(f"wanjax generate: error: {e}", file=sys.stderr)
        return 2
    save_mp4(out.frames, args.out, fps=args.fps)
    if args.png_dir:
        save_pngs(out.frames, args.png_dir)
    print(f"wrote {args.out}: {out.frames.shape[0]} frames {out.frames.shape[2]}x{out.frames.shape[1]}; "
          + ", ".join(f"{k} {v:.1f}s" for k, v in out.seconds.items()))
    return 0


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="image-to-video generation with both experts", description=cmd_generate.__doc__)
    p.add_argument("--model", required=True, help="model dir in the official or diffusers layout")
    p.add_argument("--image", required=True, help="first frame (any image file)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None, help="default: the official negative prompt")
    p.add_argument("--out", default="out.mp4")
    p.add_argument("--png-dir", default=None, help="also write the frames as PNGs here")
    p.add_argument("--frames", type=int, default=81, help="4n+1 frames (default 81)")
    p.add_argument("--size", default="480p", help="max area: 480p, 720p, WxH or an int (aspect ratio from the image)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--shift", type=float, default=5.0)
    p.add_argument("--guidance", "--guide", dest="guide", default="3.5,3.5", help="guidance 'LOW,HIGH' (low-noise, high-noise expert) or 'G'")
    p.add_argument("--solver", default="unipc", choices=("unipc", "euler"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=_DTYPES)
    p.add_argument("--quant", default=None, help="a quantized-model dir written by `wanjax quantize`")
    p.add_argument("--attention", default=None, choices=("cudnn", "cudnn_fp8", "chunked", "xla", "tpu"),
                   help="attention backend (default: automatic, or the --quant recipe's; cudnn_fp8: cuDNN FP8 flash "
                        "attention, Hopper GPUs)")
    p.add_argument("--quant-mode", default=None, choices=("fake", "real"),
                   help="run the quantized layers simulated ('fake') or on the low-bit kernels ('real')")
    p.add_argument("--int8-weights", action="store_true",
                   help="with --quant-mode real: also keep the INT4 weights unpacked to int8 for the GEMM (1 byte a "
                        "parameter more; equal or faster per linear, docs/BENCHMARKS.md)")
    p.add_argument("--mesh", default=None, help="device mesh 'data,fsdp,context,tensor' (-1 = the rest), e.g. "
                                                 "'2,1,4,1' on 8 chips: CFG over data, sequence parallel over context")
    p.set_defaults(func=cmd_generate)


def cmd_quantize(args: argparse.Namespace) -> int:
    """``wanjax quantize``: calibrate both experts (or reuse a calibration directory) and write a W4A4 artifact.

    ``--calib FILE.jsonl`` holds one JSON object per line: ``{"image": path, "prompt": text, "seed": int}``
    (``negative_prompt`` optional); statistics go to ``--work-dir`` (resumable). ``--stats DIR`` reuses the
    ``work_dir`` of an earlier calibration instead."""
    import json
    import os

    from wanjax.pipeline import GenerationConfig
    from wanjax.quant.artifact import save_artifact
    from wanjax.quant.calibrate import CalibConfig, CalibSample, CalibStats, calibrate
    from wanjax.quant.quantize import CalibrationSource, quantize, sqnr_csv
    from wanjax.quant.recipes import get_recipe, recipe_to_dict

    def fail(msg):
        print(f"wanjax quantize: error: {msg}", file=sys.stderr)
        return 2

    if (args.calib is None) == (args.stats is None):
        return fail("give exactly one of --calib FILE.jsonl (calibrate now) or --stats DIR (reuse a calibration)")
    try:
        recipe = get_recipe(args.recipe)
    except KeyError as e:
        return fail(e.args[0])
    if os.path.exists(args.out) and not args.overwrite:
        return fail(f"{args.out} exists (pass --overwrite to replace it)")
    samples = []
    if args.calib is not None:
        try:
            with open(args.calib) as f:
                for i, line in enumerate(f, 1):
                    if line.strip():
                        d = json.loads(line)
                        if "image" not in d or "prompt" not in d:
                            return fail(f"{args.calib}:{i}: each line needs 'image' and 'prompt', got {sorted(d)}")
                        samples.append(CalibSample(image=d["image"], prompt=d["prompt"],
                                                   negative_prompt=d.get("negative_prompt"), seed=int(d.get("seed", 0))))
        except (OSError, json.JSONDecodeError) as e:
            return fail(f"{args.calib}: {e}")
        if not samples:
            return fail(f"{args.calib}: no calibration samples")
    elif not os.path.isfile(os.path.join(args.stats, "manifest.json")):
        return fail(f"{args.stats}: not a calibration directory (no manifest.json)")
    pipe = _open_pipeline(args, "quantize")
    if pipe is None:
        return 2
    if samples:
        gen = GenerationConfig(num_frames=args.frames, max_area=args.size, steps=args.steps, shift=args.shift)
        work_dir = args.work_dir or f"{os.path.abspath(args.out)}.calib"
        t0 = time.perf_counter()
        stats = calibrate(pipe, samples, CalibConfig(gen=gen), work_dir=work_dir)
        print(f"calibrated on {len(samples)} samples in {time.perf_counter() - t0:.1f} s -> {work_dir}")
    else:
        stats = CalibStats(args.stats)
    t0 = time.perf_counter()
    qexperts, reports = quantize(pipe, recipe, CalibrationSource(stats), mode="fake")
    summary = {e: {p: [round(float(v), 2) for v in s.mean(axis=0)] for p, s in r["sqnr_db"].items()}
               for e, r in reports.items()}
    out = save_artifact(args.out, qexperts, recipe=recipe_to_dict(recipe), bins=stats.bins.to_dict(),
                        report={"mean_sqnr_db_per_bin": summary}, overwrite=args.overwrite)
    csv_path = f"{out}.sqnr.csv"
    with open(csv_path, "w") as f:
        f.write(sqnr_csv(reports, {e: stats.bins.expert_bins(e) for e in reports}))
    print(f"wrote {out} (recipe {recipe.name}) in {time.perf_counter() - t0:.1f} s; layer SQNR per bin: {csv_path}")
    return 0


def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="calibrate and quantize both experts (W4A4) into an artifact directory",
                       description=cmd_quantize.__doc__)
    p.add_argument("--model", required=True, help="model dir in the official or diffusers layout")
    p.add_argument("--recipe", default="default",
                   help="rtn, w8a8, smoothquant, quarot, svdquant, seed, binned, fast, default")
    p.add_argument("--calib", default=None, help="calibration samples (.jsonl: image, prompt, seed per line)")
    p.add_argument("--stats", default=None, help="reuse the work dir of an earlier calibration instead of --calib")
    p.add_argument("--work-dir", default=None, help="calibration statistics / progress (default: OUT.calib)")
    p.add_argument("--out", required=True, help="artifact directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--size", default="480p")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--shift", type=float, default=5.0)
    p.add_argument("--dtype", default="bfloat16", choices=_DTYPES)
    p.set_defaults(func=cmd_quantize)


def cmd_eval(args: argparse.Namespace) -> int:
    """``wanjax eval``: every recipe side by side against BF16 on an evaluation set disjoint from the calibration
    set (PSNR/SSIM of decoded frames, latent rel-L2, task metrics, weight bytes, wall time, per-layer SQNR heat maps,
    activation-range plots; ``--ablations`` adds the default recipe's ablations) -> ``OUT/report.md``.

    ``--eval-set`` / ``--calib-set``: JSON list (or JSON lines) of ``{"clip_seed": int, "split": "heldout"}``
    (a procedural clip: its first frame and caption) or ``{"image": path, "prompt": text}``, each with an optional
    noise ``"seed"`` (format: `wanjax.evaluation.run`)."""
    import jax.numpy as jnp

    from wanjax.evaluation.run import ABLATIONS, load_samples, run_eval
    from wanjax.io.errors import CheckpointError
    from wanjax.pipeline import GenerationConfig
    from wanjax.quant.recipes import RECIPES
    from wanjax.pipeline import WanI2VPipeline

    def fail(msg):
        print(f"wanjax eval: error: {msg}", file=sys.stderr)
        return 2

    recipes = [r for r in args.recipes.split(",") if r]
    bad = [r for r in recipes if r not in RECIPES]
    if bad or not recipes:
        return fail(f"--recipes: unknown {bad}; expected a comma list of {sorted(RECIPES)}")
    ablations = False
    if args.ablations:
        ablations = True if args.ablations == "all" else [a for a in args.ablations.split(",") if a]
        if ablations is not True and any(a not in ABLATIONS for a in ablations):
            return fail(f"--ablations: expected 'all' or a comma list of {list(ABLATIONS)}, got {args.ablations!r}")
    try:
        evs = load_samples(args.eval_set, args.frames, args.size)[:args.max_clips or None]
        cal = load_samples(args.calib_set, args.frames, args.size)
    except (OSError, ValueError, KeyError) as e:
        return fail(e)
    t0 = time.perf_counter()
    try:
        pipe = WanI2VPipeline.from_pretrained(args.model, dtype=jnp.dtype(args.dtype))
    except (CheckpointError, FileNotFoundError) as e:
        return fail(e)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s")
    guide = tuple(float(g) for g in args.guide.split(","))
    gen = GenerationConfig(num_frames=args.frames, max_area=args.size * args.size, steps=args.steps,
                           shift=args.shift, guide_scale=guide * 2 if len(guide) == 1 else guide)
    try:
        run_eval(pipe, evs, cal, gen, args.out, recipes=recipes, ablations=ablations, reservoir=args.reservoir,
                 calib_seed=args.calib_seed)
    except ValueError as e:
        return fail(e)
    print(f"wrote {args.out}/report.md")
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="compare quantization recipes side by side against BF16 (report.md + plots)",
                       description=cmd_eval.__doc__)
    p.add_argument("--model", required=True, help="model dir (official or diffusers layout), e.g. models/mini")
    p.add_argument("--recipes", default="rtn,smoothquant,quarot,svdquant,seed,default,w8a8")
    p.add_argument("--eval-set", required=True, help="evaluation samples (JSON list; see wanjax.evaluation.run)")
    p.add_argument("--calib-set", required=True, help="calibration samples, disjoint from --eval-set (same format)")
    p.add_argument("--out", required=True, help="report directory (report.md, results.json, plots/)")
    p.add_argument("--ablations", nargs="?", const="all", default=None,
                   help="also run the default recipe's ablations: all, or a comma list")
    p.add_argument("--max-clips", type=int, default=0, help="use only the first N evaluation samples (0: all)")
    p.add_argument("--frames", type=int, default=17, help="4n+1 frames (default 17, the mini model's)")
    p.add_argument("--size", type=int, default=128, help="square frame edge in pixels (default 128, the mini model's)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--shift", type=float, default=5.0)
    p.add_argument("--guide", default="3.5", help="guidance 'G' or 'LOW,HIGH'")
    p.add_argument("--reservoir", type=int, default=256, help="calibration rows kept per (layer input, step)")
    p.add_argument("--calib-seed", type=int, default=0,
                   help="seed of the calibration reservoir's row draw (repeat runs with other seeds for the spread)")
    p.add_argument("--dtype", default="bfloat16", choices=_DTYPES)
    p.set_defaults(func=cmd_eval)


def build_parser() -> argparse.ArgumentParser:
    """The ``wanjax`` argument parser with all subcommands."""
    parser = argparse.ArgumentParser(prog="wanjax", description="Wan2.2-I2V-A14B in JAX/Flax with W4A4 quantization")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_convert(sub)
    _add_generate(sub)
    _add_quantize(sub)
    _add_eval(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``wanjax`` console script."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
