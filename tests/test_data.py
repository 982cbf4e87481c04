"""Procedural video generator (wanjax.data.procedural) and the object tracker (wanjax.track)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wanjax import track
from wanjax.data import procedural as P


def test_shapes_range_and_determinism():
    v1, c1, p1 = P.make_clips(6, "train", seed=3, num_frames=9, size=64)
    v2, c2, _ = P.make_clips(6, "train", seed=3, num_frames=9, size=64)
    assert v1.shape == (6, 9, 64, 64, 3) and v1.dtype == np.float32
    assert -1.0 <= v1.min() and v1.max() <= 1.0
    np.testing.assert_array_equal(v1, v2)
    assert c1 == c2
    v3, c3, _ = P.make_clips(6, "train", seed=4, num_frames=9, size=64)
    assert not np.array_equal(v1, v3)
    # clip i does not depend on how many clips are drawn
    v4, c4, _ = P.make_clips(2, "train", seed=3, num_frames=9, size=64)
    np.testing.assert_array_equal(v4, v1[:2])
    assert c4 == c1[:2]
    # frames differ over time (something moves) and the first frame is not blank
    assert np.abs(v1[:, -1] - v1[:, 0]).mean() > 1e-3


def test_captions_name_object_colour_motion():
    p = P.sample_params(40, "train", seed=0)
    for cap, k, c, m, pan in zip(p["captions"], p["kind_name"], p["colour_name"], p["motion_name"], p["pan_name"]):
        assert cap.startswith(f"a {c} {k} {m}")
        assert (pan is None) == ("camera" not in cap)
        assert k in P.KINDS and c in P.COLOURS and m in P.MOTIONS
    assert len(set(p["motion_name"])) > 3


def test_heldout_disjoint_from_train():
    train = set(P.all_captions("train"))
    held = set(P.all_captions("heldout"))
    assert train and held and not (train & held)
    pt = P.sample_params(200, "train", seed=0)
    ph = P.sample_params(50, "heldout", seed=0)
    assert set(pt["captions"]) <= train
    assert set(ph["captions"]) <= held
    assert not set(zip(pt["kind_name"], pt["colour_name"])) & set(P.HELDOUT_PAIRS)
    # same seed, different split -> different clip parameters
    assert not np.allclose(pt["cx"][:50], ph["cx"])
    # every held-out word is in the tokenizer vocabulary
    vocab = set(P.vocabulary())
    assert all(w in vocab for c in held for w in c.split())


def test_jnp_render_matches_numpy():
    p = P.sample_params(3, "train", seed=1, num_frames=5, size=32)
    arr = P.array_params(p)
    a = P.render(arr, 5, 32)
    b = jax.jit(lambda q: P.render(q, 5, 32, xp=jnp))({k: jnp.asarray(v) for k, v in arr.items()})
    np.testing.assert_allclose(np.asarray(b), a, atol=2e-3)


def test_bad_split():
    with pytest.raises(ValueError, match="split"):
        P.sample_params(1, "test")


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_tracker_recovers_planted_direction(split):
    v, _, p = P.make_clips(24, split, seed=11, directional_only=True)
    dirs = [m.split()[1] for m in p["motion_name"]]
    assert set(dirs) == set(P.DIRECTIONS)
    acc, got = track.direction_accuracy(v, p["colour_name"], dirs)
    assert acc == 1.0, list(zip(dirs, got))
    # uint8 input gives the same answer
    u8 = np.clip(np.rint((v[0] + 1) * 127.5), 0, 255).astype(np.uint8)
    assert track.motion_direction(u8, p["colour_name"][0])[0] == dirs[0]


def test_tracker_static_and_missing():
    v, _, p = P.make_clips(8, "train", seed=2)
    static = np.repeat(v[:1, :1], 17, axis=1)[0]
    assert track.motion_direction(static, p["colour_name"][0])[0] == "none"
    grey = np.zeros((5, 32, 32, 3), np.float32)
    assert track.motion_direction(grey, "red")[0] == "none"
    with pytest.raises(ValueError, match="colour"):
        track.object_mask(grey, "black")


def test_template_tracker_needs_no_colour():
    """The colour-free tracker follows the object on the clips and on their grey versions (started from the
    object's mask in the colour first frame), and sees no motion in a frozen clip."""
    v, _, p = P.make_clips(12, "heldout", seed=1000, directional_only=True)
    dirs = [m.split()[1] for m in p["motion_name"]]
    ok_colour = ok_grey = 0
    for clip, colour, d in zip(v, p["colour_name"], dirs):
        m0 = track.object_mask(clip[:1], colour)[0]
        grey = np.repeat(clip.mean(-1, keepdims=True), 3, -1)
        assert track.motion_direction(grey, colour)[0] == "none"  # the hue tracker cannot see it
        ok_colour += track.template_direction(clip, m0)[0] == d
        ok_grey += track.template_direction(grey, m0)[0] == d
        assert track.template_direction(np.repeat(clip[:1], 17, 0), m0)[0] == "none"
    assert ok_colour == 12
    assert ok_grey >= 11  # grey loses contrast where object and background have equal luma
    # lost object -> NaN from there on; bad mask shape -> clear error
    m0 = track.object_mask(v[0][:1], p["colour_name"][0])[0]
    path = track.template_track(np.concatenate([v[0][:3], np.zeros_like(v[0][3:]) - 1]), m0)
    assert np.isfinite(path[:3]).all() and np.isnan(path[3:]).all()
    with pytest.raises(ValueError, match="mask0 shape"):
        track.template_track(v[0], np.ones((8, 8), bool))
