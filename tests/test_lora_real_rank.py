"""A LoRA on real-mode W4A4 layers keeps a GEMM-friendly total rank: rank 32 + 64 = 96 stays 96 (a multiple of 16,
what the Mosaic GPU epilogue takes; the fused act quant pads to 128 inside). Padding to the next power of two (128),
as before, overflowed the GEMM's shared memory on the H100 (237,568 B > 232,448)."""

from wanjax.kernels.act_quant_gpu import padded_rank
from wanjax.kernels.w4a4_gpu import W4A4Config, fit_epilogue, fit_stages
from wanjax.lora.apply import REAL_RANK_MULTIPLE, _padded


def test_real_mode_rank_is_a_multiple_of_16_that_the_gemm_fits():
    assert _padded(32 + 64, REAL_RANK_MULTIPLE) == 96 and _padded(32 + 8, REAL_RANK_MULTIPLE) == 48
    assert padded_rank(96) == 128  # the act-quant kernel's own padding (sliced back)
    for r in (48, 96):
        cfg = fit_stages(W4A4Config(), r, 2, "int8")
        assert fit_epilogue(cfg, r, 2, "int8")


def test_the_gemm_at_rank_96_lowers_for_cuda_within_shared_memory():
    """The Mosaic GPU GEMM of a W4A4 layer carrying a rank-64 LoRA (rank 96) lowers for CUDA on this CPU host at
    the Wan shapes (Mosaic GPU checks the kernel's shared memory against the H100's limit while lowering)."""
    import jax
    import jax.numpy as jnp

    from wanjax.kernels import w4a4_gpu

    m, k = 32760, 5120
    for n, r in ((5120, 96), (13824, 96), (5120, 32)):
        S = jax.ShapeDtypeStruct
        args = (
            S((m, k), jnp.int8),
            S((m,), jnp.float32),
            S((n, k), jnp.int8),
            S((n,), jnp.float32),
            S((m, r), jnp.bfloat16),
            S((r, n), jnp.bfloat16),
            S((n,), jnp.float32),
        )
        fn = jax.jit(lambda *a: w4a4_gpu.w4a4_matmul_gpu_any_m(*a))
        assert "mosaic_gpu" in fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
