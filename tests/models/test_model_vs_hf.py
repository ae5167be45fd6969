"""Phi4Model against Hugging Face's Phi3ForCausalLM (the architecture microsoft/phi-4 ships as).

Each test builds a random tiny HF model (fp32, eager attention, random norm weights so the norm
mapping is exercised too), converts its weights with ``hf_mapping`` and compares outputs.
"""
from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from megatron_phi4.config import ModelConfig, model_preset
from megatron_phi4.losses import token_log_probs
from megatron_phi4.models.phi4 import hf_mapping
from megatron_phi4.models.phi4.hf_mapping import HFConfigError, model_config_from_hf
from megatron_phi4.models.phi4.model import Phi4Model, count_parameters

transformers = pytest.importorskip("transformers")

RTOL = 1e-5

CONFIGS = {
    # GQA 2:1
    "h4-kv2": ModelConfig(vocab_size=128, hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                          intermediate_size=96, max_seq_length=128, rope_theta=10000.0),
    # GQA 2:1 with 6 heads, 3 layers
    "h6-kv3": ModelConfig(vocab_size=96, hidden_size=96, num_layers=3, num_attention_heads=6, num_kv_heads=3,
                          intermediate_size=160, max_seq_length=128, rope_theta=250000.0),
    # multi-query (one KV head)
    "h4-kv1": ModelConfig(vocab_size=80, hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=1,
                          intermediate_size=64, max_seq_length=128, rope_theta=10000.0, norm_eps=1e-6),
}


def rel_err(ref: torch.Tensor, got: torch.Tensor) -> float:
    return ((ref - got).abs().max() / ref.abs().max()).item()


def make_pair(cfg: ModelConfig, seed: int = 0, rope_theta: float | None = None):
    """(hf_model, our_model) with identical random fp32 weights."""
    torch.manual_seed(seed)
    hf_cfg = hf_mapping.to_hf_phi3_config(dataclasses.replace(cfg, rope_theta=rope_theta or cfg.rope_theta))
    hf_cfg._attn_implementation = "eager"
    hf = transformers.Phi3ForCausalLM(hf_cfg).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.08)
    ours = Phi4Model(cfg).float().eval()
    ours.load_state_dict(hf_mapping.hf_to_ours(hf.state_dict(), cfg), strict=True)
    return hf, ours


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    cfg = CONFIGS[request.param]
    hf, ours = make_pair(cfg)
    return cfg, hf, ours


def tokens(cfg, batch=2, seq=19, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)


@torch.no_grad()
def test_plain_sequences(pair):
    cfg, hf, ours = pair
    x = tokens(cfg)
    ref = hf(x).logits
    got = ours(x)
    assert got.shape == (2, 19, cfg.vocab_size)
    assert rel_err(ref, got) <= RTOL


@torch.no_grad()
def test_kv_cache_token_by_token(pair):
    cfg, hf, ours = pair
    x = tokens(cfg, seq=16)
    ref = hf(x).logits
    cache = ours.create_kv_cache(2, 16)
    outs = [ours(x[:, :4], kv_cache=cache)]  # prefill
    for t in range(4, 16):
        outs.append(ours(x[:, t:t + 1], kv_cache=cache))
    assert cache.seq_len == 16
    assert rel_err(ref, torch.cat(outs, 1)) <= RTOL


@torch.no_grad()
def test_kv_cache_chunks(pair):
    cfg, hf, ours = pair
    x = tokens(cfg, seq=18)
    ref = hf(x).logits
    cache = ours.create_kv_cache(2, 24)
    outs, start = [], 0
    for size in (5, 1, 7, 5):
        outs.append(ours(x[:, start:start + size], kv_cache=cache))
        start += size
    assert rel_err(ref, torch.cat(outs, 1)) <= RTOL


