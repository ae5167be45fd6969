import json
import math

import pytest
import torch

from megatron_phi4.data.preference import (
    PreferenceDataError, PreferenceDataset, collate_preference, write_preference_binary)
from megatron_phi4.losses import DPOLoss
from megatron_phi4.tokenizer import PAD_ID


def _jsonl(path, recs):
    with open(path, "w") as f:
        for r in recs:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


RECS = [
    {"prompt_ids": [1, 2, 3], "chosen_ids": [10], "rejected_ids": [11], "source": "pts",
     "weight": 0.5},
    {"prompt_ids": [4, 5], "chosen_ids": [20, 21, 22], "rejected_ids": [30],
     "ref_chosen_logp": -1.5, "ref_rejected_logp": -2.5},
]


def test_load_and_items(tmp_path):
    ds = PreferenceDataset(_jsonl(tmp_path / "p.jsonl", RECS))
    assert len(ds) == 2
    a = ds[0]
    assert a["prompt_ids"].tolist() == [1, 2, 3] and a["chosen_ids"].dtype == torch.int64
    assert a["weight"].item() == 0.5 and math.isnan(a["ref_chosen_logp"].item())
    assert a["source"] == "pts"
    assert ds[1]["weight"].item() == 1.0 and ds[1]["ref_rejected_logp"].item() == -2.5


def test_collate_layout():
    recs = [{"prompt_ids": torch.tensor([1, 2, 3]), "chosen_ids": torch.tensor([10]),
             "rejected_ids": torch.tensor([11, 12])},
            {"prompt_ids": torch.tensor([4, 5]), "chosen_ids": torch.tensor([20, 21, 22]),
             "rejected_ids": torch.tensor([30])}]
    b = collate_preference(recs)
    # rows: chosen0, chosen1, rejected0, rejected1; longest row 5 tokens -> L = 4
    assert b["input_ids"].tolist() == [[1, 2, 3, PAD_ID], [4, 5, 20, 21],
                                       [1, 2, 3, 11], [4, 5, PAD_ID, PAD_ID]]
    assert b["labels"].tolist() == [[2, 3, 10, PAD_ID], [5, 20, 21, 22],
                                    [2, 3, 11, 12], [5, 30, PAD_ID, PAD_ID]]
    assert b["loss_mask"].tolist() == [[0, 0, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1], [0, 1, 0, 0]]
    assert b["weight"].tolist() == [1.0, 1.0]
    assert "ref_chosen_logp" not in b
    assert b["position_ids"].shape == (4, 4)


def test_collate_ref_logps_and_dpo_loss_runs(tmp_path):
    recs = [dict(RECS[1]), dict(RECS[1], weight=2.0)]
    ds = PreferenceDataset(_jsonl(tmp_path / "p.jsonl", recs))
    b = collate_preference([ds[0], ds[1]], pad_to_multiple_of=8)
    assert b["input_ids"].shape == (4, 8)
    assert b["ref_chosen_logp"].tolist() == [-1.5, -1.5]
    assert b["weight"].tolist() == [1.0, 2.0]
    logits = torch.randn(4, 8, 64)
    b["labels"] = b["labels"].clamp(max=63)
    out = DPOLoss(beta=0.1)(logits, b)
    assert torch.isfinite(out.loss_sum)
    with pytest.raises(ValueError, match="reference log-probs"):
        collate_preference([ds[0], PreferenceDataset(_jsonl(tmp_path / "q.jsonl", RECS[:1]))[0]])


def test_truncation_keeps_completion_and_shared_prompt():
    p = {"prompt_ids": list(range(1, 11)), "chosen_ids": [50, 51, 52], "rejected_ids": [60]}
    b = collate_preference([p], max_length=6)
    assert b["input_ids"].shape[1] <= 6
    # both rows keep the same (last 4) prompt tokens
    assert b["input_ids"][0, :4].tolist() == [7, 8, 9, 10]
    assert b["input_ids"][1, :4].tolist() == [7, 8, 9, 10]
    assert b["labels"][0][b["loss_mask"][0] == 1].tolist() == [50, 51, 52]
    assert b["labels"][1][b["loss_mask"][1] == 1].tolist() == [60]


@pytest.mark.parametrize("line,msg", [
    ("not json", "invalid JSON"),
    ('{"prompt_ids": [1], "chosen_ids": [2]}', "rejected_ids: expected a list"),
    ('{"prompt_ids": [], "chosen_ids": [2], "rejected_ids": [3]}', "prompt_ids: must not be empty"),
    ('{"prompt_ids": [1], "chosen_ids": [2.5], "rejected_ids": [3]}', r"chosen_ids\[0\]"),
    ('{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [100352]}', "outside"),
    ('{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3], "weight": -1}', "weight"),
    ('{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3], "ref_chosen_logp": -1}',
     "together"),
    ('{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3], "extra": 1}', "unknown field"),
    ("[1, 2]", "expected a JSON object"),
])
def test_validation_file_line(tmp_path, line, msg):
    path = _jsonl(tmp_path / "bad.jsonl", [RECS[0], "", line])
    with pytest.raises(PreferenceDataError) as e:
        PreferenceDataset(path)
    assert str(e.value).startswith(f"{path}:3: ")
    assert pytest.importorskip("re").search(msg, str(e.value))


def test_binary_roundtrip(tmp_path):
    src = _jsonl(tmp_path / "p.jsonl", RECS)
    assert write_preference_binary(src, str(tmp_path / "bin" / "pairs")) == 2
    a = PreferenceDataset(src)
    b = PreferenceDataset(str(tmp_path / "bin" / "pairs"))
    assert len(b) == 2
    for i in range(2):
        for k in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert a[i][k].tolist() == b[i][k].tolist()
        assert a[i]["source"] == b[i]["source"]
        assert a[i]["weight"].item() == b[i]["weight"].item()
    mixed = PreferenceDataset([src, str(tmp_path / "bin" / "pairs")])
    assert len(mixed) == 4 and mixed[3]["chosen_ids"].tolist() == [20, 21, 22]
    with pytest.raises(PreferenceDataError, match="neither"):
        PreferenceDataset(str(tmp_path / "nothing"))
