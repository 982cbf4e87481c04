"""Names of the DiT's layers that other parts of the project address by name (the one owner of these lists).

`BLOCK_LINEARS` are the 10 Linears of every attention block of `wanjax.model.dit.WanDiT`, by their module path
(``Linear.path``; each is stacked over the ``num_layers`` scanned blocks): self-attention q/k/v/o, cross-attention
q/k/v/o and the FFN's two layers. Quantization replaces exactly these (``wanjax.quant``), calibration captures their
inputs, the checkpoint key map (`wanjax.io.keymap`) and the sharding rules (`wanjax.parallel.rules`) derive their
entries from them. Plain strings, no imports: any layer may read them.
"""

from __future__ import annotations

__all__ = ["BLOCK_LINEARS", "BLOCK_LINEAR_NAMES", "block_linear_shapes"]

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


def block_linear_shapes(cfg) -> dict[str, tuple[int, int]]:
    """``path -> (K, N)`` (in and out features) of the `BLOCK_LINEARS` of a model with config ``cfg`` (a
    `wanjax.config.WanConfig`): every attention projection is ``dim -> dim``, ``ffn.fc1`` ``dim -> ffn_dim`` and
    ``ffn.fc2`` ``ffn_dim -> dim``."""
    d, f = cfg.dim, cfg.ffn_dim
    special = {"blocks.ffn.fc1": (d, f), "blocks.ffn.fc2": (f, d)}
    return {p: special.get(p, (d, d)) for p in BLOCK_LINEARS}
