"""``python -m wanjax.train.lora``: train a small LoRA on the mini model's experts (CPU, a few minutes).

    python -m wanjax.train.lora --model models/mini --out models/mini/loras/reverse_motion --eval-n 12

The task ``reverse-motion`` teaches the experts to move the object the *other* way: the training clips are the
procedural clips of `wanjax.data.procedural` with a left/right/up/down motion, captioned with the opposite direction
(``"a red square moves right"`` under a clip where it moves left; a camera pan keeps its own words). Everything
else is the base model's own training (`wanjax.train.dit`): flow matching with shift 5, each expert on its band
of timesteps (high-noise ``t >= 900``, low-noise ``t < 900``), 10 % of the captions replaced by the negative prompt
(the unconditional branch of classifier-free guidance).

Only the LoRA is trained: for every block Linear chosen (``--modules``) a rank-``r`` pair ``down [r, K]``, ``up
[N, r]`` per block, ``up`` starting at zero, added as ``x @ down^T @ up^T * alpha / r`` to the frozen bf16 expert's
output (`wanjax.model.layers.linear_interceptor` on the unrolled blocks, so the model code is untouched). Defaults:
rank 4 on the text side of cross-attention (``cross_attn.k`` / ``cross_attn.v``, where the caption's words enter),
600 AdamW steps of batch 8 per expert at lr 5e-3 on 128 clips of 17 frames at 64x64. The low-noise expert's LoRA
trains on sigma in [0.6, 0.9) only (``--low-sigma-min``): over its whole band it first learns to ignore the
direction words instead of reversing them (low in the band the motion is visible in the noisy latent itself).

One LoRA per expert, written in the official / Wan2.2-Lightning key layout
(``diffusion_model.blocks.N.<layer>.lora_down.weight`` / ``lora_up.weight`` / ``alpha``, float32) as
``high_noise_model.safetensors`` and ``low_noise_model.safetensors`` in ``--out``, with ``training_log.json`` (the
command, settings, loss curves, time) and, with ``--eval-n``, the direction accuracy on held-out clips with and
without the LoRA (`direction_eval`). Apply them with ``wanjax generate --lora high=OUT/high_noise_model.safetensors
--lora low=OUT/low_noise_model.safetensors`` or `wanjax.lora.apply_lora`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wanjax.data import procedural
from wanjax.model.layers import linear_interceptor
from wanjax.model.names import BLOCK_LINEAR_NAMES, block_linear_shapes
from wanjax.train import dit as D

__all__ = [
    "TASKS",
    "OPPOSITE",
    "LORA_FILES",
    "official_name",
    "reverse_caption",
    "init_lora",
    "lora_branch",
    "lora_state_dict",
    "build_data",
    "LoraTrainer",
    "train_expert_lora",
    "centred_heldout",
    "direction_eval",
    "main",
]

#: left <-> right, up <-> down
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
#: expert -> file name (the Wan2.2-Lightning release's names)
LORA_FILES = {"high": "high_noise_model.safetensors", "low": "low_noise_model.safetensors"}
_OFFICIAL = {"ffn.fc1": "ffn.0", "ffn.fc2": "ffn.2"}


def reverse_caption(caption: str) -> str:
    """``"a red square moves left as the camera pans up"`` -> ``"a red square moves right as the camera pans up"``:
    the object's direction flipped, the camera's kept. A caption without ``moves <direction>`` raises ValueError."""
    words = caption.split()
    for i in range(len(words) - 1):
        if words[i] == "moves" and words[i + 1] in OPPOSITE:
            return " ".join(words[: i + 1] + [OPPOSITE[words[i + 1]]] + words[i + 2 :])
    raise ValueError(f"reverse_caption: no 'moves left/right/up/down' in {caption!r}")


#: task name -> caption transform applied to the directional training clips
TASKS = {"reverse-motion": reverse_caption}


def official_name(layer: str) -> str:
    """A block Linear's name inside a block as the official checkpoint names it (``"ffn.fc1"`` -> ``"ffn.0"``)."""
    return _OFFICIAL.get(layer, layer)