@torch.no_grad()
def test_token_log_probs_match_hf(pair):
    cfg, hf, ours = pair
    x = tokens(cfg)
    ref = torch.log_softmax(hf(x).logits[:, :-1].float(), -1).gather(-1, x[:, 1:, None]).squeeze(-1)
    targets = x[:, 1:].clone()
    got = token_log_probs(ours(x)[:, :-1], targets)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert rel_err(ref, got) <= RTOL
    # Ignored targets (-100, e.g. prompt tokens under a loss mask) give exactly 0.
    targets[:, :5] = -100
    masked = token_log_probs(ours(x)[:, :-1], targets)
    assert torch.all(masked[:, :5] == 0) and torch.allclose(masked[:, 5:], got[:, 5:])


@torch.no_grad()
def test_packed_sequences_equal_separate_runs(pair):
    cfg, hf, ours = pair
    lengths = [[5, 9, 6], [12, 8]]  # two rows, different document boundaries
    seq = 20
    x = tokens(cfg, seq=seq, seed=3)
    doc_ids = torch.zeros(2, seq, dtype=torch.long)
    pos = torch.zeros(2, seq, dtype=torch.long)
    for row, lens in enumerate(lengths):
        start = 0
        for d, n in enumerate(lens):
            doc_ids[row, start:start + n] = d
            pos[row, start:start + n] = torch.arange(n)
            start += n
    got = ours(x, position_ids=pos, document_ids=doc_ids)
    for row, lens in enumerate(lengths):
        start = 0
        for n in lens:
            ref = hf(x[row:row + 1, start:start + n]).logits[0]
            assert rel_err(ref, got[row, start:start + n]) <= RTOL
            start += n


@torch.no_grad()
def test_rope_base_change_matches_hf():
    """Mid-training raises the RoPE base (10K -> 250K) on the same weights: setting
    ``model.rope_theta`` must equal HF built with that rope_theta."""
    cfg = CONFIGS["h4-kv2"]
    hf_new, ours = make_pair(cfg, seed=5, rope_theta=250000.0)
    x = tokens(cfg, seq=40)
    before = ours(x)
    ours.rope_theta = 250000.0
    after = ours(x)
    assert rel_err(hf_new(x).logits, after) <= RTOL
    assert rel_err(after, before) > 1e-3  # the base really matters at these positions


def test_count_parameters_phi4_on_meta_device():
    start = time.time()
    cfg = model_preset("phi4-14b")
    assert count_parameters(cfg) == 14_659_507_200
    assert time.time() - start < 10  # meta device: nothing is allocated
    # HF's Phi3ForCausalLM built from our exported config has the same count.
    with torch.device("meta"):
        hf = transformers.Phi3ForCausalLM(hf_mapping.to_hf_phi3_config(cfg))
    assert sum(p.numel() for p in hf.parameters()) == 14_659_507_200


# --------------------------------------------------------------------------- the mapping itself
def test_phi4_hf_shapes_match_the_release():
    shapes = hf_mapping.hf_shapes(model_preset("phi4-14b"))
    assert shapes["model.embed_tokens.weight"] == (100352, 5120)
    assert shapes["model.layers.0.self_attn.qkv_proj.weight"] == (7680, 5120)
    assert shapes["model.layers.39.self_attn.o_proj.weight"] == (5120, 5120)
    assert shapes["model.layers.0.mlp.gate_up_proj.weight"] == (35840, 5120)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (5120, 17920)
    assert shapes["lm_head.weight"] == (100352, 5120)
    assert len(shapes) == 3 + 6 * 40
    ours = hf_mapping.our_shapes(model_preset("phi4-14b"))
    assert ours["layers.0.attention.k_proj.weight"] == (1280, 5120)
    assert ours["layers.0.mlp.up_proj.weight"] == (17920, 5120)
    with torch.device("meta"):
        model = Phi4Model(model_preset("phi4-14b"))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == ours


