"""The Pivotal Token Search tool end to end on a tiny random model over a trimmed vocabulary, with a
rule-based oracle whose pivots are known (tests/posttrain/pts_standins.py): records and pairs, the
pairs loading into the DPO stage's PreferenceDataset, resuming (limit, kill, torn journal line),
input errors before the model loads, bad references, TP-safe oracle errors, and torchrun (TP x DP)
giving the files of one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import megatron_phi4
from megatron_phi4.posttrain.pts_data import JsonIdMap, TokenCodec, load_id_map
from megatron_phi4.posttrain.pts_tool import main
from tests.posttrain import pts_standins as S

ROOT = Path(__file__).resolve().parents[2]
ORACLE = "tests.posttrain.pts_standins:FirstOfOracle"
FAST = ["--rollouts", "16", "--p-gap", "0.3", "--max-new-tokens", "16", "--device", "cpu"]
GOOD, BAD = S.REFERENCE.split(">")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Checkpoint, vocab.json and a questions file (prompt ids, and one chat-message question)."""
    from megatron_phi4.tokenizer import IM_SEP_ID, IM_START_ID, get_tokenizer

    d = tmp_path_factory.mktemp("pts")
    tok = get_tokenizer()
    chat = [{"role": "user", "content": "7"}]
    ids = S.phi4_ids(tok.apply_chat_template(chat, add_generation_prompt=True))
    vocab = S.write_vocab_json(d, ids)
    ckpt = S.save_tiny_model(d / "ckpt")
    to_model = {p: i for i, p in enumerate(ids)}
    questions = []
    for k in range(5):
        q = [to_model[IM_START_ID]] + [(7 * k + 3 * j) % len(ids) for j in range(4)] + [to_model[IM_SEP_ID]]
        questions.append({"id": f"q{k}", "prompt_ids": q, "reference": S.REFERENCE})
    questions.append({"id": "chat", "messages": chat, "reference": S.REFERENCE, "meta": {"kept": "out"}})
    qpath = d / "questions.jsonl"
    qpath.write_text("".join(json.dumps(q) + "\n" for q in questions))
    return {"dir": d, "ckpt": ckpt, "vocab": vocab, "questions": str(qpath), "ids": ids, "n": len(questions)}


def _run(setup, out, *extra, oracle=ORACLE, questions=None, loader=megatron_phi4.load_model):
    argv = ["--checkpoint", setup["ckpt"], "--questions", questions or setup["questions"], "--oracle", oracle,
            "--output", str(out), "--id-map", setup["vocab"], *FAST, *extra]
    return main(argv, load_model=loader)


def _jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _outputs(out):
    return {name: (Path(out) / name).read_text() for name in ("pivotal_tokens.jsonl", "pairs.jsonl")}


@pytest.fixture(scope="module")
def fresh(setup):
    """One complete run: the reference every other run is compared with."""
    out = setup["dir"] / "fresh"
    assert _run(setup, out) == 0
    return out


def test_records_pairs_and_known_pivots(setup, fresh):
    _check_results(setup, fresh)


@pytest.mark.gpu
def test_the_tool_on_cuda(setup, tmp_path):
    out = tmp_path / "cuda"
    assert _run(setup, out, "--device", "cuda") == 0
    _check_results(setup, out)


