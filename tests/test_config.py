"""Recipe loading, dotted overrides and validation: every error names the offending field."""
from __future__ import annotations

import dataclasses
import re

import pytest

from megatron_phi4.config import (ConfigError, ModelConfig, ParallelConfig, RecipeConfig, load_recipe,
                                  model_preset, parse_count)

BASE = """\
name: test
run_dir: runs/test
model:
  preset: tiny
parallel:
  tp: 1
stages:
  - name: pretrain
    data: {kind: synthetic, seq_length: 64, micro_batch_size: 2, global_batch_size: 8}
    optim: {lr: 1e-3, min_lr: 0.0}
    train_steps: 10
  - name: sft
    data: {kind: synthetic, seq_length: 64, micro_batch_size: 1, global_batch_size: 4}
    optim: {lr: 1e-5, min_lr: 0.0}
    train_tokens: 1M
"""


@pytest.fixture
def recipe_path(tmp_path):
    p = tmp_path / "recipe.yaml"
    p.write_text(BASE)
    return p


def load(path, *overrides, world_size=None) -> RecipeConfig:
    return load_recipe(path, list(overrides), world_size=world_size)


def raises(path, *overrides, match, world_size=None) -> str:
    with pytest.raises(ConfigError, match=match) as info:
        load(path, *overrides, world_size=world_size)
    return str(info.value)


