"""The Transformer Engine backend's name/layout mapping, proven without TE and without a GPU.

``layers/te.py`` declares the parameters TE allocates (names, shapes) and how their rows map to
checkpoint tensors with pure functions; the TE classes call the same functions. Here a stub backend
built on those declarations (tests/layers/te_stub.py) must: initialize to the local backend's
checkpoint tensors from the same seed and compute the same logits; cross checkpoints both ways;
hold exactly [gate_r; up_r] / [q_r; k_r; v_r] / down[:, r] on every TP rank; train under TP=2 with
sequence parallelism like one local process; and go through HF import/export. Also: the config-time
failure without TE, packed-document cu_seqlens, and the FP8 weight-cache signal.
"""
from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from tests.distributed_utils import run_distributed
from tests.layers import te_stub

from megatron_phi4.config import ConfigError, FP8Config, ModelConfig, model_preset
from megatron_phi4.layers import te as te_layers
from megatron_phi4.layers.backend import ParallelContext

te_stub.register()
HAS_TE = importlib.util.find_spec("transformer_engine") is not None


def _cfg(backend="local", **kw):
    return dataclasses.replace(model_preset("tiny", **kw), backend=backend)


def test_stub_has_te_names_and_same_checkpoint_and_logits():
    from megatron_phi4.models.phi4.model import build_model

    local, stub = build_model(_cfg(), seed=3), build_model(_cfg("te_stub"), seed=3)
    names = {n for n, _ in stub.named_parameters()}
    assert {"layers.0.attention.qkv.layer_norm_weight", "layers.0.attention.qkv.weight",
            "layers.0.attention.o_proj.weight", "layers.0.mlp.layer_norm_weight", "layers.0.mlp.fc1_weight",
            "layers.0.mlp.fc2_weight", "norm.weight", "embed_tokens.weight", "lm_head.weight"} <= names
    sd_local, sd_stub = local.state_dict(), stub.state_dict()
    assert list(sd_local) == list(sd_stub)
    assert all(torch.equal(sd_local[k], sd_stub[k]) for k in sd_local)
    tokens = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(stub(tokens), local(tokens), rtol=1e-5, atol=1e-6)
    # the fused rows are the checkpoint tensors stacked: [q; k; v] and [gate; up]
    qkv = stub.layers["1"].attention.qkv.weight
    assert torch.equal(qkv, torch.cat([sd_local[f"layers.1.attention.{p}_proj.weight"] for p in "qkv"]))
    fc1 = stub.layers["1"].mlp.fc1_weight
    assert torch.equal(fc1, torch.cat([sd_local["layers.1.mlp.gate_proj.weight"], sd_local["layers.1.mlp.up_proj.weight"]]))


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_tp_rank_rows_of_te_parameters(sequence_parallel):
    """Every TP rank's TE-shaped parameters, assembled from full checkpoint tensors by the layout."""
    h, ffn, q, kv, tp = 64, 128, 64, 32, 2
    g = torch.Generator().manual_seed(0)
    full = {n: torch.randn(s, generator=g) for n, s in {
        "norm": (h,), "q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "gate_proj": (ffn, h),
        "up_proj": (ffn, h), "down_proj": (h, ffn), "weight": (h, q)}.items()}
    for r in range(tp):
        ctx = ParallelContext(tp_group=None, tp_size=tp, tp_rank=r, sequence_parallel=sequence_parallel)
        cases = [
            (te_layers.norm_linear_param_shapes(h, {"q_proj": q, "k_proj": kv, "v_proj": kv}, ctx),
             te_layers.norm_linear_layout(h, {"q_proj": q, "k_proj": kv, "v_proj": kv}, ctx),
             {"layer_norm_weight": full["norm"],
              "weight": torch.cat([full["q_proj"].chunk(tp)[r], full["k_proj"].chunk(tp)[r], full["v_proj"].chunk(tp)[r]])}),
            (te_layers.norm_mlp_param_shapes(h, ffn, ctx), te_layers.norm_mlp_layout(h, ffn, ctx),
             {"layer_norm_weight": full["norm"],
              "fc1_weight": torch.cat([full["gate_proj"].chunk(tp)[r], full["up_proj"].chunk(tp)[r]]),
              "fc2_weight": full["down_proj"].chunk(tp, dim=1)[r]}),
            (te_layers.row_linear_param_shapes(q, h, ctx), te_layers.row_linear_layout(q, h, ctx),
             {"weight": full["weight"].chunk(tp, dim=1)[r]}),
        ]
        for shapes, layout, expected in cases:
            assert set(shapes) == set(layout) == set(expected)
            for pname, pieces in layout.items():
                fake = torch.full(shapes[pname], float("nan"))  # allocated as TE would, then loaded
                for p in pieces:
                    n = p.rows[1] - p.rows[0]
                    idx = tuple(slice(o, o + s) for o, s in zip(p.global_offset, (n,) + tuple(shapes[pname][1:])))
                    fake[p.rows[0]:p.rows[1]] = full[p.name][idx]
                assert torch.equal(fake, expected[pname]), pname
                norm = pname == "layer_norm_weight"
                assert all(pc.tp_replicated == norm and pc.sp_grad == (norm and sequence_parallel) for pc in pieces)