def init_lora(cfg, modules, rank: int, seed: int = 0) -> dict:
    """``{layer: {"down": [L, r, K], "up": [L, N, r]}}`` float32 for the block Linears ``modules`` (names as in
    `wanjax.model.names.BLOCK_LINEAR_NAMES`): ``down`` ~ N(0, 1/K) (Kaiming-like), ``up`` zero, so training starts at
    the base model exactly."""
    shapes = block_linear_shapes(cfg)
    key = jax.random.key(seed)
    out = {}
    for i, layer in enumerate(modules):
        if layer not in BLOCK_LINEAR_NAMES:
            raise ValueError(f"init_lora: unknown block Linear {layer!r}; expected some of {list(BLOCK_LINEAR_NAMES)}")
        k, n = shapes[f"blocks.{layer}"]
        down = jax.random.normal(jax.random.fold_in(key, i), (cfg.num_layers, rank, k), jnp.float32) / np.sqrt(k)
        out[layer] = {"down": down, "up": jnp.zeros((cfg.num_layers, n, rank), jnp.float32)}
    return out


def lora_branch(lora: dict, scale: float):
    """The interceptor ``fn(module, x)`` adding ``scale * x @ down[i]^T @ up[i]^T`` to each LoRA'd block Linear of
    block ``i`` (the model must run unrolled: ``model.scan_layers = False``)."""
    from wanjax.model.dit import current_layer_index

    def fn(module, x):
        y = module.apply_default(x)
        layer = module.path[len("blocks.") :] if module.path.startswith("blocks.") else None
        if layer not in lora:
            return y
        i = current_layer_index()
        if i is None:
            raise RuntimeError("lora_branch: no block index; run the model with scan_layers=False")
        h = jnp.einsum("...k,rk->...r", x.astype(jnp.float32), lora[layer]["down"][i])
        d = jnp.einsum("...r,nr->...n", h, lora[layer]["up"][i])
        return (y.astype(jnp.float32) + scale * d).astype(y.dtype)

    return fn


def lora_state_dict(lora: dict, alpha: float) -> dict[str, np.ndarray]:
    """The LoRA in the official / Lightning key layout: ``diffusion_model.blocks.N.<layer>.lora_down.weight`` [r, K],
    ``.lora_up.weight`` [N, r] and ``.alpha`` (float32 scalars)."""
    sd = {}
    for layer, p in lora.items():
        down, up = np.asarray(p["down"], np.float32), np.asarray(p["up"], np.float32)
        for i in range(down.shape[0]):
            base = f"diffusion_model.blocks.{i}.{official_name(layer)}"
            sd[f"{base}.lora_down.weight"] = np.ascontiguousarray(down[i])
            sd[f"{base}.lora_up.weight"] = np.ascontiguousarray(up[i])
            sd[f"{base}.alpha"] = np.asarray(alpha, np.float32)
    return sd


