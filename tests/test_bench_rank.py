"""bench.rank's pure parts: the --ranks parser and the per-block rank-mix table (the timing itself needs a GPU)."""

import pytest

from bench.rank import DEFAULT_RANKS, block_table, parse_ranks


def test_parse_ranks():
    assert parse_ranks(None) == DEFAULT_RANKS
    assert parse_ranks(["5120x5120=0,16", "13824x5120=64"]) == {(5120, 5120): (0, 16), (13824, 5120): (64,)}


def _row(k, n, r, e2e, bf16):
    return {"K": k, "N": n, "rank": r, "e2e": e2e, "bf16": bf16}


def test_block_table_adds_six_attention_linears_and_the_ffn():
    rows = [
        _row(5120, 5120, 16, 1.0, 2.0),
        _row(5120, 5120, 32, 1.5, 2.0),
        _row(5120, 13824, 32, 3.0, 6.0),
        _row(5120, 13824, 64, 4.0, 6.0),
        _row(13824, 5120, 32, 3.5, 7.0),
        _row(13824, 5120, 64, 5.0, 7.0),
    ]
    t = {b["mix"]: b for b in block_table(rows)}
    d = t["rank 32 everywhere (default)"]
    assert d["block_ms"] == pytest.approx(6 * 1.5 + 3.0 + 3.5)
    assert d["bf16_block_ms"] == pytest.approx(6 * 2.0 + 6.0 + 7.0)
    assert d["x_bf16"] == pytest.approx(25.0 / 15.5)
    assert t["ffn 64 / attention 16"]["block_ms"] == pytest.approx(6 * 1.0 + 4.0 + 5.0)
    assert "rank 64 everywhere" not in t  # 5120 x 5120 at rank 64 was not timed
    assert block_table(rows[:2]) == []  # no FFN shapes: no block


def test_block_table_rotation_columns():
    """A ``--rotate`` tag adds each mix with the rotated linears' e2e times, only where every shape has that column."""
    rows = [_row(5120, 5120, 32, 1.5, 2.0), _row(5120, 13824, 32, 3.0, 6.0), _row(13824, 5120, 32, 3.5, 7.0)]
    for r, t in zip(rows, (2.0, 4.0, 4.5)):
        r["e2e_rot256"] = r["e2e_rotmax"] = t
    rows[2]["e2e_rotmax"] = "ValueError: does not fit"  # a failed variant is a string: no block for it
    t = {b["mix"]: b for b in block_table(rows, ("256", "max"))}
    assert t["rank 32 everywhere (default), rotation 256"]["block_ms"] == pytest.approx(6 * 2.0 + 4.0 + 4.5)
    assert t["rank 32 everywhere (default), rotation 256"]["rotation"] == "256"
    assert t["rank 32 everywhere (default)"]["block_ms"] == pytest.approx(6 * 1.5 + 3.0 + 3.5)
    assert not any("rotation max" in m for m in t)
