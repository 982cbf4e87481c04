"""JSON of results that hold numpy values: one ``default=`` hook for ``json.dump``."""

from __future__ import annotations

import json

import numpy as np

__all__ = ["json_default", "to_jsonable"]


def json_default(o):
    """``json.dump(..., default=json_default)``: numpy scalars (floating, integer, bool) as Python numbers, numpy
    arrays as nested lists, anything else as ``str(o)`` (a result file never fails on an odd value)."""
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def to_jsonable(obj):
    """``obj`` as plain JSON types (a round trip through `json_default`): what a later ``json.dump`` writes as is."""
    return json.loads(json.dumps(obj, default=json_default))