def test_split_and_fuse_are_exact_inverses():
    cfg = CONFIGS["h6-kv3"]
    hf, _ = make_pair(cfg)
    sd = hf.state_dict()
    ours = hf_mapping.hf_to_ours(sd, cfg)
    # Q rows first, then K, then V; gate rows then up.
    d = cfg.head_dim
    qkv = sd["model.layers.1.self_attn.qkv_proj.weight"]
    assert torch.equal(ours["layers.1.attention.k_proj.weight"], qkv[6 * d:9 * d])
    gu = sd["model.layers.2.mlp.gate_up_proj.weight"]
    assert torch.equal(ours["layers.2.mlp.up_proj.weight"], gu[cfg.intermediate_size:])
    back = hf_mapping.ours_to_hf(ours, cfg)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_mapping_rejects_wrong_shapes_and_extra_tensors():
    cfg = CONFIGS["h4-kv2"]
    shapes = hf_mapping.hf_shapes(cfg)
    bad = dict(shapes)
    bad["model.layers.1.mlp.gate_up_proj.weight"] = (100, 64)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.gate_up_proj\.weight: shape \(100, 64\)"):
        hf_mapping.check_hf_names_and_shapes(cfg, bad)
    extra = {**shapes, "model.layers.0.self_attn.o_proj.bias": (64,)}
    with pytest.raises(ValueError, match="bias"):
        hf_mapping.check_hf_names_and_shapes(cfg, extra)
    missing = {k: v for k, v in shapes.items() if k != "lm_head.weight"}
    with pytest.raises(ValueError, match="missing tensors.*lm_head"):
        hf_mapping.check_hf_names_and_shapes(cfg, missing)
    # Recomputed buffers some checkpoints carry are ignored.
    hf_mapping.check_hf_names_and_shapes(cfg, {**shapes, "model.layers.0.self_attn.rotary_emb.inv_freq": (8,)})


# --------------------------------------------------------------------------- config.json
PHI4_RELEASE_CONFIG = {  # the keys of microsoft/phi-4's config.json (legacy RoPE keys)
    "architectures": ["Phi3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 100257, "embd_pdrop": 0.0, "eos_token_id": 100265, "hidden_act": "silu",
    "hidden_size": 5120, "initializer_range": 0.02, "intermediate_size": 17920,
    "max_position_embeddings": 16384, "model_type": "phi3", "num_attention_heads": 40,
    "num_hidden_layers": 40, "num_key_value_heads": 10, "original_max_position_embeddings": 16384,
    "pad_token_id": 100349, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 250000, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 100352,
}


def test_release_config_gives_the_phi4_preset():
    assert model_config_from_hf(PHI4_RELEASE_CONFIG) == model_preset("phi4-14b")


def test_config_roundtrip_and_transformers_form():
    cfg = model_preset("phi4-14b")
    out = hf_mapping.hf_config_from_model(cfg)
    assert out["model_type"] == "phi3" and out["architectures"] == ["Phi3ForCausalLM"]
    assert out["hidden_act"] == "silu" and out["tie_word_embeddings"] is False
    assert (out["bos_token_id"], out["eos_token_id"], out["pad_token_id"]) == (100257, 100265, 100349)
    assert out["num_key_value_heads"] == 10 and out["rope_theta"] == 250000.0
    assert out["torch_dtype"] == "bfloat16" and out["max_position_embeddings"] == 16384
    assert model_config_from_hf(out) == cfg
    # The transformers-5 form (rope_parameters) written by save_pretrained reads back too.
    saved = transformers.Phi3Config(**{k: v for k, v in out.items() if k not in ("rope_theta", "rope_scaling")})
    assert model_config_from_hf(saved.to_dict()) == cfg
    # Token ids outside a tiny vocabulary are left out instead of pointing past the embedding.
    tiny = hf_mapping.hf_config_from_model(model_preset("tiny"))
    assert tiny["eos_token_id"] is None and tiny["vocab_size"] == 512


@pytest.mark.parametrize("change, field", [
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.75}},
     "partial_rotary_factor"),
    ({"sliding_window": 2047}, "sliding_window"),
    ({"rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope_type"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "llama"}, "model_type"),
    ({"head_dim": 64}, "head_dim"),
    ({"num_key_value_heads": 7}, "num_kv_heads"),
])
def test_unsupported_configs_are_rejected_by_name(change, field):
    with pytest.raises(ValueError, match=field):
        model_config_from_hf({**PHI4_RELEASE_CONFIG, **change})


def test_config_errors_are_hf_config_errors():
    with pytest.raises(HFConfigError, match=r"config.json: sliding_window: got 4096"):
        model_config_from_hf({**PHI4_RELEASE_CONFIG, "sliding_window": 4096})
