"""8-bit attention (INT8 QK^T + FP8 PV, SageAttention2-style): the one entry point, routed by platform.

``attention8(q, k, v)`` takes [B, S, N, D] q, k, v and returns [B, Sq, N, D] in bf16 (non-causal, scale 1/sqrt(D)).
The numbers are those of ``attention8_reference`` (pre-pass :func:`~attention8_reference.quantize_qkv`, then the
core); the implementations:

* ``"reference"``: the plain-jnp reference (any platform; the CPU default, slow on accelerators: it is a scan over
  KV tiles of plain XLA ops);
* ``"tpu"``: ``attention8_tpu`` (Pallas TPU: INT8 MXU QK^T, f32 softmax, PV on the MXU), the TPU default;
  verified in the interpreter and lowered for TPU on a CPU host only;
* ``"gpu"``: ``attention8_gpu`` (Pallas Mosaic GPU, Hopper), the Hopper default: its default config matched the
  reference on an H100 (``attention8_gpu.VERIFIED``; while that flag is False, a GPU refuses with a
  NotImplementedError naming the missing run rather than silently running something else).

Override with ``impl=`` or the environment variable ``WANJAX_ATTN8_IMPL=reference|tpu|gpu``.

``wanjax.model.attention`` does not import this module (the model layer may not import kernels): the app layer
registers :func:`attention8` as the ``"attn8"`` backend (``register_attention_backend("attn8", attention8)``).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from . import attention8_reference as ref
from .attention8_reference import DEFAULT, Attn8Config

IMPLS = ("reference", "tpu", "gpu")
ENV_VAR = "WANJAX_ATTN8_IMPL"


def _device():
    try:
        return jax.devices()[0]
    except RuntimeError:  # pragma: no cover
        return None


def default_impl() -> str:
    """The implementation ``attention8`` runs here (see the module docstring); raises where none may run."""
    forced = os.environ.get(ENV_VAR) or None
    if forced:
        if forced not in IMPLS:
            raise ValueError(f"{ENV_VAR}={forced!r}; expected one of {IMPLS}")
        return forced
    dev = _device()
    platform = getattr(dev, "platform", "cpu")
    if platform == "tpu":
        return "tpu"
    if platform == "gpu":
        from . import attention8_gpu

        cc = str(getattr(dev, "compute_capability", ""))
        if not cc.startswith("9"):
            raise NotImplementedError(
                f"attention 'attn8' has a kernel for Hopper GPUs (compute capability 9.x) only; "
                f"{getattr(dev, 'device_kind', dev)} has {cc or 'unknown'}. Use another attention "
                f"backend, or {ENV_VAR}=reference for the (slow) jnp reference."
            )
        if not attention8_gpu.VERIFIED:
            raise NotImplementedError(
                "attention 'attn8' on a GPU: the default config of kernels/attention8_gpu.py has not been checked "
                "on an H100 yet (attention8_gpu.VERIFIED is False). Run "
                "tests/test_attention8_gpu.py and `python -m bench.attention8` on an H100 (it checks the kernel against "
                "the jnp reference), then set attention8_gpu.VERIFIED = True; meanwhile pass impl='gpu' (or "
                f"{ENV_VAR}=gpu) to try it, or {ENV_VAR}=reference for the jnp reference."
            )
        return "gpu"
    return "reference"


def attention8(
    q: jax.Array, k: jax.Array, v: jax.Array, *, config: Attn8Config = DEFAULT, impl: str | None = None
) -> jax.Array:
    """8-bit attention of [B, S, N, D] q, k, v; returns [B, Sq, N, D] bf16."""
    impl = impl or default_impl()
    if impl not in IMPLS:
        raise ValueError(f"attention8: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return _reference_jit(q, k, v, config)
    if impl == "tpu":
        from . import attention8_tpu

        return attention8_tpu.attention8_tpu(q, k, v, config=config)
    from . import attention8_gpu

    return attention8_gpu.attention8_gpu(q, k, v)


#: the jnp reference, jitted (config and out_dtype static)
_reference_jit_fn = jax.jit(ref.attention8_reference, static_argnums=(3, 4))


def _reference_jit(q, k, v, config):
    return _reference_jit_fn(q, k, v, config, jnp.bfloat16)
