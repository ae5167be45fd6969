"""HF safetensors -> project checkpoint -> HF safetensors, bit for bit; load_model; the format's
helpers (meta.json, latest, atomic writes) and the converter's error messages."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_phi4.checkpoint import format as ckpt_format
from megatron_phi4.checkpoint import hf_convert
from megatron_phi4.checkpoint.format import CheckpointError
from megatron_phi4.config import ModelConfig, model_preset
from megatron_phi4.models.phi4 import hf_mapping

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CFG = ModelConfig(vocab_size=128, hidden_size=64, num_layers=3, num_attention_heads=4, num_kv_heads=2,
                  intermediate_size=96, max_seq_length=128, rope_theta=10000.0)
VARIANTS = {
    "single-fp32": dict(dtype=torch.float32, max_shard_size="100MB"),
    "sharded-bf16": dict(dtype=torch.bfloat16, max_shard_size="40KB"),
}


def random_hf_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    hf_cfg = hf_mapping.to_hf_phi3_config(CFG)
    hf_cfg._attn_implementation = "eager"
    model = transformers.Phi3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0.0, 0.08)
    return model.to(dtype)


def read_safetensors_dir(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name]


@pytest.fixture(scope="module", params=list(VARIANTS))
def hf_dir(request, tmp_path_factory):
    v = VARIANTS[request.param]
    d = tmp_path_factory.mktemp(request.param) / "hf"
    model = random_hf_model(v["dtype"])
    model.save_pretrained(d, safe_serialization=True, max_shard_size=v["max_shard_size"])
    sharded = (d / hf_convert.SAFE_INDEX).is_file()
    assert sharded == request.param.startswith("sharded")
    return d


@pytest.fixture(scope="module")
def imported(hf_dir):
    ckpt = hf_dir.parent / "ckpt"
    assert hf_convert.main(["import-hf", "--hf-dir", str(hf_dir), "--output", str(ckpt)]) == 0
    return ckpt


def test_import_writes_the_project_format(hf_dir, imported):
    meta = ckpt_format.read_meta(imported)
    assert meta["format"] == "megatron_phi4" and meta["version"] == ckpt_format.FORMAT_VERSION
    assert meta["kind"] == "weights" and meta["source"]["type"] == "hf"
    assert ckpt_format.model_config_from_meta(meta) == CFG
    tmeta = ckpt_format.checkpoint_tensor_meta(imported)
    assert {k: v[0] for k, v in tmeta.items()} == hf_mapping.our_shapes(CFG)
    src_dtype = next(iter(read_safetensors_dir(hf_dir).values())).dtype
    assert {v[1] for v in tmeta.values()} == {src_dtype}  # --dtype keep
    assert leftovers(imported.parent) == []


def test_export_is_bit_exact_and_loads_in_transformers(hf_dir, imported, tmp_path):
    out = tmp_path / "export"
    shard = "40KB" if (hf_dir / hf_convert.SAFE_INDEX).is_file() else "5GB"
    assert hf_convert.main(["export-hf", "--checkpoint", str(imported), "--output", str(out),
                            "--max-shard-size", shard]) == 0
    orig, back = read_safetensors_dir(hf_dir), read_safetensors_dir(out)
    assert orig.keys() == back.keys()
    for k in orig:
        assert orig[k].dtype == back[k].dtype, k
        assert torch.equal(orig[k].view(torch.uint8), back[k].view(torch.uint8)), k
    sharded = (hf_dir / hf_convert.SAFE_INDEX).is_file()
    assert (out / hf_convert.SAFE_INDEX).is_file() == sharded
    if sharded:
        index = json.loads((out / hf_convert.SAFE_INDEX).read_text())
        assert set(index["weight_map"]) == set(orig)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in orig.values())
        assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    x = torch.randint(0, CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = transformers.Phi3ForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()(x).logits
        b = transformers.Phi3ForCausalLM.from_pretrained(out, attn_implementation="eager").eval()(x).logits
    assert torch.equal(a, b)
    assert leftovers(tmp_path) == []


def test_load_model_matches_hf(hf_dir, imported):
    import megatron_phi4

    hf = transformers.Phi3ForCausalLM.from_pretrained(hf_dir, attn_implementation="eager",
                                                      dtype=torch.float32).eval()
    model = megatron_phi4.load_model(imported, dtype=torch.float32)
    assert not model.training and model.rope_theta == CFG.rope_theta
    x = torch.randint(0, CFG.vocab_size, (2, 15), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = hf(x).logits, model(x)
    assert ((ref - got).abs().max() / ref.abs().max()).item() <= 1e-5
    # dtype=None keeps the stored dtype.
    stored = ckpt_format.checkpoint_tensor_meta(imported)["embed_tokens.weight"][1]
    assert megatron_phi4.load_model(imported).embed_tokens.weight.dtype == stored


def test_run_root_with_latest(imported, tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    shutil.copytree(imported, root / "sft" / "step_00000010")
    ckpt_format.atomic_write_text(root / ckpt_format.LATEST_FILE, "sft/step_00000010\n")
    assert ckpt_format.resolve_checkpoint(root) == root / "sft" / "step_00000010"
    assert ckpt_format.resolve_checkpoint(tmp_path) == root / "sft" / "step_00000010"  # the run dir
    out = tmp_path / "hf_from_root"
    assert hf_convert.main(["export-hf", "--checkpoint", str(root), "--output", str(out)]) == 0
    assert (out / "config.json").is_file()
    cfg = hf_mapping.model_config_from_hf(out / "config.json")
    assert cfg == CFG


def test_dtype_conversion(tmp_path):
    src = tmp_path / "hf32"
    random_hf_model(torch.float32, seed=3).save_pretrained(src, safe_serialization=True)
    ckpt = tmp_path / "ckpt_bf16"
    assert hf_convert.main(["import-hf", "--hf-dir", str(src), "--output", str(ckpt), "--dtype", "bf16"]) == 0
    assert {d for _, d in ckpt_format.checkpoint_tensor_meta(ckpt).values()} == {torch.bfloat16}
    out = tmp_path / "hf_fp32"
    assert hf_convert.main(["export-hf", "--checkpoint", str(ckpt), "--output", str(out), "--dtype", "fp32"]) == 0
    orig, back = read_safetensors_dir(src), read_safetensors_dir(out)
    for k in orig:
        assert back[k].dtype == torch.float32
        assert torch.equal(back[k], orig[k].to(torch.bfloat16).float()), k
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"


# --------------------------------------------------------------------------- errors leave nothing
def _patched_copy(hf_dir: Path, dest: Path, **changes) -> Path:
    shutil.copytree(hf_dir, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg.update(changes)
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def _run_fails(argv, capsys) -> str:
    assert hf_convert.main(argv) == 2
    return capsys.readouterr().err


def test_missing_hf_dir(tmp_path, capsys):
    out = tmp_path / "out"
    err = _run_fails(["import-hf", "--hf-dir", str(tmp_path / "nope"), "--output", str(out)], capsys)
    assert str(tmp_path / "nope") in err and "does not exist" in err
    assert not out.exists() and leftovers(tmp_path) == []


def test_bad_config_is_rejected_before_writing(hf_dir, tmp_path, capsys):
    bad = _patched_copy(hf_dir, tmp_path / "hf_sw", sliding_window=64)
    out = tmp_path / "out"
    err = _run_fails(["import-hf", "--hf-dir", str(bad), "--output", str(out)], capsys)
    assert "sliding_window" in err and "64" in err
    assert not out.exists() and leftovers(tmp_path) == []


def test_shape_mismatch_names_the_tensor(hf_dir, tmp_path, capsys):
    bad = _patched_copy(hf_dir, tmp_path / "hf_shape", intermediate_size=80)
    out = tmp_path / "out"
    for argv in (["import-hf", "--hf-dir", str(bad), "--check"],
                 ["import-hf", "--hf-dir", str(bad), "--output", str(out)]):
        err = _run_fails(argv, capsys)
        assert "model.layers.0.mlp.gate_up_proj.weight: shape (192, 64) but config.json implies (160, 64)" in err
    assert not out.exists() and leftovers(tmp_path) == []


def test_check_only_writes_nothing(hf_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert hf_convert.main(["import-hf", "--hf-dir", str(hf_dir), "--check", "--output", str(out)]) == 0
    assert "OK" in capsys.readouterr().out
    assert not out.exists() and leftovers(tmp_path) == []


def test_missing_tensor_file(hf_dir, tmp_path, capsys):
    d = tmp_path / "hf_broken"
    shutil.copytree(hf_dir, d)
    for f in d.glob("*.safetensors"):
        f.unlink()
        break
    err = _run_fails(["import-hf", "--hf-dir", str(d), "--output", str(tmp_path / "out")], capsys)
    assert "missing" in err or "neither" in err
    assert not (tmp_path / "out").exists()


def test_failure_mid_import_leaves_nothing(hf_dir, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = hf_convert.SafetensorsFile.read

    def flaky(self, name, rows=None):
        calls["n"] += 1
        if calls["n"] == 6:
            raise OSError("disk on fire")
        return real(self, name, rows)

    monkeypatch.setattr(hf_convert.SafetensorsFile, "read", flaky)
    out = tmp_path / "out"
    with pytest.raises(Exception, match="disk on fire"):
        hf_convert.import_hf(hf_dir, out, log=lambda m: None)
    assert calls["n"] == 6
    assert not out.exists() and leftovers(tmp_path) == []


def test_failure_mid_export_leaves_nothing(imported, tmp_path, monkeypatch):
    real = ckpt_format.load_model_weights
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk on fire")
        return real(*a, **k)

    monkeypatch.setattr(ckpt_format, "load_model_weights", flaky)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk on fire"):
        hf_convert.export_hf(imported, out, log=lambda m: None)
    assert not out.exists() and leftovers(tmp_path) == []


def test_existing_output_is_not_overwritten(imported, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    err = _run_fails(["export-hf", "--checkpoint", str(imported), "--output", str(out)], capsys)
    assert "already exists" in err and (out / "keep.txt").is_file()
    assert hf_convert.main(["export-hf", "--checkpoint", str(imported), "--output", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_export_of_a_non_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = _run_fails(["export-hf", "--checkpoint", str(tmp_path / "empty"), "--output", str(tmp_path / "o")], capsys)
    assert str(tmp_path / "empty") in err and "meta.json" in err and "latest" in err


def test_cli_help_subprocess():
    res = subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "import-hf" in res.stdout and "export-hf" in res.stdout


# --------------------------------------------------------------------------- the format helpers
def test_save_and_load_model_weights(tmp_path):
    sd = {"a.weight": torch.randn(4, 3), "b.weight": torch.randn(5, dtype=torch.float64)}
    ckpt = tmp_path / "c"
    ckpt_format.save_model_weights(sd, ckpt, model_preset("tiny"), step=7, stage="sft")
    meta = ckpt_format.read_meta(ckpt)
    assert meta["step"] == 7 and meta["stage"] == "sft" and meta["model"]["vocab_size"] == 512
    only_a = ckpt_format.load_model_weights(ckpt, keys=["a.weight"])
    assert list(only_a) == ["a.weight"] and torch.equal(only_a["a.weight"], sd["a.weight"])
    cast = ckpt_format.load_model_weights(ckpt, dtype=torch.bfloat16)
    assert {v.dtype for v in cast.values()} == {torch.bfloat16}
    with pytest.raises(CheckpointError, match="no tensor.*'c.weight'"):
        ckpt_format.load_model_weights(ckpt, keys=["c.weight"])
    with pytest.raises(CheckpointError, match="already exists"):
        ckpt_format.save_model_weights(sd, ckpt, model_preset("tiny"))
    ckpt_format.save_model_weights({"a.weight": torch.zeros(2)}, ckpt, model_preset("tiny"), overwrite=True)
    assert list(ckpt_format.load_model_weights(ckpt)) == ["a.weight"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_lazy_tensors_are_produced_one_at_a_time(tmp_path):
    alive = []

    def producer(i):
        def make():
            alive.append(i)
            return torch.full((3, 2), float(i))
        return make

    lazy = {f"t{i}": ((3, 2), torch.float32, producer(i)) for i in range(4)}
    ckpt_format.save_model_weights(None, tmp_path / "c", model_preset("tiny"), lazy=lazy)
    assert alive == [0, 1, 2, 3]
    got = ckpt_format.load_model_weights(tmp_path / "c")
    assert all(torch.equal(got[f"t{i}"], torch.full((3, 2), float(i))) for i in range(4))


def test_read_meta_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        ckpt_format.read_meta(tmp_path / "missing")
    (tmp_path / "c").mkdir()
    with pytest.raises(CheckpointError, match=r"meta.json is missing"):
        ckpt_format.read_meta(tmp_path / "c")
    (tmp_path / "c" / "meta.json").write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(CheckpointError, match="not a megatron_phi4 checkpoint"):
        ckpt_format.read_meta(tmp_path / "c")
    ckpt_format.write_meta(tmp_path / "c", model_preset("tiny"), kind="train", step=3)
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    meta["version"] = 99
    (tmp_path / "c" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="version 99 is not supported"):
        ckpt_format.read_meta(tmp_path / "c")
    with pytest.raises(ValueError, match="reserved"):
        ckpt_format.write_meta(tmp_path / "c", model_preset("tiny"), version=2)
    with pytest.raises(ValueError, match="kind"):
        ckpt_format.write_meta(tmp_path / "c", model_preset("tiny"), kind="bogus")
    meta.update(version=1, model={**meta["model"], "bogus_field": 1})
    (tmp_path / "c" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="bogus_field: unknown field"):
        ckpt_format.model_config_from_meta(ckpt_format.read_meta(tmp_path / "c"))


def test_resolve_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt_format.resolve_checkpoint(tmp_path / "nope")
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(CheckpointError, match=r"root.*meta.json is missing.*'latest'"):
        ckpt_format.resolve_checkpoint(root)
    ckpt_format.atomic_write_text(root / "latest", "step_5")
    with pytest.raises(CheckpointError, match=r"latest points to .*step_5.*not a complete checkpoint"):
        ckpt_format.resolve_checkpoint(root)
    ckpt_format.write_meta(root / "step_5", model_preset("tiny"))
    assert ckpt_format.resolve_checkpoint(root) == root / "step_5"
    with pytest.raises(CheckpointError, match="model weights are missing"):
        ckpt_format.load_model_weights(root)


def test_atomic_write_text(tmp_path):
    p = tmp_path / "latest"
    ckpt_format.atomic_write_text(p, "a")
    ckpt_format.atomic_write_text(p, "b")
    assert p.read_text() == "b" and [x.name for x in tmp_path.iterdir()] == ["latest"]


# --------------------------------------------------------------------------- written sharded, read whole
def _save_sharded(rank, world_size, ckpt_dir, full_state):
    """What a distributed trainer does: every rank saves its Shard(0) DTensors with DCP; rank 0
    writes meta.json (the trainer also renames a temp dir and updates latest)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    sharded = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in full_state.items()}
    dcp.save(sharded, checkpoint_id=os.path.join(ckpt_dir, ckpt_format.MODEL_DIR))
    if rank == 0:
        ckpt_format.write_meta(ckpt_dir, CFG, kind="train", step=5, stage="pretrain")
    dist.barrier()
    return True


def test_checkpoint_saved_sharded_by_two_ranks_loads_in_one_process(tmp_path):
    from tests.distributed_utils import run_distributed

    from megatron_phi4 import load_model
    from megatron_phi4.models.phi4.model import build_model

    model = build_model(CFG, seed=11)
    full = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ckpt = tmp_path / "step_5"
    assert run_distributed(_save_sharded, 2, str(ckpt), full, timeout=120) == [True, True]
    assert ckpt_format.read_meta(ckpt)["kind"] == "train"
    got = ckpt_format.load_model_weights(ckpt, keys=["layers.1.mlp.up_proj.weight"])
    assert torch.equal(got["layers.1.mlp.up_proj.weight"], full["layers.1.mlp.up_proj.weight"])
    loaded = load_model(ckpt)
    assert all(torch.equal(loaded.state_dict()[k], full[k]) for k in full)
