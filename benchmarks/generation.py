"""Rollout throughput: many samples of one long prefix, the workload of Pivotal Token Search.

    python benchmarks/generation.py                       # CPU, ~1 minute
    python benchmarks/generation.py --device cuda --dtype bf16 --hidden 1024 --layers 8

Builds a random ``Phi3ForCausalLM``, imports it as a project checkpoint (the converter's code path)
and times, on the same weights in the same process, ``--samples`` sampled continuations of one
``--prefix``-token prompt:

* ours, shared prefix: the prompt is prefilled once and its KV cache repeated for every sample;
* ours, recomputed prefix: the prompt is prefilled for every sample (``share_prefix=False``);
* ``transformers``' ``generate(num_return_sequences=samples)``, sdpa attention, its default cache.

All three sample at temperature 1 with no stop token, so every run generates exactly
``samples x new_tokens`` tokens. Prints rollout tokens/s (generated tokens over wall time,
prefill included) and the ratios. Best of ``--repeats`` timings after one untimed warm-up.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prefix", type=int, default=512, help="prompt tokens")
    ap.add_argument("--samples", type=int, default=64, help="rollouts of the prompt")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (1: the shared 2-core CI machine)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import transformers

    import megatron_phi4
    from megatron_phi4.checkpoint import hf_convert
    from megatron_phi4.config import ModelConfig
    from megatron_phi4.generation.decoding import generate_with_params
    from megatron_phi4.generation.sampling import SamplingParams
    from megatron_phi4.models.phi4 import hf_mapping

    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    device = torch.device(args.device)
    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                      num_attention_heads=args.heads, num_kv_heads=args.kv_heads,
                      intermediate_size=3 * args.hidden, max_seq_length=args.prefix + args.new_tokens + 8,
                      rope_theta=10000.0)
    torch.manual_seed(0)
    hf_cfg = hf_mapping.to_hf_phi3_config(cfg)
    hf = transformers.Phi3ForCausalLM(hf_cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0.0, 0.05)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(os.path.join(d, "hf"), safe_serialization=True)
        assert hf_convert.main(["import-hf", "--hf-dir", os.path.join(d, "hf"),
                                "--output", os.path.join(d, "ckpt")]) == 0
        ours = megatron_phi4.load_model(os.path.join(d, "ckpt"), device=device, dtype=dtype)
        hf = transformers.Phi3ForCausalLM.from_pretrained(os.path.join(d, "hf"), attn_implementation="sdpa",
                                                          dtype=dtype).to(device).eval()

    prompt = torch.randint(0, args.vocab, (args.prefix,), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, num_samples=args.samples,
                            stop_token_ids=())

    def run_ours(share_prefix: bool, params=params):
        out = generate_with_params(ours, [prompt], params, seed=0, share_prefix=share_prefix)
        return sum(len(s.token_ids) for s in out[0])

    def run_hf(new_tokens=args.new_tokens):
        x = torch.tensor([prompt], device=device)
        with torch.no_grad():
            out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=True, temperature=1.0, top_k=0,
                              top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              num_return_sequences=args.samples, eos_token_id=None, pad_token_id=0)
        return (out.shape[1] - len(prompt)) * out.shape[0]

    def timed(fn):
        best, tokens = float("inf"), 0
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            tokens = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return tokens / best, best, tokens

    # Warm-up (allocator, kernels) with two new tokens each.
    run_ours(True, SamplingParams(max_new_tokens=2, temperature=1.0, num_samples=args.samples, stop_token_ids=()))
    run_ours(False, SamplingParams(max_new_tokens=2, temperature=1.0, num_samples=args.samples, stop_token_ids=()))
    run_hf(2)

    print(f"model: vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers, {args.heads} heads "
          f"({args.kv_heads} KV), {args.dtype} on {device} ({torch.get_num_threads()} threads)")
    print(f"workload: {args.samples} samples x {args.new_tokens} new tokens of one {args.prefix}-token prefix, "
          f"temperature 1, best of {args.repeats}")
    rows = [("ours, shared prefix", lambda: run_ours(True)),
            ("ours, recomputed prefix", lambda: run_ours(False)),
            ("transformers generate", run_hf)]
    rates = {}
    for name, fn in rows:
        rate, secs, tokens = timed(fn)
        rates[name] = rate
        print(f"  {name:<26} {rate:10.1f} tokens/s   ({tokens} tokens in {secs:.2f} s)")
    shared = rates["ours, shared prefix"]
    print(f"shared / recomputed prefix: {shared / rates['ours, recomputed prefix']:.2f}x")
    print(f"shared prefix / transformers generate: {shared / rates['transformers generate']:.2f}x")
    print(f"recomputed prefix / transformers generate: "
          f"{rates['ours, recomputed prefix'] / rates['transformers generate']:.2f}x")


if __name__ == "__main__":
    main()
