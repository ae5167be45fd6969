"""generate(): greedy parity with transformers, per-sample seeds, batching without padding,
shared-prefix caches, the model log-probs it returns, its filters, and its argument errors."""
from __future__ import annotations

import pytest
import torch

from megatron_phi4.config import ModelConfig, model_preset
from megatron_phi4.generation import GenerationError, SamplingParams, generate
from megatron_phi4.generation.decoding import generate_with_params
from megatron_phi4.generation.sampling import choose_tokens, filtered_probs
from megatron_phi4.models.phi4.model import build_model

# Prompts of different lengths, so batches mix rows that still read their prompt with rows that
# already generate.
PROMPTS = [[5, 17, 3, 99, 42, 7], [11, 2], [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70], [8, 9, 10, 5]]


@pytest.fixture(scope="module")
def model():
    """A tiny random model whose next-token distributions are far from uniform."""
    m = build_model(model_preset("tiny", num_layers=2, max_seq_length=256), "cpu", seed=0).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(40.0)
    return m


def _tokens(results):
    return [[s.token_ids for s in per_prompt] for per_prompt in results]


def _assert_same(a, b, tol=1e-5):
    assert _tokens(a) == _tokens(b)
    for pa, pb in zip(a, b):
        for sa, sb in zip(pa, pb):
            assert sa.finish_reason == sb.finish_reason
            assert len(sa.logprobs) == len(sa.token_ids)
            assert max((abs(x - y) for x, y in zip(sa.logprobs, sb.logprobs)), default=0.0) <= tol


def _stop_id_used(model, prompts, **kw):
    """A token that sampled outputs produce mid-way, so stopping is exercised."""
    out = generate(model, prompts, max_new_tokens=24, stop_token_ids=[], **kw)
    return out[0][0].token_ids[5]


# -------------------------------------------------------------------------------- transformers
transformers = pytest.importorskip("transformers")
HF_CFG = ModelConfig(vocab_size=128, hidden_size=64, num_layers=3, num_attention_heads=4, num_kv_heads=2,
                     intermediate_size=96, max_seq_length=128, rope_theta=10000.0)


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    """A random Phi3ForCausalLM and the same weights imported as a project checkpoint."""
    import megatron_phi4
    from megatron_phi4.checkpoint import hf_convert
    from megatron_phi4.models.phi4 import hf_mapping

    torch.manual_seed(0)
    hf_cfg = hf_mapping.to_hf_phi3_config(HF_CFG)
    hf_cfg._attn_implementation = "eager"
    hf = transformers.Phi3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0.0, 0.08)
    d = tmp_path_factory.mktemp("hfgen")
    hf.save_pretrained(d / "hf", safe_serialization=True)
    assert hf_convert.main(["import-hf", "--hf-dir", str(d / "hf"), "--output", str(d / "ckpt")]) == 0
    return hf, megatron_phi4.load_model(d / "ckpt", dtype=torch.float32)


def _hf_greedy(hf, prompt, max_new_tokens, stop_ids):
    x = torch.tensor([prompt])
    out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new_tokens,
                      eos_token_id=list(stop_ids) or None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_matches_transformers_generate(hf_and_ours):
    hf, ours = hf_and_ours
    prompts = [[(7 * i + 3 * j) % 128 for j in range(n)] for i, n in enumerate([5, 1, 12, 9])]
    got = generate(ours, prompts, max_new_tokens=30, stop_token_ids=[])
    for p, res in zip(prompts, got):
        assert res[0].token_ids == _hf_greedy(hf, p, 30, []) and res[0].finish_reason == "length"
    # With a stop token that the greedy outputs produce: both stop right after it.
    stop = got[0][0].token_ids[8]
    got = generate(ours, prompts, max_new_tokens=30, stop_token_ids=[stop])
    assert got[0][0].finish_reason == "stop" and got[0][0].token_ids[-1] == stop
    for p, res in zip(prompts, got):
        assert res[0].token_ids == _hf_greedy(hf, p, 30, [stop])


