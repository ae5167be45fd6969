"""Hugging Face ``Phi3ForCausalLM`` <-> ``Phi4Model``: tensor names, fused layouts and config.

Every HF tensor maps to one or more of ours as row ranges (dim 0) of the HF tensor:

=============================================  ==============================================
HF (``model.`` prefix omitted for the head)    ours
=============================================  ==============================================
model.embed_tokens.weight                      embed_tokens.weight
model.layers.i.input_layernorm.weight          layers.i.input_norm.weight
model.layers.i.self_attn.qkv_proj.weight       rows [0, H*d)            layers.i.attention.q_proj.weight
                                               rows [H*d, (H+KV)*d)     layers.i.attention.k_proj.weight
                                               rows [(H+KV)*d, (H+2KV)*d) layers.i.attention.v_proj.weight
model.layers.i.self_attn.o_proj.weight         layers.i.attention.o_proj.weight
model.layers.i.post_attention_layernorm.weight layers.i.post_attention_norm.weight
model.layers.i.mlp.gate_up_proj.weight         rows [0, I) gate_proj; rows [I, 2I) up_proj
model.layers.i.mlp.down_proj.weight            layers.i.mlp.down_proj.weight
model.norm.weight                              norm.weight
lm_head.weight                                 lm_head.weight
=============================================  ==============================================

Splitting is a row slice and fusing a concatenation, so conversion is exact in both directions.
The specs are ordered embedding, layer 0..N-1, final norm, head: converters stream in that order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

from megatron_phi4.config import ModelConfig
# The Phi-4 release's special token ids (see shared/reference/phi4.md), from their one home.
from megatron_phi4.tokenizer import BOS_ID as PHI4_BOS_TOKEN_ID  # <|endoftext|>
from megatron_phi4.tokenizer import EOS_ID as PHI4_EOS_TOKEN_ID  # <|im_end|>
from megatron_phi4.tokenizer import PAD_ID as PHI4_PAD_TOKEN_ID  # <|dummy_85|>

# Buffers some HF checkpoints carry that are recomputed, never loaded.
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


class HFConfigError(ValueError):
    """An HF config.json describes a model this project cannot represent exactly."""


@dataclass(frozen=True)
class TensorSpec:
    """One HF tensor and the row ranges of it that are our tensors."""

    hf_name: str
    shape: tuple[int, ...]
    parts: tuple[tuple[str, int, int], ...]  # (our name, first row, end row)
    layer: int | None = None  # None for the embedding, final norm and head

    @property
    def our_names(self) -> list[str]:
        return [p[0] for p in self.parts]

    def our_shape(self, name: str) -> tuple[int, ...]:
        for n, a, b in self.parts:
            if n == name:
                return (b - a,) + self.shape[1:]
        raise KeyError(name)

    def split(self, hf_tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """Our tensors from the HF tensor (row views; ``.contiguous()`` or ``.clone()`` to own them)."""
        if tuple(hf_tensor.shape) != self.shape:
            raise ValueError(f"{self.hf_name}: expected shape {self.shape}, got {tuple(hf_tensor.shape)}")
        return {n: hf_tensor[a:b] for n, a, b in self.parts}

    def fuse(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The HF tensor from our tensors (concatenated along rows)."""
        pieces = []
        for n, a, b in self.parts:
            if n not in tensors:
                raise KeyError(f"{self.hf_name} needs {n}, which is missing")
            t = tensors[n]
            want = (b - a,) + self.shape[1:]
            if tuple(t.shape) != want:
                raise ValueError(f"{n}: expected shape {want}, got {tuple(t.shape)}")
            pieces.append(t)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)


def layer_specs(cfg: ModelConfig, i: int) -> list[TensorSpec]:
    """The HF tensors of decoder layer ``i`` (in HF's state-dict order) and their split."""
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv, inter = cfg.num_attention_heads * d, cfg.num_kv_heads * d, cfg.intermediate_size
    hp, op = f"model.layers.{i}.", f"layers.{i}."
    return [
        TensorSpec(hp + "self_attn.o_proj.weight", (h, q), ((op + "attention.o_proj.weight", 0, h),), i),
        TensorSpec(hp + "self_attn.qkv_proj.weight", (q + 2 * kv, h), (
            (op + "attention.q_proj.weight", 0, q),
            (op + "attention.k_proj.weight", q, q + kv),
            (op + "attention.v_proj.weight", q + kv, q + 2 * kv)), i),
        TensorSpec(hp + "mlp.gate_up_proj.weight", (2 * inter, h), (
            (op + "mlp.gate_proj.weight", 0, inter),
            (op + "mlp.up_proj.weight", inter, 2 * inter)), i),
        TensorSpec(hp + "mlp.down_proj.weight", (h, inter), ((op + "mlp.down_proj.weight", 0, h),), i),
        TensorSpec(hp + "input_layernorm.weight", (h,), ((op + "input_norm.weight", 0, h),), i),
        TensorSpec(hp + "post_attention_layernorm.weight", (h,), ((op + "post_attention_norm.weight", 0, h),), i),
    ]


