"""Issue 38's training options (wanjax/train/cli.py, wanjax/train/detail.py): per-expert budgets, experts from
scratch, the kept VAE / text encoder files, the twinkling-dots data change."""

import argparse
import filecmp
import json

import jax
import jax.numpy as jnp
import numpy as np

from wanjax.data import procedural
from wanjax.train import cli
from wanjax.train import detail


def test_expert_plan_overrides():
    a = argparse.Namespace(
        expert_steps=10, expert_time=5.0, expert_lr=1e-4, high_steps=None, high_time=7.0, high_lr=None,
        low_steps=3, low_time=None, low_lr=2e-4,
    )  # fmt: skip
    p = cli.expert_plan(a)
    assert p["high"] == {"steps": 10, "time": 7.0, "lr": 1e-4}
    assert p["low"] == {"steps": 3, "time": 5.0, "lr": 2e-4}


def test_rel_distance():
    a = {"w": jnp.ones((4,)), "b": jnp.zeros((2,))}
    b = {"w": jnp.ones((4,)) * 3.0, "b": jnp.zeros((2,))}
    assert cli.rel_distance(a, a) == 0.0
    assert abs(cli.rel_distance(a, b) - 4.0 / 4.0) < 1e-6  # ||2 * ones(4)|| = 4, mean norm (2 + 6) / 2 = 4


def _clips(n=16, frames=5, size=64):
    p = procedural.sample_params(n, "train", 7, frames, size)
    return procedural.array_params(p), p


def test_twinkles_half_the_clips_new_every_frame_under_the_object():
    arr, p = _clips()
    dens = np.asarray(detail.clip_density(arr, 0.3))
    assert 3 <= int((dens == 0).sum()) <= 13 and dens.max() <= 0.3 and (dens[dens > 0] >= 0.075).all()
    std = np.asarray(procedural.render(arr, 5, 64, xp=jnp))
    tw = np.asarray(jax.jit(lambda q: detail.render_with_sparkles(q, 5, 64, density=0.3))(arr))
    again = np.asarray(jax.jit(lambda q: detail.render_with_sparkles(q, 5, 64, density=0.3))(arr))
    np.testing.assert_array_equal(tw, again)  # deterministic
    diff = np.abs(tw - std).max(-1)  # [N, F, H, W]
    changed = diff > 0.1
    for i in range(len(dens)):
        if dens[i] == 0:
            assert not changed[i].any(), i
        else:
            assert changed[i].mean() > 0.002, (i, changed[i].mean())
    i = int(np.argmax(dens))
    # a new set of dots every frame: the changed pixels of frames 1 and 2 are not the same set
    assert (changed[i, 1] != changed[i, 2]).mean() > 0.002
    # the object covers them: no change where the object is opaque
    alpha = np.asarray(detail.object_alpha(arr, 5, 64))[..., 0]
    assert not changed[alpha > 0.999].any()
    # dots are white or black: the changed pixels sit near +1 or -1
    v = tw[i][changed[i]]
    assert (np.abs(np.abs(v) - 1.0) < 0.35).mean() > 0.5


def _run(out, *extra):
    cli.main(
        ["run", "--out", str(out), "--preset", "tiny", "--vae-pool", "4", "--stats-clips", "2", "--n-train", "4"]
        + ["--enc-batch", "2", "--batch", "2", "--eval-n", "0", "--log-every", "1", *extra]
    )
    with open(out / "log.json") as f:
        return json.load(f)


def test_run_per_expert_budgets_scratch_and_kept_files(tmp_path):
    first = _run(
        tmp_path / "a", "--vae-steps", "0", "--base-steps", "2", "--high-steps", "1", "--low-steps", "3",
        "--data-twinkle", "0.3",
    )  # fmt: skip
    assert [first["stages"][k]["steps"] for k in ("base", "high", "low")] == [2, 1, 3]
    d = first["expert_distance"]
    assert set(d) == {"high_vs_low", "high_vs_base", "low_vs_base"} and d["high_vs_low"] > 0
    vae, t5 = tmp_path / "a" / "Wan2.1_VAE.pth", tmp_path / "a" / "models_t5_umt5-xxl-enc-bf16.pth"
    second = _run(
        tmp_path / "b", "--vae-from", str(vae), "--vae-steps", "0", "--vae-keep", "1", "--t5-from", str(t5),
        "--expert-init", "scratch", "--high-steps", "2", "--low-steps", "1",
    )  # fmt: skip
    assert "base" not in second["stages"] and second["stages"]["vae"]["kept"]
    assert [second["stages"][k]["steps"] for k in ("high", "low")] == [2, 1]
    d = second["expert_distance"]
    assert set(d) == {"high_vs_low", "high_vs_init", "low_vs_init"}
    assert d["high_vs_low"] > 1.0  # two independent initialisations
    assert filecmp.cmp(vae, tmp_path / "b" / "Wan2.1_VAE.pth", shallow=False)
    assert filecmp.cmp(t5, tmp_path / "b" / "models_t5_umt5-xxl-enc-bf16.pth", shallow=False)
    cli.assemble(str(tmp_path / "b"), str(tmp_path / "official"), preset="tiny")
    assert (tmp_path / "official" / "high_noise_model" / "config.json").exists()
