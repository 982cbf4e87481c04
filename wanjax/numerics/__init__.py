"""wanjax.numerics: number formats and codecs, the bottom layer of the package.

Imports only jax, numpy and ml_dtypes (never another wanjax package); ``wanjax.kernels`` and ``wanjax.quant`` build on
it. Modules (nothing is imported here; import what you need):

* ``table``        the format table: names, bits, qmax, default blocks, MX scale rules (the one place they are listed)
* ``formats``      the public face: ``quantize`` / ``dequantize`` / ``quantize_dequantize`` and every name below
* ``codecs``       element codecs: E2M1 (FP4), E8M0, FP8 e4m3, exact powers of two
* ``pack``         4-bit nibble packing (the one owner of the layout the kernels read)
* ``tensor``       ``QuantizedTensor`` (the pytree every quantizer returns) and ``dequantize``
* ``int_formats``  INT4 / INT8 (per channel or group) and FP8 e4m3 quantizers
* ``two_level``    INT4 with two-level integer group scales (a unit per row, integer multiples per group)
* ``fp4``          MXFP4 / NVFP4 quantizers, the MX shared-exponent rule, ``mxfp4_decode``
* ``dequant``      the dequantizer of every format
* ``groups``       scale groups along K (reshape, abs-max)
* ``checks``       argument checks and the non-finite input policy
* ``hadamard``     Walsh-Hadamard butterflies and the block rotation primitives (QuaRot-style rotations)
"""