def _check_results(setup, fresh):
    from megatron_phi4.data.preference import PreferenceDataset, collate_preference

    summary = json.loads((fresh / "summary.json").read_text())
    journal = _jsonl(fresh / "journal.rank0.jsonl")
    assert sorted(r["question"] for r in journal) == sorted([f"q{k}" for k in range(5)] + ["chat"])
    pivots, pairs = _jsonl(fresh / "pivotal_tokens.jsonl"), _jsonl(fresh / "pairs.jsonl")
    assert summary["questions_done"] == setup["n"] and summary["pivotal_tokens"] == len(pivots) > 0
    assert summary["pairs"] == len(pairs) > 0
    assert summary["rollouts"] == sum(r["rollouts"] for r in journal)
    assert summary["rollouts_per_pivotal_token"] == pytest.approx(summary["rollouts"] / len(pivots))
    codec = TokenCodec(JsonIdMap.load(setup["vocab"]))
    queries = {r["question"]: r for r in journal}
    known = 0
    for p in pivots:
        assert abs(p["p_after"] - p["p_before"]) >= 0.3 and queries[p["question"]]["status"] == "searched"
        assert p["token_text"] == codec.decode([p["token_id"]])
        prefix_text = codec.decode(p["prompt_ids"][p["query_len"]:])
        assert len(p["prompt_ids"]) == p["query_len"] + p["position"]
        # The first character of either set decides every rollout after it: p is then exactly 1 or 0.
        if p["token_text"] in GOOD + BAD and not set(prefix_text) & set(GOOD + BAD):
            assert p["p_after"] == (1.0 if p["token_text"] in GOOD else 0.0)
            known += 1
        if p["pair"]:
            raised = p["p_after"] > p["p_before"]
            alt = p["alternatives"][-1]  # the verified one ends the list
            assert {p["pair"]["chosen_id"], p["pair"]["rejected_id"]} == {p["token_id"], alt["token_id"]}
            assert p["pair"]["chosen_id"] == (p["token_id"] if raised else alt["token_id"])
            assert (alt["p"] <= p["p_before"] - 0.15) if raised else (alt["p"] >= p["p_before"] + 0.15)
    assert known > 0
    # The pairs are the DPO stage's records as they are: one-token completions after Q + prefix.
    ds = PreferenceDataset(str(fresh / "pairs.jsonl"), vocab_size=S.VOCAB)
    with_pair = [p for p in pivots if p["pair"]]
    assert len(ds) == len(with_pair)
    for i, p in enumerate(with_pair):
        assert ds[i]["prompt_ids"].tolist() == p["prompt_ids"] and ds[i]["source"] == "pts"
        assert ds[i]["chosen_ids"].tolist() == [p["pair"]["chosen_id"]]
        assert ds[i]["rejected_ids"].tolist() == [p["pair"]["rejected_id"]]
    batch = collate_preference([ds[i] for i in range(len(ds))], pad_id=S.VOCAB - 1)
    assert batch["loss_mask"].sum().item() == 2 * len(ds)  # exactly the two single tokens per pair


def test_resume_after_limit_kill_and_torn_line_gives_the_same_files(setup, fresh, capsys, monkeypatch):
    out = setup["dir"] / "resumed"
    assert _run(setup, out, "--limit", "2") == 0
    assert len(_jsonl(out / "journal.rank0.jsonl")) == 2
    # Killed in the middle of a question (the oracle's 40th call of this run).
    monkeypatch.setenv("PTS_TEST_KILL_ON_CALL", "40")
    with pytest.raises(KeyboardInterrupt):
        _run(setup, out)
    monkeypatch.delenv("PTS_TEST_KILL_ON_CALL")
    done = _jsonl(out / "journal.rank0.jsonl")
    assert 2 <= len(done) < setup["n"]
    # A torn last line (killed while appending): dropped, that question redone.
    with open(out / "journal.rank0.jsonl", "a") as f:
        f.write('{"question": "q4", "index": 4, "piv')
    capsys.readouterr()
    assert _run(setup, out) == 0
    assert f"{setup['n']} questions, {len(done)} done" in capsys.readouterr().err
    assert sorted(r["question"] for r in _jsonl(out / "journal.rank0.jsonl")) == sorted(
        r["question"] for r in _jsonl(fresh / "journal.rank0.jsonl"))
    assert _outputs(out) == _outputs(fresh)
    # Resuming with other settings is refused, naming the setting.
    assert _run(setup, out, "--rollouts", "8") == 2
    assert "rollouts=16, now rollouts=8" in capsys.readouterr().err


def test_progress_lines(setup, capsys):
    assert _run(setup, setup["dir"] / "progress", "--limit", "1") == 0
    err = capsys.readouterr().err
    assert "[pts] rank 0: 1/1 q0: p=" in err and "rollouts/pivotal" in err and "exported 1/6 questions" in err


def _never_load(*a, **k):
    raise AssertionError("the model was loaded before the inputs were checked")


