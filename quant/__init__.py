"""wanjax.quant: quantization number formats and pure transforms over parameter pytrees.

Kept light on purpose (no kernel imports). Import submodules directly, e.g.
``from wanjax.quant import formats`` (see ``docs/formats.md``).
"""
