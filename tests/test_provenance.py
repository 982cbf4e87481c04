"""Provenance and consistency of calibration work dirs and quantized artifacts (issue 30), and
``--quant-mode auto`` (issue 29): sample / settings / model mismatches named, restart, model fingerprints, edited
formats and NaN tables refused at load, published file modes, temp dirs cleaned, inputs never overwritten."""

import hashlib
import json
import os
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from test_artifact import mixed_qlayers
from wanjax.config import TINY
from wanjax.model.dit import WanDiT
from wanjax.pipeline import GenerationConfig, WanI2VPipeline
from wanjax.quant import artifact
from wanjax.quant.apply import qlinears, quantize_model
from wanjax.quant.artifact import (
    ArtifactError,
    attach_artifact,
    compare_fingerprints,
    load_artifact,
    model_fingerprint,
    resolve_quant_mode,
    save_artifact,
)
from wanjax.quant.bins import seed_bins
from wanjax.quant.calibrate import (
    CalibConfig,
    CalibrationMismatchError,
    CalibSample,
    calibrate,
    check_calibration_model,
)
from wanjax.quant.recipes import RECIPES, recipe_to_dict
from wanjax.sampling import flow_schedule

GEN = GenerationConfig(steps=8, shift=5.0, guide_scale=(2.0, 4.0))
CAL = CalibConfig(gen=GEN, reservoir=4, rows_per_call=4, blocks_per_group=1)
BINS = seed_bins(flow_schedule(12, shift=5.0))


# ------------------------------------------------------------------------------------------ calibration
@pytest.fixture(scope="module")
def fpipe():
    high = WanDiT(TINY, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(1))
    low = WanDiT(TINY, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(2))
    return WanI2VPipeline(high, low, vae=None)


def _samples(tmp_path, **change):
    """Two samples with an image file, a prompt and precomputed y / context (the pipe has no VAE / text encoder:
    the precomputed arrays drive the run, the image and prompt are still part of the sample's identity)."""
    out = []
    for i in range(2):
        r = np.random.default_rng(i)
        img = tmp_path / f"img{i}.png"
        if not img.exists():
            img.write_bytes(b"image-%d" % i)
        kw = dict(
            image=str(img),
            prompt=f"prompt {i}",
            seed=i,
            y=jnp.asarray(r.standard_normal((1, 2, 4, 4, 20)), jnp.float32),
            context=jnp.asarray(r.standard_normal((2, 5, TINY.text_dim)), jnp.float32),
        )
        if i == 1:
            kw.update(change)
        out.append(CalibSample(**kw))
    return out


class _Stop(Exception):
    pass


def _stop(kind, uid):
    raise _Stop(uid)


def _start(pipe, samples, work_dir, cfg=CAL, **kw):
    """Run until the first trajectory is saved (the manifest is written before any work)."""
    with pytest.raises(_Stop):
        calibrate(pipe, samples, cfg, work_dir=work_dir, progress=False, on_unit=_stop, **kw)