def embedding_spec(cfg: ModelConfig) -> TensorSpec:
    v, h = cfg.vocab_size, cfg.hidden_size
    return TensorSpec("model.embed_tokens.weight", (v, h), (("embed_tokens.weight", 0, v),))


def final_specs(cfg: ModelConfig) -> list[TensorSpec]:
    v, h = cfg.vocab_size, cfg.hidden_size
    return [TensorSpec("model.norm.weight", (h,), (("norm.weight", 0, h),)),
            TensorSpec("lm_head.weight", (v, h), (("lm_head.weight", 0, v),))]


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """All HF tensors in streaming order: embedding, layers 0..N-1, final norm, head."""
    specs = [embedding_spec(cfg)]
    for i in range(cfg.num_layers):
        specs += layer_specs(cfg, i)
    return specs + final_specs(cfg)


def spec_groups(cfg: ModelConfig) -> list[tuple[str, list[TensorSpec]]]:
    """Specs grouped for streaming with a progress label: embedding, each layer, final norm + head."""
    groups = [("embedding", [embedding_spec(cfg)])]
    groups += [(f"layer {i + 1}/{cfg.num_layers}", layer_specs(cfg, i)) for i in range(cfg.num_layers)]
    return groups + [("final norm + lm_head", final_specs(cfg))]


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    return {s.hf_name: s.shape for s in tensor_specs(cfg)}


def our_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    return {n: s.our_shape(n) for s in tensor_specs(cfg) for n in s.our_names}


def hf_name_for(cfg: ModelConfig) -> dict[str, str]:
    """Our name -> the HF tensor it lives in."""
    return {n: s.hf_name for s in tensor_specs(cfg) for n in s.our_names}


def is_ignored_hf_tensor(name: str) -> bool:
    return name.endswith(IGNORED_HF_SUFFIXES)


