"""``python -m wanjax.train``: train the mini Wan2.2 MoE on procedural video and write it out.

    python -m wanjax.train run --out /tmp/mini_run              # generate data, train VAE, base DiT, two experts
    python -m wanjax.train assemble --src /tmp/mini_run --dst models/mini   # official Wan2.2 layout

``run`` writes a flat folder (few files, so it travels back from a remote accelerator): ``high.safetensors``,
``low.safetensors`` (official keys, bf16), ``Wan2.1_VAE.pth``, ``models_t5_umt5-xxl-enc-bf16.pth``,
``tokenizer.json``, ``log.json`` (configs, steps, times, loss curves, held-out metrics) and ``samples.npz``
(held-out generations). Each stage writes its files as soon as it ends. ``assemble`` lays them out as the
published checkpoint (``high_noise_model/``, ``low_noise_model/``, ``Wan2.1_VAE.pth``,
``models_t5_umt5-xxl-enc-bf16.pth``, ``google/umt5-xxl/tokenizer.json``) for `WanI2VPipeline.from_pretrained`.

Stages (all from ``--seed``): (1) mini VAE on rendered clips; (2) latent statistics folded into the VAE; (3) the
training set: clips rendered, encoded to latents x0 and conditions y exactly as the pipeline does, captions
encoded by the frozen mini UMT5; (4) base DiT over all t; (5) high-noise expert fine-tuned on t >= 900 and
low-noise expert on t < 900; (6) held-out evaluation through the real pipeline.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wanjax.config import WanConfig
from wanjax.data import procedural
from wanjax.model.t5 import T5Config, small_t5_config
from wanjax.model.vae import VAEConfig, encode_video
from wanjax.train import dit as D
from wanjax.train import text as T
from wanjax.train import vae as V
from wanjax.pipeline import WanI2VPipeline
from wanjax.train.export_components import save_t5_pth, save_vae_pth

OFFICIAL_NAMES = {
    "high": "high_noise_model",
    "low": "low_noise_model",
    "vae": "Wan2.1_VAE.pth",
    "t5": "models_t5_umt5-xxl-enc-bf16.pth",
    "tok": os.path.join("google", "umt5-xxl"),
}


@dataclasses.dataclass(frozen=True)
class Preset:
    vae: VAEConfig
    dit: WanConfig
    t5: T5Config
    size: int
    frames: int
    vae_frames: int
    vae_crop: int = 0  # train the VAE on random square crops of this size (0: full frames)


PRESETS = {
    # the VAE trains on 64x64 crops of full 17-frame clips: every causal-cache step the pipeline decodes is trained
    "mini": Preset(V.MINI_VAE, D.MINI_DIT, T.MINI_T5, 128, 17, 17, 64),
    # what a 2-core CPU can train in about half an hour (used when no accelerator time was left): the same
    # architectures, narrower: VAE base 8 with one residual block per level, DiT dim 128 = 1 head x 128 (RoPE split
    # 44/42/42 as the real model), 4 layers
    "cpu": Preset(
        VAEConfig(base_dim=8, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=1),
        WanConfig(dim=128, ffn_dim=512, num_heads=1, num_layers=4, text_dim=256, text_len=32, freq_dim=256),
        T.MINI_T5,
        128,
        17,
        5,
        64,
    ),
    "tiny": Preset(
        VAEConfig(base_dim=4, z_dim=16, dim_mult=(1, 1, 1, 1), num_res_blocks=1),
        WanConfig(dim=32, ffn_dim=64, num_heads=1, num_layers=1, text_dim=32, text_len=16, freq_dim=32),
        small_t5_config(vocab_size=64, dim=32, dim_ffn=64, num_heads=2, num_layers=1, text_len=16),
        32,
        5,
        5,
    ),
}


class Log:
    """Progress lines to stdout (flushed) + a dict saved as log.json."""

    def __init__(self, out: str):
        self.out = out
        self.data: dict = {"stages": {}, "curves": {}}
        self.t0 = time.perf_counter()

    def __call__(self, msg: str):
        print(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}", flush=True)

    def save(self):
        with open(os.path.join(self.out, "log.json"), "w") as f:
            json.dump(self.data, f, indent=1, default=float)


def _device_put_params(p):
    return {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in p.items()}


def _renderer(size: int, frames: int):
    return jax.jit(lambda p: procedural.render(p, frames, size, xp=jnp))


def _param_pool(n: int, seed: int, frames: int, size: int):
    p = procedural.sample_params(n, "train", seed, frames, size)
    return procedural.array_params(p), p["captions"]


def _take(arr: dict, idx) -> dict:
    return {k: v[idx] for k, v in arr.items()}


def train_vae(pre: Preset, args, log: Log):
    if args.vae_from:
        from wanjax.io.vae_loader import load_vae

        vae = load_vae(
            args.vae_from, pre.vae, dtype=jnp.bfloat16 if args.bf16 else jnp.float32, param_dtype=jnp.float32
        )
        log(f"vae: started from {args.vae_from}")
    else:
        vae = V.new_vae(
            pre.vae,
            seed=args.seed,
            dtype=jnp.bfloat16 if args.bf16 else jnp.float32,
            zero_residual=bool(args.vae_zero_residual),
        )
    frames = args.vae_frames or pre.vae_frames
    if (frames - 1) % 4:
        raise ValueError(f"--vae-frames must be 4n+1 (the VAE's causal chunks), got {frames}")
    pool, _ = _param_pool(args.vae_pool, args.seed + 1, frames, pre.size)
    pool = {k: jnp.asarray(v) for k, v in pool.items()}
    rng = np.random.default_rng(args.seed + 2)
    crop = pre.vae_crop
    if crop:
        full = _renderer(pre.size, frames)

        def render(p):  # a random crop (offsets multiple of 8) per batch
            o = rng.integers(0, (pre.size - crop) // 8 + 1, 2) * 8
            return full(p)[:, :, o[0] : o[0] + crop, o[1] : o[1] + crop]
    else:
        render = _renderer(pre.size, frames)
    trainer = V.Trainer(
        vae,
        kl_weight=args.kl_weight,
        chroma_weight=args.vae_chroma,
        colour_weight=args.vae_colour,
        colour_on=args.vae_colour_on,
    )
    curve, t_start, n = [], time.perf_counter(), 0
    for i in range(args.vae_steps):
        idx = rng.integers(0, args.vae_pool, args.vae_batch)
        video = render(_take(pool, jnp.asarray(idx)))
        prog = max(i / args.vae_steps, (time.perf_counter() - t_start) / args.vae_time if i else 0.0)
        m = trainer.step(
            video,
            jax.random.fold_in(jax.random.key(args.seed * 100 + 7), i),
            D.lr_at(i, args.vae_lr, prog, warmup=100),
            train_branches=i >= args.vae_branch_freeze,
        )
        if i == args.vae_branch_freeze and i:
            log(f"vae step {i}: residual/attention branches released (--vae-branch-freeze)")
        n = i + 1
        if i == 0:
            jax.block_until_ready(m)
            log(f"vae: first step (compile) {time.perf_counter() - t_start:.1f}s")
            t_start = time.perf_counter()
        if i % args.log_every == 0 or i == args.vae_steps - 1:
            m = {k: float(v) for k, v in m.items()}
            curve.append([i, m["loss"], m["l1"], m["l2"], m["kl"], m["chroma_ratio"]])
            log(
                f"vae step {i}: loss {m['loss']:.4f} l1 {m['l1']:.4f} l2 {m['l2']:.5f} kl {m['kl']:.3f} "
                f"chroma l1 {m['chroma_l1']:.4f} ratio {m['chroma_ratio']:.3f} latent chroma l1 "
                f"{m['latent_chroma_l1']:.4f} (grey {m['grey_latent_chroma_l1']:.4f}) sigma {m['colour_sigma']:.3f}"
            )
        if time.perf_counter() - t_start > args.vae_time:
            log(f"vae: time budget {args.vae_time}s reached after {n} steps")
            break
    log.data["stages"]["vae"] = {
        "steps": n,
        "seconds_after_compile": time.perf_counter() - t_start,
        "batch": args.vae_batch,
        "frames": frames,
        "crop": pre.vae_crop,
        "lr": args.vae_lr,
        "kl_weight": args.kl_weight,
        "chroma_weight": args.vae_chroma,
        "colour_weight": args.vae_colour,
        "zero_residual": bool(args.vae_zero_residual),
        "branch_freeze_steps": args.vae_branch_freeze,
        "colour_on": args.vae_colour_on,
        "from": args.vae_from,
    }
    log.data["curves"]["vae"] = curve
    return trainer.model()


def latent_stats(vae, render, pool, n_clips: int, batch: int):
    """Per-channel mean/std of the raw latent mean over ``n_clips`` rendered clips (through `encode_video`, the
    jitted function the dataset encoding reuses, so no extra compilation)."""
    mean = np.asarray(vae.cfg.latents_mean, np.float64)
    std = np.asarray(vae.cfg.latents_std, np.float64)
    mus = []
    for s in range(0, n_clips, batch):
        idx = jnp.arange(s, s + batch) % n_clips
        lat = np.asarray(encode_video(vae, render(_take(pool, idx))), np.float64).reshape(-1, vae.cfg.z_dim)
        mus.append(lat * std + mean)  # back to the raw mean
    mu = np.concatenate(mus)
    return mu.mean(0), mu.std(0) + 1e-6


def build_dataset(vae, t5, tok, pre: Preset, args, log: Log):
    """x0 [N, F_lat, h, w, 16], y [N, ..., 20] (bf16 on device), caption ids [N], contexts [C, L, D], negative."""
    from wanjax.pipeline import DEFAULT_NEGATIVE_PROMPT
    from wanjax.text import encode_prompts

    t0 = time.perf_counter()
    arr, caps = _param_pool(args.n_train, args.seed + 3, pre.frames, pre.size)
    arr = {k: jnp.asarray(v) for k, v in arr.items()}
    if getattr(args, "data_twinkle", 0.0) > 0:
        from wanjax.train.detail import render_with_sparkles

        dens, rad = float(args.data_twinkle), float(args.data_twinkle_radius)
        render = jax.jit(lambda p: render_with_sparkles(p, pre.frames, pre.size, radius=rad, density=dens))
        log(f"dataset: twinkling dots on the training clips (density up to {dens}, radius {rad} px; half the clips)")
    else:
        render = _renderer(pre.size, pre.frames)
    uniq = sorted(set(caps))
    cap_idx = np.array([uniq.index(c) for c in caps], np.int32)
    ctx = []
    for s in range(0, len(uniq), 64):
        c, _ = encode_prompts(t5, tok, uniq[s : s + 64], pad_to=pre.dit.text_len)
        ctx.append(c)
    ctx = jnp.concatenate(ctx).astype(jnp.float32)
    neg, _ = encode_prompts(t5, tok, [DEFAULT_NEGATIVE_PROMPT], pad_to=pre.dit.text_len)
    cond = jax.jit(lambda v, x: D.condition_latents(v, x, pre.frames))
    x0s, ys = [], []
    t_enc = None
    for s in range(0, args.n_train, args.enc_batch):
        idx = jnp.arange(s, min(s + args.enc_batch, args.n_train))
        clips = render(_take(arr, idx))
        x0s.append(encode_video(vae, clips).astype(jnp.bfloat16))
        ys.append(cond(vae, clips[:, 0]).astype(jnp.bfloat16))
        if t_enc is None:
            jax.block_until_ready(ys[-1])
            t_enc = time.perf_counter()  # the budget counts after the first (compiling) batch
        elif time.perf_counter() - t_enc > args.data_time:
            jax.block_until_ready(ys[-1])
            log(f"dataset: time budget {args.data_time}s reached after {s + len(idx)} clips")
            break
    x0 = jnp.concatenate(x0s)
    y = jnp.concatenate(ys)
    jax.block_until_ready((x0, y))
    cap_idx = cap_idx[: x0.shape[0]]
    dt = time.perf_counter() - t0
    log(
        f"dataset: {x0.shape[0]} clips -> x0 {tuple(x0.shape)}, y {tuple(y.shape)}, {len(uniq)} captions; "
        f"latent std {float(jnp.std(x0.astype(jnp.float32))):.3f}; {dt:.1f}s"
    )
    log(f"dataset: {len(set(cap_idx.tolist()))} distinct captions among the encoded clips")
    log.data["stages"]["dataset"] = {
        "clips": int(x0.shape[0]),
        "captions": len(set(cap_idx.tolist())),
        "seconds": dt,
        "latent_shape": list(x0.shape[1:]),
    }
    return x0, y, jnp.asarray(cap_idx), ctx, neg.astype(jnp.float32)


STAGE_SEED = {"base": 1, "high": 2, "low": 3}


def train_dit(trainer: D.Trainer, data, name: str, steps: int, lr: float, budget: float, args, log: Log):
    """Train ``trainer`` on stage ``name`` ("base", "high", "low") for ``steps`` steps or ``budget`` seconds (the
    budget is counted after the first, compiling, step)."""
    x0, y, cap_idx, ctx, neg = data
    u_range = D.expert_u_range(name, args.shift)
    trainer.reset_optimizer()
    it = D.batches(x0.shape[0], args.batch, args.seed * 100 + STAGE_SEED[name])
    curve, t_start, n = [], time.perf_counter(), 0
    for i in range(steps):
        idx = jnp.asarray(next(it))
        key = jax.random.fold_in(jax.random.key(args.seed * 100 + STAGE_SEED[name]), i)
        loss = trainer.step(
            x0[idx].astype(jnp.float32),
            y[idx],
            ctx[cap_idx[idx]],
            neg,
            key,
            D.lr_at(
                i,
                lr,
                max(i / steps, (time.perf_counter() - t_start) / budget if i else 0.0),
                warmup=min(200, steps // 4 + 1),
            ),
            u_range,
        )
        n = i + 1
        if i == 0:
            jax.block_until_ready(loss)
            log(f"{name}: first step (compile) {time.perf_counter() - t_start:.1f}s")
            t_start = time.perf_counter()
        if i % args.log_every == 0 or i == steps - 1:
            curve.append([i, float(loss)])
            log(f"{name} step {i}: loss {curve[-1][1]:.4f}")
        if time.perf_counter() - t_start > budget:
            log(f"{name}: time budget {budget}s reached after {n} steps")
            break
    jax.block_until_ready(trainer.params)
    secs = time.perf_counter() - t_start
    # loss on 8 fixed batches (same batches and noise for every stage)
    rng = np.random.default_rng(99)
    losses = []
    for j in range(8):
        idx = jnp.asarray(rng.integers(0, x0.shape[0], args.batch))
        losses.append(
            float(
                trainer.eval_loss(
                    trainer.params, x0[idx].astype(jnp.float32), y[idx], ctx[cap_idx[idx]], jax.random.key(j), *u_range
                )
            )
        )
    log.data["stages"][name] = {
        "steps": n,
        "seconds_after_compile": secs,
        "batch": args.batch,
        "lr": lr,
        "u_range": list(u_range),
        "final_loss": float(np.mean(losses)),
    }
    log.data["curves"][name] = curve
    log(f"{name}: {n} steps in {secs:.1f}s, final loss (8 fixed batches) {np.mean(losses):.4f}")
    return trainer


def save_expert(model, path: str, aux: str):
    import ml_dtypes
    from safetensors.numpy import save_file

    from wanjax.io.export import export_state_dict

    sd = export_state_dict(model, layout="official", dtype=ml_dtypes.bfloat16)
    save_file(sd, path, metadata={"format": "pt"})
    from wanjax.config import official_config_dict

    name = os.path.basename(path)[: -len(".safetensors")]
    with open(os.path.join(aux, f"{name}.config.json"), "w") as f:
        json.dump(official_config_dict(model.cfg), f, indent=1)


def expert_plan(args) -> dict:
    """Per expert: steps, time budget (s) and peak learning rate; ``--high-*`` / ``--low-*`` override the shared
    ``--expert-*`` settings."""
    out = {}
    for e in ("high", "low"):
        pick = lambda k: getattr(args, f"{e}_{k}", None)  # noqa: E731
        out[e] = {
            "steps": pick("steps") if pick("steps") is not None else args.expert_steps,
            "time": pick("time") if pick("time") is not None else args.expert_time,
            "lr": pick("lr") if pick("lr") is not None else args.expert_lr,
        }
    return out


def rel_distance(a, b) -> float:
    """``||a - b|| / mean(||a||, ||b||)`` over all leaves of two parameter pytrees (f32)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    d = sum(float(jnp.sum(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)))) for x, y in zip(la, lb))
    na = sum(float(jnp.sum(jnp.square(x.astype(jnp.float32)))) for x in la)
    nb = sum(float(jnp.sum(jnp.square(y.astype(jnp.float32)))) for y in lb)
    return float(np.sqrt(d) / max(0.5 * (np.sqrt(na) + np.sqrt(nb)), 1e-30))


