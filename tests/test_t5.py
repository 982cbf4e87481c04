"""UMT5 encoder: parity with transformers.UMT5EncoderModel, loaders (official .pth + HF safetensors),
bad-input errors, tokenizer wrapper, encode_prompts, full-size parameter count. CPU, fp32, tiny configs."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from wanjax.io import t5_loader  # noqa: E402
from wanjax.io.t5_loader import (
    encoder_from_params,
    load_t5_encoder,
    params_from_state_dict,
)
from wanjax.model.t5 import (
    TINY_T5,
    UMT5_XXL,
    UMT5Encoder,
    relative_position_buckets,
)
from wanjax.text import (
    PromptTokenizer,
    clean_prompt,
    encode_prompts,
    find_tokenizer_dir,
)

VOCAB, D, H, DKV, DFF, LAYERS = 300, 64, 4, 16, 96, 3


def _hf_config():
    return transformers.UMT5Config(
        vocab_size=VOCAB,
        d_model=D,
        num_heads=H,
        d_kv=DKV,
        d_ff=DFF,
        num_layers=LAYERS,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        attn_implementation="eager",
    )


def _cfg():
    return TINY_T5.replace(num_layers=LAYERS, dim_attn=H * DKV)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    model = transformers.UMT5EncoderModel(_hf_config()).eval()
    # Perturb every weight (norm scales start at 1 and biases small otherwise) so all of them matter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (p.shape[-1] ** -0.5 if p.ndim == 2 and "shared" not in name else 1.0))
    return model


def _hf_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _to_official(hf_sd: dict) -> dict:
    """HF UMT5EncoderModel keys -> official wan/modules/t5.py T5Encoder keys (rename map written from the official
    module tree: T5Encoder.token_embedding / blocks[i].{norm1, attn.{q,k,v,o}, norm2, ffn.{gate.0, fc1, fc2},
    pos_embedding.embedding} / norm)."""
    sub = {
        "layer.0.layer_norm.weight": "norm1.weight",
        "layer.0.SelfAttention.q.weight": "attn.q.weight",
        "layer.0.SelfAttention.k.weight": "attn.k.weight",
        "layer.0.SelfAttention.v.weight": "attn.v.weight",
        "layer.0.SelfAttention.o.weight": "attn.o.weight",
        "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
        "layer.1.layer_norm.weight": "norm2.weight",
        "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
        "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
        "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight",
    }
    out = {}
    for k, v in hf_sd.items():
        if k == "shared.weight":
            out["token_embedding.weight"] = v
        elif k == "encoder.embed_tokens.weight":
            continue
        elif k == "encoder.final_layer_norm.weight":
            out["norm.weight"] = v
        else:
            assert k.startswith("encoder.block."), k
            i, rest = k[len("encoder.block.") :].split(".", 1)
            out[f"blocks.{i}.{sub[rest]}"] = v
    return out


def _inputs(batch_lengths, seq, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, size=(len(batch_lengths), seq)).astype(np.int64)
    mask = np.zeros_like(ids)
    for b, n in enumerate(batch_lengths):
        mask[b, :n] = 1
        ids[b, n:] = 0
    return ids, mask


def _rel_err(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return np.abs(got - ref).max() / np.abs(ref).max()


# ------------------------------------------------------------------------------------------------ model


@pytest.mark.parametrize("length", [1, 9, 40, 300, 512, 700])
def test_relative_position_buckets_match_transformers(length):
    attn = transformers.models.umt5.modeling_umt5.UMT5Attention(_hf_config(), has_relative_attention_bias=True)
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    ref = attn._relative_position_bucket(rel).numpy()
    got = relative_position_buckets(length, length, 32, 128)
    np.testing.assert_array_equal(got, ref)
    assert got.min() >= 0 and got.max() < 32


@pytest.fixture(scope="module")
def jax_model(hf_model):
    params = params_from_state_dict(_hf_state(hf_model), _cfg(), layout="hf")
    return encoder_from_params(_cfg(), params)


@pytest.mark.parametrize("seq,lengths", [(7, [7, 3]), (24, [24, 17, 1]), (45, [30, 45])])
def test_parity_with_transformers_umt5(hf_model, jax_model, seq, lengths):
    ids, mask = _inputs(lengths, seq, seed=seq)
    with torch.no_grad():
        ref = hf_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    got = jax_model(jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    assert got.shape == (len(lengths), seq, D) and got.dtype == jnp.float32
    err = _rel_err(got, ref.numpy())
    assert err <= 1e-5, f"max relative error {err:.3e}"
    # the mask matters: dropping it changes the real tokens' outputs of the padded rows
    if min(lengths) < seq:
        nomask = jax_model(jnp.asarray(ids, jnp.int32), None)
        b = int(np.argmin(lengths))
        assert _rel_err(nomask[b, : lengths[b]], ref.numpy()[b, : lengths[b]]) > 1e-3


def test_mask_none_equals_all_ones(jax_model):
    ids, mask = _inputs([12, 12], 12, seed=1)
    a = jax_model(jnp.asarray(ids, jnp.int32), None)
    b = jax_model(jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bf16_compute_close_to_fp32(hf_model):
    cfg = _cfg().replace(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    m16 = encoder_from_params(cfg, params_from_state_dict(_hf_state(hf_model), cfg, layout="hf"))
    assert m16.blocks.attn.q.kernel[...].dtype == jnp.bfloat16
    ids, mask = _inputs([20, 11], 20, seed=3)
    with torch.no_grad():
        ref = hf_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    got = m16(jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    assert got.dtype == jnp.bfloat16
    err = _rel_err(np.asarray(got.astype(jnp.float32)), ref.numpy())
    assert 1e-6 < err < 5e-2, err


def test_umt5_xxl_param_count():
    abstract = nnx.eval_shape(lambda: UMT5Encoder(UMT5_XXL, rngs=nnx.Rngs(0)))
    shapes = jax.tree.leaves(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    n = sum(int(np.prod(s.shape)) for s in shapes)
    # embedding 256384*4096                          = 1,050,148,864
    # per layer: q,k,v,o 4*4096*4096                  =    67,108,864
    #            gate,fc1,fc2 3*4096*10240            =   125,829,120
    #            norm1,norm2 2*4096                   =         8,192
    #            relative bias 32 buckets * 64 heads  =         2,048
    #            -> 192,948,224 per layer; x 24       = 4,630,757,376
    # final norm 4096                                 =         4,096
    # total                                          = 5,680,910,336
    # (the 5,680,863,232 logged by sdnext is 23*2048 less: it counts one shared bias table, T5- not UMT5-style)
    assert n == 5_680_910_336
    assert UMT5_XXL.num_params() == n
    assert all(s.dtype == jnp.bfloat16 for s in shapes)
    q = abstract.blocks.attn.q.kernel
    assert q.shape == (24, 4096, 4096)
    assert abstract.blocks.rel_bias.shape == (24, 32, 64)


# ----------------------------------------------------------------------------------------------- loaders


@pytest.fixture(scope="module")
def checkpoint_files(hf_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("t5ckpt")
    hf_dir = root / "text_encoder"
    hf_model.save_pretrained(hf_dir)
    official = {k: torch.from_numpy(v) for k, v in _to_official(_hf_state(hf_model)).items()}
    pth = root / "models_t5_tiny-enc.pth"
    torch.save(official, pth)
    return hf_dir, pth


def test_official_and_hf_layouts_give_identical_outputs(hf_model, checkpoint_files):
    hf_dir, pth = checkpoint_files
    assert any(f.endswith(".safetensors") for f in os.listdir(hf_dir))
    m_hf = load_t5_encoder(hf_dir, dtype=jnp.float32, param_dtype=jnp.float32)
    m_off = load_t5_encoder(pth, dtype=jnp.float32, param_dtype=jnp.float32)
    # config read from config.json / inferred from shapes (text_len is the tokenizer default 512 there)
    assert m_hf.cfg == m_off.cfg == _cfg().replace(text_len=512)
    ids, mask = _inputs([16, 5], 16, seed=7)
    a = m_hf(jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    b = m_off(jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with torch.no_grad():
        ref = hf_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    assert _rel_err(a, ref.numpy()) <= 1e-5


def test_official_bf16_pth_is_read_bit_exact(hf_model, tmp_path):
    sd = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in _to_official(_hf_state(hf_model)).items()}
    pth = tmp_path / "enc-bf16.pth"
    torch.save(sd, pth)
    m = load_t5_encoder(pth)  # default: bf16 params, bf16 compute
    assert m.cfg.param_dtype == jnp.bfloat16 and m.cfg.dtype == jnp.bfloat16
    emb = np.asarray(m.embedding[...].astype(jnp.float32))
    np.testing.assert_array_equal(emb, sd["token_embedding.weight"].float().numpy())
    fc2 = np.asarray(m.blocks.ffn.fc2.kernel[...][2].astype(jnp.float32))
    np.testing.assert_array_equal(fc2, sd["blocks.2.ffn.fc2.weight"].float().numpy().T)


def test_missing_key_error_names_key(hf_model):
    sd = _to_official(_hf_state(hf_model))
    del sd["blocks.1.ffn.fc1.weight"]
    with pytest.raises(KeyError, match=r"blocks\.1\.ffn\.fc1\.weight.*\(96, 64\)"):
        params_from_state_dict(sd, _cfg(), source="enc.pth")
    sd = _hf_state(hf_model)
    del sd["encoder.final_layer_norm.weight"]
    with pytest.raises(KeyError, match=r"encoder\.final_layer_norm\.weight"):
        params_from_state_dict(sd, _cfg())


def test_wrong_shape_error_names_key_expected_got(hf_model):
    sd = _to_official(_hf_state(hf_model))
    sd["blocks.0.attn.o.weight"] = np.zeros((64, 32), np.float32)
    with pytest.raises(ValueError, match=r"enc\.pth.*blocks\.0\.attn\.o\.weight.*\(64, 32\).*expected \(64, 64\)"):
        params_from_state_dict(sd, _cfg(), source="enc.pth")


def test_unexpected_keys_and_layout_errors(hf_model):
    sd = _to_official(_hf_state(hf_model))
    sd["blocks.3.norm1.weight"] = np.ones(64, np.float32)  # a 4th layer the config does not have
    with pytest.raises(ValueError, match=r"unexpected keys.*blocks\.3\.norm1\.weight"):
        params_from_state_dict(sd, _cfg())
    with pytest.raises(ValueError, match="not a UMT5 encoder state dict"):
        params_from_state_dict({"foo.weight": np.zeros(3)}, _cfg())
    with pytest.raises(ValueError, match="model_type.*'t5'"):
        t5_loader.config_from_hf_dict({"model_type": "t5", "vocab_size": 1}, source="config.json")
    with pytest.raises(FileNotFoundError, match="T5 checkpoint not found"):
        load_t5_encoder("/nonexistent/models_t5.pth")


def test_encoder_from_params_rejects_bad_tree(hf_model):
    params = params_from_state_dict(_hf_state(hf_model), _cfg(), layout="hf")
    params["norm"]["scale"] = np.ones(65, np.float32)
    with pytest.raises(ValueError, match=r"\['norm'\]\['scale'\].*\(65,\).*\(64,\)"):
        encoder_from_params(_cfg(), params)


# --------------------------------------------------------------------------------------------- tokenizer

WORDS = ["a", "cat", "dog", "runs", "on", "the", "grass", "&", "big", "red"]


def _write_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({w: i + 3 for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    return os.path.join(folder, "tokenizer.json")


def test_clean_prompt():
    assert clean_prompt("  a \t cat\n\n runs &amp;amp; ") == "a cat runs &"
    assert clean_prompt(" A  B ", "lower") == "a b"
    assert clean_prompt(" x  y ", None) == " x  y "
    with pytest.raises(ValueError, match="mode"):
        clean_prompt("x", "canonical")


def test_tokenizer_padding_truncation_lengths(tmp_path, caplog):
    tj = _write_tokenizer(tmp_path / "google" / "umt5-xxl")  # official Wan folder layout
    assert find_tokenizer_dir(tmp_path) == str(tmp_path / "google" / "umt5-xxl")
    tok = PromptTokenizer(tmp_path, text_len=6)
    out = tok(["a cat", "  the  big red dog runs on the grass ", "zebra"])
    assert out.ids.shape == out.mask.shape == (3, 6) and out.ids.dtype == np.int32
    np.testing.assert_array_equal(out.ids[0], [3, 4, 1, 0, 0, 0])  # tokens + EOS + pad
    np.testing.assert_array_equal(out.mask[0], [1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(out.ids[1], [8, 11, 12, 5, 6, 1])  # truncated, EOS kept last
    np.testing.assert_array_equal(out.ids[2], [2, 1, 0, 0, 0, 0])  # unknown word
    np.testing.assert_array_equal(out.lengths, [3, 6, 2])
    np.testing.assert_array_equal(out.truncated, [False, True, False])
    assert "truncated" in caplog.text
    # same ids/mask as transformers with the official call arguments
    ref_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=tj, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    texts = [clean_prompt(t) for t in ["a cat", "  the  big red dog runs on the grass ", "zebra"]]
    ref = ref_tok(
        texts,
        padding="max_length",
        truncation=True,
        max_length=6,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="np",
    )
    np.testing.assert_array_equal(out.ids, ref["input_ids"])
    np.testing.assert_array_equal(out.mask, ref["attention_mask"])
    with pytest.raises(FileNotFoundError, match="no tokenizer found"):
        PromptTokenizer(tmp_path / "google" / "umt5-xxl" / "missing")


def test_encode_prompts_trims_and_zero_pads(tmp_path, hf_model, jax_model):
    _write_tokenizer(tmp_path / "tokenizer")
    tok = PromptTokenizer(tmp_path, text_len=10)
    prompts = ["a big red cat runs", "dog"]
    ctx, lengths = encode_prompts(jax_model, tok, prompts)
    np.testing.assert_array_equal(lengths, [6, 2])
    assert ctx.shape == (2, 6, D)
    t = tok(prompts)
    with torch.no_grad():
        ref = hf_model(
            input_ids=torch.from_numpy(t.ids.astype(np.int64)), attention_mask=torch.from_numpy(t.mask.astype(np.int64))
        ).last_hidden_state.numpy()
    assert _rel_err(ctx[0], ref[0, :6]) <= 1e-5
    assert _rel_err(ctx[1, :2], ref[1, :2]) <= 1e-5
    assert np.all(np.asarray(ctx[1, 2:]) == 0)
    padded, _ = encode_prompts(jax_model, tok, prompts, pad_to=16)
    assert padded.shape == (2, 16, D)
    np.testing.assert_array_equal(np.asarray(padded[:, :6]), np.asarray(ctx))
    assert np.all(np.asarray(padded[:, 6:]) == 0)
    with pytest.raises(ValueError, match="pad_to=3"):
        encode_prompts(jax_model, tok, prompts, pad_to=3)


def test_hf_safetensors_without_config_infers_shapes(checkpoint_files, tmp_path):
    hf_dir, _ = checkpoint_files
    st = [f for f in os.listdir(hf_dir) if f.endswith(".safetensors")]
    assert len(st) == 1
    lone = tmp_path / "weights.safetensors"
    lone.write_bytes((hf_dir / st[0]).read_bytes())
    m = load_t5_encoder(lone, dtype=jnp.float32, param_dtype=jnp.float32)
    assert m.cfg == _cfg().replace(text_len=512)
    ref = load_t5_encoder(hf_dir, dtype=jnp.float32, param_dtype=jnp.float32)
    ids, mask = _inputs([9, 4], 9, seed=11)
    np.testing.assert_array_equal(
        np.asarray(m(jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))),
        np.asarray(ref(jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))),
    )