def test_calibration_records_samples_and_refuses_others(fpipe, tmp_path):
    work = tmp_path / "work"
    _start(fpipe, _samples(tmp_path), work)
    man = json.load(open(work / "manifest.json"))
    assert len(man["sample_hashes"]) == 2 and man["sample_hashes"][1]["seed"] == 1
    assert set(man["model_fingerprint"]["experts"]) == {"high", "low"}
    _start(fpipe, _samples(tmp_path), work)  # same samples: resumes (sample 0's trajectory is kept)
    assert sorted(os.listdir(work / "traj")) == ["sample_00000.npz", "sample_00001.npz"]

    other = tmp_path / "other.png"
    other.write_bytes(b"another image")
    cases = {
        "image": dict(image=str(other)),
        "prompt": dict(prompt="another prompt"),
        "negative_prompt": dict(negative_prompt="blurry"),
        "y": dict(y=jnp.zeros((1, 2, 4, 4, 20), jnp.float32)),
        "context": dict(context=jnp.zeros((2, 5, TINY.text_dim), jnp.float32)),
    }
    for field, change in cases.items():
        with pytest.raises(CalibrationMismatchError, match=rf"different samples \(sample 1: {field}\)"):
            calibrate(fpipe, _samples(tmp_path, **change), CAL, work_dir=work, progress=False)
    with pytest.raises(CalibrationMismatchError, match=r"sample 1: seed \(1 -> 7\)"):
        calibrate(fpipe, _samples(tmp_path, seed=7), CAL, work_dir=work, progress=False)
    # the same file name with other content is another sample
    (tmp_path / "img1.png").write_bytes(b"edited pixels")
    with pytest.raises(CalibrationMismatchError, match=r"sample 1: image"):
        calibrate(fpipe, _samples(tmp_path), CAL, work_dir=work, progress=False)
    (tmp_path / "img1.png").write_bytes(b"image-1")
    with pytest.raises(CalibrationMismatchError, match=r"different settings \(config.reservoir: 4 -> 5\)") as e:
        calibrate(
            fpipe,
            _samples(tmp_path),
            CalibConfig(gen=GEN, reservoir=5, rows_per_call=4, blocks_per_group=1),
            work_dir=work,
            progress=False,
        )
    assert isinstance(e.value, ValueError) and "restart=True" in str(e.value)
    with pytest.raises(CalibrationMismatchError, match=r"2 -> 1"):
        calibrate(fpipe, _samples(tmp_path)[:1], CAL, work_dir=work, progress=False)
    with pytest.raises(FileNotFoundError, match=r"sample 1: image '.*nope.png' does not exist"):
        calibrate(fpipe, _samples(tmp_path, image=str(tmp_path / "nope.png")), CAL, work_dir=work, progress=False)
    assert json.load(open(work / "manifest.json")) == man  # nothing above touched the run

    # another model with the same config
    other_pipe = WanI2VPipeline(
        WanDiT(TINY, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(7)),
        nnx.merge(fpipe.graphdef, fpipe._params_low),
        vae=None,
    )
    with pytest.raises(CalibrationMismatchError, match=r"different model weights \(expert 'high'"):
        calibrate(other_pipe, _samples(tmp_path), CAL, work_dir=work, progress=False)
    check_calibration_model(work, fpipe)  # --stats DIR reused with the same model
    with pytest.raises(CalibrationMismatchError, match=r"collected on another model \(expert 'high'"):
        check_calibration_model(work, other_pipe)

    # restart: the earlier run's statistics and trajectories go, the new samples are recorded
    (work / "stats" / "stale.npz").write_bytes(b"x")
    _start(fpipe, _samples(tmp_path, prompt="another prompt"), work, restart=True)
    assert not (work / "stats" / "stale.npz").exists()
    assert sorted(os.listdir(work / "traj")) == ["sample_00000.npz"]
    new = json.load(open(work / "manifest.json"))
    assert new["sample_hashes"][1]["prompt"] != man["sample_hashes"][1]["prompt"]
    _start(fpipe, _samples(tmp_path, prompt="another prompt"), work)  # and resumes with them


def test_calibration_work_dir_without_hashes_resumes_with_a_warning(fpipe, tmp_path):
    work = tmp_path / "work"
    _start(fpipe, _samples(tmp_path), work)
    man = json.load(open(work / "manifest.json"))
    del man["sample_hashes"], man["model_fingerprint"]  # as an older wanjax wrote it
    json.dump(man, open(work / "manifest.json", "w"))
    with pytest.warns(UserWarning, match="records no sample hashes / model fingerprint"):
        _start(fpipe, _samples(tmp_path), work)
    assert "sample_hashes" in json.load(open(work / "manifest.json"))


