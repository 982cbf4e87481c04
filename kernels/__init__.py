"""wanjax.kernels: low-bit (W4A4) kernels, each beside a plain-jnp reference, and a dispatcher.

Modules (import what you need; nothing heavy is imported here):

* ``reference``      plain-jnp references: int4 packing, activation quantization, low-rank, W4A4 GEMM
* ``dispatch``       ``w4a4_linear`` / ``w4a4_matmul`` / ``act_quant`` (INT4) and ``mxfp4_linear`` (MXFP4): the entry
                     points ``wanjax.quant`` calls; backend by platform, override with
                     ``WANJAX_KERNELS=reference|xla|pallas``
* ``w4a4_gpu``       Hopper W4A4 GEMM (Pallas Mosaic GPU, int8 / int4-in-registers / fp8 ``wgmma``, fused epilogue)
* ``act_quant_gpu``  fused activation quantization (XLA) and a single-pass Pallas quantizer
* ``mxfp4_gpu``      MXFP4 -> (e4m3, 2**row_exp) re-encoding and the FP8 GEMM path
* ``w4a4_tpu``       Pallas TPU W4A4 GEMM (interpreter-verified only)
"""
