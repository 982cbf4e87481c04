"""Small helpers shared by several test files: the shipped mini model's folder, the argument lists of the CLI
tests (``wanjax generate`` / ``quantize`` on it), tiny models and the comparisons several tests make."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINI = os.path.join(ROOT, "models", "mini")

#: the settings of a quick calibration run: 5 frames of 64x64, 8 steps
QUICK_CALIB = ("--frames", "5", "--size", "64", "--steps", "8")


def generate_argv(image, *extra) -> list:
    """``wanjax generate`` on the mini model with ``image`` and the prompt "p", then ``extra``."""
    return ["generate", "--model", MINI, "--image", str(image), "--prompt", "p", *extra]


def quantize_argv(*extra) -> list:
    """``wanjax quantize`` on the mini model, then ``extra``."""
    return ["quantize", "--model", MINI, *extra]


def tiny_dit(cfg, seed):
    """An fp32 `WanDiT` of ``cfg`` (parameters from ``nnx.Rngs(seed)``) and its inputs: a latent ``x [1, 2, 4, 4,
    in_dim]`` and a text context ``[1, 5, text_dim]``, standard normal (numpy ``default_rng(0)``)."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from wanjax.model.dit import WanDiT

    model = WanDiT(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 2, 4, 4, cfg.in_dim)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((1, 5, cfg.text_dim)), jnp.float32)
    return model, x, ctx


def nvfp4_qlinear(mode="real", path="x"):
    """A 64 -> 32 NVFP4 (weights and activations, groups of 16) `QLinear` of all-ones weights in ``mode`` (real mode
    is refused for NVFP4: the constructor raises then)."""
    import jax.numpy as jnp
    import numpy as np

    from wanjax.numerics import formats
    from wanjax.quant.qlinear import QLinear, QLinearConfig

    cfg = QLinearConfig(64, 32, "nvfp4", 16, "nvfp4", 16)
    qt = formats.quantize_nvfp4(jnp.ones((32, 64))).pack()
    return QLinear(
        cfg,
        qweight=qt.codes,
        wscale=qt.scales,
        wtensor_scale=qt.tensor_scale,
        act_clip=np.ones(1, np.float32),
        mode=mode,
        path=path,
    )


def rel_l2(a, b) -> float:
    """``||a - b|| / ||b||`` in float64."""
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def fake_and_real(qmodel, x, ctx, t=950.0, bin_index=1) -> dict:
    """``{"fake": y, "real": y}`` (float32 numpy): the quantized DiT ``qmodel`` at timestep ``t`` inside timestep bin
    ``bin_index``, once in each QLinear mode (the kernels are those ``WANJAX_KERNELS`` selects)."""
    import jax.numpy as jnp
    import numpy as np

    from wanjax.quant.apply import set_mode
    from wanjax.quant.qlinear import active_bin

    with active_bin(bin_index):
        return {m: np.asarray(set_mode(qmodel, m)(x, jnp.array([t]), ctx), np.float32) for m in ("fake", "real")}
