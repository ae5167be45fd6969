"""Phi-4's stable checkpoint names, and the explicit mapping from the pieces a backend builds.

Checkpoints, the HF converter and ``load_model`` speak these names, whatever backend built the
model (the local backend's ``layers.3.attention.qkv.norm.weight`` and Transformer Engine's fused
``layers.3.attention.qkv.layer_norm_weight`` are both ``layers.3.input_norm.weight`` here).
``global_shapes`` lists them in initialization (and streaming) order.

The mapping is data: (path of the module the backend returned, role it declared) -> name.
``install_state_dict_hooks`` makes ``model.state_dict()`` / ``model.load_state_dict()`` use
these names, through torch's state-dict hooks: each local parameter is split into (views of) its
named tensors on the way out and assembled from them on the way in.
"""
from __future__ import annotations

import re

import torch

from megatron_phi4.config import ModelConfig
from megatron_phi4.distributed.sharding import Layout, collect_param_layout

# module path pattern -> {role: checkpoint name}; "{i}" is the decoder layer index.
NAMES: dict[str, dict[str, str]] = {
    "embed_tokens": {"weight": "embed_tokens.weight"},
    "layers.{i}.attention.qkv": {
        "norm": "layers.{i}.input_norm.weight",
        "q_proj": "layers.{i}.attention.q_proj.weight",
        "k_proj": "layers.{i}.attention.k_proj.weight",
        "v_proj": "layers.{i}.attention.v_proj.weight",
    },
    "layers.{i}.attention.o_proj": {"weight": "layers.{i}.attention.o_proj.weight"},
    "layers.{i}.mlp": {
        "norm": "layers.{i}.post_attention_norm.weight",
        "gate_proj": "layers.{i}.mlp.gate_proj.weight",
        "up_proj": "layers.{i}.mlp.up_proj.weight",
        "down_proj": "layers.{i}.mlp.down_proj.weight",
    },
    "norm": {"weight": "norm.weight"},
    "lm_head": {"weight": "lm_head.weight"},
}
_PATTERNS = [(re.compile("^" + re.escape(p).replace(r"\{i\}", r"(?P<i>\d+)") + "$"), roles)
             for p, roles in NAMES.items()]


def global_name(module_path: str, role: str) -> str:
    """The checkpoint name of ``role`` in the piece at ``module_path``."""
    for pattern, roles in _PATTERNS:
        m = pattern.match(module_path)
        if m and role in roles:
            return roles[role].replace("{i}", m.groupdict().get("i") or "")
    raise KeyError(f"no checkpoint name for role {role!r} of module {module_path!r}; "
                   f"add it to megatron_phi4/models/phi4/state_dict.py NAMES")


def global_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor with its global shape, in initialization order."""
    h, d, inter, v = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_attention_heads * d, cfg.num_kv_heads * d
    out = {"embed_tokens.weight": (v, h)}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        out.update({p + "input_norm.weight": (h,), p + "attention.q_proj.weight": (q, h),
                    p + "attention.k_proj.weight": (kv, h), p + "attention.v_proj.weight": (kv, h),
                    p + "attention.o_proj.weight": (h, q), p + "post_attention_norm.weight": (h,),
                    p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                    p + "mlp.down_proj.weight": (h, inter)})
    out.update({"norm.weight": (h,), "lm_head.weight": (v, h)})
    return out


def param_layout(model: torch.nn.Module) -> Layout:
    """{local parameter FQN: pieces named by checkpoint names} for a (stage of a) Phi-4 model."""
    return collect_param_layout(model, global_name)


def _piece_shape(piece, local_shape) -> tuple[int, ...]:
    return (piece.rows[1] - piece.rows[0],) + tuple(local_shape[1:])


def _to_checkpoint_names(module, state_dict, prefix, local_metadata) -> None:
    layout = module.checkpoint_layout()
    items = list(state_dict.items())
    state_dict.clear()
    for key, tensor in items:
        fqn = key[len(prefix):] if key.startswith(prefix) else None
        if fqn not in layout:
            state_dict[key] = tensor
            continue
        for piece in layout[fqn]:
            state_dict[prefix + piece.name] = tensor[piece.rows[0]:piece.rows[1]]


def _from_checkpoint_names(module, state_dict, prefix, local_metadata, strict, missing_keys,
                           unexpected_keys, error_msgs) -> None:
    layout = module.checkpoint_layout()
    shapes = {n: tuple(p.shape) for n, p in module.named_parameters()}
    for fqn, pieces in layout.items():
        keys = [prefix + p.name for p in pieces]
        if not all(k in state_dict for k in keys):
            continue  # missing: torch reports the local name as missing (strict) or leaves it
        parts = []
        for piece, key in zip(pieces, keys):
            t = state_dict.pop(key)
            want = _piece_shape(piece, shapes[fqn])
            if tuple(t.shape) == tuple(piece.global_shape) and want != tuple(t.shape):
                # a full tensor: keep this rank's rectangle (tensor-parallel model, full checkpoint)
                t = t[tuple(slice(o, o + n) for o, n in zip(piece.global_offset, want))]
            parts.append(t)
        state_dict[prefix + fqn] = parts[0] if len(parts) == 1 else torch.cat(parts)


def install_state_dict_hooks(model: torch.nn.Module) -> None:
    """Make ``state_dict()`` / ``load_state_dict()`` of ``model`` use checkpoint names. Under
    tensor parallelism ``state_dict()`` holds this rank's rectangles; ``load_state_dict`` accepts
    either those or the full tensors (it keeps this rank's rectangle)."""
    model.register_state_dict_post_hook(_to_checkpoint_names)
    model.register_load_state_dict_pre_hook(_from_checkpoint_names)