@pytest.mark.parametrize("line, match", [
    ("{not json", r"questions.jsonl:2: invalid JSON"),
    ('{"prompt_ids": [1, 2], "reference": "a>b", "answer": 3}', r":2: unknown field 'answer'"),
    ('{"prompt_ids": [1, 64], "reference": "a>b"}', r":2: prompt_ids\[1\]: expected a token id in \[0, 64\)"),
    ('{"prompt_ids": [1, 2]}', r":2: reference: expected a non-empty string"),
    ('{"id": "q0", "prompt_ids": [1, 2], "reference": "a>b"}', r":2: id: 'q0' is already used at .*:1"),
    ('{"prompt_ids": [1], "prompt": "x", "reference": "a>b"}', r":2: give the query once"),
    ('{"messages": [{"role": "user", "content": "hello"}], "reference": "a>b"}', r":2: messages: .*not in the id map"),
    ('{"id": "q9", "prompt_ids": [1, 2], "reference": "ab"}', r":2: reference: .*not 'GOOD>BAD'"),
])
def test_bad_questions_fail_before_the_model_loads(setup, tmp_path, capsys, line, match):
    q = tmp_path / "questions.jsonl"
    q.write_text('{"id": "q0", "prompt_ids": [1, 2], "reference": "a>b"}\n' + line + "\n")
    assert _run(setup, tmp_path / "out", questions=str(q), loader=_never_load) == 2
    import re
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, match", [
    (["--oracle", "no_such_module:X"], "--oracle: cannot import"),
    (["--id-map", "/nonexistent/vocab.json"], "--id-map /nonexistent/vocab.json: cannot read"),
    (["--p-gap", "0"], "--p-gap: got 0.0"),
    (["--max-p", "0.1"], "--max-p: got 0.1"),
    (["--oracle-option", "timeout"], "--oracle-option 'timeout': expected KEY=VALUE"),
])
def test_bad_options_fail_before_the_model_loads(setup, tmp_path, capsys, extra, match):
    assert _run(setup, tmp_path / "out", *extra, loader=_never_load) == 2
    assert match in capsys.readouterr().err


def test_a_bad_reference_found_while_checking_is_recorded_and_the_run_goes_on(setup, tmp_path):
    q = tmp_path / "questions.jsonl"
    lines = _jsonl(setup["questions"])[:2]
    lines.insert(1, {"id": "broken", "prompt_ids": lines[0]["prompt_ids"], "reference": "no sets"})
    q.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out"
    assert _run(setup, out, questions=str(q), oracle="tests.posttrain.pts_standins:LateBadReferenceOracle") == 0
    recs = {r["question"]: r for r in _jsonl(out / "journal.rank0.jsonl")}
    assert recs["broken"]["status"] == "bad_reference" and recs["broken"]["rollouts"] == 0
    assert "questions.jsonl:2" in recs["broken"]["error"] and "GOOD>BAD" in recs["broken"]["error"]
    assert recs["q0"]["status"] == recs["q1"]["status"] == "searched"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["questions_by_status"]["bad_reference"] == 1 and summary["bad_references"][0].startswith("broken")


def test_id_map_hooks(setup):
    ids = setup["ids"]
    m = load_id_map(setup["vocab"])  # a trimmed-vocabulary vocab.json, or its directory
    assert isinstance(m, JsonIdMap) and load_id_map(str(setup["dir"])).phi4_ids == ids
    codec = TokenCodec(m)
    a = ids.index(S.phi4_ids()[0])
    assert codec.decode([a, S.VOCAB - 1, a]) == codec.decode([a]) + "\ufffd" + codec.decode([a])  # a padding row
    from megatron_phi4.tokenizer import EOD_ID, IM_END_ID
    assert codec.stop_token_ids == [ids.index(IM_END_ID), ids.index(EOD_ID)]
    # Any object with to_phi4 / to_trimmed plugs in as module:attribute (e.g. demo.trimmed_vocab's).
    hook = load_id_map("tests.posttrain.test_pts_tool:_hook_factory")
    assert TokenCodec(hook).decode([a]) == codec.decode([a])
    # Without a map the ids are Phi-4's.
    full = TokenCodec()
    assert full.stop_token_ids == [IM_END_ID, EOD_ID] and full.decode(full.tokenizer.encode("x = 12")) == "x = 12"