def build_data(
    pipe,
    n: int,
    seed: int,
    frames: int,
    size: int,
    task: str = "reverse-motion",
    split: str = "train",
    batch: int = 8,
    cache: str | None = None,
) -> dict:
    """The data of ``task``: ``n`` directional clips of ``split`` rendered at ``size`` x ``size``, ``frames``
    frames, encoded as the pipeline encodes them (the VAE is most of the time on a CPU: about 1 s a clip at 64x64).

    Returns a dict: ``x0`` [n, ...16] and ``y`` [n, ...20] (float32), ``cap_idx`` [n] into ``ctx`` [C, L, D] (the
    contexts of the transformed captions), ``captions`` (transformed), ``ctx_orig`` [n, L, D] (each clip's own
    caption) and ``neg`` [1, L, D] (the negative prompt). ``cache``: an ``.npz`` holding the encoded latents of
    exactly these settings (written when missing, reused when its settings match)."""
    from wanjax.model.vae import encode_video
    from wanjax.pipeline import DEFAULT_NEGATIVE_PROMPT
    from wanjax.text import encode_prompts

    clips, orig, _ = procedural.make_clips(n, split, seed, frames, size, directional_only=True)
    caps = [TASKS[task](c) for c in orig]
    key = f"{n}/{split}/{seed}/{frames}/{size}/{task}"
    uniq = sorted(set(caps))
    tl = pipe.cfg.text_len

    def encode(prompts):
        parts = [
            encode_prompts(pipe.text_encoder, pipe.tokenizer, prompts[s : s + 64], pad_to=tl)[0]
            for s in range(0, len(prompts), 64)
        ]
        return jnp.concatenate(parts).astype(jnp.float32)

    if cache and os.path.isfile(cache) and str(np.load(cache)["key"]) == key:
        with np.load(cache) as z:
            x0, y = z["x0"], z["y"]
    else:
        cond = nnx.jit(lambda v, x: D.condition_latents(v, x, frames))
        enc = nnx.jit(encode_video)
        x0s, ys = [], []
        for s in range(0, n, batch):
            v = jnp.asarray(clips[s : s + batch])
            x0s.append(np.asarray(enc(pipe.vae, v), np.float32))
            ys.append(np.asarray(cond(pipe.vae, v[:, 0]), np.float32))
        x0, y = np.concatenate(x0s), np.concatenate(ys)
        if cache:
            np.savez(cache, x0=x0, y=y, key=np.asarray(key))
    return {
        "x0": jnp.asarray(x0),
        "y": jnp.asarray(y),
        "cap_idx": jnp.asarray(np.array([uniq.index(c) for c in caps], np.int32)),
        "ctx": encode(uniq),
        "captions": caps,
        "ctx_orig": encode(list(orig)),
        "neg": encode([DEFAULT_NEGATIVE_PROMPT]),
    }


class LoraTrainer:
    """Flow-matching training of a LoRA on a frozen expert (`wanjax.train.dit.fm_loss` on the expert with the LoRA
    branch): one jitted step ``(lora, opt_state, x0, y, ctx, neg, key, lr) -> (lora, opt_state, loss)``, AdamW
    (`wanjax.train.dit.make_tx`, no weight decay)."""

    def __init__(self, expert, lora: dict, alpha: float, u_range, shift: float = 5.0, drop_text: float = 0.1):
        rank = next(iter(lora.values()))["down"].shape[1]
        self.scale = float(alpha) / rank
        self.lora = lora
        self.tx = D.make_tx(weight_decay=0.0)
        self.opt_state = self.tx.init(lora)
        graphdef, self.state = nnx.split(expert)
        scale, tx = self.scale, self.tx
        u_lo, u_hi = (float(u) for u in u_range)

        def loss_fn(lora, state, x0, y, ctx, key):
            model = nnx.merge(graphdef, state)
            model.scan_layers = False
            with linear_interceptor(lora_branch(lora, scale)):
                return D.fm_loss(model, x0, y, ctx, key, u_lo, u_hi, shift)

        def step(lora, opt_state, state, x0, y, ctx, neg, key, lr):
            kd, kl = jax.random.split(key)
            drop = jax.random.uniform(kd, (x0.shape[0], 1, 1)) < drop_text
            c = jnp.where(drop, neg.astype(ctx.dtype), ctx)
            loss, grads = jax.value_and_grad(loss_fn)(lora, state, x0, y, c, kl)
            updates, opt_state = tx.update(grads, opt_state, lora)
            lora = jax.tree.map(lambda p, u: p - lr * u, lora, updates)
            return lora, opt_state, loss

        self._step = jax.jit(step, donate_argnums=(0, 1))
        self._eval_loss = jax.jit(loss_fn)

    def step(self, x0, y, ctx, neg, key, lr: float):
        self.lora, self.opt_state, loss = self._step(
            self.lora, self.opt_state, self.state, x0, y, ctx, neg, key, jnp.float32(lr)
        )
        return loss

    def eval_loss(self, lora, x0, y, ctx, key) -> float:
        """The loss of ``lora`` on one batch (no update)."""
        return float(self._eval_loss(lora, self.state, x0, y, ctx, key))


