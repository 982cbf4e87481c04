"""wanjax.kernels: low-bit (W4A4) kernels, each beside a plain-jnp reference, and a dispatcher.

Layer: imports only ``wanjax.numerics`` (number formats, codecs, packing, Hadamard primitives) and jax; never
``wanjax.quant`` (``tests/test_import_layers.py`` checks it).

Modules (import what you need; nothing heavy is imported here):

* ``dispatch``       the entry points ``wanjax.quant`` calls: ``w4a4_linear`` / ``w4a4_matmul`` / ``act_quant`` (INT4)
                     and ``mxfp4_linear`` / ``mxfp4_linear_fp8`` / ``mxfp4_matmul`` (MXFP4); routing only (backend by
                     platform, override with ``WANJAX_KERNELS=reference|xla|pallas``; shape and size thresholds)
* ``w4a4_linear``    the INT4 linear's operand checks and one function per GEMM implementation
* ``mxfp4_linear``   the MXFP4 linears' activation quantization, checks and kernel-path glue
* ``xla_paths``      the XLA implementations (int8 / fp8 / bf16 dots with the fused epilogue in f32)
* ``reference``      plain-jnp references: activation quantization, low-rank, W4A4 GEMM (packing re-exported from
                     ``wanjax.numerics.pack``)
* ``w4a4_gpu``       Hopper W4A4 GEMM (Pallas Mosaic GPU, int8 / int4-in-registers / fp8 ``wgmma``, fused epilogue)
                     and ``build_gemm_kernel``, the scaffolding it shares with ``w4a4_g128_gpu``
* ``w4a4_g128_gpu``  Hopper group-scaled (g128) W4A4 GEMM (per-group promotion into f32 registers)
* ``act_quant_gpu``  fused activation quantization (XLA) and the Pallas (Triton) quantizers
* ``mxfp4_gpu``      MXFP4 -> (e4m3, 2**row_exp) re-encoding and the FP8 GEMM path
* ``mxfp4_act_gpu``  MXFP4 activation quantization straight into e4m3 (Pallas Triton)
* ``w4a4_tpu``       Pallas TPU W4A4 GEMM (interpreter-verified only)
"""