# ------------------------------------------------------------------------------------------ fingerprints
def test_model_fingerprint_tolerates_dtype_not_another_model():
    m32 = WanDiT(TINY, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    st = nnx.state(m32)
    st16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) else a, st)
    host = jax.device_get(st)  # an expert kept in host memory
    a = model_fingerprint({"high": m32})
    assert compare_fingerprints(a, model_fingerprint({"high": st16})) == {}
    assert compare_fingerprints(a, model_fingerprint({"high": host})) == {}
    other = model_fingerprint({"high": WanDiT(TINY, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(1))})
    diff = compare_fingerprints(a, other)
    assert list(diff) == ["high"] and len(diff["high"]) > 5
    assert a["experts"]["high"]["digest"] != other["experts"]["high"]["digest"]
    # one tensor scaled by 5 %: that tensor (and only it) is named
    leaves = nnx.to_pure_dict(st)
    leaves["blocks"]["ffn"]["fc1"]["kernel"] = leaves["blocks"]["ffn"]["fc1"]["kernel"] * 1.05
    diff = compare_fingerprints(a, model_fingerprint({"high": leaves}))
    assert [d.split(":")[0] for d in diff["high"]] == ["blocks.ffn.fc1.kernel"]
    with pytest.raises(ValueError, match="already quantized"):
        model_fingerprint({"high": quantize_model(m32, mixed_qlayers(m32, fmts={}))})