def test_loads_with_preset_and_yaml_floats(recipe_path):
    r = load(recipe_path)
    assert r.model == model_preset("tiny")
    assert [s.name for s in r.stages] == ["pretrain", "sft"]
    # YAML 1.1 reads "1e-3" (no dot) as a string; float fields still get a float.
    lr = r.stage("pretrain").optim.lr
    assert isinstance(lr, float) and lr == pytest.approx(1e-3)
    assert r.stage("sft").train_tokens == 1_000_000  # "1M" parsed by parse_count
    assert r.stage("sft").num_steps() == -(-1_000_000 // (4 * 64))


def test_override_by_stage_name_and_index(recipe_path):
    r = load(recipe_path, "stages.sft.optim.lr=1e-6", "stages.0.train_steps=3", "model.num_layers=3")
    assert r.stage("sft").optim.lr == pytest.approx(1e-6) and isinstance(r.stage("sft").optim.lr, float)
    assert r.stage("pretrain").train_steps == 3
    assert r.model.num_layers == 3 and r.model.hidden_size == 64  # the rest of the preset stays


def test_override_stage_rope_theta_and_model_preset(recipe_path):
    r = load(recipe_path, "stages.sft.rope_theta=250000", "model.preset=tiny-phi4-vocab")
    assert r.stage("sft").rope_theta == 250000.0
    assert r.model.vocab_size == 100352 and r.model.num_layers == 4


def test_unknown_field_is_named_with_its_path(recipe_path):
    msg = raises(recipe_path, "stages.sft.optim.lrr=1", match=r"stages\.1\.optim\.lrr: unknown field")
    assert "allowed:" in msg and "lr" in msg
    raises(recipe_path, "bogus=1", match=r"bogus: unknown field")
    raises(recipe_path, "model.hiden_size=8", match=r"model\.hiden_size: unknown field")


def test_missing_stage_name_in_override(recipe_path):
    raises(recipe_path, "stages.dpo.optim.lr=1", match=r"stages\.dpo: no list entry with index or name 'dpo'")


def test_bad_choice_lists_allowed_values(recipe_path):
    msg = raises(recipe_path, "parallel.pp_schedule=bogus", match=r"parallel\.pp_schedule: got 'bogus'")
    for allowed in ("'gpipe'", "'1f1b'", "'interleaved_1f1b'", "'zero_bubble'"):
        assert allowed in msg
    raises(recipe_path, "stages.sft.data.kind=web", match=r"stages\.sft\.data\.kind: got 'web', allowed:")
    raises(recipe_path, "stages.sft.optim.decay_style=step", match=r"stages\.sft\.optim\.decay_style")
    raises(recipe_path, "model.preset=phi5", match=r"model\.preset: unknown preset 'phi5', allowed: phi4-14b")


def test_tp_must_divide_query_groups_of_phi4(recipe_path):
    msg = raises(recipe_path, "model.preset=phi4-14b", "parallel.tp=4", match=r"parallel\.tp")
    assert "[1, 2, 5, 10]" in msg
    assert "num_kv_heads=10" in msg
    # Direct validation gives the same list.
    with pytest.raises(ConfigError, match=re.escape("tp must be one of [1, 2, 5, 10]")):
        ParallelConfig(tp=4).validate(model_preset("phi4-14b"))
    ParallelConfig(tp=5).validate(model_preset("phi4-14b"))


def test_global_batch_layout(recipe_path):
    # dp = world 3 / (tp 1 * pp 1) = 3: 8 sequences cannot be split as micro 2 x dp 3.
    raises(recipe_path, world_size=3, match=re.escape(
        "stages.pretrain.data.global_batch_size: 8 is not divisible by micro_batch_size * dp = 2 * 3"))
    load(recipe_path, world_size=4)
    raises(recipe_path, "stages.pretrain.data.global_batch_size=7",
           match=r"stages\.pretrain\.data\.global_batch_size: 7 is not a multiple of micro_batch_size=2")
    raises(recipe_path, "parallel.tp=2", world_size=3, match=r"world size 3 is not divisible by tp \* pp = 2")


def test_type_errors_name_the_field(recipe_path):
    raises(recipe_path, "stages.sft.optim.lr=fast", match=r"stages\.1\.optim\.lr: expected a number, got 'fast'")
    raises(recipe_path, "parallel.tp=true", match=r"parallel\.tp: expected an integer, got True")
    raises(recipe_path, "parallel.sequence_parallel=1", match=r"parallel\.sequence_parallel: expected true/false")


def test_stage_rules(recipe_path):
    raises(recipe_path, "stages.sft.train_steps=5", match=r"stages\.sft: set exactly one of train_tokens and train_steps")
    raises(recipe_path, "stages.sft.name=s f t", match=r"stages\.s f t\.name: 's f t' must be letters")
    raises(recipe_path, "stages.1.name=pretrain", match=r"stage names must be unique")
    raises(recipe_path, "stages.sft.loss.type=dpo", "stages.sft.data.kind=pretrain", "stages.sft.data.mixture=m.yaml",
           match=r"stages\.sft\.data\.kind: a DPO loss needs preference data")
    raises(recipe_path, "stages.sft.train_tokens=lots", match=r"stages\.sft\.train_tokens: cannot read 'lots'")
    with pytest.raises(ConfigError, match=r"--stage: no stage named 'dpo'"):
        load(recipe_path).stage("dpo")


def test_model_validation_names_fields():
    with pytest.raises(ConfigError, match=r"model\.num_kv_heads: num_attention_heads=4 is not a multiple"):
        ModelConfig(hidden_size=64, num_attention_heads=4, num_kv_heads=3).validate()
    with pytest.raises(ConfigError, match=r"model\.hidden_size: 65 is not divisible"):
        ModelConfig(hidden_size=65, num_attention_heads=4, num_kv_heads=2).validate()
    with pytest.raises(ConfigError, match=r"model\.backend: got 'jax'"):
        ModelConfig(backend="jax").validate()


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_recipe(lst)
    with pytest.raises(ConfigError, match="expected key=value"):
        load_recipe(None, ["model.num_layers"])


@pytest.mark.parametrize("text, value", [
    ("10T", 10 * 10**12), ("250B", 250 * 10**9), ("1.5M", 1_500_000), ("8K", 8000), ("5760", 5760),
    (5760, 5760), (2.5e11, 250_000_000_000), ("1e3", 1000), ("4G", 4 * 10**9),
])
def test_parse_count(text, value):
    assert parse_count(text) == value


@pytest.mark.parametrize("bad", ["ten", "10X", "", True])
def test_parse_count_errors_name_the_field(bad):
    with pytest.raises(ConfigError, match=r"stages\.x\.train_tokens"):
        parse_count(bad, "stages.x.train_tokens")


def test_checkpoint_section_is_validated():
    from megatron_phi4.config import CheckpointConfig

    with pytest.raises(ConfigError, match=r"checkpoint\.async_save"):
        CheckpointConfig(async_save=True).validate()
    with pytest.raises(ConfigError, match=r"checkpoint\.keep_last"):
        CheckpointConfig(keep_last=0).validate()


# --------------------------------------------------------------------------- model.fp8
def _fp8(backend="local", **fp8):
    from megatron_phi4.config import FP8Config, model_preset

    return dataclasses.replace(model_preset("tiny", num_layers=4), backend=backend,
                               fp8=FP8Config(enabled=True, **fp8))


@pytest.mark.parametrize("backend,fp8,match", [
    ("local", dict(recipe="delayed"), r"model\.fp8\.recipe: got 'delayed' with model\.backend 'local', allowed: "
                                      r"'tensorwise', 'rowwise' \('delayed' needs model\.backend 'te'\)"),
    ("local", dict(recipe="mxfp8"), r"model\.fp8\.recipe: .*'mxfp8' needs model\.backend 'te'"),
    ("te", dict(recipe="rowwise"), r"model\.fp8\.recipe: got 'rowwise' with model\.backend 'te'.*needs model\.backend 'local'"),
    ("local", dict(recipe="tensorwise", amax_history_len=16), r"model\.fp8\.amax_history_len: only delayed"),
    ("local", dict(format="e4m3"), r"model\.fp8\.format: the local backend"),
    ("local", dict(amax_reduction="tp"), r"model\.fp8\.amax_reduction: the local backend"),
    ("te", dict(recipe="delayed", keep_first_last_bf16=True), r"model\.fp8\.keep_first_last_bf16: delayed scaling"),
    ("local", dict(keep_first_last_bf16=True, bf16_layers=2), r"model\.fp8\.bf16_layers: 2 layers at each end"),
    ("local", dict(amax_reduction="all"), r"model\.fp8\.amax_reduction: got 'all', allowed: 'tp_dp', 'tp'"),
    ("te", dict(recipe="mxfp8", format="hybrid"), r"model\.fp8\.format: MXFP8 block scaling uses E4M3 only"),
])
def test_fp8_config_errors(backend, fp8, match):
    cfg = _fp8(backend, **fp8)
    with pytest.raises(ConfigError, match=match):
        cfg.fp8.validate(cfg.backend, cfg.num_layers)  # the FP8 rules, whatever is installed here


def test_fp8_config_from_yaml_and_layer_choice():
    from megatron_phi4.config import FP8Config, ModelConfig, from_dict

    cfg = from_dict(ModelConfig, {"preset": "tiny", "num_layers": 6,
                                  "fp8": {"enabled": True, "recipe": "rowwise", "keep_first_last_bf16": True,
                                          "bf16_layers": 2}}, "model")
    cfg.validate()
    assert [cfg.fp8.bf16_layer(i, 6) for i in range(6)] == [True, True, False, False, True, True]
    assert not FP8Config(enabled=True).bf16_layer(0, 6) and FP8Config().bf16_layer(3, 6)
    with pytest.raises(ConfigError, match=r"model\.fp8\.recipee: unknown field"):
        from_dict(ModelConfig, {"fp8": {"recipee": "x"}}, "model")
    bad = dataclasses.replace(cfg, intermediate_size=120)
    with pytest.raises(ConfigError, match=r"model\.fp8\.enabled: FP8 matrix products need intermediate_size = 120"):
        bad.validate()


def test_registry_requirements_are_checked_at_config_time():
    from megatron_phi4.registry import BACKENDS, Registry, UnavailableEntryError

    reg = Registry("thing.kind", {"a": object()}, requirements={"a": lambda: "needs a unicorn"})
    assert reg.unavailable_reason("a") == "needs a unicorn"
    with pytest.raises(UnavailableEntryError, match=r"thing\.kind: 'a' cannot be used here: needs a unicorn"):
        reg.check_available("a")
    assert BACKENDS.unavailable_reason("local") is None
