"""Where the shipped mini model is: `mini_model_path()`.

The mini Wan2.2 MoE (official layout, ~36 MB; model card ``models/mini/README.md``) lives in the repository's
``models/mini`` folder. The wheel ships the same files as the data package ``wanjax.assets`` (``wanjax/assets/mini``),
so a plain ``pip install`` has it too. `mini_model_path` finds it in either place; ``WANJAX_MINI_MODEL`` overrides.
"""

from __future__ import annotations

import importlib.util
import os

__all__ = ["mini_model_path", "MINI_MODEL_ENV"]

MINI_MODEL_ENV = "WANJAX_MINI_MODEL"
_MARKER = os.path.join("high_noise_model", "config.json")


def _candidates() -> list[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    out = [
        os.path.join(here, "assets", "mini"),  # installed wheel
        os.path.join(os.path.dirname(here), "models", "mini"),
    ]  # source checkout / editable install
    try:
        spec = importlib.util.find_spec("wanjax.assets")  # editable install: mapped to models/
    except (ImportError, ValueError):
        spec = None
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        out.append(os.path.join(loc, "mini"))
    return out


def mini_model_path() -> str:
    """The directory of the shipped mini model (official Wan2.2 layout), for ``WanI2VPipeline.from_pretrained``.

    Looks at ``$WANJAX_MINI_MODEL``, then the installed package data (``wanjax/assets/mini``), then the source
    checkout (``models/mini``). Raises ``FileNotFoundError`` with how to get it when none has the model.
    """
    env = os.environ.get(MINI_MODEL_ENV)
    if env:
        if not os.path.isfile(os.path.join(env, _MARKER)):
            raise FileNotFoundError(f"${MINI_MODEL_ENV}={env}: no mini model there (expected {_MARKER})")
        return env
    tried = []
    for c in _candidates():
        if c in tried:
            continue
        tried.append(c)
        if os.path.isfile(os.path.join(c, _MARKER)):
            return c
    raise FileNotFoundError(
        "the wanjax mini model was not found (looked in " + ", ".join(tried) + "). It ships in the wheel and in the "
        "repository's models/mini; this install has neither (a source install without models/?). Clone the "
        f"repository and `pip install` it, or point ${MINI_MODEL_ENV} at a copy of models/mini."
    )