@pytest.fixture(scope="module")
def source():
    """A BF16 model, its pipeline and its experts quantized (INT4 everywhere: the rtn recipe's formats)."""
    model = WanDiT(TINY, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    q = quantize_model(model, mixed_qlayers(model, fmts={}))
    return model, WanI2VPipeline(model, model, vae=None), q


def _bf16_pipe(seed):
    m = WanDiT(TINY, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(seed))
    return WanI2VPipeline(m, m, vae=None)


def test_attach_checks_the_model_fingerprint(source, tmp_path):
    model, pipe, q = source
    qdir = save_artifact(
        tmp_path / "q", {"high": q, "low": q}, bins=BINS.to_dict(), recipe=recipe_to_dict(RECIPES["rtn"]), source=pipe
    )
    man = attach_artifact(_bf16_pipe(0), qdir)  # the same weights, another pipeline object
    assert (
        man["attached_mode"] == "fake" and man["attached_mode_reason"] == "no low-bit kernels for cpu: simulated W4A4"
    )
    assert set(man["model_fingerprint"]["experts"]) == {"high", "low"}
    other = _bf16_pipe(5)
    with pytest.raises(
        ArtifactError,
        match=r"made from another model .* expert 'high': artifact made from "
        r"[0-9a-f]{16}, this model is [0-9a-f]{16}.*--force",
    ) as e:
        attach_artifact(other, qdir)
    assert "quant_bins" not in vars(other) or other.quant_bins is None  # nothing was replaced
    with pytest.warns(UserWarning, match="attached anyway: force=True"):
        attach_artifact(other, qdir, force=True)
    assert other.quant_bins == BINS
    assert "expert 'low'" in str(e.value)
    # attaching again to a pipeline that already runs quantized experts compares with the model they replaced
    with pytest.raises(ArtifactError, match="made from another model"):
        attach_artifact(other, qdir)
    same = _bf16_pipe(0)
    attach_artifact(same, qdir)
    attach_artifact(same, qdir)  # same source: still matches


def test_edited_formats_and_nan_tables_are_refused(source, tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    _, pipe, q = source

    def edit(qdir, layer_edit=None, tensor_edit=None, drop_header=False):
        """Edit an artifact as a user could: the manifest (then its checksum recomputed) and / or a tensor file
        (then its sha256 in the manifest recomputed)."""
        mpath = os.path.join(qdir, "manifest.json")
        man = json.load(open(mpath))
        man.pop("manifest_sha256")
        if layer_edit:
            layer_edit(man["experts"]["high"]["layers"])
        if tensor_edit or drop_header:
            fpath = os.path.join(qdir, "high.safetensors")
            with safe_open(fpath, framework="np") as f:
                header = f.metadata()
            t = load_file(fpath)
            if tensor_edit:
                tensor_edit(t)
            save_file(t, fpath, metadata=None if drop_header else header)
            man["experts"]["high"]["sha256"] = hashlib.sha256(open(fpath, "rb").read()).hexdigest()
        man["manifest_sha256"] = hashlib.sha256(artifact._canonical(man)).hexdigest()
        json.dump(man, open(mpath, "w"))
        return qdir

    def fresh(name, **kw):
        return save_artifact(tmp_path / name, {"high": q, "low": q}, bins=BINS.to_dict(), **kw)

    def a_fmt(fmt):
        return lambda layers: layers["blocks.ffn.fc1"]["config"].update(a_fmt=fmt)

    # activation format edited (int4 -> int8: the same tensor shapes), checksums recomputed
    with pytest.raises(
        ArtifactError,
        match=r"layer 'blocks.ffn.fc1': the manifest's config differs from the one "
        r"the file was written with \(a_fmt: manifest 'int8', file 'int4'\)",
    ):
        load_artifact(edit(fresh("a"), a_fmt("int8")))
    with pytest.raises(ArtifactError, match=r"'blocks.ffn.fc1': a_fmt='int8' \(recipe 'rtn': 'int4'\)"):
        load_artifact(edit(fresh("b", recipe=recipe_to_dict(RECIPES["rtn"])), a_fmt("int8")))
    with pytest.raises(ArtifactError, match=r"invalid quantization config .*a_fmt must be one of"):
        load_artifact(edit(fresh("c"), a_fmt("int3")))
    # an older artifact (no configs in the file header): the tensors are checked against the edited formats
    with pytest.raises(
        ArtifactError,
        match=r"tensor 'blocks.ffn.fc1.qweight' is uint8, int8 weights / int4 "
        r"activations store int8",
    ):
        load_artifact(
            edit(fresh("d"), lambda ls: ls["blocks.ffn.fc1"]["config"].update(w_fmt="int8"), drop_header=True)
        )
    with pytest.raises(
        ArtifactError,
        match=r"'blocks.self_attn.q' has 2 bins, the stored timestep bins give that "
        r"expert 3",
    ):
        load_artifact(edit(fresh("e"), lambda ls: ls["blocks.self_attn.q"]["config"].update(nbins=2)))

    # NaN in a clip table: refused, naming the tensor (not replaced by a default scale)
    def nan_clip(t):
        t["blocks.cross_attn.v.act_clip"][1, 2] = np.nan

    with pytest.raises(
        ArtifactError,
        match=r"tensor 'blocks.cross_attn.v.act_clip' holds 1 non-finite value "
        r"\(NaN/Inf; first at index \[1, 2\]\)",
    ):
        load_artifact(edit(fresh("f"), tensor_edit=nan_clip))

    def zero_clip(t):
        t["blocks.ffn.fc2.act_clip"][0, 0] = 0.0

    with pytest.raises(ArtifactError, match=r"'blocks.ffn.fc2.act_clip' \(per-bin table\) has non-positive"):
        load_artifact(edit(fresh("g"), tensor_edit=zero_clip))

    def inf_lowrank(t):  # bf16 tensors are stored as raw uint16 bits: 0x7F80 is +Inf
        t["blocks.ffn.fc1.down"].reshape(-1)[3] = 0x7F80

    with pytest.raises(ArtifactError, match=r"tensor 'blocks.ffn.fc1.down' holds 1 non-finite value"):
        load_artifact(edit(fresh("h"), tensor_edit=inf_lowrank))
    load_artifact(edit(fresh("i")))  # an unedited round trip of the editor loads


def test_save_refuses_inconsistent_recipe(source, tmp_path):
    _, _, q = source
    with pytest.raises(ArtifactError, match=r"recipe 'seed'.*not quantized with this recipe"):
        save_artifact(tmp_path / "q", {"high": q}, recipe=recipe_to_dict(RECIPES["seed"]))
    assert os.listdir(tmp_path) == []  # temp dir removed


# ------------------------------------------------------------------------------------------ auto mode
def test_resolve_quant_mode(monkeypatch):
    assert resolve_quant_mode(None) == ("fake", "no low-bit kernels for cpu: simulated W4A4")
    assert resolve_quant_mode("auto")[0] == "fake"
    assert resolve_quant_mode("real") == ("real", "real mode requested")
    assert resolve_quant_mode("fake")[0] == "fake"
    with pytest.raises(ValueError, match="quant mode must be one of"):
        resolve_quant_mode("fast")
    monkeypatch.setattr(artifact, "_kernel_platform", lambda: ("gpu", True, "NVIDIA H100 80GB HBM3"))
    mode, why = resolve_quant_mode("auto")
    assert mode == "real" and "Hopper" in why
    nv = {
        "blocks.ffn.fc1": {
            "config": {
                "in_features": 64,
                "out_features": 64,
                "w_fmt": "nvfp4",
                "w_group": 16,
                "a_fmt": "nvfp4",
                "a_group": 16,
            }
        }
    }
    mode, why = resolve_quant_mode("auto", layers=nv)
    assert mode == "fake" and "layer 'blocks.ffn.fc1' has no low-bit kernel" in why
    monkeypatch.setattr(artifact, "_kernel_platform", lambda: ("gpu", False, "NVIDIA A100-SXM4-80GB"))
    mode, why = resolve_quant_mode(None)
    assert mode == "fake" and "A100" in why and "sm_90" in why
    monkeypatch.setattr(artifact, "_kernel_platform", lambda: ("tpu", False, "TPU v5 lite"))
    assert resolve_quant_mode(None)[0] == "real"


def test_attach_auto_records_the_chosen_mode(source, tmp_path, monkeypatch):
    _, pipe, q = source
    qdir = save_artifact(tmp_path / "q", {"high": q, "low": q}, bins=BINS.to_dict(), source=pipe)
    monkeypatch.setattr(artifact, "_kernel_platform", lambda: ("gpu", True, "NVIDIA H100"))
    p = _bf16_pipe(0)
    man = attach_artifact(p, qdir)  # default mode: auto
    assert man["attached_mode"] == "real" and "Hopper" in man["attached_mode_reason"]
    assert {ql.mode for ql in qlinears(nnx.merge(p.graphdef, p._params_high)).values()} == {"real"}
    monkeypatch.setattr(artifact, "_kernel_platform", lambda: ("cpu", False, "cpu"))
    p = _bf16_pipe(0)
    with pytest.warns(UserWarning, match="int8_weights ignored: mode 'auto' chose 'fake'"):
        man = attach_artifact(p, qdir, int8_weights=True)
    assert man["attached_mode"] == "fake"
    assert {ql.mode for ql in qlinears(nnx.merge(p.graphdef, p._params_high)).values()} == {"fake"}


# ------------------------------------------------------------------------------------------ files
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_published_modes_follow_the_umask(source, tmp_path, umask):
    _, _, q = source
    old = os.umask(umask)
    try:
        qdir = save_artifact(tmp_path / "q", {"high": q})
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(qdir).st_mode) == 0o777 & ~umask
    for f in os.listdir(qdir):
        assert stat.S_IMODE(os.stat(os.path.join(qdir, f)).st_mode) == 0o666 & ~umask, f


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError])
def test_temp_dir_removed_on_error_and_interrupt(source, tmp_path, monkeypatch, exc):
    import safetensors.numpy

    _, _, q = source
    calls = []

    def failing(tensors, path, metadata=None):
        calls.append(path)
        open(path, "wb").write(b"partial")
        raise exc("disk full" if exc is OSError else None)

    monkeypatch.setattr(safetensors.numpy, "save_file", failing)
    with pytest.raises(exc):
        save_artifact(tmp_path / "q", {"high": q})
    assert calls and os.listdir(tmp_path) == []


def test_save_never_overwrites_an_input(source, tmp_path):
    _, _, q = source
    model_dir = tmp_path / "model"
    (model_dir / "high_noise_model").mkdir(parents=True)
    (model_dir / "config.json").write_text("{}")
    for dst, rel in ((model_dir, "is"), (tmp_path, "contains"), (model_dir / "q", "is inside")):
        with pytest.raises(ValueError, match=rf"artifact directory .* {rel} the input .*model"):
            save_artifact(dst, {"high": q}, inputs=(model_dir, None), overwrite=True)
    assert sorted(os.listdir(model_dir)) == ["config.json", "high_noise_model"]

    class Src:  # a source naming where it was loaded from
        model_dir = str(tmp_path / "model")
        _params_high = _params_low = nnx.state(source[0])

    with pytest.raises(ValueError, match="is the input"):
        save_artifact(model_dir, {"high": q}, source=Src(), overwrite=True)
    assert sorted(os.listdir(model_dir)) == ["config.json", "high_noise_model"]
