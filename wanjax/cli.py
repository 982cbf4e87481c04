"""Command line: ``wanjax <subcommand> ...``.

One function per subcommand (``cmd_<name>(args) -> int``), registered in `build_parser`. Implemented: ``convert``,
``generate``, ``quantize``, ``eval``.

Conventions shared by every subcommand:

* Every setting and every input and output path is checked before any model is loaded; a problem is one line
  ``wanjax <cmd>: error: ...`` on stderr and exit status 2 (Ctrl-C: one line, exit status 130). ``--debug`` (before
  or after the subcommand) also prints the traceback.
* Sampling settings (``--frames``, ``--size``, ``--steps``, ``--shift``, ``--guidance``, ``--fps``, ...) default to
  the model's ``generation_config.json``, else the official Wan2.2-I2V-A14B defaults
  (`wanjax.generation_config.GenerationConfig.for_model`); the resolved settings are printed at start.
  ``--size`` is a maximum pixel area everywhere: ``480p``, ``720p``, ``WxH`` or a bare ``N`` meaning ``NxN``.
* An existing output is refused without ``--overwrite``, and an output that is, contains or lies inside an input is
  refused even with it (nothing given as input is ever deleted).
* JAX's persistent compilation cache is on (``$WANJAX_CACHE_DIR``, default ``~/.cache/wanjax/jax_compile``); opt out
  with ``--no-compile-cache`` or ``WANJAX_COMPILE_CACHE=0``.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import re
import shutil
import sys
import time

_DTYPES = ("bfloat16", "float32", "float16")
_QUANT_MODES = ("auto", "fake", "real")
_FROM_MODEL = "default: from the model's generation_config.json, else {}"

#: Environment variables of the compilation cache (`setup_compile_cache`).
CACHE_DIR_ENV = "WANJAX_CACHE_DIR"
COMPILE_CACHE_ENV = "WANJAX_COMPILE_CACHE"


class CLIError(Exception):
    """A user error: printed as the one line ``wanjax <cmd>: error: <message>``, exit status 2."""


# ----------------------------------------------------------------------------------------------- set-up
def default_cache_dir() -> str:
    """Where the CLI keeps JAX's compilation cache: ``$WANJAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/wanjax/jax_compile``
    (``~/.cache/wanjax/jax_compile``)."""
    if os.environ.get(CACHE_DIR_ENV):
        return os.path.expanduser(os.environ[CACHE_DIR_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "wanjax", "jax_compile")


def setup_compile_cache(enabled: bool = True) -> str | None:
    """Turn on JAX's persistent compilation cache (a repeated run skips compiling); returns its directory, or None
    when disabled (``enabled=False`` or ``WANJAX_COMPILE_CACHE=0``) or when JAX already has a cache dir configured
    (``JAX_COMPILATION_CACHE_DIR``: kept, its path returned). Every program compiled in 0.1 s or more is cached,
    whatever its size (JAX's defaults, 1 s, skip most of the small CPU programs)."""
    if not enabled or os.environ.get(COMPILE_CACHE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    import jax

    have = jax.config.jax_compilation_cache_dir
    path = have or default_cache_dir()
    if not have:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            print(f"wanjax: warning: compilation cache {path} not usable ({e}); running without it", file=sys.stderr)
            return None
        jax.config.update("jax_compilation_cache_dir", path)
        try:  # JAX decides once per process whether to use the cache: let an earlier decision be made again
            from jax.experimental.compilation_cache import compilation_cache

            compilation_cache.reset_cache()
        except (ImportError, AttributeError):  # pragma: no cover - older / newer JAX
            pass
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path


# ----------------------------------------------------------------------------------------------- checks
def parse_size(text: str, flag: str = "--size") -> str:
    """``--size``: ``480p`` / ``720p`` / ``WxH`` (maximum area W*H; the aspect ratio comes from the image) or a bare
    ``N`` meaning ``NxN``; returns the normalized string (``"128x128"``) or raises `CLIError`."""
    from wanjax.conditioning import max_area_from_size

    s = str(text).strip().lower()
    if re.fullmatch(r"\d+", s):
        s = f"{int(s)}x{int(s)}"
    try:
        max_area_from_size(s)
    except ValueError as e:
        raise CLIError(f"{flag} {text!r}: expected 480p, 720p, WxH (e.g. 832x480) or N (NxN); {e}") from None
    return s


def _area_edge(size: str) -> int:
    """Square edge (a multiple of 16) of about the area of ``size``: procedural clips are rendered square."""
    from wanjax.conditioning import max_area_from_size

    m = re.fullmatch(r"(\d+)x(\d+)", size)
    if m and m.group(1) == m.group(2):
        return int(m.group(1))
    return max(16, int(math.isqrt(max_area_from_size(size))) // 16 * 16)


def _parse_guidance(args) -> tuple[float | None, float | None]:
    """``--guidance G`` or ``LOW,HIGH`` (low-noise expert, high-noise expert), refined by ``--guidance-low`` /
    ``--guidance-high``; None where not given."""
    low = high = None
    g = getattr(args, "guidance", None)
    if g is not None:
        try:
            vals = [float(v) for v in str(g).split(",")]
            if len(vals) not in (1, 2):
                raise ValueError
        except ValueError:
            raise CLIError(
                f"--guidance expects 'G' or 'LOW,HIGH' (low-noise expert, high-noise expert), got {g!r}"
            ) from None
        low, high = (vals[0], vals[-1])
    if getattr(args, "guidance_low", None) is not None:
        low = args.guidance_low
    if getattr(args, "guidance_high", None) is not None:
        high = args.guidance_high
    for name, v in (("low", low), ("high", high)):
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise CLIError(f"--guidance ({name}-noise expert): expected a finite number >= 0, got {v!r}")
    return low, high


def resolve_generation(args, command: str):
    """The `GenerationConfig` of a run: the flags given (None = not given) over the model's
    ``generation_config.json`` over the official defaults; every value checked (flags by flag name first, then the
    resolved config: a bad ``generation_config.json`` is named). Raises `CLIError`."""
    from wanjax.conditioning import check_num_frames
    from wanjax.generation_config import GENERATION_CONFIG_FILE, GenerationConfig

    frames = getattr(args, "frames", None)
    if frames is not None:
        try:
            check_num_frames(frames)
        except ValueError as e:
            raise CLIError(f"--frames {frames}: {e}") from None
    for flag, v in (("--steps", getattr(args, "steps", None)), ("--fps", getattr(args, "fps", None))):
        if v is not None and v < 1:
            raise CLIError(f"{flag}: expected a positive integer, got {v}")
    shift = getattr(args, "shift", None)
    if shift is not None and not (math.isfinite(shift) and shift > 0):
        raise CLIError(f"--shift: expected a finite number > 0, got {shift!r}")
    size = parse_size(args.size) if getattr(args, "size", None) is not None else None
    low, high = _parse_guidance(args)
    over = dict(
        num_frames=frames,
        max_area=size,
        steps=getattr(args, "steps", None),
        shift=shift,
        guidance_low=low,
        guidance_high=high,
        solver=getattr(args, "solver", None),
        seed=getattr(args, "seed", None),
        fps=getattr(args, "fps", None),
    )
    src = os.path.join(args.model, GENERATION_CONFIG_FILE)
    try:
        if getattr(args, "lightning", None) is not None:  # model defaults < the Lightning preset < flags
            _warn_lightning_overrides(over, command)
            gen = GenerationConfig.lightning(GenerationConfig.for_model(args.model), **over)
        else:
            gen = GenerationConfig.for_model(args.model, **over)
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from None
    if hasattr(gen, "validate"):
        try:
            gen.validate(source=f"settings (flags over {src})" if os.path.isfile(src) else "settings")
        except ValueError as e:
            raise CLIError(str(e)) from None
    if not isinstance(gen.fps, int) or gen.fps < 1:
        raise CLIError(f"fps: expected a positive integer (from {src}), got {gen.fps!r}")
    return gen


#: setting -> the Lightning preset's value (`wanjax.generation_config.LIGHTNING`), for `_warn_lightning_overrides`
_LIGHTNING_SETTINGS = {"steps": 4, "shift": 5.0, "solver": "euler"}


def _warn_lightning_overrides(over: dict, command: str) -> None:
    """``--lightning`` with sampling flags that differ from the preset: the flags win (as in
    ``GenerationConfig.lightning(**overrides)``); one warning line names them."""
    diff = [f"--{k} {over[k]}" for k, want in _LIGHTNING_SETTINGS.items() if over.get(k) not in (None, want)]
    low, high = over.get("guidance_low"), over.get("guidance_high")
    if low not in (None, 1.0) or high not in (None, 1.0):
        diff.append(
            f"guidance {1.0 if low is None else low:g} (low-noise) / {1.0 if high is None else high:g} (high-noise)"
        )
    if diff:
        print(
            f"wanjax {command}: warning: --lightning with {', '.join(diff)}: the flags replace the preset's 4 Euler "
            "steps, shift 5, guidance 1 (what the Lightning LoRAs were distilled for)",
            file=sys.stderr,
        )


def _print_settings(gen, model: str) -> None:
    from wanjax.generation_config import GENERATION_CONFIG_FILE

    src = os.path.join(model, GENERATION_CONFIG_FILE)
    where = f"flags over {src}" if os.path.isfile(src) else "flags over the official Wan2.2 defaults"
    print(f"settings ({where}): {gen.describe()}", flush=True)


def _check_model_dir(model: str) -> None:
    if not os.path.exists(model):
        raise CLIError(f"--model {model}: no such directory")
    if not os.path.isdir(model):
        raise CLIError(f"--model {model}: expected a model directory (official or diffusers layout), got a file")


def _check_image(path: str, flag: str = "--image") -> None:
    """Exists, is a file and decodes as an image (`wanjax.conditioning.load_image`)."""
    from wanjax.conditioning import load_image

    if not os.path.exists(path):
        raise CLIError(f"{flag} {path}: no such file")
    if not os.path.isfile(path):
        raise CLIError(f"{flag} {path}: expected an image file, got a directory")
    if not os.access(path, os.R_OK):
        raise CLIError(f"{flag} {path}: not readable (permission denied)")
    try:
        load_image(path)
    except (ValueError, OSError) as e:
        raise CLIError(f"{flag} {path}: {e}") from None


def _writable_parent(path: str, flag: str) -> None:
    """The nearest existing ancestor of ``path``'s parent must be a writable directory (it is created if missing)."""
    d = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(d):
        d = os.path.dirname(d)
    if not os.path.isdir(d):
        raise CLIError(f"{flag} {path}: {d} is a file, not a directory")
    if not os.access(d, os.W_OK | os.X_OK):
        raise CLIError(f"{flag} {path}: directory {d} is not writable")


def _check_overlap(dst: str, *sources, flag: str) -> None:
    from wanjax.io.atomic import check_not_overlapping

    try:
        check_not_overlapping(dst, *sources, what=flag)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _check_out_file(path: str, exts: tuple[str, ...], overwrite: bool, sources: tuple, flag: str = "--out") -> None:
    """An output file: a known extension, not a directory, a writable (or creatable) parent, refused if it exists
    without ``--overwrite``, never one of the inputs."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in exts:
        raise CLIError(
            f"{flag} {path}: expected a file name ending in {' or '.join(exts)}, got "
            f"{repr(ext) if ext else 'no extension'}"
        )
    if os.path.isdir(path):
        raise CLIError(f"{flag} {path}: is a directory; expected a file name ending in {' or '.join(exts)}")
    _check_overlap(path, *sources, flag=flag)
    if os.path.exists(path) and not overwrite:
        raise CLIError(f"{flag} {path} exists (pass --overwrite to replace it)")
    _writable_parent(path, flag)


def _check_out_dir(path: str, overwrite: bool, sources: tuple, flag: str, reuse=None) -> None:
    """An output directory: not a file, refused if it exists (unless ``--overwrite``, or ``reuse(path)`` says it is
    an earlier run's to resume), never an input or around one, writable parent."""
    _check_overlap(path, *sources, flag=flag)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise CLIError(f"{flag} {path}: exists and is a file, expected a directory")
        if not overwrite and not (reuse and reuse(path)) and os.listdir(path):
            raise CLIError(f"{flag} {path} exists (pass --overwrite to replace it)")
    _writable_parent(path, flag)


def _supports(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _stage(msg: str) -> float:
    print(f"{msg} ...", flush=True)
    return time.perf_counter()


# ----------------------------------------------------------------------------------------------- convert
def cmd_convert(args: argparse.Namespace) -> int:
    """``wanjax convert SRC DST``: safetensors checkpoint (any supported layout) -> orbax cache directory."""
    import jax.numpy as jnp

    from wanjax.io.orbax_cache import convert

    if not os.path.exists(args.src):
        raise CLIError(f"{args.src}: no such checkpoint file or directory")
    _check_out_dir(args.dst, True, (args.src,), "DST")  # overlap / file / parent; existence: convert's own
    t0 = _stage(f"converting {args.src}")
    out = convert(
        args.src,
        args.dst,
        jnp.dtype(args.dtype),
        ignore_unknown=args.ignore_unknown,
        overwrite=args.overwrite,
        compress=args.compress,
    )
    print(f"wrote {out} ({args.dtype}) in {time.perf_counter() - t0:.1f} s")
    return 0


def _add_convert(sub, common) -> None:
    p = sub.add_parser(
        "convert",
        parents=[common],
        help="convert a DiT checkpoint (official / diffusers / ComfyUI safetensors) into a fast-loading orbax cache",
        description=cmd_convert.__doc__,
    )
    p.add_argument("src", help="expert dir, diffusers transformer dir, *.safetensors.index.json or .safetensors file")
    p.add_argument("dst", help="output directory (must not exist unless --overwrite; never the source or around it)")
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=_DTYPES,
        help="storage dtype of the large weights (modulation, norms, time embedding, head stay fp32; "
        "default: %(default)s)",
    )
    p.add_argument("--ignore-unknown", action="store_true", help="skip tensors that are not DiT parameters")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument(
        "--compress", action="store_true", help="zstd-compress the arrays (smaller, slower to load on few cores)"
    )
    p.set_defaults(func=cmd_convert)


# ----------------------------------------------------------------------------------------------- shared
def _make_mesh(args):
    if not getattr(args, "mesh", None):
        return None
    from wanjax.sharding import make_mesh

    try:
        return make_mesh(*(int(v) for v in args.mesh.split(",")))
    except ValueError as e:
        raise CLIError(f"--mesh {args.mesh!r}: {e}") from None


def _open_pipeline(args: argparse.Namespace, *, release_text_encoder: bool, mesh=None):
    """`WanI2VPipeline.from_pretrained(args.model)` with ``--dtype`` (and a mesh); a line before and after.

    ``release_text_encoder``: drop the text encoder after its first use (``generate``: one prompt); ``quantize`` and
    ``eval`` encode one prompt per sample and must keep it."""
    import jax.numpy as jnp

    from wanjax.pipeline import WanI2VPipeline

    t0 = _stage(f"loading {args.model} ({args.dtype})")
    pipe = WanI2VPipeline.from_pretrained(
        args.model, dtype=jnp.dtype(args.dtype), release_text_encoder=release_text_encoder, mesh=mesh
    )
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s", flush=True)
    return pipe


def resolve_quant_mode(mode: str, manifest: dict | None = None, mesh=None) -> tuple[str, str]:
    """``--quant-mode``: ``wanjax.quant.artifact.resolve_quant_mode`` (told the artifact's layer formats from its
    ``manifest`` and the mesh) where it exists, else ``auto`` -> ``real`` on a Hopper-or-newer NVIDIA GPU or a TPU,
    ``fake`` elsewhere; returns ``(mode, one-line reason)``."""
    try:
        from wanjax.quant.artifact import resolve_quant_mode as resolve
    except ImportError:
        resolve = None
    if resolve is not None:
        kw = {}
        if manifest is not None and _supports(resolve, "layers"):
            kw["layers"] = {
                f"{e}:{p}": c for e, m in manifest.get("experts", {}).items() for p, c in m.get("layers", {}).items()
            }
        if mesh is not None and _supports(resolve, "mesh"):
            kw["mesh"] = mesh
        return resolve(mode, **kw)
    if mode != "auto":
        return mode, "as asked (--quant-mode)"
    import jax

    dev = jax.devices()[0]
    if dev.platform == "tpu":
        return "real", "TPU: the Pallas TPU low-bit kernels"
    if dev.platform == "gpu":
        cc = getattr(dev, "compute_capability", None)
        try:
            ok = cc is not None and float(cc) >= 9.0
        except (TypeError, ValueError):
            ok = False
        if ok:
            return "real", f"NVIDIA GPU with compute capability {cc}: the Mosaic-GPU W4A4 kernels"
        return "fake", f"GPU {dev.device_kind} (compute capability {cc}) has no W4A4 kernel: simulated W4A4"
    return "fake", f"no low-bit kernels on {dev.platform}: simulated W4A4 (same numerics, not faster)"


# ----------------------------------------------------------------------------------------------- generate
def cmd_generate(args: argparse.Namespace) -> int:
    """``wanjax generate``: image + prompt -> mp4 (or GIF) with the two experts.

    Settings default to the model's ``generation_config.json`` (e.g. models/mini: 17 frames, 128x128, 20 steps),
    else the official ones (81 frames, 480p max area, 40 steps, shift 5.0, guidance 3.5/3.5, FlowUniPC). Everything
    is checked before the model is loaded; the video is written to a temporary file, verified, then renamed.

    ``--lora [high=|low=|both=]FILE[:STRENGTH]`` (repeatable) and ``--lightning [DIR]`` (the 4-step preset between
    the model's defaults and the flags, plus DIR's two LoRAs) are read and checked against the model's config before
    loading and applied after ``--quant`` attaches: merged into BF16 experts, extra low-rank rank on W4A4 ones
    (docs/LORA.md)."""
    import numpy as np

    from wanjax.video_io import VIDEO_EXTENSIONS, save_pngs, save_video, to_uint8

    qmode = args.quant_mode or "auto"
    if args.int8_weights and not (args.quant and qmode in ("real", "auto")):
        raise CLIError("--int8-weights needs --quant DIR and --quant-mode real")
    gen = resolve_generation(args, "generate")
    _check_model_dir(args.model)
    _check_image(args.image)
    manifest = None
    if args.quant:
        if not os.path.isfile(os.path.join(args.quant, "manifest.json")):
            raise CLIError(
                f"--quant {args.quant}: not a quantized-model directory (no manifest.json); write one "
                "with `wanjax quantize`"
            )
        from wanjax.quant.artifact import ArtifactError, read_manifest

        try:
            manifest = read_manifest(args.quant)  # format and checksum, before any model is loaded
        except (ArtifactError, OSError) as e:
            raise CLIError(f"--quant {args.quant}: {e}") from None
    lora_specs = lora_specs_from_args(args)
    sources = (args.model, args.image, args.quant, args.lightning or None) + tuple(s[2] for s in lora_specs)
    _check_out_file(args.out, VIDEO_EXTENSIONS, args.overwrite, sources)
    if args.png_dir:
        _check_out_dir(args.png_dir, args.overwrite, sources + (args.out,), "--png-dir")
    if args.force and not args.quant:
        raise CLIError("--force applies to --quant (use an artifact made from another model); no --quant given")
    loras = read_loras(lora_specs, args.model, args.lora_ignore_unknown)  # read and checked before the model loads
    cache = _step_cache(args, gen)  # the calibration is read and checked before any model is loaded
    mesh = _make_mesh(args)
    if args.quant:
        qmode, why = resolve_quant_mode(qmode, manifest, mesh)
        if args.int8_weights and qmode != "real":
            raise CLIError(f"--int8-weights needs --quant DIR and --quant-mode real (auto chose {qmode}: {why})")
    _print_settings(gen, args.model)

    pipe = _open_pipeline(args, release_text_encoder=True, mesh=mesh)
    if args.quant:
        from wanjax.quant.artifact import attach_artifact

        kw = {"int8_weights": args.int8_weights} if args.int8_weights else {}
        if args.force:
            if _supports(attach_artifact, "force"):
                kw["force"] = True
            else:
                print(
                    "wanjax generate: warning: --force ignored (this attach_artifact has no model check to override)",
                    file=sys.stderr,
                )
        mode_arg = args.quant_mode or "auto"
        if mode_arg == "auto" and not _auto_supported(attach_artifact):
            mode_arg = qmode  # resolved here: attach_artifact knows fake / real only
        t0 = _stage(f"attaching {args.quant} (quant mode {qmode}: {why})")
        manifest = attach_artifact(pipe, args.quant, mode=mode_arg, **kw)
        print(
            f"using the quantized experts of {args.quant} (recipe "
            f"{manifest.get('recipe', {}).get('name', '?')}, {qmode} mode) in {time.perf_counter() - t0:.1f} s"
        )
    if loras:  # after --quant: on W4A4 experts a LoRA is extra rank of the low-rank branch (nothing re-quantized)
        apply_loras(pipe, loras)
    if getattr(args, "attention", None):  # after --quant: an explicit backend wins over the recipe's
        from wanjax.model.attention import set_attention_backend

        set_attention_backend(args.attention)

    import jax

    from wanjax.pipeline import DEFAULT_NEGATIVE_PROMPT

    times = {}
    t0 = _stage("encoding the prompt (text encoder)")
    context = pipe.encode_text([args.prompt, args.negative_prompt or DEFAULT_NEGATIVE_PROMPT])
    times["text"] = time.perf_counter() - t0
    t0 = _stage("encoding the image (VAE)")
    y, (h, w) = pipe.prepare_condition(args.image, gen.num_frames, gen.max_area)
    jax.block_until_ready(y)
    times["vae_encode"] = time.perf_counter() - t0
    t0 = _stage(f"denoising: {gen.steps} steps, {gen.num_frames} frames at {w}x{h}")
    latents, _ = pipe.denoise(y, context, gen, progress=not args.no_progress, cache=cache)
    jax.block_until_ready(latents)
    times["denoise"] = time.perf_counter() - t0
    if cache is not None:
        print(f"{cache.summary()}: {cache.schedule} (C computed, S skipped)")
    t0 = _stage("decoding (VAE)")
    frames = to_uint8(np.asarray(pipe.decode(latents)))
    times["vae_decode"] = time.perf_counter() - t0
    save_video(frames, args.out, fps=gen.fps)
    if args.png_dir:
        save_pngs(frames, args.png_dir)
        print(f"wrote {frames.shape[0]} PNG frames to {args.png_dir}")
    print(
        f"wrote {args.out}: {frames.shape[0]} frames {frames.shape[2]}x{frames.shape[1]} at {gen.fps} fps; "
        + ", ".join(f"{k} {v:.1f}s" for k, v in times.items())
    )
    return 0


def parse_lora_arg(text: str, flag: str = "--lora") -> tuple[str, str, float]:
    """``--lora [high=|low=|both=]FILE[:STRENGTH]`` -> ``(expert, file, strength)``: expert ``both`` and strength 1
    unless given; a ``:`` is read as the strength separator only when the whole text is not an existing path.
    Raises `CLIError`."""
    expert, rest, strength = "both", str(text), 1.0
    m = re.match(r"(high|low|both)=(.*)$", rest, re.S)
    if m:
        expert, rest = m.group(1), m.group(2)
    m = re.fullmatch(r"(.*):([^:/\\]*)", rest, re.S)
    if m and not os.path.exists(rest):
        try:
            strength = float(m.group(2))
        except ValueError:
            raise CLIError(
                f"{flag} {text}: strength {m.group(2)!r} after ':' is not a number (expected "
                "[high=|low=|both=]FILE[:STRENGTH], e.g. low=style.safetensors:0.8)"
            ) from None
        rest = m.group(1)
    if not rest:
        raise CLIError(f"{flag} {text}: no file (expected [high=|low=|both=]FILE[:STRENGTH])")
    if not math.isfinite(strength):
        raise CLIError(f"{flag} {text}: strength must be a finite number, got {strength}")
    return expert, rest, strength


def lora_specs_from_args(args: argparse.Namespace) -> list[tuple[str, str, str, float]]:
    """The LoRA files of ``--lora`` (each `parse_lora_arg`) and ``--lightning DIR`` (its high- and low-noise files,
    `wanjax.lora.lightning_files`): ``[(flag, expert, path, strength)]``, nothing read yet. Raises `CLIError`."""
    specs = [(f"--lora {t}",) + parse_lora_arg(t) for t in (getattr(args, "lora", None) or [])]
    lightning = getattr(args, "lightning", None)
    if lightning:
        from wanjax.lora.lightning import lightning_files

        try:
            files = lightning_files(lightning)
        except FileNotFoundError as e:
            raise CLIError(f"--lightning {lightning}: {e}") from None
        specs += [(f"--lightning {lightning}", e, f, 1.0) for e, f in files.items()]
    if getattr(args, "lora_ignore_unknown", False) and not specs:
        raise CLIError("--lora-ignore-unknown applies to --lora FILE / --lightning DIR; neither was given")
    return specs


def _model_dit_config(model: str):
    """The DiT config of a model directory from its ``high_noise_model/config.json`` (official) or
    ``transformer/config.json`` (diffusers) without reading any weight; None when absent or unreadable (the
    loader reports that)."""
    from wanjax.config import config_from_json

    for sub in ("high_noise_model", "transformer"):
        path = os.path.join(model, sub, "config.json")
        if os.path.isfile(path):
            try:
                return config_from_json(path)
            except (OSError, ValueError, TypeError):
                return None
    return None


def read_loras(specs, model: str, ignore_unknown: bool = False) -> list[tuple]:
    """Read every LoRA file of ``specs`` (`lora_specs_from_args`) and check it (format, and module names and shapes
    against ``model``'s config when it has a ``config.json``) before any model is loaded:
    ``[(LoraWeights, expert, strength, flag)]``. A bad file is a `CLIError` naming the flag, file, key, expected and
    got; with ``ignore_unknown`` unknown keys are reported as a warning and skipped."""
    if not specs:
        return []
    from wanjax.lora import LoraError, read_lora

    cfg = _model_dit_config(model)
    out = []
    for flag, expert, path, strength in specs:
        if not os.path.exists(path):
            raise CLIError(f"{flag}: {path}: no such file")
        if os.path.isdir(path):
            raise CLIError(
                f"{flag}: {path}: is a directory; expected a LoRA .safetensors file (the two files of a Lightning "
                "release directory: --lightning DIR)"
            )
        if not os.access(path, os.R_OK):
            raise CLIError(f"{flag}: {path}: not readable (permission denied)")
        name = f"lightning-{expert}" if flag.startswith("--lightning") else ""
        try:
            lw = read_lora(path, cfg, ignore_unknown=ignore_unknown, name=name)
        except LoraError as e:
            raise CLIError(f"{flag}: {e}".replace("pass ignore_unknown=True", "pass --lora-ignore-unknown")) from None
        out.append((lw, expert, strength, flag))
    return out


def apply_loras(pipe, loras) -> list[str]:
    """Apply ``loras`` (`read_loras`) to the pipeline's experts (`wanjax.lora.apply_lora`: merged into BF16 experts,
    extra low-rank rank on W4A4 ones) and print one line per LoRA: name, expert, strength, rank, layers. Returns
    the names. A LoRA that does not fit the loaded experts is a `CLIError`."""
    from wanjax.lora import LoraError, apply_lora

    quantized = getattr(pipe, "quant_bins", None) is not None
    t0 = _stage(
        f"applying {len(loras)} LoRA file(s) "
        + ("as extra low-rank rank of the W4A4 experts" if quantized else "merged into the experts' weights")
    )
    names = []
    for lw, expert, strength, flag in loras:
        try:
            name = apply_lora(pipe, lw, expert=expert, strength=strength)
        except LoraError as e:
            raise CLIError(f"{flag}: {e}") from None
        ranks = "/".join(str(r) for r in sorted(set(lw.ranks.values()))) or "-"
        print(
            f"LoRA {name}: expert {expert}, strength {strength:g}, rank {ranks}, {len(lw.modules)} layers"
            + (f" + {len(lw.diffs)} full deltas" if lw.diffs else "")
            + (f", {len(lw.ignored)} unknown keys skipped" if lw.ignored else "")
            + f" ({lw.format})"
        )
        names.append(name)
    print(f"applied {len(names)} LoRA(s) in {time.perf_counter() - t0:.1f} s", flush=True)
    return names


def _step_cache(args: argparse.Namespace, gen):
    """``--cache [PATH]``: a `wanjax.sampling.cache.StepCache` from the calibration of ``gen``'s settings in PATH (a
    ``cache_calibration.json`` or a directory holding one; default: the --quant artifact's, else the model dir's);
    None without --cache."""
    if args.cache is None:
        return None
    from wanjax.sampling.cache import CacheCalibration, CacheCalibrationError, CacheConfig, StepCache

    where = args.cache or args.quant or args.model
    try:
        cal = CacheCalibration.load(where, gen.steps, gen.shift, gen.boundary, gen.solver)
        config = CacheConfig(threshold=args.cache_threshold, max_skips=args.cache_max_skips).validate()
    except (CacheCalibrationError, ValueError) as e:
        if args.quant and not args.cache and not os.path.isfile(CacheCalibration.path_of(args.quant)):
            raise CLIError(
                f"--cache: {args.quant} holds no step-cache calibration (cache_calibration.json): `wanjax quantize` "
                "writes one into the artifact unless --cache-samples 0 (or an older wanjax wrote it); quantize again, "
                "or pass --cache PATH"
            ) from None
        raise CLIError(f"--cache: {e}") from None
    if args.quant and cal.precision == "bf16" and not args.cache:
        print(f"wanjax generate: warning: --cache: {where} was calibrated on {cal.precision} experts", file=sys.stderr)
    return StepCache(config, cal)


def _auto_supported(attach_artifact) -> bool:
    """Whether ``attach_artifact`` resolves ``mode="auto"`` itself (the quant module defines `resolve_quant_mode`)."""
    import wanjax.quant.artifact as art

    return hasattr(art, "resolve_quant_mode")


def add_generation_flags(
    p, *, guidance: bool = True, solver: bool = False, seed: bool = False, fps: bool = False
) -> None:
    """The generation flags every command (and script) with generation settings shares: ``--frames``, ``--size``
    (one meaning everywhere: the maximum pixel area, `parse_size`), ``--steps``, ``--shift``, and as asked
    ``--guidance`` / ``--guidance-low`` / ``--guidance-high``, ``--solver``, ``--seed``, ``--fps``. Each defaults to
    None and is resolved by `resolve_generation` (flag > the model's generation_config.json > official)."""
    p.add_argument("--frames", type=int, default=None, help="number of frames, 4n+1 (" + _FROM_MODEL.format(81) + ")")
    p.add_argument(
        "--size",
        default=None,
        help="maximum pixel area: 480p, 720p, WxH (e.g. 832x480) or N for NxN; the aspect ratio comes "
        "from the image (" + _FROM_MODEL.format("480p") + ")",
    )
    p.add_argument("--steps", type=int, default=None, help="sampling steps (" + _FROM_MODEL.format(40) + ")")
    p.add_argument("--shift", type=float, default=None, help="flow shift (" + _FROM_MODEL.format(5.0) + ")")
    if guidance:
        p.add_argument("--guide", dest="guidance", default=None, help=argparse.SUPPRESS)  # old name
        p.add_argument(
            "--guidance",
            dest="guidance",
            default=None,
            metavar="G|LOW,HIGH",
            help="classifier-free guidance: one scale, or LOW,HIGH = low-noise expert, high-noise expert ("
            + _FROM_MODEL.format("3.5,3.5")
            + ")",
        )
        p.add_argument(
            "--guidance-low",
            type=float,
            default=None,
            metavar="G",
            help="guidance of the low-noise expert (overrides --guidance's)",
        )
        p.add_argument(
            "--guidance-high",
            type=float,
            default=None,
            metavar="G",
            help="guidance of the high-noise expert (overrides --guidance's)",
        )
    if solver:
        p.add_argument("--solver", default=None, choices=("unipc", "euler"), help=_FROM_MODEL.format("unipc"))
    if seed:
        p.add_argument("--seed", type=int, default=None, help="noise seed (" + _FROM_MODEL.format(0) + ")")
    if fps:
        p.add_argument(
            "--fps",
            type=int,
            default=None,
            help="frames per second of the video, a positive integer (" + _FROM_MODEL.format(16) + ")",
        )


def _add_generate(sub, common) -> None:
    p = sub.add_parser(
        "generate",
        parents=[common],
        help="image-to-video generation with both experts",
        description=cmd_generate.__doc__,
    )
    p.add_argument("--model", required=True, help="model dir in the official or diffusers layout, e.g. models/mini")
    p.add_argument("--image", required=True, help="first frame (any image file Pillow reads)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None, help="default: the official negative prompt")
    p.add_argument("--out", default="out.mp4", help="video file, .mp4 or .gif (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace --out (and --png-dir's frames) if they exist")
    p.add_argument("--png-dir", default=None, help="also write the frames as PNGs here")
    add_generation_flags(p, solver=True, seed=True, fps=True)
    p.add_argument("--dtype", default="bfloat16", choices=_DTYPES, help="default: %(default)s")
    p.add_argument("--quant", default=None, help="a quantized-model dir written by `wanjax quantize`")
    p.add_argument(
        "--quant-mode",
        default="auto",
        choices=_QUANT_MODES,
        help="with --quant: 'real' runs the low-bit kernels, 'fake' simulates W4A4 in bf16/fp32, 'auto' "
        "picks real where kernels exist (Hopper GPU, TPU) and says which (default: %(default)s)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="with --quant: use an artifact even if it was made from another model (warns)",
    )
    p.add_argument(
        "--attention",
        default=None,
        choices=("cudnn", "cudnn_fp8", "attn8", "chunked", "xla", "tpu"),
        help="attention backend (default: automatic, or the --quant recipe's; cudnn_fp8: cuDNN FP8 flash "
        "attention, Hopper GPUs; attn8: 8-bit attention with fine-grained scales, self-attention "
        "only: the jnp reference on CPU, the Pallas kernel on TPU; refused on GPUs until its kernel "
        "has been verified there)",
    )
    p.add_argument(
        "--int8-weights",
        action="store_true",
        help="with --quant-mode real: also keep the INT4 weights unpacked to int8 for the GEMM (1 byte a "
        "parameter more; equal or faster per linear, docs/BENCHMARKS.md)",
    )
    p.add_argument(
        "--mesh",
        default=None,
        help="device mesh 'data,fsdp,context,tensor' (-1 = the rest), e.g. "
        "'2,1,4,1' on 8 chips: CFG over data, sequence parallel over context",
    )
    p.add_argument(
        "--cache",
        nargs="?",
        const="",
        default=None,
        metavar="PATH",
        help="step caching (docs/CACHING.md): skip the block stack on steps where its residual changes little, "
        "reusing the last one; PATH is a cache_calibration.json or a dir holding one (default: the --quant dir's, "
        "else the --model dir's), calibrated for these steps/shift/boundary. Off by default",
    )
    p.add_argument(
        "--cache-threshold",
        type=float,
        default=0.1,
        help="with --cache: accumulated magnitude error allowed before a step is computed again (default: %(default)s)",
    )
    p.add_argument(
        "--cache-max-skips",
        type=int,
        default=2,
        help="with --cache: most steps skipped in a row (default: %(default)s)",
    )
    p.add_argument(
        "--lora",
        action="append",
        default=None,
        metavar="[high=|low=|both=]FILE[:STRENGTH]",
        help="apply a LoRA .safetensors (Lightning/official, diffusers/PEFT or kohya/ComfyUI keys) to the high-noise "
        "expert, the low-noise one or both (default: both) at STRENGTH (default 1); repeatable. Merged into BF16 "
        "experts; with --quant, extra rank of the W4A4 low-rank branch (docs/LORA.md)",
    )
    p.add_argument(
        "--lora-ignore-unknown",
        action="store_true",
        help="skip LoRA keys that name no layer of the model (listed in a warning) instead of refusing the file",
    )
    p.add_argument(
        "--lightning",
        nargs="?",
        const="",
        default=None,
        metavar="DIR",
        help="the Wan2.2-Lightning 4-step preset: 4 Euler steps on its schedule (shift 5, boundary 0.9), CFG off; "
        "DIR: a Lightning release directory whose high_noise_model / low_noise_model .safetensors are applied to "
        "their experts (without DIR the experts must already carry it). --steps / --shift / --solver / --guidance "
        "given as well replace the preset's (with a warning)",
    )
    p.add_argument("--no-progress", action="store_true", help="no per-step progress bar")
    p.set_defaults(func=cmd_generate)


# ----------------------------------------------------------------------------------------------- quantize
def _read_calib_file(path: str) -> list:
    """``--calib FILE.jsonl``: one ``{"image", "prompt", "seed"?, "negative_prompt"?}`` per line; relative image
    paths are relative to the file; every image is checked here."""
    import json

    from wanjax.quant.calibrate import CalibSample

    if not os.path.isfile(path):
        raise CLIError(f"--calib {path}: no such file")
    samples = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"--calib {path}: cannot read ({e})") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise CLIError(f"{path}:{i}: not a JSON object ({e})") from None
        if not isinstance(d, dict) or "image" not in d or "prompt" not in d:
            raise CLIError(
                f"{path}:{i}: each line needs 'image' and 'prompt', got "
                f"{sorted(d) if isinstance(d, dict) else type(d).__name__}"
            )
        img = (
            d["image"]
            if os.path.isabs(d["image"])
            else os.path.join(os.path.dirname(os.path.abspath(path)), d["image"])
        )
        if not os.path.exists(img) and os.path.exists(d["image"]):
            img = d["image"]  # relative to the working directory (the old behaviour)
        _check_image(img, flag=f"{path}:{i}: image")
        try:
            seed = int(d.get("seed", 0))
        except (TypeError, ValueError):
            raise CLIError(f"{path}:{i}: key 'seed': expected an integer, got {d.get('seed')!r}") from None
        samples.append(
            CalibSample(image=img, prompt=str(d["prompt"]), negative_prompt=d.get("negative_prompt"), seed=seed)
        )
    if not samples:
        raise CLIError(f"{path}: no calibration samples")
    return samples


def _is_calib_work_dir(path: str) -> bool:
    import json

    try:
        with open(os.path.join(path, "manifest.json")) as f:
            return str(json.load(f).get("format", "")).startswith("wanjax.calibration")
    except (OSError, ValueError, AttributeError):
        return False


def cmd_quantize(args: argparse.Namespace) -> int:
    """``wanjax quantize``: calibrate both experts (or reuse a calibration directory) and write a W4A4 artifact.

    ``--calib FILE.jsonl`` holds one JSON object per line: ``{"image": path, "prompt": text, "seed": int}``
    (``negative_prompt`` optional; image paths relative to the file). Calibration and quantization are streamed
    block group by group (`wanjax.quant.stream`) through a work dir (``--work-dir``, default ``OUT.calib``),
    resumable: re-running the same command continues an interrupted run from its last finished unit. A group's
    statistics are deleted once it is quantized (``--keep-calib`` keeps them and the work dir); the default work dir
    is removed once the artifact is written and always kept when the run fails. ``--calib-budget fast`` calibrates on
    the first 4 samples and 2 steps per timestep bin. ``--stats DIR`` quantizes from an earlier calibration instead."""
    from wanjax.quant.recipes import get_recipe

    if (args.calib is None) == (args.stats is None):
        raise CLIError("give exactly one of --calib FILE.jsonl (calibrate now) or --stats DIR (reuse a calibration)")
    auto_why = None
    if args.recipe == "auto":
        from wanjax.quant.recipes import auto_recipe

        args.recipe, auto_why = auto_recipe()
    try:
        recipe = get_recipe(args.recipe)
    except KeyError as e:
        raise CLIError(e.args[0]) from None
    samples = _read_calib_file(args.calib) if args.calib is not None else None
    budget = _calib_budget(args)
    if samples is not None:
        samples = budget.select(samples)
    _check_model_dir(args.model)
    if args.stats is not None and not (os.path.isdir(args.stats) and _is_calib_work_dir(args.stats)):
        raise CLIError(
            f"--stats {args.stats}: not a calibration directory (no manifest.json of format wanjax.calibration)"
        )
    if args.cache_samples < 0:
        raise CLIError(f"--cache-samples: expected 0 (no step-cache calibration) or more, got {args.cache_samples}")
    own_work = args.calib is not None and args.work_dir is None
    work_dir = (args.work_dir or f"{os.path.abspath(args.out)}.calib") if args.calib is not None else None
    _check_out_dir(args.out, args.overwrite, (args.model, args.stats, args.calib, work_dir), "--out")
    if work_dir is not None:
        _check_overlap(work_dir, args.model, args.calib, flag="--work-dir")
        if (
            os.path.exists(work_dir)
            and (not os.path.isdir(work_dir) or os.listdir(work_dir))
            and not _is_calib_work_dir(work_dir)
        ):
            raise CLIError(
                f"--work-dir {work_dir}: exists and is not a calibration work dir (no manifest.json of "
                "format wanjax.calibration); choose another --work-dir"
            )
        _writable_parent(work_dir, "--work-dir")
    if args.calib is not None:
        from wanjax.quant.calibrate import CalibConfig

        gen = resolve_generation(args, "quantize")
        try:
            CalibConfig(gen=gen).resolved()  # the timestep bins must fit the steps
        except ValueError as e:
            raise CLIError(f"--steps {gen.steps}: {e}") from None
        _print_settings(gen, args.model)

    # messages after every check of the arguments (a refused command prints its one error line only)
    if auto_why is not None:
        print(f"wanjax quantize: recipe {args.recipe} ({auto_why})")
    if args.stats is not None and args.cache_samples and not os.path.isdir(os.path.join(args.stats, "traj")):
        print(
            f"wanjax quantize: warning: --stats {args.stats} kept no trajectories (an online-mode calibration): "
            "no step-cache calibration is written (generate --cache needs one: docs/CACHING.md)",
            file=sys.stderr,
        )
        args.cache_samples = 0
    pipe = _open_pipeline(args, release_text_encoder=False)
    if samples is not None:
        try:
            _quantize_streamed(args, pipe, recipe, samples, gen, work_dir, budget)
        except BaseException:
            if os.path.isdir(work_dir):
                print(
                    f"wanjax quantize: calibration progress kept in {work_dir} (run the same command again to resume)",
                    file=sys.stderr,
                )
            raise
        if own_work and not args.keep_calib:
            shutil.rmtree(work_dir, ignore_errors=True)
            print(f"removed the calibration work dir {work_dir} (--keep-calib keeps it)")
        elif args.keep_calib:
            print(f"kept the calibration work dir {work_dir} (reuse it with --stats)")
        else:
            print(f"kept the calibration work dir {work_dir} (its statistics were deleted group by group)")
    else:
        import wanjax.quant.calibrate as qc

        if hasattr(qc, "check_calibration_model"):  # statistics of another model would quantize it wrongly
            try:
                qc.check_calibration_model(args.stats, pipe)
            except ValueError as e:
                raise CLIError(f"--stats {args.stats}: {e}") from None
        _write_artifact(args, pipe, recipe, qc.CalibStats(args.stats))
    return 0


def _calib_budget(args):
    """``--calib-budget`` (default ``seed``) with ``--calib-samples`` / ``--calib-steps-per-bin`` over its values
    (`wanjax.quant.stream.BUDGETS`); they apply to ``--calib`` only. Raises `CLIError`."""
    import dataclasses

    from wanjax.quant.stream import BUDGETS

    flags = {"--calib-budget": args.calib_budget, "--calib-samples": args.calib_samples}
    flags["--calib-steps-per-bin"] = args.calib_steps_per_bin
    given = [f for f, v in flags.items() if v is not None]
    if args.stats is not None and given:
        raise CLIError(f"{', '.join(given)}: a calibration budget applies to --calib (a new calibration), not --stats")
    if args.calib_samples is not None and args.calib_samples < 1:
        raise CLIError(f"--calib-samples: expected a positive integer, got {args.calib_samples}")
    if args.calib_steps_per_bin is not None and args.calib_steps_per_bin < 0:
        raise CLIError(f"--calib-steps-per-bin: expected 0 (every step) or more, got {args.calib_steps_per_bin}")
    over = {"samples": args.calib_samples, "steps_per_bin": args.calib_steps_per_bin}
    budget = BUDGETS[args.calib_budget or "seed"]
    return dataclasses.replace(budget, **{k: v for k, v in over.items() if v is not None})


def _quantize_streamed(args, pipe, recipe, samples, gen, work_dir: str, budget) -> str:
    """``--calib``: `wanjax.quant.stream.quantize_streamed` (capture and quantize block group by group, resumable,
    the artifact published when complete) and the layer SQNR table beside the artifact."""
    from wanjax.io.atomic import atomic_write
    from wanjax.quant.calibrate import CalibrationMismatchError
    from wanjax.quant.quantize import sqnr_csv
    from wanjax.quant.stream import calib_config, quantize_streamed

    resumed = os.path.isfile(os.path.join(work_dir, "manifest.json"))
    steps = f"{budget.steps_per_bin} steps per bin" if budget.steps_per_bin else "every step"
    t0 = _stage(
        f"calibrating and quantizing both experts block group by group (recipe {recipe.name}; budget {budget.name}: "
        f"{len(samples)} samples, {steps}) -> {work_dir}"
        + (" (resuming the earlier run there)" if resumed and not args.restart else "")
    )
    hook = _streamed_step_cache(args, pipe, recipe, work_dir) if getattr(args, "cache_samples", 0) > 0 else None
    try:
        res = quantize_streamed(
            pipe,
            samples,
            recipe,
            args.out,
            work_dir=work_dir,
            cfg=calib_config(recipe, gen, budget),
            keep_calib=args.keep_calib,
            overwrite=args.overwrite,
            restart=args.restart,
            inputs=tuple(p for p in (args.model, args.calib) if p),
            before_publish=hook,
        )
    except CalibrationMismatchError as e:
        raise CLIError(f"{e} (pass --restart to discard it and calibrate again)") from None
    csv_path = f"{res.out}.sqnr.csv"
    with atomic_write(csv_path) as f:
        f.write(sqnr_csv(res.reports, {e: res.bins.expert_bins(e) for e in res.reports}))
    print(f"wrote {res.out} (recipe {recipe.name}) in {time.perf_counter() - t0:.1f} s; layer SQNR per bin: {csv_path}")
    return res.out


def _streamed_step_cache(args, pipe, recipe, work_dir: str):
    """The streamed run's ``before_publish``: the step cache's calibration (`_artifact_step_cache`) of the experts
    staged for publication, saved into the artifact; its report entry goes into the manifest."""

    def hook(staging: str) -> dict:
        from wanjax.quant.artifact import load_artifact
        from wanjax.quant.calibrate import CalibStats
        from wanjax.quant.recipes import recipe_to_dict

        qexperts, _ = load_artifact(staging)
        cal = _artifact_step_cache(args, pipe, qexperts, CalibStats(work_dir), recipe_to_dict(recipe))
        cal.save(staging)
        return {"step_cache": {"file": "cache_calibration.json", "precision": cal.precision, "samples": cal.samples}}

    return hook


def _write_artifact(args, pipe, recipe, stats) -> str:
    import functools

    from wanjax.io.atomic import atomic_write
    from wanjax.quant.artifact import save_artifact
    from wanjax.quant.quantize import CalibrationSource, quantize, sqnr_csv
    from wanjax.quant.recipes import recipe_to_dict

    t0 = _stage(f"quantizing both experts (recipe {recipe.name})")
    qexperts, reports = quantize(pipe, recipe, CalibrationSource(stats), mode="fake")
    summary = {
        e: {p: [round(float(v), 2) for v in s.mean(axis=0)] for p, s in r["sqnr_db"].items()}
        for e, r in reports.items()
    }
    report = {"mean_sqnr_db_per_bin": summary}
    kw, save = {}, save_artifact
    if getattr(args, "cache_samples", 0) > 0:
        from wanjax.quant.step_cache import save_artifact_with_cache

        cal = _artifact_step_cache(args, pipe, qexperts, stats, recipe_to_dict(recipe))
        save = functools.partial(save_artifact_with_cache, calibration=cal)  # published with the artifact
        report["step_cache"] = {"file": "cache_calibration.json", "precision": cal.precision, "samples": cal.samples}
    if _supports(save_artifact, "source"):
        kw["source"] = pipe  # the model's fingerprint: generate --quant checks it
    if _supports(save_artifact, "inputs"):
        kw["inputs"] = tuple(p for p in (args.model, args.stats, args.calib, args.work_dir) if p)
    out = save(
        args.out,
        qexperts,
        recipe=recipe_to_dict(recipe),
        bins=stats.bins.to_dict(),
        report=report,
        overwrite=args.overwrite,
        **kw,
    )
    csv_path = f"{out}.sqnr.csv"
    with atomic_write(csv_path) as f:
        f.write(sqnr_csv(reports, {e: stats.bins.expert_bins(e) for e in reports}))
    print(f"wrote {out} (recipe {recipe.name}) in {time.perf_counter() - t0:.1f} s; layer SQNR per bin: {csv_path}")
    return out


def _artifact_step_cache(args, pipe, qexperts, stats, recipe: dict):
    """The step cache's calibration of the quantized experts (`wanjax.quant.step_cache.artifact_step_cache`) on the
    first ``--cache-samples`` calibration samples; per-sample progress is kept in the work dir, unless that is the
    ``--stats`` input."""
    from wanjax.quant.step_cache import artifact_step_cache

    n = min(args.cache_samples, int(stats.manifest.get("samples", args.cache_samples)))
    t0 = _stage(
        f"calibrating the step cache: {n} uncached guided run(s) with the quantized experts "
        "(--no-cache-calibration skips it)"
    )
    cal = artifact_step_cache(
        pipe, qexperts, stats, recipe, samples=n, resume=args.stats is None, log=lambda m: print(m, flush=True)
    )
    print(f"calibrated the step cache ({cal.precision}, {cal.samples} runs) in {time.perf_counter() - t0:.1f} s")
    return cal


def _recipe_help() -> str:
    from wanjax.quant.recipes import RECIPES

    return (
        "quantization recipe, one of: auto, " + ", ".join(RECIPES) + " (default: %(default)s: w4a8 on a Hopper GPU, "
        "where INT8 activations cost no GEMM time, else default; docs/QUANTIZATION.md)"
    )


def _add_quantize(sub, common) -> None:
    p = sub.add_parser(
        "quantize",
        parents=[common],
        help="calibrate and quantize both experts (W4A4) into an artifact directory",
        description=cmd_quantize.__doc__,
    )
    p.add_argument("--model", required=True, help="model dir in the official or diffusers layout")
    p.add_argument("--recipe", default="auto", help=_recipe_help())
    p.add_argument("--calib", default=None, help="calibration samples (.jsonl: image, prompt, seed per line)")
    p.add_argument("--stats", default=None, help="reuse the work dir of an earlier calibration instead of --calib")
    p.add_argument(
        "--work-dir",
        default=None,
        help="calibration statistics and progress, resumable (default: OUT.calib, removed when the "
        "artifact is written unless --keep-calib; a --work-dir given is always kept)",
    )
    p.add_argument("--keep-calib", action="store_true", help="keep the default work dir OUT.calib after success")
    p.add_argument(
        "--restart",
        action="store_true",
        help="discard an earlier calibration in the work dir made from other samples or settings",
    )
    p.add_argument(
        "--calib-budget",
        default=None,
        choices=("seed", "fast"),
        help="calibration budget: seed (every --calib sample, every step of every timestep bin: the seed's 12 "
        "samples x 40 steps; the default) or fast (the first 4 samples, 2 steps per bin; docs/QUANTIZATION.md)",
    )
    p.add_argument("--calib-samples", type=int, default=None, metavar="N", help="the first N --calib samples only")
    p.add_argument(
        "--calib-steps-per-bin", type=int, default=None, metavar="K", help="capture K steps per timestep bin (0: all)"
    )
    p.add_argument("--out", required=True, help="artifact directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (never an input)")
    add_generation_flags(p, guidance=False)
    p.add_argument("--dtype", default="bfloat16", choices=_DTYPES, help="default: %(default)s")
    p.add_argument(
        "--cache-samples",
        type=int,
        default=2,
        metavar="N",
        help="calibrate the step cache (generate --cache) on the first N calibration samples with the quantized "
        "experts and store it in OUT/cache_calibration.json: one uncached guided run each (default: %(default)s; "
        "0: none)",
    )
    p.add_argument(
        "--no-cache-calibration",
        dest="cache_samples",
        action="store_const",
        const=0,
        help="write no step-cache calibration (same as --cache-samples 0)",
    )
    p.set_defaults(func=cmd_quantize)


# ----------------------------------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> int:
    """``wanjax eval``: every recipe side by side against BF16 on an evaluation set disjoint from the calibration
    set (PSNR/SSIM of decoded frames, latent rel-L2, task metrics, weight bytes, wall time, per-layer SQNR heat maps,
    activation-range plots; ``--ablations`` adds the default recipe's ablations) -> ``OUT/report.md``.

    ``--eval-set`` / ``--calib-set``: JSON list (or JSON lines) of ``{"clip_seed": int, "split": "heldout"}``
    (a procedural clip: its first frame and caption) or ``{"image": path, "prompt": text}``, each with an optional
    noise ``"seed"`` (format: `wanjax.evaluation.run`). Settings default to the model's generation_config.json."""
    from wanjax.evaluation.run import check_disjoint, check_settings, load_samples, run_eval
    from wanjax.evaluation.variants import ABLATIONS, plan_variants
    from wanjax.quant.recipes import RECIPES

    recipes = [r for r in args.recipes.split(",") if r]
    bad = [r for r in recipes if r not in RECIPES]
    if bad or not recipes:
        raise CLIError(f"--recipes: unknown {bad}; expected a comma list of {list(RECIPES)}")
    ablations = False
    if args.ablations:
        ablations = True if args.ablations == "all" else [a for a in args.ablations.split(",") if a]
        if ablations is not True and any(a not in ABLATIONS for a in ablations):
            raise CLIError(f"--ablations: expected 'all' or a comma list of {list(ABLATIONS)}, got {args.ablations!r}")
    if args.max_clips < 0:
        raise CLIError(f"--max-clips: expected 0 (all) or a positive integer, got {args.max_clips}")
    if args.reservoir < 1:
        raise CLIError(f"--reservoir: expected a positive integer, got {args.reservoir}")
    _check_model_dir(args.model)
    for flag, path in (("--eval-set", args.eval_set), ("--calib-set", args.calib_set)):
        if not os.path.isfile(path):
            raise CLIError(f"{flag} {path}: no such file")
    gen = resolve_generation(args, "eval")
    try:
        check_settings(gen, plan_variants(recipes, ablations))
    except ValueError as e:
        raise CLIError(f"--steps: {e}") from None
    _check_out_dir(
        args.out,
        args.overwrite,
        (args.model, args.eval_set, args.calib_set),
        "--out",
        reuse=lambda d: os.path.isfile(os.path.join(d, "results.json")) or os.path.isdir(os.path.join(d, "work")),
    )
    edge = _area_edge(gen.max_area)
    try:
        evs = load_samples(args.eval_set, gen.num_frames, edge)[: args.max_clips or None]
        cal = load_samples(args.calib_set, gen.num_frames, edge)
        for flag, ss in (("--eval-set", evs), ("--calib-set", cal)):
            for s in ss:
                if isinstance(s.image, str):
                    _check_image(s.image, flag=f"{flag} image")
        check_disjoint(evs, cal)
    except (OSError, ValueError, KeyError) as e:
        raise CLIError(str(e)) from None
    cache = _eval_cache(args, gen)
    _print_settings(gen, args.model)
    pipe = _open_pipeline(args, release_text_encoder=False)
    run_eval(
        pipe,
        evs,
        cal,
        gen,
        args.out,
        recipes=recipes,
        ablations=ablations,
        reservoir=args.reservoir,
        calib_seed=args.calib_seed,
        log=lambda s: print(s, flush=True),
        **({"cache": cache} if cache is not None else {}),
    )
    print(f"wrote {args.out}/report.md")
    return 0


def _eval_cache(args: argparse.Namespace, gen):
    """``eval --cache [PATH]``: a `wanjax.evaluation.cache.CacheEval` (PATH's calibration read and checked against
    ``gen`` here, before any model is loaded); None without --cache."""
    if args.cache is None:
        return None
    from wanjax.evaluation.cache import CacheEval
    from wanjax.sampling.cache import CacheCalibration, CacheCalibrationError, CacheConfig

    try:
        spec = CacheEval(
            CacheConfig(threshold=args.cache_threshold, max_skips=args.cache_max_skips),
            calibration=args.cache or None,
            samples=args.cache_samples,
        ).validate()
        if spec.calibration is not None:
            CacheCalibration.load(spec.calibration, gen.steps, gen.shift, gen.boundary, gen.solver)
    except (CacheCalibrationError, ValueError) as e:
        raise CLIError(f"--cache: {e}") from None
    return spec


def _add_eval(sub, common) -> None:
    from wanjax.quant.recipes import RECIPES

    p = sub.add_parser(
        "eval",
        parents=[common],
        help="compare quantization recipes side by side against BF16 (report.md + plots)",
        description=cmd_eval.__doc__,
    )
    p.add_argument("--model", required=True, help="model dir (official or diffusers layout), e.g. models/mini")
    p.add_argument(
        "--recipes",
        default="rtn,smoothquant,quarot,svdquant,seed,default,w8a8",
        help="comma list of recipes from: " + ", ".join(RECIPES) + " (default: %(default)s)",
    )
    p.add_argument("--eval-set", required=True, help="evaluation samples (JSON list; see wanjax.evaluation.run)")
    p.add_argument("--calib-set", required=True, help="calibration samples, disjoint from --eval-set (same format)")
    p.add_argument(
        "--out",
        required=True,
        help="report directory (report.md, results.json, plots/); an earlier report dir there is resumed",
    )
    p.add_argument("--overwrite", action="store_true", help="write into an existing --out that is not a report dir")
    p.add_argument(
        "--ablations",
        nargs="?",
        const="all",
        default=None,
        help="also run the default recipe's ablations: all, or a comma list",
    )
    p.add_argument("--max-clips", type=int, default=0, help="use only the first N evaluation samples (0: all)")
    add_generation_flags(p)
    p.add_argument(
        "--reservoir",
        type=int,
        default=256,
        help="calibration rows kept per (layer input, step) (default: %(default)s)",
    )
    p.add_argument(
        "--calib-seed",
        type=int,
        default=0,
        help="seed of the calibration reservoir's row draw (repeat runs with other seeds for the spread)",
    )
    p.add_argument("--dtype", default="bfloat16", choices=_DTYPES, help="default: %(default)s")
    p.add_argument(
        "--cache",
        nargs="?",
        const="",
        default=None,
        metavar="PATH",
        help="also run BF16 and every variant with the step cache (docs/CACHING.md) and compare each with its own "
        "uncached run; calibrated per precision on the calibration set (--cache-samples), or PATH's "
        "cache_calibration.json for all",
    )
    p.add_argument(
        "--cache-threshold", type=float, default=0.1, help="with --cache: the skip threshold (default: %(default)s)"
    )
    p.add_argument(
        "--cache-max-skips",
        type=int,
        default=2,
        help="with --cache: most steps skipped in a row (default: %(default)s)",
    )
    p.add_argument(
        "--cache-samples",
        type=int,
        default=2,
        metavar="N",
        help="with --cache: calibration-set samples the cache is calibrated on, per precision (default: %(default)s)",
    )
    p.set_defaults(func=cmd_eval)


# ----------------------------------------------------------------------------------------------- main
def _common_flags(top: bool) -> argparse.ArgumentParser:
    """``--debug`` / ``--no-compile-cache``, accepted before and after the subcommand (SUPPRESS in the
    subcommands so that they do not reset the global value)."""
    p = argparse.ArgumentParser(add_help=False)
    d = {} if top else {"default": argparse.SUPPRESS}
    p.add_argument("--debug", action="store_true", help="print the traceback of an error", **d)
    p.add_argument(
        "--no-compile-cache",
        action="store_true",
        help=f"do not use JAX's persistent compilation cache (${CACHE_DIR_ENV}, default "
        f"~/.cache/wanjax/jax_compile; also {COMPILE_CACHE_ENV}=0)",
        **d,
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    """The ``wanjax`` argument parser with all subcommands."""
    import wanjax

    parser = argparse.ArgumentParser(
        prog="wanjax", parents=[_common_flags(True)], description="Wan2.2-I2V-A14B in JAX/Flax with W4A4 quantization"
    )
    parser.add_argument("--version", action="version", version=f"wanjax {wanjax.__version__}")
    common = _common_flags(False)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_convert(sub, common)
    _add_generate(sub, common)
    _add_quantize(sub, common)
    _add_eval(sub, common)
    return parser


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split("\n")).strip() or repr(e)
    if isinstance(e, CLIError):
        return msg
    return f"{type(e).__name__}: {msg}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``wanjax`` console script; returns the exit status (0 ok, 2 error, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse's own errors (exit 2), --help and --version (0)
        return int(e.code or 0) if isinstance(e.code, (int, type(None))) else 2
    cmd = f"wanjax {args.command}"
    import warnings

    show = warnings.showwarning

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        if args.debug:
            return show(message, category, filename, lineno, file, line)
        print(f"{cmd}: warning: {' '.join(str(message).splitlines())}", file=sys.stderr)

    warnings.showwarning = one_line_warning
    try:
        cache = setup_compile_cache(not args.no_compile_cache)
        if cache and args.debug:
            print(f"compilation cache: {cache}", file=sys.stderr)
        return args.func(args)
    except KeyboardInterrupt:
        print(f"\n{cmd}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            import traceback

            traceback.print_exc()
        print(f"{cmd}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = show


if __name__ == "__main__":
    sys.exit(main())
