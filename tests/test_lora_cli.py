"""``wanjax generate --lora / --lora-ignore-unknown / --lightning``: parsing, bad LoRA files refused with one line
and exit status 2 before any model is loaded, and the shipped trained LoRA applied end to end on the mini model in
BF16 and on W4A4 experts of a quantized artifact (5 frames of 64x64, 2 steps)."""

import os

import numpy as np
import pytest
from helpers import MINI, generate_argv
from lora_mini_helpers import LORA_FILES
from safetensors.numpy import save_file

from wanjax import cli
from wanjax.cli import CLIError, main, parse_lora_arg

HIGH, LOW = LORA_FILES["high"], LORA_FILES["low"]
TINY = ["--frames", "5", "--size", "64", "--steps", "2", "--no-progress"]

needs_mini = pytest.mark.skipif(not os.path.isfile(HIGH), reason="models/mini or its trained LoRA is not present")


class Loaded(BaseException):
    """Raised instead of loading a model: a check that should have refused the input came too late."""


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*a, **kw):
        raise Loaded("a model would have been loaded")

    monkeypatch.setattr(cli, "_open_pipeline", refuse)


@pytest.fixture
def image(tmp_path):
    from PIL import Image

    p = tmp_path / "img.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(p)
    return str(p)


def _err(capsys, argv) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wanjax generate: error: "), lines
    return lines[0]


def _mini_lora(rank=2, dim=256, ffn=768, blocks=6, extra=None):
    """A random LoRA in the Lightning layout on every Linear of the mini model's blocks (or another size)."""
    rng = np.random.default_rng(0)
    sd = {}
    for i in range(blocks):
        for m, (k, n) in {"self_attn.q": (dim, dim), "cross_attn.o": (dim, dim), "ffn.0": (dim, ffn)}.items():
            b = f"diffusion_model.blocks.{i}.{m}"
            sd[f"{b}.lora_down.weight"] = rng.standard_normal((rank, k)).astype(np.float32) * 0.01
            sd[f"{b}.lora_up.weight"] = rng.standard_normal((n, rank)).astype(np.float32) * 0.01
            sd[f"{b}.alpha"] = np.asarray(rank, np.float32)
    sd.update(extra or {})
    return sd


# ------------------------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize(
    "text, want",
    [
        ("a.safetensors", ("both", "a.safetensors", 1.0)),
        ("high=a.safetensors", ("high", "a.safetensors", 1.0)),
        ("low=dir/a.safetensors:0.5", ("low", "dir/a.safetensors", 0.5)),
        ("both=a.safetensors:-1e-1", ("both", "a.safetensors", -0.1)),
        ("style=v2.safetensors:2", ("both", "style=v2.safetensors", 2.0)),  # not an expert prefix: part of the name
    ],
)
def test_parse_lora_arg(text, want):
    assert parse_lora_arg(text) == want


def test_parse_lora_arg_keeps_an_existing_path_with_a_colon(tmp_path):
    p = tmp_path / "odd:name"
    p.write_bytes(b"")
    assert parse_lora_arg(f"high={p}") == ("high", str(p), 1.0)


@pytest.mark.parametrize(
    "text, match",
    [
        ("a.safetensors:strong", "strength 'strong' after ':' is not a number"),
        ("high=", "no file"),
        ("a.safetensors:inf", "strength must be a finite number"),
    ],
)
def test_parse_lora_arg_errors(text, match):
    with pytest.raises(CLIError, match=match):
        parse_lora_arg(text)


# ------------------------------------------------------------------------------------------------ bad inputs
@pytest.mark.skipif(not os.path.isdir(os.path.join(MINI, "high_noise_model")), reason="models/mini not present")
def test_bad_lora_inputs_are_refused_before_loading(tmp_path, image, capsys, monkeypatch, no_model_loads):
    out = str(tmp_path / "v.mp4")

    def gen(*extra):
        return generate_argv(image, "--out", out, *extra)

    missing = tmp_path / "nope.safetensors"
    assert _err(capsys, gen("--lora", str(missing))).endswith(f"--lora {missing}: {missing}: no such file")
    adir = tmp_path / "adir"
    adir.mkdir()
    assert "is a directory; expected a LoRA .safetensors file" in _err(capsys, gen("--lora", str(adir)))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    assert "not a readable safetensors file" in _err(capsys, gen("--lora", str(junk)))
    # a LoRA for another model size: file, key, expected and got
    other = tmp_path / "other.safetensors"
    save_file(_mini_lora(dim=128, ffn=512, blocks=2), str(other))
    msg = _err(capsys, gen("--lora", f"low={other}:0.5"))
    assert f"--lora low={other}:0.5: {other}:" in msg
    assert "expected down [r, 256] and up [256, r]" in msg and "got down [2, 128]" in msg
    # a block the model lacks
    deep = tmp_path / "deep.safetensors"
    save_file(_mini_lora(blocks=8), str(deep))
    assert "the model has 6 blocks (0..5)" in _err(capsys, gen("--lora", str(deep)))
    # unknown keys: refused, naming the flag that skips them
    extra = tmp_path / "extra.safetensors"
    save_file(_mini_lora(extra={"text_encoder.layers.0.q.lora_down.weight": np.zeros((2, 8), np.float32)}), str(extra))
    msg = _err(capsys, gen("--lora", str(extra)))
    assert "1 key(s) name no Wan2.2 DiT LoRA tensor" in msg and "pass --lora-ignore-unknown" in msg
    # ... skipped with --lora-ignore-unknown (a warning lists them; here the run stops at the model load)
    with pytest.raises(Loaded):
        main(gen("--lora", str(extra), "--lora-ignore-unknown"))
    assert "warning:" in capsys.readouterr().err
    assert _err(capsys, gen("--lora-ignore-unknown")).endswith(
        "--lora-ignore-unknown applies to --lora FILE / --lightning DIR; neither was given"
    )
    assert "cannot tell the high-noise LoRA" in _err(capsys, gen("--lightning", str(adir)))
    assert "not a directory" in _err(capsys, gen("--lightning", str(missing)))
    # no output may be written onto or around a LoRA file
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    lora = pngs / "ok.safetensors"
    save_file(_mini_lora(), str(lora))
    assert f"--png-dir {pngs} contains the input {lora}" in _err(
        capsys, gen("--lora", str(lora), "--png-dir", str(pngs))
    )
    with pytest.raises(Loaded):  # a good file passes every check
        main(gen("--lora", f"high={lora}:0.7", "--lora", str(lora)))