# -------------------------------------------------------------------------------- batching, seeds
def test_batched_equals_unbatched_and_seeds_are_per_sample(model):
    stop = _stop_id_used(model, PROMPTS, temperature=1.0, seed=1)
    kw = dict(max_new_tokens=20, temperature=1.0, top_k=50, num_samples=3, stop_token_ids=[stop], seed=1)
    batched = generate(model, PROMPTS, **kw)
    assert any(s.finish_reason == "stop" for p in batched for s in p)  # rows leave the batch early
    assert any(s.finish_reason == "length" for p in batched for s in p)
    for i, p in enumerate(PROMPTS):
        _assert_same([batched[i]], generate(model, [p], **kw))
    # Another order and another batch; sample j does not depend on num_samples either.
    order = [2, 0, 3, 1]
    permuted = generate(model, [PROMPTS[i] for i in order], **kw)
    _assert_same([batched[i] for i in order], permuted)
    more = generate(model, PROMPTS[:2], **{**kw, "num_samples": 5})
    _assert_same(batched[:2], [m[:3] for m in more])
    # Per-prompt seeds: prompt i under seeds[i] equals prompt i alone under that seed.
    per = generate(model, PROMPTS[:2], **{**kw, "seed": [1, 9]})
    _assert_same([per[1]], generate(model, [PROMPTS[1]], **{**kw, "seed": 9}))
    # Reproducible by seed, different under another seed, and the samples of a prompt differ.
    _assert_same(batched, generate(model, PROMPTS, **kw))
    assert _tokens(batched) != _tokens(generate(model, PROMPTS, **{**kw, "seed": 2}))
    assert len({tuple(s.token_ids) for s in batched[0]}) > 1


def test_unseeded_follows_torch_manual_seed(model):
    torch.manual_seed(3)
    a = generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, num_samples=2)
    torch.manual_seed(3)
    b = generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, num_samples=2)
    assert _tokens(a) == _tokens(b)


def test_shared_prefix_equals_recomputed_prefix(model):
    stop = _stop_id_used(model, PROMPTS, temperature=0.8, seed=4)
    params = SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.9, num_samples=6,
                            stop_token_ids=(stop,))
    shared = generate_with_params(model, PROMPTS, params, seed=4, share_prefix=True)
    recomputed = generate_with_params(model, PROMPTS, params, seed=4, share_prefix=False)
    _assert_same(shared, recomputed)


def test_logprobs_are_the_models_at_temperature_one(model):
    out = generate(model, PROMPTS, max_new_tokens=10, temperature=0.7, top_k=20, num_samples=2, seed=0,
                   stop_token_ids=[])
    for p, per_prompt in zip(PROMPTS, out):
        for s in per_prompt:
            seq = torch.tensor([p + s.token_ids])
            with torch.no_grad():
                logp = torch.log_softmax(model(seq)[0].float(), -1)
            want = [logp[len(p) - 1 + k, t].item() for k, t in enumerate(s.token_ids)]
            assert max(abs(a - b) for a, b in zip(want, s.logprobs)) <= 1e-5


def test_greedy_equals_step_by_step_argmax(model):
    out = generate(model, PROMPTS, max_new_tokens=12, num_samples=2, stop_token_ids=[])
    for p, per_prompt in zip(PROMPTS, out):
        ids = list(p)
        for _ in range(12):
            with torch.no_grad():
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert per_prompt[0].token_ids == per_prompt[1].token_ids == ids[len(p):]


def test_default_stop_tokens_end_a_sample():
    cfg = model_preset("tiny", num_layers=1, vocab_size=100352, hidden_size=32)
    m = build_model(cfg, "cpu", seed=0).eval()
    prompt = [1, 2, 3]
    seen = {}
    hook = m.norm.register_forward_hook(lambda mod, args, out: seen.update(h=out[0, -1].detach()))
    with torch.no_grad():
        m(torch.tensor([prompt]))
    hook.remove()
    for stop in (100265, 100257):  # make <|im_end|>, then <|endoftext|>, the likeliest next token
        w = build_model(cfg, "cpu", seed=0).lm_head.weight.detach()
        with torch.no_grad():
            m.lm_head.weight.copy_(w)
            m.lm_head.weight[stop] = 100 * seen["h"] / seen["h"].norm()
        out = generate(m, [prompt], max_new_tokens=5)
        assert out[0][0].token_ids == [stop] and out[0][0].finish_reason == "stop"
        out = generate(m, [prompt], max_new_tokens=5, stop_token_ids=[])
        assert len(out[0][0].token_ids) == 5 and out[0][0].finish_reason == "length"


# -------------------------------------------------------------------------------- the sampler
def test_filters_match_transformers_warpers():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 300, generator=g) * 3
    logits[0, :5] = logits[0, 5]  # ties at the top-k boundary are kept, as in transformers
    for temperature, top_k, top_p in [(1.0, 0, 0.9), (0.7, 40, 1.0), (1.3, 25, 0.8), (0.5, 5, 0.5)]:
        ref = logits.clone()
        for w in ([TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else [])
                  + ([TopPLogitsWarper(top_p)] if top_p < 1 else [])):
            ref = w(None, ref)
        want = torch.softmax(ref.double(), -1)
        probs, order = filtered_probs(logits, temperature, top_k, top_p)
        got = probs if order is None else torch.zeros_like(probs).scatter_(-1, order, probs)
        assert torch.allclose(got, want, atol=1e-7, rtol=0), (temperature, top_k, top_p)


