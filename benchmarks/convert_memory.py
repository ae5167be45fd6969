#!/usr/bin/env python
"""Peak resident memory of import-hf / export-hf against the checkpoint size.

Writes a synthetic HF Phi3ForCausalLM checkpoint of a wide model (default: 4 layers, hidden 2048,
intermediate 8192, vocab 32000, fp32: ~1.5 GB, one shard per layer), then runs
``convert_checkpoint.py import-hf`` and ``export-hf`` each in a fresh process and reports that
process's peak RSS (VmHWM) next to the baseline of a process that only imports the converter.
Streaming means the converter's own share (peak - baseline) stays around one tensor / one layer,
not the checkpoint size.

    python benchmarks/convert_memory.py [--layers 4] [--hidden 2048] [--workdir /tmp/convmem]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHILD = r"""
import sys
sys.path.insert(0, {repo!r})
from megatron_phi4.checkpoint.hf_convert import main
rc = 0 if {argv!r} is None else main({argv!r})
status = open('/proc/self/status').read()
hwm = [l for l in status.splitlines() if l.startswith('VmHWM')][0].split()[1]
print('PEAK_KB', hwm)
sys.exit(rc)
"""


def run_child(argv):
    out = subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO), argv=argv)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"child failed: {argv}\n{out.stdout}\n{out.stderr}")
    peak = int([line for line in out.stdout.splitlines() if line.startswith("PEAK_KB")][0].split()[1])
    return peak * 1024, out.stdout


def write_synthetic_hf(d: Path, cfg) -> tuple[int, int, int]:
    """One safetensors shard per layer (+ embedding, + head) with an index; returns
    (total bytes, largest tensor bytes, bytes of one decoder layer)."""
    import torch
    from safetensors.torch import save_file

    from megatron_phi4.models.phi4 import hf_mapping

    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(hf_mapping.hf_config_from_model(cfg, dtype=torch.float32), indent=2))
    groups = hf_mapping.spec_groups(cfg)
    weight_map, total, biggest, layer_bytes = {}, 0, 0, 0
    g = torch.Generator().manual_seed(0)
    for gi, (_, specs) in enumerate(groups):
        fname = f"model-{gi + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {s.hf_name: torch.randn(s.shape, generator=g) * 0.02 for s in specs}
        save_file(tensors, str(d / fname), metadata={"format": "pt"})
        sizes = [t.numel() * t.element_size() for t in tensors.values()]
        total += sum(sizes)
        biggest = max(biggest, max(sizes))
        if specs[0].layer is not None:
            layer_bytes = sum(sizes)
        weight_map.update({n: fname for n in tensors})
        del tensors
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total, biggest, layer_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a fresh temp dir, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = ap.parse_args()

    from megatron_phi4.config import ModelConfig

    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                      num_attention_heads=args.heads, num_kv_heads=args.kv_heads,
                      intermediate_size=args.intermediate, max_seq_length=4096, rope_theta=10000.0)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="convmem-"))
    if work.exists() and args.workdir:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    gib = 2**30
    try:
        total, biggest, layer = write_synthetic_hf(work / "hf", cfg)
        base, _ = run_child(None)
        imp, _ = run_child(["import-hf", "--hf-dir", str(work / "hf"), "--output", str(work / "ckpt")])
        exp, _ = run_child(["export-hf", "--checkpoint", str(work / "ckpt"), "--output", str(work / "export"),
                            "--max-shard-size", "1GB"])
        rows = [
            ("checkpoint size (fp32)", total),
            ("largest tensor", biggest),
            ("one decoder layer (all its tensors)", layer),
            ("baseline process (python + torch + converter imported)", base),
            ("import-hf peak RSS", imp),
            ("export-hf peak RSS", exp),
            ("import-hf peak - baseline", imp - base),
            ("export-hf peak - baseline", exp - base),
        ]
        print(f"model: {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, "
              f"heads {args.heads}/{args.kv_heads} kv, vocab {args.vocab}")
        for name, n in rows:
            print(f"  {name:<58s} {n / gib:7.3f} GiB")
        print(f"  import extra / checkpoint = {(imp - base) / total:.2f}; "
              f"export extra / checkpoint = {(exp - base) / total:.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
