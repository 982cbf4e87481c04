"""Timestep bins (quant/bins.py): the seed's 6-bin table, any count per expert, host and jitted look-up."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wanjax.quant.bins import TimestepBins, make_bins, seed_bins, uniform_bins
from wanjax.sampling import flow_schedule

SEED_TABLE = [  # name, expert, steps, t_max, t_min (seed reference, section 2.6)
    ("high_early", "high", 5, 999, 978),
    ("high_mid", "high", 5, 972, 944),
    ("boundary_pre", "high", 5, 937, 902),
    ("boundary_post", "low", 5, 892, 846),
    ("low_mid", "low", 13, 833, 555),
    ("low_late", "low", 7, 514, 113),
]


def test_seed_table_40_steps_shift5():
    bins = seed_bins(flow_schedule(40, shift=5.0))
    got = [(r["name"], r["expert"], r["steps"], r["t_max"], r["t_min"]) for r in bins.table()]
    assert got == SEED_TABLE
    assert sum(len(s) for s in bins.steps) == 40
    assert bins.expert_bins("low") == ("boundary_post", "low_mid", "low_late") and bins.offset("low") == 3


def test_every_schedule_step_maps_to_its_bin_host_and_jit():
    sched = flow_schedule(40, shift=5.0)
    bins = seed_bins(sched)
    want = [bins.bin_of_step(i) for i in range(40)]
    assert [bins.index(t) for t in sched.timesteps] == want
    got = jax.jit(bins.lookup)(jnp.asarray(sched.timesteps))
    np.testing.assert_array_equal(np.asarray(got), want)
    # one traced scalar at a time too (as a jitted step receives it)
    f = jax.jit(lambda t: bins.lookup(t))
    assert [int(f(jnp.float32(t))) for t in sched.timesteps[::7]] == want[::7]
    local = np.asarray(jax.jit(bins.local_lookup)(jnp.asarray(sched.timesteps)))
    np.testing.assert_array_equal(local, [w if w < 3 else w - 3 for w in want])


def test_off_schedule_timesteps_respect_the_expert_boundary():
    bins = seed_bins(flow_schedule(40, shift=5.0))
    assert bins.name(1000) == "high_early" and bins.name(975) == "high_mid"
    assert bins.name(901) == "boundary_pre" and bins.name(900) == "boundary_pre"  # t >= 900 is high noise
    assert bins.name(899.5) == "boundary_post" and bins.name(0) == "low_late" and bins.name(-5) == "low_late"
    assert int(bins.lookup(901.0)) == 2 and int(bins.lookup(899.0)) == 3


@pytest.mark.parametrize("per_expert", [1, 2, 4, 5, {"high": 2, "low": 6}])
def test_any_count_per_expert(per_expert):
    sched = flow_schedule(40, shift=5.0)
    bins = uniform_bins(sched, per_expert)
    counts = per_expert if isinstance(per_expert, dict) else {"high": per_expert, "low": per_expert}
    assert len(bins.expert_bins("high")) == counts["high"] and len(bins.expert_bins("low")) == counts["low"]
    for e, n in (("high", 15), ("low", 25)):
        names = bins.expert_bins(e)
        sizes = [len(bins.steps[bins.names.index(nm)]) for nm in names]
        assert sum(sizes) == n and max(sizes) - min(sizes) <= 1  # equal slices by fractional position
    # bins partition the schedule in order, and look-up agrees with membership
    flat = [i for s in bins.steps for i in s]
    assert flat == list(range(40))
    assert [bins.index(t) for t in sched.timesteps] == [bins.bin_of_step(i) for i in range(40)]


def test_other_schedules_follow_the_actual_timesteps():
    sched = flow_schedule(20, shift=3.0)
    bins = seed_bins(sched)
    high = int(np.sum(sched.timesteps >= 900))
    assert sum(len(bins.steps[i]) for i in range(3)) == high
    for b in range(bins.num_bins):
        assert bins.t_max[b] == sched.timesteps[bins.steps[b][0]]
        assert bins.t_min[b] == sched.timesteps[bins.steps[b][-1]]


def test_errors_and_roundtrip():
    sched = flow_schedule(8, shift=5.0)  # 3 high-noise steps
    with pytest.raises(ValueError, match="holds no step"):
        uniform_bins(sched, 4)
    with pytest.raises(ValueError, match="increasing"):
        make_bins(sched, {"high": (0.5, 0.2), "low": ()})
    with pytest.raises(ValueError, match="names"):
        make_bins(sched, {"high": (0.5,), "low": ()}, names={"high": ("a",)})
    bins = seed_bins(flow_schedule(40))
    assert TimestepBins.from_dict(bins.to_dict()) == bins
