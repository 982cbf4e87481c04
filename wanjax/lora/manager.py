"""LoRAs on a pipeline's two experts, switchable at run time: ``apply_lora(pipe, "high.safetensors", expert="high")``.

The first call records the pipeline's experts as they are (the *base*: BF16, or W4A4 attached by
``wanjax.quant``); every change (apply, strength, remove) rebuilds both experts from the base and the list of
active LoRAs (`wanjax.lora.apply.lora_model`) and installs them with the pipeline's public methods
(``replace_experts``, or ``wanjax.quant.apply.attach_to_pipeline`` with the pipeline's ``quant_bins`` for quantized
experts). Removing the last LoRA installs the base arrays themselves: the outputs are exactly the ones before.
Nothing is re-quantized: a W4A4 expert keeps its codes and gets the LoRAs as extra low-rank rank.

Both experts always get the same module structure and branch ranks (the expert without a LoRA on a layer gets zero
columns there), so one compiled velocity serves both. If the pipeline's experts are replaced behind this module's
back (``replace_experts`` / ``attach_to_pipeline`` / ``attach_artifact``), the new experts become the base and the
active LoRAs are applied to them at the next change.

Memory: the base arrays stay referenced (for exact removal). On W4A4 experts only the LoRA branches come on top
(rank-64 BF16 on the 400 block Linears of an A14B expert: 0.6 GB); on BF16 experts the merged Linears are a second
copy of the touched weights (for an always-on LoRA such as Lightning on BF16, merge once with
`wanjax.lora.lora_model` and drop the original instead).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from flax import nnx

from wanjax.lora.apply import lora_model, lora_ranks, pad_lora_ranks
from wanjax.lora.formats import LoraWeights, read_lora

__all__ = ["apply_lora", "set_lora_strength", "remove_lora", "active_loras", "EXPERTS"]

EXPERTS = ("high", "low")
_ATTR = "_wanjax_lora"


@dataclasses.dataclass
class _Active:
    name: str
    weights: LoraWeights
    expert: str
    strength: float


@dataclasses.dataclass
class _State:
    graphdef: Any
    base: dict  # expert -> params state of the base expert
    bins: Any  # the pipeline's quant_bins (quantized experts) or None
    installed: Any  # the graphdef object last installed (detects experts replaced behind our back)
    loras: list = dataclasses.field(default_factory=list)


def _state(pipe) -> _State:
    st = getattr(pipe, _ATTR, None)
    prev = []
    if st is not None and pipe.graphdef is not st.installed:
        prev, st = st.loras, None  # experts replaced since: the current ones become the base, the LoRAs stay listed
    if st is None:
        st = _State(
            graphdef=pipe.graphdef,
            base={e: pipe.expert_params(e) for e in EXPERTS},
            bins=getattr(pipe, "quant_bins", None),
            installed=pipe.graphdef,
            loras=list(prev),
        )
        setattr(pipe, _ATTR, st)
    return st


def _install(pipe, st: _State) -> None:
    """Build both experts from the base and the active LoRAs and give them to the pipeline."""
    if not st.loras:
        high = nnx.merge(st.graphdef, st.base["high"])
        low = nnx.merge(st.graphdef, st.base["low"])
    else:
        models = {}
        for e in EXPERTS:
            specs = [(a.weights, a.strength) for a in st.loras if a.expert == e]
            models[e] = lora_model(nnx.merge(st.graphdef, st.base[e]), specs)
        ranks: dict[str, int] = {}
        for m in models.values():
            for p, r in lora_ranks(m).items():
                ranks[p] = max(ranks.get(p, 0), r)
        high, low = (pad_lora_ranks(models[e], ranks) for e in EXPERTS)
    if st.bins is not None:
        from wanjax.quant.apply import attach_to_pipeline

        attach_to_pipeline(pipe, high, low, st.bins)
    else:
        pipe.replace_experts(high, low)
    st.installed = pipe.graphdef


def apply_lora(
    pipe,
    lora: str | os.PathLike | LoraWeights,
    *,
    expert: str = "both",
    strength: float = 1.0,
    name: str | None = None,
    ignore_unknown: bool = False,
) -> str:
    """Apply a LoRA (a ``.safetensors`` path in any accepted format, or `LoraWeights`) to the pipeline's
    ``expert`` (``"high"``, ``"low"`` or ``"both"``) at ``strength``; returns its name (for `set_lora_strength` /
    `remove_lora`; default: the file's base name, or ``name``). Several LoRAs can be active at once; the file is
    checked against the experts' config before anything changes (`LoraError` naming file / key / expected / got).
    """
    if expert not in EXPERTS + ("both",):
        raise ValueError(f"apply_lora: expert must be 'high', 'low' or 'both', got {expert!r}")
    lw = lora if isinstance(lora, LoraWeights) else read_lora(lora, pipe.cfg, ignore_unknown=ignore_unknown)
    st = _state(pipe)
    base_name = name or lw.name or os.path.basename(str(lw.source))
    taken = {a.name for a in st.loras}
    label, i = base_name, 2
    while label in taken:
        label, i = f"{base_name}#{i}", i + 1
    experts = EXPERTS if expert == "both" else (expert,)
    added = [_Active(label, lw, e, float(strength)) for e in experts]
    st.loras.extend(added)
    try:
        _install(pipe, st)
    except Exception:
        for a in added:
            st.loras.remove(a)
        raise
    return label


def set_lora_strength(pipe, name: str, strength: float) -> None:
    """Change the strength of the active LoRA ``name`` (on every expert it is on); no re-quantization."""
    st = _state(pipe)
    hits = [a for a in st.loras if a.name == name]
    if not hits:
        raise KeyError(f"set_lora_strength: no active LoRA {name!r}; active: {[a.name for a in st.loras]}")
    old = [a.strength for a in hits]
    for a in hits:
        a.strength = float(strength)
    try:
        _install(pipe, st)
    except Exception:
        for a, s in zip(hits, old):
            a.strength = s
        raise


def remove_lora(pipe, name: str | None = None) -> None:
    """Remove the active LoRA ``name`` (every LoRA when None). Removing the last one restores the exact base
    experts."""
    st = getattr(pipe, _ATTR, None)
    if st is None:
        if name is None:
            return
        raise KeyError(f"remove_lora: no LoRA is active on this pipeline (asked for {name!r})")
    st = _state(pipe)
    if name is not None and not any(a.name == name for a in st.loras):
        raise KeyError(f"remove_lora: no active LoRA {name!r}; active: {[a.name for a in st.loras]}")
    st.loras = [a for a in st.loras if name is not None and a.name != name]
    _install(pipe, st)


def active_loras(pipe) -> list[dict]:
    """The active LoRAs: ``[{"name", "expert", "strength", "source", "format", "modules"}]``."""
    st = getattr(pipe, _ATTR, None)
    if st is None:
        return []
    return [
        {
            "name": a.name,
            "expert": a.expert,
            "strength": a.strength,
            "source": a.weights.source,
            "format": a.weights.format,
            "modules": len(a.weights.modules),
        }
        for a in st.loras
    ]
