"""Names of the DiT's layers that other parts of the project address by name (the one owner of these lists).

`BLOCK_LINEARS` are the 10 Linears of every attention block of `wanjax.model.dit.WanDiT`, by their module path
(``Linear.path``; each is stacked over the ``num_layers`` scanned blocks): self-attention q/k/v/o, cross-attention
q/k/v/o and the FFN's two layers. Quantization replaces exactly these (``wanjax.quant``), calibration captures their
inputs, the checkpoint key map (`wanjax.io.keymap`) and the sharding rules (`wanjax.parallel.rules`) derive their
entries from them. Plain strings, no imports: any layer may read them.
"""

from __future__ import annotations

__all__ = ["BLOCK_LINEARS", "BLOCK_LINEAR_NAMES", "FUSED_LINEARS", "block_linear_shapes", "fused_parent"]

#: Module paths of the 10 Linears of a WanDiT block, in the model's order (``"blocks.self_attn.q"``, ...).
BLOCK_LINEARS: tuple[str, ...] = (
    "blocks.self_attn.q",
    "blocks.self_attn.k",
    "blocks.self_attn.v",
    "blocks.self_attn.o",
    "blocks.cross_attn.q",
    "blocks.cross_attn.k",
    "blocks.cross_attn.v",
    "blocks.cross_attn.o",
    "blocks.ffn.fc1",
    "blocks.ffn.fc2",
)

#: The same layers by their name inside one block (``"self_attn.q"``, ..., ``"ffn.fc2"``).
BLOCK_LINEAR_NAMES: tuple[str, ...] = tuple(p[len("blocks.") :] for p in BLOCK_LINEARS)


#: Fused projections a quantized model may hold instead of some `BLOCK_LINEARS` (``fused path -> its parts``, in the
#: order of their output columns): ``blocks.self_attn.qkv`` is one linear ``[K, 3 * dim]`` computing the
#: self-attention q, k and v from their one shared input (``wanjax.quant``'s recipe option ``fuse_qkv``). The model
#: runs it and splits the output when the attention module has a ``qkv`` attribute (`wanjax.model.dit.Attention`).
FUSED_LINEARS: dict[str, tuple[str, ...]] = {
    "blocks.self_attn.qkv": ("blocks.self_attn.q", "blocks.self_attn.k", "blocks.self_attn.v"),
}


def fused_parent(path: str) -> str | None:
    """The fused path (`FUSED_LINEARS`) that computes the block Linear ``path``, or None."""
    return next((f for f, parts in FUSED_LINEARS.items() if path in parts), None)


def block_linear_shapes(cfg) -> dict[str, tuple[int, int]]:
    """``path -> (K, N)`` (in and out features) of the `BLOCK_LINEARS` of a model with config ``cfg`` (a
    `wanjax.config.WanConfig`): every attention projection is ``dim -> dim``, ``ffn.fc1`` ``dim -> ffn_dim`` and
    ``ffn.fc2`` ``ffn_dim -> dim``."""
    d, f = cfg.dim, cfg.ffn_dim
    special = {"blocks.ffn.fc1": (d, f), "blocks.ffn.fc2": (f, d)}
    return {p: special.get(p, (d, d)) for p in BLOCK_LINEARS}