def check_hf_names_and_shapes(cfg: ModelConfig, found: Mapping[str, tuple[int, ...]]) -> None:
    """Raise ValueError listing missing, unexpected and wrongly shaped HF tensors."""
    expected = hf_shapes(cfg)
    problems = []
    missing = [n for n in expected if n not in found]
    if missing:
        problems.append(f"missing tensors: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    extra = [n for n in found if n not in expected and not is_ignored_hf_tensor(n)]
    biases = [n for n in extra if n.endswith(".bias")]
    if biases:
        problems.append(f"bias tensors (Phi-4 has no biases): {biases[:5]}")
    others = [n for n in extra if not n.endswith(".bias")]
    if others:
        problems.append(f"unexpected tensors: {others[:5]}{' ...' if len(others) > 5 else ''}")
    for n, shape in expected.items():
        if n in found and tuple(found[n]) != shape:
            problems.append(f"{n}: shape {tuple(found[n])} but config.json implies {shape}")
    if problems:
        raise ValueError("HF checkpoint does not match its config.json: " + "; ".join(problems))


def hf_to_ours(hf_state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Whole-model conversion HF -> ours (for in-memory use; converters stream per spec)."""
    check_hf_names_and_shapes(cfg, {k: tuple(v.shape) for k, v in hf_state_dict.items()})
    out = {}
    for spec in tensor_specs(cfg):
        out.update({n: t.clone() for n, t in spec.split(hf_state_dict[spec.hf_name]).items()})
    return out


def ours_to_hf(state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Whole-model conversion ours -> HF."""
    missing = [n for n in our_shapes(cfg) if n not in state_dict]
    if missing:
        raise KeyError(f"state dict lacks {missing[:5]}")
    return {spec.hf_name: spec.fuse(state_dict).clone() for spec in tensor_specs(cfg)}


# --------------------------------------------------------------------------- config.json
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def hf_config_from_model(cfg: ModelConfig, dtype: torch.dtype | str = torch.bfloat16,
                         bos_token_id: int | None = PHI4_BOS_TOKEN_ID,
                         eos_token_id: int | None = PHI4_EOS_TOKEN_ID,
                         pad_token_id: int | None = PHI4_PAD_TOKEN_ID) -> dict[str, Any]:
    """config.json contents for ``Phi3ForCausalLM`` describing ``cfg``.

    Token ids default to the Phi-4 release's; an id outside the vocabulary (tiny test models) is
    written as null. RoPE is written both in the transformers-5 form (``rope_parameters``) and the
    legacy keys (``rope_theta``, ``rope_scaling: null``) that older readers expect.
    """
    name = dtype if isinstance(dtype, str) else _DTYPE_NAMES.get(dtype)
    if name is None:
        raise ValueError(f"unsupported dtype for an HF export: {dtype}")

    def tok(t):
        return t if t is not None and 0 <= t < cfg.vocab_size else None

    return {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": 1.0},
        "partial_rotary_factor": 1.0,
        "max_position_embeddings": cfg.max_seq_length,
        "original_max_position_embeddings": cfg.max_seq_length,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "initializer_range": cfg.init_std,
        "attention_dropout": 0.0,
        "embd_pdrop": 0.0,
        "resid_pdrop": 0.0,
        "use_cache": True,
        "bos_token_id": tok(bos_token_id),
        "eos_token_id": tok(eos_token_id),
        "pad_token_id": tok(pad_token_id),
        "torch_dtype": name,
        "dtype": name,
    }


def _is_one(x) -> bool:
    try:
        return math.isclose(float(x), 1.0)
    except (TypeError, ValueError):
        return False


def model_config_from_hf(config_json: Mapping[str, Any] | str, **overrides) -> ModelConfig:
    """A ModelConfig from an HF Phi-3/Phi-4 config.json (a dict or a path).

    Rejects, with the offending key in the message, what Phi4Model cannot reproduce exactly:
    partial rotary embeddings, sliding-window attention, RoPE scaling (longrope/su/yarn...),
    biases, tied embeddings, an activation other than silu, a head_dim other than hidden/heads.
    """
    if isinstance(config_json, (str, bytes)) or hasattr(config_json, "__fspath__"):
        import json
        from pathlib import Path

        path = Path(config_json)
        if not path.is_file():
            raise HFConfigError(f"{path}: config.json not found")
        try:
            config_json = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise HFConfigError(f"{path}: not valid JSON ({e})") from None
    c = dict(config_json)

    def fail(key, msg):
        raise HFConfigError(f"config.json: {key}: {msg}")

    model_type = c.get("model_type")
    archs = c.get("architectures") or []
    if model_type != "phi3":
        fail("model_type", f"got {model_type!r}; only Phi-3-architecture ('phi3') checkpoints such as "
                           f"microsoft/phi-4 can be imported")
    if archs and "Phi3ForCausalLM" not in archs:
        fail("architectures", f"got {archs}; expected Phi3ForCausalLM")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(c.get(key), int):
            fail(key, f"missing or not an integer (got {c.get(key)!r})")
    act = c.get("hidden_act", "silu")
    if act != "silu":
        fail("hidden_act", f"got {act!r}; Phi4Model implements SwiGLU with silu only")
    rope = c.get("rope_parameters") if isinstance(c.get("rope_parameters"), dict) else {}
    prf = c.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
    if prf is not None and not _is_one(prf):
        fail("partial_rotary_factor", f"got {prf}; only full rotary embeddings (1.0) are supported")
    if rope.get("partial_rotary_factor") is not None and not _is_one(rope["partial_rotary_factor"]):
        fail("rope_parameters.partial_rotary_factor",
             f"got {rope['partial_rotary_factor']}; only full rotary embeddings (1.0) are supported")
    if c.get("sliding_window") is not None:
        fail("sliding_window", f"got {c['sliding_window']}; Phi4Model uses full causal attention (must be null)")
    if c.get("rope_scaling") is not None:
        fail("rope_scaling", f"got {c['rope_scaling']}; RoPE scaling is not supported (must be null)")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in (None, "default"):
        fail("rope_parameters.rope_type", f"got {rope_type!r}; only plain RoPE ('default') is supported")
    for key in ("attention_bias", "mlp_bias", "bias"):
        if c.get(key):
            fail(key, "biases are not supported (Phi-4 has none)")
    if c.get("tie_word_embeddings"):
        fail("tie_word_embeddings", "tied embeddings are not supported (Phi-4's lm_head is separate)")
    heads = c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or heads
    if c.get("head_dim") is not None and c["head_dim"] != c["hidden_size"] // heads:
        fail("head_dim", f"got {c['head_dim']}; Phi4Model needs hidden_size / num_attention_heads = "
                         f"{c['hidden_size'] // heads}")
    theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    cfg = ModelConfig(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        num_layers=c["num_hidden_layers"],
        num_attention_heads=heads,
        num_kv_heads=kv,
        intermediate_size=c["intermediate_size"],
        norm_eps=float(c.get("rms_norm_eps", 1e-5)),
        rope_theta=float(theta),
        max_seq_length=int(c.get("max_position_embeddings", 4096)),
        init_std=float(c.get("initializer_range", 0.02)),
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cfg.validate("model")
    return cfg


def hf_dtype_from_config(config_json: Mapping[str, Any]) -> torch.dtype | None:
    name = config_json.get("dtype") or config_json.get("torch_dtype")
    return {v: k for k, v in _DTYPE_NAMES.items()}.get(name)


def to_hf_phi3_config(cfg: ModelConfig, **kwargs):
    """A ``transformers.Phi3Config`` for ``cfg`` (imports transformers lazily; tests and tools)."""
    from transformers import Phi3Config

    d = hf_config_from_model(cfg, **kwargs)
    for k in ("architectures", "model_type", "torch_dtype", "dtype", "rope_scaling", "rope_theta",
              "partial_rotary_factor"):
        d.pop(k, None)
    return Phi3Config(**d)


def iter_layer_names(cfg: ModelConfig) -> Iterable[list[str]]:
    """Our tensor names grouped per streaming group (embedding, each layer, final norm + head)."""
    for _, specs in spec_groups(cfg):
        yield [n for s in specs for n in s.our_names]