def cmd_run(args):
    pre = PRESETS[args.preset]
    os.makedirs(args.out, exist_ok=True)
    log = Log(args.out)
    log(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; preset {args.preset}")
    log.data["args"] = vars(args)
    log.data["configs"] = {
        "vae": dataclasses.asdict(pre.vae),
        "dit": pre.dit.to_dict(),
        "t5": {k: v for k, v in dataclasses.asdict(pre.t5).items() if k not in ("dtype", "param_dtype")},
        "size": pre.size,
        "frames": pre.frames,
    }
    log.data["device"] = jax.devices()[0].device_kind
    # text: tokenizer + frozen random UMT5 (rounded to bf16, as shipped)
    from wanjax.text import PromptTokenizer

    aux = args.aux or args.out
    os.makedirs(aux, exist_ok=True)
    T.save_tokenizer(aux)
    tok = PromptTokenizer(os.path.join(aux, "tokenizer.json"), text_len=pre.dit.text_len)
    if args.t5_from:  # the given text encoder, byte for byte (e.g. the shipped one)
        from wanjax.io.t5_loader import load_t5_encoder

        t5 = load_t5_encoder(args.t5_from, pre.t5, dtype=pre.t5.dtype, param_dtype=jnp.bfloat16)
        t5_path = os.path.join(args.out, OFFICIAL_NAMES["t5"])
        if os.path.abspath(args.t5_from) != os.path.abspath(t5_path):
            shutil.copyfile(args.t5_from, t5_path)
        log(f"text encoder: {args.t5_from} kept as it is (--t5-from)")
    else:
        t5 = V.cast_params(T.mini_t5(pre.t5, seed=T.T5_SEED), jnp.bfloat16)
        save_t5_pth(t5, os.path.join(args.out, OFFICIAL_NAMES["t5"]))
    from wanjax.io.vae_loader import load_vae

    if args.vae_keep:
        # the given VAE file as it is (byte for byte): no training, no latent statistics folded again
        if not args.vae_from or args.vae_steps:
            raise ValueError("--vae-keep 1 needs --vae-from FILE and --vae-steps 0")
        vae_path = os.path.join(args.out, OFFICIAL_NAMES["vae"])
        if os.path.abspath(args.vae_from) != os.path.abspath(vae_path):
            shutil.copyfile(args.vae_from, vae_path)
        log(f"vae: {args.vae_from} kept as it is (--vae-keep)")
        log.data["stages"]["vae"] = {"steps": 0, "from": args.vae_from, "kept": True}
    else:
        # (1) VAE
        vae = train_vae(pre, args, log)
        # (2) latent statistics folded in; weights rounded to bf16 as shipped
        pool, _ = _param_pool(args.stats_clips, args.seed + 4, pre.frames, pre.size)
        pool = {k: jnp.asarray(v) for k, v in pool.items()}
        m, s = latent_stats(vae, _renderer(pre.size, pre.frames), pool, args.stats_clips, args.enc_batch)
        V.fold_latent_stats(vae, m, s)
        V.cast_params(vae, jnp.bfloat16)
        vae_path = save_vae_pth(vae, os.path.join(args.out, OFFICIAL_NAMES["vae"]))
        log(
            f"vae: latent mean |max| {np.abs(m).max():.3f}, std range {s.min():.3f}..{s.max():.3f} folded; "
            f"wrote {vae_path}"
        )
        log.data["stages"]["vae"]["latent_stats"] = {"mean": m.tolist(), "std": s.tolist()}
    # the pipeline runs the VAE in bf16 compute: the DiT sees latents computed that way
    vae_eval = load_vae(vae_path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    log.save()
    # (3) data
    data = build_dataset(vae_eval, t5, tok, pre, args, log)
    log.save()
    # (4) base, (5) experts
    # time left for the base model: what the deadline leaves after the experts and the evaluation
    plan = expert_plan(args)
    left = args.deadline - (time.perf_counter() - log.t0)
    expert_total = sum(plan[e]["time"] for e in ("high", "low"))
    base_time = max(20.0, min(args.base_time, left - expert_total - 60 - args.eval_reserve))
    if base_time < args.base_time:
        log(f"base: time budget cut to {base_time:.0f}s by the {args.deadline:.0f}s deadline")
    dtype = jnp.bfloat16 if args.bf16 else jnp.float32
    trainer = D.Trainer(D.new_dit(pre.dit, seed=args.seed, dtype=dtype), shift=args.shift, drop_text=args.drop_text)
    init_params = jax.tree.map(lambda a: jnp.array(a, copy=True), trainer.params)
    if args.expert_init == "base":
        train_dit(trainer, data, "base", args.base_steps, args.lr, base_time, args, log)
        base_params = jax.tree.map(lambda a: jnp.array(a, copy=True), trainer.params)
        base = trainer.model()
        save_expert(base, os.path.join(args.out, "low.safetensors"), aux)  # usable checkpoints if time runs out
        save_expert(base, os.path.join(args.out, "high.safetensors"), aux)
    else:
        log("experts: trained from a fresh initialisation each (--expert-init scratch), no base model")
        base_params = None
    log.save()
    expert_params = {}
    for name in ("high", "low"):
        if base_params is not None:
            trainer.params = jax.tree.map(lambda a: jnp.array(a, copy=True), base_params)
        else:  # its own initialisation (seeds differ per expert)
            trainer.params = nnx.split(
                D.new_dit(pre.dit, seed=args.seed + STAGE_SEED[name], dtype=dtype), nnx.Param, ...
            )[1]
        pl = plan[name]
        train_dit(trainer, data, name, pl["steps"], pl["lr"], pl["time"], args, log)
        expert_params[name] = jax.tree.map(lambda a: jnp.array(a, copy=True), trainer.params)
        save_expert(trainer.model(), os.path.join(args.out, f"{name}.safetensors"), aux)
        log.save()
    dist = {"high_vs_low": rel_distance(expert_params["high"], expert_params["low"])}
    ref = base_params if base_params is not None else init_params
    for name in ("high", "low"):
        dist[f"{name}_vs_{'base' if base_params is not None else 'init'}"] = rel_distance(expert_params[name], ref)
    log.data["expert_distance"] = dist
    log("expert weights, relative Frobenius distance: " + ", ".join(f"{k} {v:.4f}" for k, v in dist.items()))
    log.data["total_train_seconds"] = time.perf_counter() - log.t0
    # (6) held-out evaluation through the real pipeline on the written files
    left = args.deadline - (time.perf_counter() - log.t0)
    if args.eval_n > 0 and left < 60:
        log(f"eval: skipped, only {left:.0f}s left before the deadline")
    elif args.eval_n > 0:
        adir = os.path.join(aux, "_assembled")
        assemble(args.out, adir, aux=aux, log=log)
        pipe = WanI2VPipeline.from_pretrained(adir)
        samples = {}
        for guide in args.eval_guides:
            from wanjax.train.evaluate import evaluate

            g = (guide, guide)
            res = evaluate(
                pipe,
                n=args.eval_n,
                seed=args.eval_seed,
                steps=args.eval_steps,
                guide=g,
                num_frames=pre.frames,
                size=pre.size,
                max_seconds=min(
                    args.eval_time,
                    max(5.0, (args.deadline - (time.perf_counter() - log.t0) - 40) / len(args.eval_guides)),
                ),
            )
            vids, truth = res.pop("videos"), res.pop("truth")
            log(
                f"eval guide {guide}: PSNR(frame0) mean {res['psnr_frame0_mean']:.2f} dB (min "
                f"{res['psnr_frame0_min']:.2f}), direction accuracy {res['direction_accuracy']:.3f} "
                f"(hue {res['direction_accuracy_hue']:.3f}) ({res['seconds']:.1f}s)"
            )
            log.data.setdefault("eval", []).append(res)
            samples[f"videos_g{guide:g}"] = vids
            samples["truth"] = truth
            samples["captions"] = np.array(res["captions"][: len(vids)])
            np.savez_compressed(os.path.join(args.out, "samples.npz"), **samples)
            log.save()
        shutil.rmtree(adir, ignore_errors=True)
    log.data["total_seconds"] = time.perf_counter() - log.t0
    log.save()
    log(f"done in {log.data['total_seconds']:.1f}s")


def assemble(src: str, dst: str, aux: str | None = None, preset: str = "mini", log=None) -> str:
    """Lay the flat files of ``run`` out in the official Wan2.2 directory layout at ``dst``.

    ``aux`` holds ``{high,low}.config.json`` and the tokenizer files (default ``src``); missing ones are
    regenerated from ``preset`` (the tokenizer is a pure function of the caption vocabulary)."""
    from wanjax.config import official_config_dict

    aux = aux or src
    from wanjax.io.dit_loader import load_dit
    from wanjax.io.export import save_dit

    os.makedirs(dst, exist_ok=True)
    for name in ("high", "low"):
        target = os.path.join(dst, OFFICIAL_NAMES[name])
        if os.path.isdir(target):
            shutil.rmtree(target)
        tmp = os.path.join(dst, f".tmp-{name}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        shutil.copy(os.path.join(src, f"{name}.safetensors"), os.path.join(tmp, "model.safetensors"))
        cfg_src = os.path.join(aux, f"{name}.config.json")
        if os.path.isfile(cfg_src):
            shutil.copy(cfg_src, os.path.join(tmp, "config.json"))
        else:
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(official_config_dict(PRESETS[preset].dit), f, indent=1)
        m = load_dit(os.path.join(tmp, "model.safetensors"), dtype=jnp.bfloat16)
        save_dit(m, target, layout="official")
        shutil.rmtree(tmp)
    for name in ("vae", "t5"):
        shutil.copy(os.path.join(src, OFFICIAL_NAMES[name]), os.path.join(dst, OFFICIAL_NAMES[name]))
    tdir = os.path.join(dst, OFFICIAL_NAMES["tok"])
    if os.path.isfile(os.path.join(aux, "tokenizer.json")):
        os.makedirs(tdir, exist_ok=True)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            if os.path.isfile(os.path.join(aux, f)):
                shutil.copy(os.path.join(aux, f), os.path.join(tdir, f))
    else:
        T.save_tokenizer(tdir)
    if log is not None:
        log(f"assembled the official layout in {dst}")
    return dst


def cmd_evaluate(args):
    """Held-out evaluation of an official-layout model folder; writes eval.json, samples.npz and a PNG strip."""
    from wanjax.metrics import psnr
    from wanjax.train.evaluate import evaluate, heldout_set
    from wanjax.train.report import strip_png

    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    pipe = WanI2VPipeline.from_pretrained(args.model)
    res_all = {"model": args.model, "load_seconds": time.perf_counter() - t0, "runs": []}
    # VAE reconstruction on held-out clips (bf16, as the pipeline runs it)
    if args.vae_clips:
        vids = heldout_set(args.vae_clips, seed=args.seed + 777)[0]
        x = jnp.asarray(vids.astype(np.float32) / 127.5 - 1.0)
        rec = nnx.jit(lambda v, a: v.decode(v.encode(a)))(pipe.vae, x)
        from wanjax.video_io import to_uint8

        r8 = np.stack([to_uint8(np.asarray(r)) for r in rec])
        res_all["vae_recon_psnr"] = psnr(r8, vids, data_range=255.0)
        print(f"VAE held-out reconstruction PSNR {res_all['vae_recon_psnr']:.2f} dB", flush=True)
        strip_png([vids[0], r8[0]], os.path.join(args.out, "vae_recon.png"))
    samples = {}
    for g in args.guides:
        res = evaluate(
            pipe, n=args.n, seed=args.seed, steps=args.steps, guide=(g, g), keep=args.keep, max_seconds=args.max_seconds
        )
        vids, truth = res.pop("videos"), res.pop("truth")
        samples[f"videos_g{g:g}"] = vids
        samples["truth"] = truth
        samples["captions"] = np.array(res["captions"][: len(vids)])
        print(
            f"guide {g}: n {res['n']}, PSNR(frame0) mean {res['psnr_frame0_mean']:.2f} dB (min "
            f"{res['psnr_frame0_min']:.2f}), direction accuracy {res['direction_accuracy']:.3f} "
            f"(hue {res['direction_accuracy_hue']:.3f}), {res['seconds']:.1f}s",
            flush=True,
        )
        res_all["runs"].append(res)
        rows = []
        for i in range(len(vids)):
            rows += [truth[i], vids[i]]
        strip_png(rows, os.path.join(args.out, f"samples_g{g:g}.png"))
        with open(os.path.join(args.out, "eval.json"), "w") as f:
            json.dump(res_all, f, indent=1, default=float)
    np.savez_compressed(os.path.join(args.out, "samples.npz"), **samples)
    return res_all


def cmd_vae(args):
    """Train only the VAE (stage 1 of ``run``) and check it on held-out clips (`evaluate.vae_check`): the quick
    experiment for the VAE's settings. Writes ``log.json`` and ``vae_recon.png`` (input row over reconstruction)."""
    from wanjax.train.evaluate import vae_check
    from wanjax.train.report import strip_png

    pre = PRESETS[args.preset]
    os.makedirs(args.out, exist_ok=True)
    log = Log(args.out)
    log(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; preset {args.preset}, VAE only")
    log.data["args"] = vars(args)
    vae = train_vae(pre, args, log)
    log(
        f"vae: wrote {save_vae_pth(vae, os.path.join(args.out, OFFICIAL_NAMES['vae']), dtype='float32')} (fp32, "
        "for --vae-from)"
    )
    V.cast_params(vae, jnp.bfloat16)
    check = vae_check(vae, n=args.check_n, seed=args.check_seed)
    example = check.pop("example")
    log.data["vae_check"] = check
    log(
        f"vae check (held-out, n {check['n']}): PSNR {check['psnr']:.2f} dB, chroma ratio {check['chroma_ratio']:.3f}, "
        f"tracker on reconstructions {check['tracker_on_recon']:.3f} (on inputs {check['tracker_on_truth']:.3f}), "
        f"template tracker {check['template_on_recon']:.3f} (on inputs {check['template_on_truth']:.3f})"
    )
    strip_png(list(example), os.path.join(args.out, "vae_recon.png"))
    log.save()
    return check


def _vae_args(p):
    """The seed and VAE-training options shared by ``run`` and ``vae``."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", type=int, default=1, help="bf16 compute while training (params stay fp32)")
    p.add_argument("--vae-steps", type=int, default=2000)
    p.add_argument("--vae-time", type=float, default=75.0, help="VAE training time budget (s)")
    p.add_argument("--vae-batch", type=int, default=8)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-pool", type=int, default=4096)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument(
        "--vae-chroma",
        type=float,
        default=0.0,
        help="weight of an extra chroma L1 term of the VAE "
        "loss (0: plain L1 + L2). The logged chroma ratio shows grey reconstructions, which this term alone "
        "has not prevented (docs/MODEL_CARD.md)",
    )
    p.add_argument(
        "--vae-colour",
        type=float,
        default=1.0,
        help="weight of the latent colour term (first three "
        "latent channels pinned to each patch's mean colour; see train.vae.vae_loss). Without it (0) the "
        "mini VAE decodes grey (docs/MODEL_CARD.md)",
    )
    p.add_argument(
        "--vae-zero-residual",
        type=int,
        default=1,
        help="1 (default): zero-init the last layer of every "
        "residual and attention branch of the VAE (train.vae.zero_residual_init), so training starts from "
        "the plain conv chain",
    )
    p.add_argument(
        "--vae-colour-on",
        default="sample",
        choices=("sample", "mean"),
        help="the latent colour "
        "term compares the sampled latent (default: it also keeps the sampling noise of the colour "
        "channels small) or its mean with the patch colour",
    )
    p.add_argument(
        "--vae-from",
        default=None,
        help="start the VAE from this official .pth (e.g. the one a `vae` "
        "run writes); with --vae-steps 0 it is used as it is",
    )
    p.add_argument("--vae-frames", type=int, default=0, help="frames per VAE training clip (4n+1; 0: the preset's)")
    p.add_argument(
        "--vae-branch-freeze",
        type=int,
        default=10**9,
        help="hold the last layer of every residual "
        "/ attention branch fixed for this many VAE steps (default: all of them, so with "
        "--vae-zero-residual 1 the branches stay zero: the recipe that keeps colour; releasing them "
        "early lost it in the runs of docs/MODEL_CARD.md)",
    )


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m wanjax.train", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train everything and write the flat output folder")
    r.add_argument("--out", required=True)
    r.add_argument("--aux", default=None, help="folder for the tokenizer and config files (default: --out)")
    r.add_argument("--preset", default="mini", choices=sorted(PRESETS))
    _vae_args(r)
    r.add_argument("--stats-clips", type=int, default=256)
    r.add_argument("--n-train", type=int, default=8192)
    r.add_argument("--enc-batch", type=int, default=64)
    r.add_argument("--data-time", type=float, default=40.0, help="time budget for encoding the training set (s)")
    r.add_argument("--batch", type=int, default=128)
    r.add_argument("--lr", type=float, default=5e-4)
    r.add_argument("--base-steps", type=int, default=20000)
    r.add_argument("--base-time", type=float, default=110.0)
    r.add_argument("--expert-steps", type=int, default=6000)
    r.add_argument("--expert-time", type=float, default=35.0)
    r.add_argument("--expert-lr", type=float, default=2e-4)
    for e, band in (("high", "t >= 900"), ("low", "t < 900")):
        r.add_argument(
            f"--{e}-steps",
            type=int,
            default=None,
            help=f"steps of the {e}-noise expert ({band}; default: --expert-steps)",
        )
        r.add_argument(
            f"--{e}-time",
            type=float,
            default=None,
            help=f"time budget (s) of the {e}-noise expert (default: --expert-time)",
        )
        r.add_argument(
            f"--{e}-lr",
            type=float,
            default=None,
            help=f"peak learning rate of the {e}-noise expert (default: --expert-lr)",
        )
    r.add_argument(
        "--expert-init",
        default="base",
        choices=("base", "scratch"),
        help="base (default): train a base model over all t, then fine-tune a copy per expert; scratch: no base, "
        "each expert from its own fresh initialisation",
    )
    r.add_argument(
        "--data-twinkle",
        type=float,
        default=0.0,
        help="training-data change of issue 38 (wanjax.train.detail): small white/black dots, a new random set "
        "every frame, in half of the training clips, at up to this density per 8x8 cell (0: off, the standard clips)",
    )
    r.add_argument("--data-twinkle-radius", type=float, default=1.3, help="dot radius in pixels")
    r.add_argument(
        "--t5-from",
        default=None,
        help="use this official .pth text encoder (copied byte for byte) instead of drawing the random mini UMT5 "
        "from its seed (keep the shipped one: models/mini/models_t5_umt5-xxl-enc-bf16.pth)",
    )
    r.add_argument(
        "--vae-keep",
        type=int,
        default=0,
        help="1: use the --vae-from file byte for byte (needs --vae-steps 0; no latent statistics folded again); "
        "0 (default): --vae-from is loaded, trained --vae-steps more and its latent statistics are folded again",
    )
    r.add_argument("--shift", type=float, default=5.0)
    r.add_argument("--drop-text", type=float, default=0.1)
    r.add_argument("--log-every", type=int, default=100)
    r.add_argument(
        "--deadline",
        type=float,
        default=1e9,
        help="wall-clock seconds for the whole run: the base "
        "model's budget shrinks and the evaluation is cut to end before it",
    )
    r.add_argument("--eval-reserve", type=float, default=100.0, help="seconds kept for the evaluation")
    r.add_argument("--eval-n", type=int, default=16)
    r.add_argument("--eval-time", type=float, default=40.0, help="stop generating held-out clips after this (s)")
    r.add_argument("--eval-seed", type=int, default=1000)
    r.add_argument("--eval-steps", type=int, default=20)
    r.add_argument("--eval-guides", type=float, nargs="+", default=[3.5])
    v = sub.add_parser("vae", help="train only the VAE and check it on held-out clips (PSNR, colour, tracker)")
    v.add_argument("--out", required=True)
    v.add_argument("--preset", default="mini", choices=sorted(PRESETS))
    _vae_args(v)
    v.add_argument("--log-every", type=int, default=100)
    v.add_argument("--check-n", type=int, default=16)
    v.add_argument("--check-seed", type=int, default=1000)
    a = sub.add_parser("assemble", help="lay a run's files out in the official Wan2.2 layout")
    a.add_argument("--src", required=True)
    a.add_argument("--dst", required=True)
    a.add_argument("--aux", default=None)
    a.add_argument("--preset", default="mini", choices=sorted(PRESETS))
    e = sub.add_parser("evaluate", help="held-out first-frame PSNR + motion-direction accuracy of a model folder")
    e.add_argument("--model", default="models/mini")
    e.add_argument("--out", required=True)
    e.add_argument("--n", type=int, default=16)
    e.add_argument("--seed", type=int, default=1000)
    e.add_argument("--steps", type=int, default=20)
    e.add_argument("--guides", type=float, nargs="+", default=[3.5])
    e.add_argument("--keep", type=int, default=3)
    e.add_argument("--vae-clips", type=int, default=4)
    e.add_argument("--max-seconds", type=float, default=None)
    args = ap.parse_args(argv)
    if args.cmd == "run":
        cmd_run(args)
    elif args.cmd == "evaluate":
        cmd_evaluate(args)
    elif args.cmd == "vae":
        cmd_vae(args)
    else:
        assemble(args.src, args.dst, aux=args.aux, preset=args.preset, log=print)


if __name__ == "__main__":
    sys.exit(main())