def train_expert_lora(pipe, expert: str, data: dict, args, log=print, val: dict | None = None) -> tuple[dict, dict]:
    """Train the LoRA of ``expert`` (``"high"`` / ``"low"``) on ``data`` (`build_data`); returns the LoRA and its
    log entry: steps, seconds, loss curve, the loss of the base and of the LoRA on 8 fixed training batches, and
    with ``val`` (`build_data` of held-out clips) both models' loss there with the transformed captions and with the
    clips' own."""
    x0, y, cap_idx, ctx, neg = (data[k] for k in ("x0", "y", "cap_idx", "ctx", "neg"))
    model = nnx.merge(pipe.graphdef, pipe.expert_params(expert))
    u_range = D.expert_u_range(expert, args.shift)
    if expert == "low" and args.low_sigma_min > 0:  # only the top of the low-noise band (module docstring)
        s = args.low_sigma_min
        u_range = (s / (args.shift - (args.shift - 1.0) * s), u_range[1])  # inverse of the shift at sigma s
    seed = args.seed * 100 + {"high": 2, "low": 3}[expert]
    lora = init_lora(model.cfg, args.modules, args.rank, seed)
    base = jax.tree.map(jnp.copy, lora)  # up = 0: the base model
    tr = LoraTrainer(model, lora, args.alpha, u_range, shift=args.shift, drop_text=args.drop_text)
    rng = np.random.default_rng(99)
    fixed = [
        (jnp.asarray(rng.integers(0, x0.shape[0], args.batch)), jax.random.key(1000 + j)) for j in range(8)
    ]  # same batches and noise before and after

    def fixed_loss(lo):
        return float(np.mean([tr.eval_loss(lo, x0[i], y[i], ctx[cap_idx[i]], k) for i, k in fixed]))

    before = fixed_loss(tr.lora)
    it = D.batches(x0.shape[0], args.batch, seed)
    curve, t0 = [], time.perf_counter()
    for i in range(args.steps):
        idx = jnp.asarray(next(it))
        key = jax.random.fold_in(jax.random.key(seed), i)
        lr = D.lr_at(i, args.lr, i / args.steps, warmup=min(50, args.steps // 4 + 1))
        loss = tr.step(x0[idx], y[idx], ctx[cap_idx[idx]], neg, key, lr)
        if i % args.log_every == 0 or i == args.steps - 1:
            curve.append([i, float(loss)])
            log(f"{expert} step {i}: loss {curve[-1][1]:.4f} ({time.perf_counter() - t0:.0f}s)")
    after = fixed_loss(tr.lora)
    secs = time.perf_counter() - t0
    log(f"{expert}: {args.steps} steps in {secs:.0f}s; loss on 8 fixed batches {before:.4f} (base) -> {after:.4f}")
    entry = {
        "steps": args.steps,
        "seconds": round(secs, 1),
        "u_range": list(u_range),
        "loss_base": before,
        "loss_lora": after,
        "curve": curve,
    }
    if val is not None:
        vx0, vy, vctx = val["x0"], val["y"], {"task": val["ctx"][val["cap_idx"]], "own": val["ctx_orig"]}
        b = args.batch

        def val_loss(lo, which):
            c = vctx[which]
            return float(
                np.mean(
                    [
                        tr.eval_loss(lo, vx0[s : s + b], vy[s : s + b], c[s : s + b], jax.random.key(2000 + s + j))
                        for s in range(0, vx0.shape[0], b)
                        for j in range(4)
                    ]
                )
            )

        entry["heldout_loss"] = {
            m: {"task_captions": val_loss(lo, "task"), "own_captions": val_loss(lo, "own")}
            for m, lo in (("base", base), ("lora", tr.lora))
        }
        h = entry["heldout_loss"]
        log(
            f"{expert}: held-out loss with the task's captions {h['base']['task_captions']:.4f} (base) -> "
            f"{h['lora']['task_captions']:.4f}, with their own {h['base']['own_captions']:.4f} -> "
            f"{h['lora']['own_captions']:.4f}"
        )
    return tr.lora, entry


def centred_heldout(n: int, seed: int = 1000, frames: int = 17, size: int = 64):
    """``n`` held-out directional clips (`wanjax.train.evaluate.heldout_set`'s captions, shapes, colours and
    motions) with the object starting at the centre of the frame and its path shortened to stay inside: from the
    first frame every direction has room, so the caption alone decides where the object goes (the held-out clips of
    `heldout_set` start where their captioned path fits, which leaves no room for the opposite one). Returns
    (uint8 videos [n, F, H, W, 3], captions, colours, directions)."""
    from wanjax.video_io import to_uint8

    p = procedural.sample_params(n, "heldout", seed, frames, size, directional_only=True)
    p["cx"][:] = size / 2.0
    p["cy"][:] = size / 2.0
    span = max(frames - 1, 1)
    room = size / 2.0 - 1.1 * p["radius"]  # how far the centre may move with the object still inside
    dist = np.hypot(p["vx"], p["vy"]) * span
    factor = np.minimum(1.0, room / np.maximum(dist, 1e-6)).astype(np.float32)
    p["vx"] *= factor
    p["vy"] *= factor
    clips = procedural.render(procedural.array_params(p), frames, size)
    dirs = [m.split()[1] for m in p["motion_name"]]
    return np.stack([to_uint8(c) for c in clips]), list(p["captions"]), list(p["colour_name"]), dirs


def direction_eval(
    pipe, n: int, seed: int, frames: int, size: int, steps: int, guide: float = 3.5, centred: bool = True
) -> dict:
    """Generate ``n`` held-out directional clips (captions and shape/colour pairs never trained on; ``centred``:
    `centred_heldout`, else `wanjax.train.evaluate.heldout_set`) from their first frame and caption, and track the
    object (`wanjax.train.evaluate.template_accuracy`): ``captioned`` = fraction moving as the caption says,
    ``reversed`` = fraction moving the opposite way, plus the tracked directions."""
    from wanjax.train.evaluate import heldout_set, template_accuracy

    videos, caps, colours, dirs = (centred_heldout if centred else heldout_set)(n, seed, frames, size)
    outs = [
        pipe.generate(
            videos[i, 0],
            caps[i],
            num_frames=frames,
            max_area=size * size,
            steps=steps,
            guide_scale=(guide, guide),
            seed=seed + i,
            progress=False,
        ).frames
        for i in range(n)
    ]
    acc, got = template_accuracy(outs, videos, colours, dirs)
    rev = float(np.mean([g == OPPOSITE[d] for g, d in zip(got, dirs)]))
    return {"n": n, "captioned": acc, "reversed": rev, "tracked": got, "directions": dirs}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m wanjax.train.lora", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/mini", help="model dir (official layout), default: %(default)s")
    ap.add_argument("--out", required=True, help="directory for the two LoRA files and training_log.json")
    ap.add_argument("--task", default="reverse-motion", choices=sorted(TASKS))
    ap.add_argument("--experts", default="high,low", help="comma list of high, low (default: %(default)s)")
    ap.add_argument(
        "--modules",
        default="cross_attn.k,cross_attn.v",
        help="comma list of block Linears (of: " + ", ".join(BLOCK_LINEAR_NAMES) + "; default: %(default)s)",
    )
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=4.0, help="LoRA alpha (scale alpha / rank; default: %(default)s)")
    ap.add_argument("--clips", type=int, default=128, help="training clips (default: %(default)s)")
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--size", type=int, default=64, help="square clip edge in pixels (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=600, help="optimizer steps per expert (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--shift", type=float, default=5.0)
    ap.add_argument("--drop-text", type=float, default=0.1)
    ap.add_argument(
        "--low-sigma-min",
        type=float,
        default=0.6,
        help="train the low-noise expert's LoRA only on sigma in [this, 0.9) (0: its whole band; default: %(default)s)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument(
        "--val-clips", type=int, default=16, help="held-out clips for the validation loss (default: %(default)s)"
    )
    ap.add_argument("--eval-n", type=int, default=0, help="held-out clips to evaluate with and without the LoRA")
    ap.add_argument("--eval-steps", type=int, default=8)
    ap.add_argument("--overwrite", action="store_true", help="replace LoRA files already in --out")
    ap.add_argument("--data-cache", default=None, help="an .npz keeping the encoded training set between runs")
    return ap