def _hook_factory():
    return JsonIdMap(S.phi4_ids([882, 78191]), source="hook")


def _tp_oracle_rank(rank, world, kind):
    import torch.distributed as dist

    from megatron_phi4.posttrain.pts_search import BadReference, OracleFailure, OracleVerdicts

    calls = []

    class Oracle:
        def check(self, candidate, reference):
            calls.append(candidate)
            if kind == "bad_reference":
                raise ValueError("reference is not a number")
            if kind == "failure":
                raise OSError("no sandbox")
            return S.Result(candidate == reference, "")

    verdicts = OracleVerdicts(Oracle(), dist.group.WORLD)
    try:
        return verdicts(["1", "2"], "2"), len(calls)
    except (BadReference, OracleFailure) as e:
        return (type(e).__name__, str(e)), len(calls)


@pytest.mark.parametrize("kind, want", [
    ("ok", [False, True]),
    ("bad_reference", ("BadReference", "reference is not a number")),
    ("failure", ("OracleFailure", "the oracle failed: OSError: no sandbox")),
])
def test_oracle_verdicts_and_errors_reach_every_tp_rank(kind, want):
    from tests.distributed_utils import run_distributed

    # Only the first rank of the TP group runs the oracle; the other gets its verdicts or its error.
    first_called = 1 if kind != "ok" else 2
    assert run_distributed(_tp_oracle_rank, 2, kind, timeout=120) == [(want, first_called), (want, 0)]


@pytest.mark.torchrun
def test_torchrun_tp2_dp2_writes_the_files_of_one_process(setup, fresh, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           str(ROOT / "tools" / "pivotal_token_search.py"), "--checkpoint", setup["ckpt"],
           "--questions", setup["questions"], "--oracle", ORACLE, "--output", str(out),
           "--id-map", setup["vocab"], "--tp", "2", *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in out.glob("journal.rank*.jsonl")) == ["journal.rank0.jsonl", "journal.rank1.jsonl"]
    assert [len(_jsonl(p)) for p in sorted(out.glob("journal.rank*.jsonl"))] == [3, 3]  # round robin
    assert _outputs(out) == _outputs(fresh)


def test_trimmed_vocab_of_the_demo_plugs_in(setup, tmp_path):
    """The demo's TrimmedVocab (branch task) is an IdMap, and its vocab.json reads as a JsonIdMap."""
    tv = pytest.importorskip("megatron_phi4.demo.trimmed_vocab")
    vocab = tv.TrimmedVocab(setup["ids"], vocab_size=S.VOCAB)
    path = vocab.save(tmp_path)
    ids = list(range(len(setup["ids"]))) + [S.VOCAB - 1]
    a, b = TokenCodec(vocab), TokenCodec(load_id_map(path))
    assert a.decode(ids) == b.decode(ids) and a.decode(ids).endswith("\ufffd")
    assert a.stop_token_ids == b.stop_token_ids == vocab.stop_token_ids
    chat = [{"role": "user", "content": "7"}]
    assert a.encode_chat(chat) == b.encode_chat(chat)


def test_the_oracles_of_the_registry_plug_in():
    """The named oracles (branch oracles): verdicts, and a bad reference as BadReference."""
    pytest.importorskip("megatron_phi4.posttrain.oracles")
    from megatron_phi4.posttrain.pts_data import PTSDataError, Question
    from megatron_phi4.posttrain.pts_search import BadReference, OracleVerdicts
    from megatron_phi4.posttrain.pts_tool import _check_references, load_oracle

    verdicts = OracleVerdicts(load_oracle("numeric"))
    assert verdicts(["so the answer is 12", "the answer is 123"], "12") == [True, False]
    with pytest.raises(BadReference, match="twelve"):
        verdicts(["12"], "twelve")
    with pytest.raises(PTSDataError, match="q.jsonl:3: reference"):
        _check_references(load_oracle("numeric"), [Question(0, "a", "q.jsonl:3", (1,), "twelve")])
    with pytest.raises(PTSDataError, match="--oracle nope"):
        load_oracle("nope")