def test_lightning_preset_and_flag_overrides(tmp_path, image, capsys, no_model_loads):
    """``--lightning``: the preset over the model's generation_config.json; explicit flags win, with a warning."""
    out = str(tmp_path / "v.mp4")
    with pytest.raises(Loaded):
        main(generate_argv(image, "--out", out, "--lightning"))
    cap = capsys.readouterr()
    assert "4 steps" in cap.out and "euler" in cap.out and "lightning schedule" in cap.out and not cap.err
    with pytest.raises(Loaded):
        main(generate_argv(image, "--out", out, "--lightning", "--steps", "6", "--guidance", "2"))
    cap = capsys.readouterr()
    assert "6 steps" in cap.out and "lightning schedule" in cap.out
    assert "warning: --lightning with --steps 6, guidance 2 (low-noise) / 2 (high-noise)" in cap.err


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture
def applied(monkeypatch):
    """Records the pipeline `apply_loras` ran on and its active LoRAs (the real function runs)."""
    from wanjax.lora import active_loras

    seen = {}
    real = cli.apply_loras

    def spy(pipe, loras):
        names = real(pipe, loras)
        seen.update(pipe=pipe, active=active_loras(pipe), quantized=getattr(pipe, "quant_bins", None) is not None)
        return names

    monkeypatch.setattr(cli, "apply_loras", spy)
    return seen


@needs_mini
def test_generate_with_the_trained_lora_bf16(tmp_path, image, capsys, applied):
    out = tmp_path / "v.mp4"
    argv = generate_argv(image, "--out", str(out), "--lora", f"high={HIGH}", "--lora", f"low={LOW}:0.5", *TINY)
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "merged into the experts' weights" in text
    assert "LoRA high_noise_model.safetensors: expert high, strength 1, rank 4, 12 layers" in text
    assert "LoRA low_noise_model.safetensors: expert low, strength 0.5, rank 4, 12 layers" in text
    assert f"wrote {out}: 5 frames 64x64" in text and out.stat().st_size > 0
    assert not applied["quantized"]
    assert [(a["expert"], a["strength"]) for a in applied["active"]] == [("high", 1.0), ("low", 0.5)]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A W4A4 artifact of the mini model (`lora_mini_helpers.quick_w4a4`), written with `save_artifact`."""
    from lora_mini_helpers import quick_w4a4

    from wanjax.quant.artifact import save_artifact
    from wanjax.quant.recipes import recipe_to_dict

    q, recipe, bins, fingerprint = quick_w4a4()
    qdir = tmp_path_factory.mktemp("art") / "q"
    save_artifact(str(qdir), q, recipe=recipe_to_dict(recipe), bins=bins.to_dict(), model_fingerprint=fingerprint)
    return str(qdir)


@needs_mini
def test_generate_with_the_trained_lora_on_w4a4_experts(tmp_path, image, capsys, applied, artifact):
    out = tmp_path / "q.mp4"
    argv = generate_argv(image, "--out", str(out), "--quant", artifact, "--lora", f"both={HIGH}:0.8", *TINY)
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "quant mode fake" in text and "as extra low-rank rank of the W4A4 experts" in text
    assert "LoRA high_noise_model.safetensors: expert both, strength 0.8, rank 4, 12 layers" in text
    assert f"wrote {out}: 5 frames 64x64" in text
    assert applied["quantized"]  # applied after the artifact was attached: on the W4A4 experts
    assert [(a["expert"], a["strength"]) for a in applied["active"]] == [("high", 0.8), ("low", 0.8)]
