"""Image-to-video generation with the two Wan2.2 experts: encode -> denoise (expert switch, CFG) -> decode.

One jitted function (`wanjax.sampling.guided_velocity`, the classifier-free-guided forward of one expert) takes the
expert's parameters as an argument, so a single compilation serves both experts; the loop is
`wanjax.sampling.sample`, the project's one denoise loop.

    pipe = WanI2VPipeline.from_pretrained("models/mini")             # a local dir (official or diffusers layout)
    frames = pipe("input.jpg", "a cat surfing")                       # uint8 [F, H, W, 3], the model's own defaults
    out = pipe.generate("input.jpg", "a cat surfing", seed=1, num_inference_steps=10)   # I2VOutput
    save_mp4(out.frames, "out.mp4", fps=out.gen.fps)                 # wanjax.video_io.save_mp4

Settings: ``generate(gen=None)`` starts from ``pipe.generation_defaults`` (official defaults < a diffusers layout's
``boundary_ratio`` / ``flow_shift`` < the model's ``generation_config.json``, see `wanjax.generation_config`), then
applies keyword overrides: `GenerationConfig` fields, ``guidance_low`` / ``guidance_high``, or the diffusers names
(``num_inference_steps``, ``height``/``width``, ``guidance_scale``/``guidance_scale_2``, ``output_type``). Settings
are validated before any work (`GenerationConfig.validate`); a NaN/Inf in the latent stops the loop with a
`NonFiniteError` naming the expert, the step and the first layer that produced it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wanjax import conditioning
from wanjax.generation_config import GenerationConfig, apply_overrides  # noqa: F401  (re-exported)
from wanjax.kernels.attention8 import attention8
from wanjax.model.attention import register_attention_backend
from wanjax.model.dit import WanDiT
from wanjax.nonfinite import NonFiniteError, all_finite, check_finite_params, locate_nonfinite  # noqa: F401
from wanjax.sampling import sample
from wanjax.sampling.guidance import guided_velocity
from wanjax.video_io import to_uint8

# "attn8" (8-bit attention) lives in kernels/, which the model layer may not import: the app layer plugs it in.
register_attention_backend("attn8", attention8)

#: Official default negative prompt (``sample_neg_prompt`` in Wan2.2's shared config).
DEFAULT_NEGATIVE_PROMPT = conditioning.NEGATIVE_PROMPT


#: ``output_type`` values of `WanI2VPipeline.generate`.
OUTPUT_TYPES = (None, "uint8", "np", "pil", "latent")

#: Keyword arguments of `WanI2VPipeline.generate` besides the settings (listed in its TypeError).
GENERATE_ARGS = ("image", "prompt", "negative_prompt", "gen", "context", "noise", "progress", "output_type", "cache")


@dataclasses.dataclass
class I2VOutput:
    """Result of a generation.

    ``frames``: by ``output_type``: uint8 [F, H, W, 3] (default, ``"uint8"``), float32 [F, H, W, 3] in [0, 1]
    (``"np"``, as diffusers), a list of ``PIL.Image`` (``"pil"``), or ``None`` (``"latent"``: the VAE decode is
    skipped). ``latents``: the final latents [1, F_lat, h, w, 16] (channels-last). ``timesteps`` and ``experts``:
    what ran at each step; ``seconds``: time per stage; ``gen``: the resolved settings.
    """

    frames: Any
    latents: np.ndarray
    timesteps: np.ndarray
    experts: list[str]
    seconds: dict[str, float]
    gen: GenerationConfig | None = None
    cache: Any = None


class WanI2VPipeline:
    """The Wan2.2 I2V pipeline over two DiT experts, a Wan VAE, and a UMT5 encoder + tokenizer.

    Args:
      high, low: the high-noise (t >= boundary * 1000) and low-noise experts (`WanDiT`, same config and dtype).
      vae: `wanjax.model.vae.WanVAE`.
      text_encoder, tokenizer: `wanjax.model.t5.UMT5Encoder` and `wanjax.text.PromptTokenizer`; may be None if
        contexts are passed to `generate` directly.
      release_text_encoder: drop the text encoder after the first encoding (frees its memory; the official code
        offloads it too).
      mesh: optional `jax.sharding.Mesh` from `wanjax.sharding.make_mesh`: the experts' weights are sharded by the
        rule table, the denoise step runs with CFG's (cond, uncond) over "data" and sequence-parallel attention
        (``attention_mode``: "auto", "ulysses" or "ring") over "context". Text encoder and VAE run unsharded.
      expert_placement: "device" keeps both experts on the accelerator; "swap" keeps only the active one there and the
        other in host memory, swapping once per video at the boundary (timesteps only decrease); "auto" (default)
        picks "swap" when the two experts take more than 60 % of the device's memory (e.g. two BF16 A14B experts,
        57 GB, on an 80 GB card), else "device". Ignored (always "device") with a mesh.
    """

    def __init__(
        self,
        high: WanDiT,
        low: WanDiT,
        vae,
        text_encoder=None,
        tokenizer=None,
        *,
        release_text_encoder: bool = False,
        mesh=None,
        attention_mode: str = "auto",
        expert_placement: str = "auto",
    ):
        g_high, self._params_high = nnx.split(high)
        g_low, self._params_low = nnx.split(low)
        if g_high != g_low:
            raise ValueError("the two experts must share config and dtype (their module graphs differ)")
        self.graphdef = g_high
        self.cfg = high.cfg
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.release_text_encoder = release_text_encoder
        self.mesh = mesh
        self.attention_mode = attention_mode
        if mesh is not None:
            self._params_high, self._params_low = self._shard(self._params_high), self._shard(self._params_low)
        self._velocity = self._jit_velocity(guided_velocity)
        self._velocity_fn = guided_velocity  # unjitted: the step cache splits it at the block stack
        self._cached = None  # (compute, skip) jitted on the first cached run
        self.expert_placement = "device" if mesh is not None else self._choose_placement(expert_placement)
        self.swaps = 0
        self._resident = "high"
        if self.expert_placement == "swap":
            self._params_low = jax.device_get(self._params_low)  # host memory until the boundary
        #: Settings `generate` starts from (`from_pretrained` reads the model's own; else the official defaults).
        self.generation_defaults = GenerationConfig()
        #: The local model directory `from_pretrained` loaded (a Hub snapshot for a repo id); None otherwise.
        self.model_dir: str | None = None

    def _shard(self, params):
        from wanjax import sharding

        return sharding.shard_params(params, self.mesh)

    def _jit_velocity(self, velocity_fn: Callable) -> Callable:
        """``velocity_fn(graphdef, params, x, y, ctx, t, guide, constrain=None)`` jitted for this pipeline: plain
        ``jax.jit`` on one device, `wanjax.sharding.sharded_velocity` on a mesh."""
        g = self.graphdef
        if self.mesh is None:
            return jax.jit(lambda params, x, y, ctx, t, guide: velocity_fn(g, params, x, y, ctx, t, guide))
        from wanjax import sharding

        return sharding.sharded_velocity(velocity_fn, g, self.mesh, mode=self.attention_mode)

    def _jit_cached(self) -> tuple[Callable, Callable, Callable]:
        """The step cache's jitted functions (`wanjax.sampling.cache`): ``compute(params, x, y, ctx, t, guide) ->
        (v, residual)``, ``skip(params, x, y, ctx, t, guide, residual) -> (v, residual)`` and ``indicator(params, x,
        y, ctx, t, guide)`` (TeaCache's modulated input; embeddings only). The velocity of quantized experts tells how to run a step through its ``step_context(t)``
        attribute (`wanjax.quant.apply`: the active timestep bin); another custom velocity cannot be split."""
        if self._cached is not None:
            return self._cached
        from wanjax.sampling.cache import cached_guided_indicator, cached_guided_velocity

        vfn = self._velocity_fn
        step_context = getattr(vfn, "step_context", None)
        if vfn is not guided_velocity and step_context is None:
            raise ValueError(
                "cache: this pipeline denoises with a custom velocity (replace_experts(velocity=...)) that has no "
                "step_context; the step cache can split only wanjax.sampling.guided_velocity and the quantized "
                "experts' velocity (wanjax.quant.apply.attach_to_pipeline)"
            )
        g, mesh = self.graphdef, self.mesh

        def run(params, x, y, ctx, t, guide, residual, constrain=None):
            with step_context(t) if step_context is not None else contextlib.nullcontext():
                return cached_guided_velocity(g, params, x, y, ctx, t, guide, residual, constrain=constrain)

        def indicator(params, x, y, ctx, t, guide, constrain=None):
            return cached_guided_indicator(g, params, x, y, ctx, t, constrain=constrain)

        if mesh is None:
            compute = jax.jit(lambda p, x, y, ctx, t, guide: run(p, x, y, ctx, t, guide, None))
            self._cached = (compute, jax.jit(run), jax.jit(indicator))
            return self._cached
        from jax.sharding import NamedSharding, PartitionSpec

        from wanjax import sharding

        rep = NamedSharding(mesh, PartitionSpec())

        def traced(params, x, y, ctx, t, guide, residual=None):
            with sharding.sequence_parallel(mesh, mode=self.attention_mode):
                v, r = run(params, x, y, ctx, t, guide, residual, lambda a: sharding.constrain_batch(a, mesh))
            return jax.lax.with_sharding_constraint(v, rep), r

        jc, js = jax.jit(lambda p, x, y, ctx, t, guide: traced(p, x, y, ctx, t, guide)), jax.jit(traced)
        ji = jax.jit(
            lambda p, x, y, ctx, t, guide: indicator(
                p, x, y, ctx, t, guide, lambda a: sharding.constrain_batch(a, mesh)
            )
        )

        def place(x, y, ctx):
            return tuple(jax.device_put(a, rep) for a in (x, y, ctx))

        self._cached = (
            lambda p, x, y, ctx, t, guide: jc(p, *place(x, y, ctx), t, guide),
            lambda p, x, y, ctx, t, guide, r: js(p, *place(x, y, ctx), t, guide, r),
            lambda p, x, y, ctx, t, guide: ji(p, *place(x, y, ctx), t, guide),
        )
        return self._cached

    def replace_experts(self, high: nnx.Module, low: nnx.Module, velocity: Callable | None = None) -> None:
        """Denoise with other experts from now on (e.g. quantized ones from `wanjax.quant`).

        ``high`` and ``low`` must share one module graph. ``velocity`` is the guided velocity
        ``fn(graphdef, params, x, y, ctx, t, guide, constrain=None)`` (default: `wanjax.sampling.guided_velocity`),
        jitted here; with a mesh the experts' parameters are sharded by the rule table and the velocity is jitted for
        the mesh. The
        expert placement policy is kept. A NaN/Inf in either expert's parameters (float weights, scales, tables)
        raises `wanjax.io.errors.CheckpointError` naming the expert and the parameter.
        """
        g_high, p_high = nnx.split(high)
        g_low, p_low = nnx.split(low)
        if g_high != g_low:
            raise ValueError("replace_experts: the two experts must have the same structure; their graphs differ")
        check_finite_params(p_high, "replace_experts: high-noise expert")
        check_finite_params(p_low, "replace_experts: low-noise expert")
        if self.mesh is not None:
            p_high, p_low = self._shard(p_high), self._shard(p_low)
        self.graphdef = g_high
        self._params_high, self._params_low = p_high, p_low
        self._velocity = self._jit_velocity(guided_velocity if velocity is None else velocity)
        self._velocity_fn = guided_velocity if velocity is None else velocity
        self._cached = None
        self._resident = "high"
        if self.expert_placement == "swap":
            self._params_low = jax.device_get(self._params_low)

    def _choose_placement(self, placement: str) -> str:
        if placement not in ("auto", "device", "swap"):
            raise ValueError(f"expert_placement must be 'auto', 'device' or 'swap', got {placement!r}")
        if placement != "auto":
            return placement
        limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
        if not limit:  # CPU: host memory is the device memory
            return "device"
        need = sum(x.nbytes for x in jax.tree.leaves((self._params_high, self._params_low)))
        return "swap" if need > 0.6 * limit else "device"

    def expert_params(self, name: str):
        """The parameters of expert ``name`` ("high" / "low"), on the device (swapping it in if needed)."""
        if self.expert_placement == "swap" and self._resident != name:
            other = "low" if name == "high" else "high"
            setattr(self, f"_params_{other}", jax.device_get(getattr(self, f"_params_{other}")))
            setattr(self, f"_params_{name}", jax.device_put(getattr(self, f"_params_{name}")))
            self._resident = name
            self.swaps += 1
        return getattr(self, f"_params_{name}")

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        dtype=jnp.bfloat16,
        *,
        revision: str | None = None,
        cache_dir: str | None = None,
        progress: bool = False,
        **kw,
    ) -> "WanI2VPipeline":
        """Load a pipeline from a model directory or a Hugging Face Hub repo id.

        ``path_or_repo_id``: a local directory in the official layout (``high_noise_model/``, ``low_noise_model/``,
        ``Wan2.1_VAE.pth``, ``models_t5_umt5-xxl-enc-bf16.pth``, ``google/umt5-xxl/``) or the diffusers layout
        (``transformer/``, ``transformer_2/``, ``vae/``, ``text_encoder/``, ``tokenizer/``); or, when no such local
        path exists and it looks like ``"org/name"``, a Hub repo downloaded with ``huggingface_hub.snapshot_download``
        (``revision``, ``cache_dir``; needs the network, or the files already in the Hub cache). A directory holding
        both layouts is refused (move one away). ``progress`` prints one line per component loaded.

        Sets ``pipe.model_dir`` (the local directory) and ``pipe.generation_defaults`` (`GenerationConfig.for_model`:
        the official defaults, a diffusers layout's ``boundary_ratio`` / ``flow_shift``, the model's
        ``generation_config.json``), validated before any weight is read. Every expert, the VAE and the text encoder
        are checked for NaN/Inf weights (`wanjax.io.errors.CheckpointError` naming the component and parameter).
        Other keyword arguments go to the constructor (``release_text_encoder``, ``mesh``, ``expert_placement``...).
        """
        from wanjax.io.dit_loader import load_dit
        from wanjax.io.t5_loader import load_t5_encoder
        from wanjax.io.vae_loader import load_vae
        from wanjax.text import PromptTokenizer

        path = resolve_model_dir(path_or_repo_id, revision=revision, cache_dir=cache_dir)
        layout = model_layout(path)
        if layout == "official":
            parts = {
                "high": "high_noise_model",
                "low": "low_noise_model",
                "vae": "Wan2.1_VAE.pth",
                "t5": "models_t5_umt5-xxl-enc-bf16.pth",
                "tok": os.path.join("google", "umt5-xxl"),
            }
        else:
            parts = {
                "high": "transformer",
                "low": "transformer_2",
                "vae": "vae",
                "t5": "text_encoder",
                "tok": "tokenizer",
            }
        p = {k: os.path.join(path, v) for k, v in parts.items()}
        missing = [parts[k] for k, v in p.items() if not os.path.exists(v)]
        if missing:
            raise FileNotFoundError(f"{path}: incomplete {layout} layout, missing {missing}")
        defaults = GenerationConfig.for_model(path).validate(source=f"{path} (generation defaults)")
        what = {"high": "high-noise expert", "low": "low-noise expert", "vae": "VAE", "t5": "text encoder"}
        loaded = {}
        for k, fn in (
            ("high", lambda q: load_dit(q, dtype=dtype)),
            ("low", lambda q: load_dit(q, dtype=dtype)),
            ("vae", lambda q: load_vae(q, dtype=dtype)),
            ("t5", lambda q: load_t5_encoder(q, dtype=dtype, param_dtype=dtype)),
        ):
            with _stage(f"loading {what[k]} ({parts[k]})", progress):
                loaded[k] = fn(p[k])
                check_finite_params(nnx.state(loaded[k], nnx.Param), f"{p[k]}: {what[k]}")
        tok = PromptTokenizer(p["tok"], text_len=loaded["high"].cfg.text_len)
        pipe = cls(loaded["high"], loaded["low"], loaded["vae"], loaded["t5"], tok, **kw)
        pipe.model_dir = path
        pipe.generation_defaults = defaults
        return pipe

    # ---------------------------------------------------------------- stages
    def encode_text(self, prompts: Sequence[str]) -> jax.Array:
        """Prompts -> context [B, text_len, text_dim] (zero-padded as Wan does); `NonFiniteError` if not finite."""
        from wanjax.text import encode_prompts

        if self.text_encoder is None or self.tokenizer is None:
            raise RuntimeError(
                "this pipeline has no text encoder/tokenizer (released or never loaded): pass `context=` to generate()"
            )
        ctx, _ = encode_prompts(self.text_encoder, self.tokenizer, list(prompts), pad_to=self.cfg.text_len)
        if self.release_text_encoder:
            self.text_encoder = None
        if not all_finite(ctx):
            raise NonFiniteError("the text encoder produced NaN/Inf features (check its weights)", stage="text")
        return ctx

    def prepare_condition(self, image, num_frames: int, max_area) -> tuple[jax.Array, tuple[int, int]]:
        """Image -> y [1, F_lat, h, w, 20] (4 mask + 16 VAE latent channels) and the pixel size (H, W);
        `NonFiniteError` if the VAE encoder gives NaN/Inf."""
        from wanjax.model.vae import encode_image_video

        img = conditioning.preprocess_image(image, max_area)  # [H, W, 3] in [-1, 1]
        conditioning.check_num_frames(num_frames)
        # the VAE latents of conditioning.i2v_video(img, num_frames) (the image, then black frames), without
        # recomputing the encoder chunks whose output repeats (bitwise the same latents, a third of the chunks)
        lat = encode_image_video(self.vae, jnp.asarray(img)[None], num_frames)  # [1, F_lat, h, w, 16]
        mask = conditioning.i2v_mask(num_frames, lat.shape[2], lat.shape[3])
        y = conditioning.concat_condition(jnp.asarray(mask), lat).astype(jnp.float32)
        if not all_finite(y):
            raise NonFiniteError(
                "the VAE encoder produced NaN/Inf from the image (check the VAE weights)", stage="vae_encode"
            )
        return y, img.shape[:2]

    def expert_for(self, t: int, boundary: float) -> str:
        """``"high"`` if ``t >= boundary * num_train_timesteps`` else ``"low"`` (as the official code)."""
        return "high" if t >= boundary * self.cfg.num_train_timesteps else "low"

    def denoise(
        self,
        y: jax.Array,
        context: jax.Array,
        gen: GenerationConfig,
        noise: jax.Array | None = None,
        progress: bool = True,
        velocity_fn: Callable | None = None,
        cache=None,
    ) -> tuple[jax.Array, list[str]]:
        """The denoise loop: official FlowUniPC/Euler schedule, expert switch at the boundary, CFG per expert.

        ``context``: [2, L, D] (positive, negative). ``noise``: the starting latent [1, F_lat, h, w, 16] (drawn from
        ``gen.seed`` when None). ``velocity_fn(expert, params, x, y, context, t, guide) -> v`` replaces the guided
        velocity (calibration records the trajectory through it). Returns the final latents and the expert used at
        each step.

        After every step the latent is checked for NaN/Inf (one jitted reduction, one scalar transfer); a non-finite
        latent raises `NonFiniteError` naming the expert, the step, ``t`` and the first layer that produced it (found
        by re-running that step's forward block by block, `wanjax.nonfinite.locate_nonfinite`).

        ``cache``: a `wanjax.sampling.cache.StepCache`: steps its plan marks are run with the block stack skipped
        (the residual of the expert's last computed step reused); its ``computed`` / ``skipped`` count the forwards.
        Not combinable with ``velocity_fn``.
        """
        sched = gen.sigma_schedule(self.cfg.num_train_timesteps)
        shape = y.shape[:-1] + (self.cfg.out_dim,)
        x = (
            jax.random.normal(jax.random.key(gen.seed), shape, jnp.float32)
            if noise is None
            else jnp.asarray(noise, jnp.float32)
        )
        if x.shape != shape:
            raise ValueError(f"noise shape {x.shape} does not match the latent shape {shape}")
        if noise is not None and not all_finite(x):
            raise ValueError("noise: contains NaN or Inf")
        guide_low, guide_high = gen.guide_scale
        experts: list[str] = []
        inputs: dict[str, Any] = {}
        bar = _progress(gen.steps, progress)
        if cache is not None:
            if velocity_fn is not None:
                raise ValueError("denoise: cache= and velocity_fn= cannot be combined")
            compute, skip, indicator = self._jit_cached()
            cache.begin(
                [int(t) for t in sched.timesteps], [self.expert_for(int(t), gen.boundary) for t in sched.timesteps]
            )

        def model_fn(x, t, i):
            t = int(t)
            name = self.expert_for(t, gen.boundary)
            experts.append(name)
            params = self.expert_params(name)
            guide = guide_high if name == "high" else guide_low
            inputs.update(x=x, guide=guide)  # kept (no copy, no sync) for the failure report
            if velocity_fn is not None:
                return velocity_fn(name, params, x, y, context, jnp.float32(t), jnp.float32(guide))
            if cache is not None:
                args = (params, x, y, context, jnp.float32(t), jnp.float32(guide))
                return cache.step(i, name, lambda: compute(*args), lambda r: skip(*args, r), lambda: indicator(*args))
            # guidance exactly 1 (CFG off, e.g. the Lightning preset): the conditional forward alone, batch 1
            ctx = context[:1] if guide == 1.0 else context
            return self._velocity(params, x, y, ctx, jnp.float32(t), jnp.float32(guide))

        def callback(i, t, x):
            if not all_finite(x):  # the one sync per step (the bar needed it anyway)
                if bar is not None:
                    bar.close()
                self._raise_nonfinite(i, t, experts[-1], inputs["x"], y, context, inputs["guide"], gen)
            if bar is not None:
                bar.set_postfix_str(f"t={t} expert={experts[-1]}")
                bar.update(1)

        try:
            x = sample(model_fn, x, sched, gen.solver, unroll=True, callback=callback)
        finally:
            if bar is not None:
                bar.close()
        return x, experts

    def _raise_nonfinite(self, i: int, t: int, name: str, x, y, context, guide: float, gen: GenerationConfig):
        """Locate the first non-finite stage of step ``i`` (a debug re-run of that forward) and raise."""
        cm = None
        bins = getattr(self, "quant_bins", None)
        if bins is not None:  # quantized experts need their timestep bin active
            from wanjax.quant.qlinear import active_bin

            cm = lambda: active_bin(bins.local_lookup(jnp.float32(t)))  # noqa: E731
        note, layer = "", None
        try:
            found = locate_nonfinite(
                self.graphdef, self.expert_params(name), x, y, context, jnp.float32(t), jnp.float32(guide), context=cm
            )
        except Exception as e:  # the report must not hide the original failure
            found, note = None, f"; the layer could not be located ({type(e).__name__}: {e})"
        if found is not None:
            layer, detail = found
            where = f"first produced by {layer}" + (f" ({detail})" if detail else "")
        elif not note:
            where = f"the model output was finite: the {gen.solver} solver step produced it"
        else:
            where = "source unknown"
        expert = "high-noise" if name == "high" else "low-noise"
        raise NonFiniteError(
            f"non-finite latent (NaN/Inf) after denoise step {i + 1} of {gen.steps} (index {i}, "
            f"t={t}, {expert} expert '{name}'): {where}{note}",
            stage="denoise",
            expert=name,
            step=i,
            t=int(t),
            layer=layer,
        )

    def make_cache(self, cache, gen: GenerationConfig, config=None):
        """A `wanjax.sampling.cache.StepCache` for ``gen``: ``cache`` itself if it is one, else the calibration of
        ``gen``'s steps / shift / boundary / solver read from a file or a directory's ``cache_calibration.json``
        (`CacheCalibrationError` naming the file when it has none), with ``config`` (default `CacheConfig()`)."""
        from wanjax.sampling.cache import CacheCalibration, StepCache

        if isinstance(cache, StepCache):
            return cache
        if not isinstance(cache, (str, os.PathLike)):
            raise TypeError(f"cache: expected a StepCache or a calibration path, got {type(cache).__name__}")
        cal = CacheCalibration.load(cache, gen.steps, gen.shift, gen.boundary, gen.solver)
        return StepCache(config, cal)

    def calibrate_cache(
        self, samples, gen: GenerationConfig | None = None, *, precision: str = "bf16", progress: bool = False
    ):
        """Run the uncached sampler on ``samples`` (``(image, prompt, seed)`` tuples, or ``(image, context, seed)``
        with a [2, L, D] context) and return the `wanjax.sampling.cache.CacheCalibration` of their mean magnitude
        ratios (per expert step and CFG branch); ``.save(DIR)`` writes ``DIR/cache_calibration.json``."""
        from wanjax.sampling.cache import StepCache, calibration_from_runs

        gen = (gen if gen is not None else self.generation_defaults).validate()
        runs, rel_in, rel_out, out = [], [], [], None
        for image, prompt, seed in samples:
            rec = StepCache(record=True)
            kw = {"context": prompt} if not isinstance(prompt, str) else {"prompt": prompt}
            out = self.generate(
                image, gen=gen, seed=int(seed), cache=rec, output_type="latent", progress=progress, **kw
            )
            runs.append(rec.recorded)
            rel_in.append(rec.recorded_input)
            rel_out.append(rec.recorded_output)
        if out is None:
            raise ValueError("calibrate_cache: no samples")
        return calibration_from_runs(
            runs,
            out.timesteps,
            out.experts,
            steps=gen.steps,
            shift=gen.shift,
            boundary=gen.boundary,
            solver=gen.solver,
            precision=precision,
            rel_input=rel_in,
            rel_output=rel_out,
        )

    def decode(self, latents: jax.Array) -> jax.Array:
        """Latents -> video [F, H, W, 3] in [-1, 1] (one latent frame at a time inside the VAE); `NonFiniteError`
        if the result holds NaN/Inf."""
        from wanjax.model.vae import decode_video

        if self.mesh is not None:  # latents live on the mesh; the VAE runs on one device
            latents = jax.device_put(latents, jax.tree.leaves(nnx.state(self.vae))[0].sharding)
        video = decode_video(self.vae, latents)[0]
        if not all_finite(video):
            raise NonFiniteError(
                "the VAE decoder produced NaN/Inf"
                + (
                    " from finite latents (check the VAE weights)"
                    if all_finite(latents)
                    else " (its input latents are not finite)"
                ),
                stage="vae_decode",
            )
        return video

    # ---------------------------------------------------------------- all together
    def generate(
        self,
        image,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        gen: GenerationConfig | None = None,
        *,
        context: jax.Array | None = None,
        noise: jax.Array | None = None,
        progress: bool = True,
        output_type: str | None = None,
        cache=None,
        **overrides,
    ) -> I2VOutput:
        """Generate a video from an image (path, PIL image in any mode, or a uint8 array) and a prompt.

        Settings: ``gen`` (default ``self.generation_defaults``, the model's own) updated by ``overrides``: any
        `GenerationConfig` field (``num_frames``, ``max_area``, ``steps``, ``shift``, ``boundary``, ``solver``,
        ``seed``, ``fps``), ``guidance_low`` / ``guidance_high`` (``guide_scale=(low, high)`` also works), or the
        diffusers names ``num_inference_steps``, ``height`` + ``width`` (-> ``max_area = height * width``; the output
        keeps the image's aspect ratio, sides multiples of 16), ``guidance_scale`` (high-noise expert, and low-noise
        too unless ``guidance_scale_2`` is given) and ``guidance_scale_2`` (low-noise expert). The resolved settings
        are validated before any work (`GenerationConfig.validate`); an unknown name raises ``TypeError`` listing the
        valid ones. diffusers' ``generator`` is refused: pass ``seed``.

        ``output_type``: ``None`` / ``"uint8"`` (uint8 frames), ``"np"`` (float32 in [0, 1], as diffusers), ``"pil"``
        (list of PIL images) or ``"latent"`` (no VAE decode; ``frames`` is None, see ``latents``). ``context``
        ([2, L, D]: positive, negative) skips the text encoder. ``progress`` prints a line per stage (text encoder,
        VAE encode, VAE decode) and a progress bar for the denoise loop. Raises `NonFiniteError` if a NaN/Inf appears.

        ``cache``: step caching (docs/CACHING.md): a `wanjax.sampling.cache.StepCache`, or a directory / file with a
        ``cache_calibration.json`` (a `StepCache` with the default `CacheConfig` is made from the calibration of
        these settings); None (default) computes every step. With ``progress`` a line says how many forwards were
        computed and skipped; ``I2VOutput.cache`` is the `StepCache` used.
        """
        if "generator" in overrides:
            raise TypeError(
                "generator= (a torch.Generator in diffusers) is not supported: wanjax draws the noise with "
                "jax.random from an integer seed; pass seed=<int> (or noise=<latent>)"
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type: expected one of {list(OUTPUT_TYPES)}, got {output_type!r}")
        gen = apply_overrides(
            gen if gen is not None else self.generation_defaults, overrides, also_valid=GENERATE_ARGS
        ).validate()
        if context is None and prompt is None:
            raise ValueError("generate() needs a prompt (or a precomputed context)")
        for name, arr in (("context", context), ("noise", noise)):
            if arr is not None and not all_finite(jnp.asarray(arr)):
                raise ValueError(f"{name}: contains NaN or Inf")
        if isinstance(image, (str, os.PathLike)):
            image = conditioning.load_image(image)  # a bad file fails here, before any model runs
        conditioning.i2v_size(conditioning.image_to_array(image).shape[:2], gen.max_area)
        times = {}
        t0 = time.perf_counter()
        if context is None:
            neg = DEFAULT_NEGATIVE_PROMPT if not negative_prompt else negative_prompt
            with _stage("text encoder (2 prompts)", progress):
                context = self.encode_text([prompt, neg])
        times["text"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with _stage(f"VAE encode ({gen.num_frames} frames)", progress):
            y, hw = self.prepare_condition(image, gen.num_frames, gen.max_area)
        times["vae_encode"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if cache is not None:
            cache = self.make_cache(cache, gen)
        latents, experts = self.denoise(y, context, gen, noise=noise, progress=progress, cache=cache)
        jax.block_until_ready(latents)
        if cache is not None and progress:
            print(f"wanjax: {cache.summary()} [{cache.schedule}]", file=sys.stderr, flush=True)
        times["denoise"] = time.perf_counter() - t0
        frames = None
        if output_type != "latent":
            t0 = time.perf_counter()
            with _stage(f"VAE decode ({gen.num_frames} frames, {hw[1]}x{hw[0]})", progress):
                video = self.decode(latents)
            frames = _format_frames(np.asarray(video), output_type)
            times["vae_decode"] = time.perf_counter() - t0
        sched = gen.sigma_schedule(self.cfg.num_train_timesteps)
        return I2VOutput(
            frames=frames,
            latents=np.asarray(latents),
            timesteps=np.asarray(sched.timesteps),
            experts=experts,
            seconds=times,
            gen=gen,
            cache=cache,
        )

    def __call__(self, image, prompt: str | None = None, negative_prompt: str | None = None, **kw):
        """``pipe(image, prompt, ...)``: `generate` returning only the frames (uint8 [F, H, W, 3] by default), or
        the latents with ``output_type="latent"``."""
        out = self.generate(image, prompt, negative_prompt, **kw)
        return out.latents if kw.get("output_type") == "latent" else out.frames


_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


def looks_like_repo_id(name: str) -> bool:
    """``"org/name"`` as the Hugging Face Hub spells repo ids (one slash, no ``..`` or ``--``)."""
    return bool(_REPO_ID.fullmatch(name)) and ".." not in name and "--" not in name and not name.endswith(".git")


def resolve_model_dir(
    path_or_repo_id: str | os.PathLike, *, revision: str | None = None, cache_dir: str | None = None
) -> str:
    """A local model directory for ``path_or_repo_id``: the path itself if it exists, else a Hub snapshot
    (``huggingface_hub.snapshot_download``) when it looks like ``"org/name"``. Raises ``FileNotFoundError`` naming
    the path / repo id and the cause (no such directory; not a directory; download failed: offline, unknown repo,
    gated, ...)."""
    name = os.fspath(path_or_repo_id)
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise FileNotFoundError(f"{path}: is a file; expected a model directory (official or diffusers layout)")
    if not looks_like_repo_id(name):
        raise FileNotFoundError(
            f"{path}: no such directory; expected a model directory in the official layout "
            "(high_noise_model/, low_noise_model/, ...) or the diffusers layout (transformer/, "
            "transformer_2/, ...), or a Hugging Face repo id 'org/name'"
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise FileNotFoundError(
            f"{name!r}: not a local directory, and downloading it as a Hugging Face repo id needs "
            "huggingface_hub (pip install huggingface_hub)"
        ) from e
    try:
        return snapshot_download(repo_id=name, revision=revision, cache_dir=cache_dir)
    except Exception as e:  # network, auth, unknown repo or revision, offline mode
        raise FileNotFoundError(
            f"{name!r}: not a local directory, and downloading it from the Hugging Face Hub "
            f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (check the "
            "repo id, the network / HF_HUB_OFFLINE, and a token for gated repos; or pass a local "
            "directory)"
        ) from e


def model_layout(path: str) -> str:
    """``"official"`` or ``"diffusers"`` for a model directory; a directory holding both (or neither) is refused
    with an error naming what was found."""
    official = [d for d in ("high_noise_model", "low_noise_model") if os.path.isdir(os.path.join(path, d))]
    diffusers = [d for d in ("transformer", "transformer_2") if os.path.isdir(os.path.join(path, d))]
    if official and diffusers:
        raise ValueError(
            f"{path}: holds two model layouts, the official one ({', '.join(d + '/' for d in official)}) "
            f"and the diffusers one ({', '.join(d + '/' for d in diffusers)}); cannot tell which to "
            "load: move one of them to its own directory"
        )
    if official:
        return "official"
    if diffusers:
        return "diffusers"
    raise FileNotFoundError(
        f"{path}: expected the official layout (high_noise_model/, low_noise_model/, ...) or the "
        "diffusers layout (transformer/, transformer_2/, ...); found neither"
    )


def _format_frames(video: np.ndarray, output_type: str | None):
    """Decoded video [F, H, W, 3] in [-1, 1] -> frames of ``output_type``."""
    if output_type in (None, "uint8"):
        return to_uint8(video)
    if output_type == "np":
        return np.clip((video.astype(np.float32) + 1.0) / 2.0, 0.0, 1.0)
    from PIL import Image

    return [Image.fromarray(f) for f in to_uint8(video)]


@contextlib.contextmanager
def _stage(label: str, enabled: bool):
    """One line on stderr for a stage: ``wanjax: <label> ... 1.2 s``."""
    if not enabled:
        yield
        return
    print(f"wanjax: {label} ...", end="", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        yield
    except BaseException:
        print(" failed", file=sys.stderr, flush=True)
        raise
    print(f" {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="denoise", unit="step")
