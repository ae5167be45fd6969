import os
import subprocess
import sys

import pytest

from megatron_phi4.data.mixture import MixtureError, MixtureSpec, path_weights
from megatron_phi4.data.mixture_report import main, mixture_budget, parse_count

from .conftest import write_docs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PHI4 = os.path.join(ROOT, "examples", "mixtures", "phi4_pretrain.yaml")
UNIQUE = "web=1.3T,web_rewrites=290B,synthetic=290B,code=820B,books=580B"


def _write(tmp_path, text, name="mix.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_phi4_table_epochs():
    spec = MixtureSpec.from_yaml(PHI4)
    given = {k: parse_count(v) for k, v in (x.split("=") for x in UNIQUE.split(","))}
    rows = mixture_budget(spec, parse_count("10T"), given)
    got = {r.name: round(r.epochs, 1) for r in rows}
    assert got == {"web": 1.2, "web_rewrites": 5.2, "synthetic": 13.8, "code": 2.4, "books": 1.7}
    assert [round(r.weight, 2) for r in rows] == [0.15, 0.15, 0.40, 0.20, 0.10]


def test_report_cli(capsys):
    assert main(["--mixture", PHI4, "--train-tokens", "10T", "--unique-tokens", UNIQUE]) == 0
    out = capsys.readouterr().out
    for name, ep in [("web ", "1.2"), ("web_rewrites", "5.2"), ("synthetic", "13.8"),
                     ("code", "2.4"), ("books", "1.7")]:
        line = next(l for l in out.splitlines() if l.startswith(name))
        assert line.split()[-1] == ep


def test_report_script_runs():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "mixture_report.py"),
                        "--mixture", PHI4, "--train-tokens", "10T", "--unique-tokens", UNIQUE],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "13.8" in r.stdout


def test_report_reads_idx_and_filter(tmp_path):
    docs = [list(range(1, 11)), list(range(1, 101)), list(range(1, 31))]  # 10, 100, 30 tokens
    a = write_docs(tmp_path / "a", docs)
    p = _write(tmp_path, f"""
sources:
  - name: a
    weight: 1
    paths: [{a}]
  - name: long
    weight: 1
    min_document_tokens: 20
    paths: [{a}]
""")
    rows = mixture_budget(MixtureSpec.from_yaml(p, check_paths=True), 1000)
    assert rows[0].unique_tokens == 140 and rows[0].from_index
    assert rows[1].unique_tokens == 130
    assert rows[0].epochs == pytest.approx(500 / 140)


def test_relative_paths_and_path_weights(tmp_path):
    p = _write(tmp_path, """
sources:
  - name: code
    weight: 2
    paths:
      - {path: sub/x, weight: 3}
      - {path: /abs/y, weight: 1}
  - name: web
    weight: 6
    paths: sub/w
""")
    spec = MixtureSpec.from_yaml(p)
    assert spec.sources[0].paths[0].prefix == str(tmp_path / "sub" / "x")
    assert spec.sources[0].paths[1].prefix == "/abs/y"
    assert spec.sources[1].prefixes == [str(tmp_path / "sub" / "w")]
    assert spec.normalized_weights() == [0.25, 0.75]
    assert path_weights(spec.sources[0], [1, 1]) == [0.75, 0.25]
    assert path_weights(spec.sources[1], [7]) == [1.0]


@pytest.mark.parametrize("body,field", [
    ("sources: []", "sources"),
    ("sources:\n  - {name: a, weight: 0, paths: [x]}", "sources[0] (a).weight"),
    ("sources:\n  - {name: a, weight: -1, paths: [x]}", "sources[0] (a).weight"),
    ("sources:\n  - {name: a, weight: yes, paths: [x]}", "sources[0] (a).weight"),
    ("sources:\n  - {name: a, weight: 1}", "sources[0] (a).paths"),
    ("sources:\n  - {weight: 1, paths: [x]}", "sources[0].name"),
    ("sources:\n  - {name: a, weight: 1, paths: [x]}\n  - {name: a, weight: 1, paths: [y]}",
     "sources[1].name"),
    ("sources:\n  - {name: a, weight: 1, paths: [x], min_document_tokens: -5}",
     "sources[0] (a).min_document_tokens"),
    ("sources:\n  - {name: a, weight: 1, paths: [{path: x, weight: 0}]}",
     "sources[0] (a).paths[0].weight"),
    ("sources:\n  - {name: a, weight: 1, paths: [{path: x, weight: 1}, y]}",
     "sources[0] (a).paths"),
    ("sources:\n  - {name: a, wieght: 1, paths: [x]}", "sources[0].wieght"),
])
def test_validation_names_file_and_field(tmp_path, body, field):
    p = _write(tmp_path, body)
    with pytest.raises(MixtureError) as e:
        MixtureSpec.from_yaml(p)
    assert str(e.value).startswith(f"{p}: {field}:"), str(e.value)


def test_check_paths(tmp_path):
    p = _write(tmp_path, "sources:\n  - {name: a, weight: 1, paths: [missing]}")
    MixtureSpec.from_yaml(p)  # not checked by default
    with pytest.raises(MixtureError, match=r"sources\[0\] \(a\)\.paths\[0\]: indexed dataset not found"):
        MixtureSpec.from_yaml(p, check_paths=True)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(MixtureError, match="cannot read"):
        MixtureSpec.from_yaml(str(tmp_path / "nope.yaml"))
    p = _write(tmp_path, "sources: [a: b: c")
    with pytest.raises(MixtureError, match="invalid YAML"):
        MixtureSpec.from_yaml(p)


def test_example_mixtures_parse():
    for name in ("phi4_pretrain.yaml", "phi4_midtrain.yaml", "tiny.yaml"):
        spec = MixtureSpec.from_yaml(os.path.join(ROOT, "examples", "mixtures", name))
        assert spec.sources
    mid = MixtureSpec.from_yaml(os.path.join(ROOT, "examples", "mixtures", "phi4_midtrain.yaml"))
    assert any(s.min_document_tokens == 8192 for s in mid.sources)


def test_report_unknown_source_errors(capsys):
    assert main(["--mixture", PHI4, "--train-tokens", "10T", "--unique-tokens", "nope=1T"]) == 2
    assert "nope" in capsys.readouterr().err