def test_inverse_cdf_picks_the_token_whose_interval_holds_u():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.7]] * 5))
    p = SamplingParams(max_new_tokens=1, temperature=1.0)
    toks, lps = choose_tokens(logits, p, torch.tensor([0.0, 0.05, 0.15, 0.31, 0.999]))
    assert toks.tolist() == [0, 0, 1, 2, 2]
    assert torch.allclose(lps, torch.log(torch.tensor([0.1, 0.1, 0.2, 0.7, 0.7])))
    # top-p = 0.6 keeps only the most likely token: every u maps to it.
    toks, _ = choose_tokens(logits, SamplingParams(max_new_tokens=1, temperature=1.0, top_p=0.6),
                            torch.tensor([0.0, 0.5, 0.999, 0.2, 0.9]))
    assert toks.tolist() == [2] * 5


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=4, temperature=-1.0), "temperature"),
    (dict(max_new_tokens=4, top_p=0.0), "top_p"),
    (dict(max_new_tokens=4, top_k=-2), "top_k"),
    (dict(max_new_tokens=4, num_samples=0), "num_samples"),
    (dict(max_new_tokens=4, stop_token_ids=5), "stop_token_ids"),
    (dict(max_new_tokens=4, seed=[1]), "seed: got 1 seeds for 4 prompts"),
    (dict(max_new_tokens=4, seed=-3), "seed"),
    (dict(max_new_tokens=500), "max_seq_length"),
])
def test_bad_arguments_name_the_argument(model, kwargs, match):
    with pytest.raises(GenerationError, match=match):
        generate(model, PROMPTS, **kwargs)


@pytest.mark.parametrize("prompts, match", [
    ([], "prompts: expected a non-empty list"),
    ([[1, 2], []], r"prompts\[1\]: is empty"),
    ([[1, 512]], r"prompts\[0\]\[1\]: token id 512 outside \[0, 512\)"),
    ([[1, "a"]], r"prompts\[0\]\[1\]"),
    ("abc", "prompts"),
])
def test_bad_prompts_name_the_position(model, prompts, match):
    with pytest.raises(GenerationError, match=match):
        generate(model, prompts, max_new_tokens=2)


# -------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_cuda_matches_cpu_and_transformers(model, hf_and_ours):
    """On a GPU (fp32): greedy tokens equal transformers' and the CPU's; seeded samples equal the
    CPU's (the uniforms are drawn on the CPU); shared prefix == recomputed; bf16 runs."""
    import copy

    cuda = copy.deepcopy(model).to("cuda")
    greedy = dict(max_new_tokens=16, stop_token_ids=[])
    _assert_same(generate(cuda, PROMPTS, **greedy), generate(model, PROMPTS, **greedy), tol=1e-4)
    sampled = dict(max_new_tokens=16, temperature=1.0, top_p=0.9, num_samples=4, seed=5, stop_token_ids=[])
    on_gpu = generate(cuda, PROMPTS, **sampled)
    _assert_same(on_gpu, generate(model, PROMPTS, **sampled), tol=1e-4)
    params = SamplingParams(max_new_tokens=16, temperature=1.0, num_samples=4, stop_token_ids=())
    _assert_same(generate_with_params(cuda, PROMPTS, params, seed=2, share_prefix=True),
                 generate_with_params(cuda, PROMPTS, params, seed=2, share_prefix=False), tol=1e-4)
    hf, ours = hf_and_ours
    hf, ours = copy.deepcopy(hf).to("cuda"), copy.deepcopy(ours).to("cuda")
    prompts = [[(7 * i + 3 * j) % 128 for j in range(n)] for i, n in enumerate([5, 1, 12, 9])]
    for p, res in zip(prompts, generate(ours, prompts, max_new_tokens=30, stop_token_ids=[])):
        x = torch.tensor([p], device="cuda")
        want = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=30,
                           eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert res[0].token_ids == want
    out = generate(cuda.to(torch.bfloat16), PROMPTS, max_new_tokens=8, temperature=1.0, num_samples=64, seed=0)
    assert all(len(s.token_ids) >= 1 and all(lp <= 0 for lp in s.logprobs) for per in out for s in per)