def main(argv=None) -> dict:
    """Run the training (arguments: ``python -m wanjax.train.lora --help``); returns the log dict."""
    from safetensors.numpy import save_file

    from wanjax.pipeline import WanI2VPipeline

    args = _parser().parse_args(argv)
    args.experts = [e for e in args.experts.split(",") if e]
    args.modules = [m for m in args.modules.split(",") if m]
    if not args.experts or any(e not in LORA_FILES for e in args.experts):
        raise SystemExit(f"--experts: expected a comma list of high, low, got {args.experts}")
    os.makedirs(args.out, exist_ok=True)
    files = {e: os.path.join(args.out, LORA_FILES[e]) for e in args.experts}
    there = [f for f in files.values() if os.path.exists(f)]
    if there and not args.overwrite:
        raise SystemExit(f"--out {args.out}: {there} exist (pass --overwrite to replace them)")
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.0f}s] {msg}", flush=True)

    pipe = WanI2VPipeline.from_pretrained(args.model)
    data = build_data(pipe, args.clips, args.seed + 7, args.frames, args.size, args.task, cache=args.data_cache)
    log(f"data: {args.clips} clips {args.frames}x{args.size}x{args.size}, {len(set(data['captions']))} captions")
    val = None
    if args.val_clips:
        cache = f"{args.data_cache}.val.npz" if args.data_cache else None
        val = build_data(pipe, args.val_clips, 1000, args.frames, args.size, args.task, split="heldout", cache=cache)
        log(f"held-out validation: {args.val_clips} clips")
    record = {
        "command": "python -m wanjax.train.lora " + " ".join(argv if argv is not None else sys.argv[1:]),
        "jax": jax.__version__,
        "device": jax.devices()[0].device_kind,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "overwrite", "data_cache")},
        "experts": {},
    }
    for e in args.experts:
        lora, entry = train_expert_lora(pipe, e, data, args, log, val)
        sd = lora_state_dict(lora, args.alpha)
        save_file(sd, files[e], metadata={"format": "pt", "wanjax_task": args.task, "rank": str(args.rank)})
        entry["file"] = LORA_FILES[e]
        entry["bytes"] = os.path.getsize(files[e])
        record["experts"][e] = entry
        log(f"wrote {files[e]} ({entry['bytes'] / 1024:.0f} KiB)")
    record["train_seconds"] = round(time.perf_counter() - t_start, 1)
    if args.eval_n:
        from wanjax.lora import apply_lora, remove_lora

        ev = {"frames": args.frames, "size": args.size, "steps": args.eval_steps, "guide": 3.5}
        ev["without"] = direction_eval(pipe, args.eval_n, 1000, args.frames, args.size, args.eval_steps)
        for e, f in files.items():
            apply_lora(pipe, f, expert=e)
        ev["with"] = direction_eval(pipe, args.eval_n, 1000, args.frames, args.size, args.eval_steps)
        remove_lora(pipe)
        for k in ("without", "with"):
            log(f"held-out ({k} LoRA): captioned direction {ev[k]['captioned']:.3f}, reversed {ev[k]['reversed']:.3f}")
        record["eval"] = ev
    with open(os.path.join(args.out, "training_log.json"), "w") as f:
        json.dump(record, f, indent=1, default=float)
    log("done")
    return record


if __name__ == "__main__":
    main()