def test_checkpoints_cross_between_te_layout_and_local(tmp_path):
    from megatron_phi4.api import load_model
    from megatron_phi4.checkpoint.format import read_meta, save_model_weights
    from megatron_phi4.models.phi4.model import build_model

    stub = build_model(_cfg("te_stub"), seed=5)
    # a checkpoint written by a TE run says backend "te" in its meta, which this machine cannot build
    save_model_weights(stub.state_dict(), tmp_path / "ckpt", _cfg("te"))
    assert read_meta(tmp_path / "ckpt")["model"]["backend"] == "te"
    local = load_model(tmp_path / "ckpt")  # falls back to the local backend where TE is absent
    if not HAS_TE:
        assert local.config.backend == "local"
    tokens = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(local(tokens), stub(tokens), rtol=1e-5, atol=1e-6)
    again = build_model(_cfg("te_stub"), seed=0)
    again.load_state_dict(local.state_dict())
    assert torch.equal(again.layers["1"].mlp.fc1_weight, stub.layers["1"].mlp.fc1_weight)


def test_hf_import_export_through_te_layout(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from megatron_phi4.checkpoint import hf_convert
    from megatron_phi4.checkpoint.format import load_model_weights, save_model_weights
    from megatron_phi4.models.phi4 import hf_mapping
    from megatron_phi4.models.phi4.model import build_model

    cfg = ModelConfig(vocab_size=128, hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                      intermediate_size=96, max_seq_length=64, rope_theta=10000.0)
    torch.manual_seed(0)
    hf_cfg = hf_mapping.to_hf_phi3_config(cfg)
    hf_cfg._attn_implementation = "eager"
    hf = transformers.Phi3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0.0, 0.08)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    hf_convert.import_hf(tmp_path / "hf", tmp_path / "ckpt", log=lambda m: None)
    stub = build_model(dataclasses.replace(cfg, backend="te_stub"), seed=None)
    stub.load_state_dict(load_model_weights(tmp_path / "ckpt"))
    tokens = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(stub(tokens), hf(tokens).logits, rtol=1e-4, atol=1e-4)
    # the TE-layout model's state dict, saved as a TE run would save it, exports bit-exactly
    save_model_weights(stub.state_dict(), tmp_path / "ckpt_te", dataclasses.replace(cfg, backend="te"))
    hf_convert.export_hf(tmp_path / "ckpt_te", tmp_path / "hf_out", log=lambda m: None)
    out = {k: v for f in sorted((tmp_path / "hf_out").glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    ref = {k: v for f in sorted((tmp_path / "hf").glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    assert set(out) == set(ref) and all(torch.equal(out[k], ref[k]) for k in ref)


def _train_stub_tp_sp(rank, world):
    from megatron_phi4.config import ParallelConfig
    from megatron_phi4.distributed.parallel_dims import ParallelDims
    from megatron_phi4.engine import ParallelEngine
    from tests.layers.test_float8 import _steps, _train

    pcfg = ParallelConfig(tp=2, sequence_parallel=True)
    engine = ParallelEngine(_cfg("te_stub", num_layers=4), pcfg, ParallelDims.build(pcfg, model_cfg=_cfg()), seed=9)
    return _train(engine, _steps())


def test_te_layout_under_tp2_sp_fsdp_trains_like_one_local_process():
    from megatron_phi4.config import ParallelConfig
    from megatron_phi4.distributed.parallel_dims import ParallelDims
    from megatron_phi4.engine import ParallelEngine
    from tests.layers.test_float8 import _steps, _train

    losses, full = run_distributed(_train_stub_tp_sp, 2, timeout=240)[0]
    engine = ParallelEngine(_cfg(num_layers=4), ParallelConfig(dp_shard="none"), ParallelDims(1, 1, 1), seed=9)
    ref_losses, ref_full = _train(engine, _steps())
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    for k, v in ref_full.items():  # the parity suite's tolerance after AdamW steps
        torch.testing.assert_close(full[k], v, rtol=1e-4, atol=1e-5, msg=k)


# ----------------------------------------------------------------------------- no TE here
@pytest.mark.skipif(HAS_TE, reason="checks the behaviour without Transformer Engine")
def test_te_backend_fails_at_config_time_without_te():
    with pytest.raises(ConfigError, match=r"model\.backend: 'te' cannot be used here: .*transformer_engine.*NGC"):
        ModelConfig(backend="te").validate()
    from megatron_phi4.config import load_recipe

    with pytest.raises(ConfigError, match=r"model\.backend: 'te'"):
        load_recipe("examples/recipes/tiny_cpu.yaml", ["model.backend=te"], variables={"SAMPLE_DATA": "/nonexistent"})
    with pytest.raises(ImportError, match="NGC"):  # bypassing the config: a clear error too
        te_layers.TEBackend()


def test_cu_seqlens_from_document_ids():
    doc = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    cu, longest = te_layers.cu_seqlens_from_document_ids(doc)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 6, 12] and longest == 6


def test_weight_versions_mark_the_first_microbatch_after_each_update():
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([p], lr=0.1)
    seen = te_layers.WeightVersions()
    assert seen.is_first_microbatch([p]) is True  # first forward: cast and cache
    assert seen.is_first_microbatch([p]) is False  # next micro-batch, same weights: reuse the cache
    p.grad = torch.ones(4)
    opt.step()
    assert seen.is_first_microbatch([p]) is True  # the optimizer changed the weights
    assert seen.is_first_microbatch([p]) is False
    with torch.no_grad():
        p.copy_(torch.zeros(4))  # a checkpoint load
    assert seen.is_first_microbatch([p]) is True
    p.data = torch.zeros(4)  # storage swapped
    assert seen.is_first_microbatch([p]) is True


@pytest.mark.skipif(not HAS_TE, reason="needs Transformer Engine")
def test_te_recipes_map_to_te_classes():  # pragma: no cover - NGC only
    from transformer_engine.common import recipe as r

    for name, cls in (("delayed", r.DelayedScaling), ("tensorwise", r.Float8CurrentScaling),
                      ("blockwise", r.Float8BlockScaling), ("mxfp8", r.MXFP8BlockScaling)):
        assert isinstance(te_layers.te_recipe(FP8Config(enabled=True, recipe=name)), cls)
