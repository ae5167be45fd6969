"""Lint of the Dockerfile (no docker daemon on CI machines, so the image itself is not built here):
a pinned NGC PyTorch base, a non-root user, no torch (re)install, only paths that exist, and the
same tag in docs/container.md."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PINNED_NGC = re.compile(r"^nvcr\.io/nvidia/pytorch:(\d{2})\.(\d{2})-py3$")
TORCH_PACKAGES = re.compile(r"^(torch|torchvision|torchaudio|pytorch)([<>=!~\[;@ ].*)?$", re.I)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, cur = [], ""
    for line in text.splitlines():
        if not cur and line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        cur += line
        if cur.strip():
            word, _, rest = cur.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        cur = ""
    return out


def _commands(shell: str) -> list[list[str]]:
    """The simple commands of a RUN line (split at ``&&``, ``||``, ``;``, ``|``; quotes respected)."""
    lexer = shlex.shlex(shell, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    out, cur = [], []
    for tok in lexer:
        if tok and set(tok) <= set(";&|"):
            out.append(cur)
            cur = []
        else:
            cur.append(tok)
    return [c for c in out + [cur] if c]


def lint(text: str) -> list[str]:
    """Problems found in a Dockerfile's text (empty: fine)."""
    ins = instructions(text)
    problems = []
    args = {}
    for word, rest in ins:
        if word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k.strip()] = v.strip()
    froms = [rest.split()[0] for word, rest in ins if word == "FROM"]
    if not froms:
        problems.append("no FROM")
    for image in froms:
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)
        if not PINNED_NGC.match(image):
            problems.append(f"FROM {image}: not a pinned NGC PyTorch tag (nvcr.io/nvidia/pytorch:YY.MM-py3)")
    users = [rest for word, rest in ins if word == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("the image must end with USER <non-root>")
    for word, rest in ins:
        if word != "RUN":
            continue
        for tokens in _commands(rest):
            if "install" not in tokens or not any(t in ("pip", "pip3", "conda", "mamba") or t.endswith("/pip")
                                                  for t in tokens[:tokens.index("install")]):
                continue
            after = tokens[tokens.index("install") + 1:]
            torch_like = [t for t in after if TORCH_PACKAGES.match(t)]
            if torch_like:
                problems.append(f"RUN installs {torch_like}: the image's own torch build must be kept")
            forced = [t for t in after if t in ("-U", "--upgrade", "--force-reinstall", "--ignore-installed", "-I")]
            if forced:
                problems.append(f"RUN pip install {forced}: would replace packages the image already has")
    return problems


def test_dockerfile_is_pinned_non_root_and_keeps_the_image_torch():
    text = (REPO / "Dockerfile").read_text()
    assert lint(text) == []
    for word, rest in instructions(text):
        if word == "COPY":
            for src in rest.split()[:-1]:
                assert (REPO / src).exists(), f"COPY {src}: no such path in the repository"


def test_container_doc_names_the_dockerfile_tag():
    text = (REPO / "Dockerfile").read_text()
    tag = re.search(r"ARG BASE_IMAGE=(\S+)", text).group(1)
    doc = (REPO / "docs" / "container.md").read_text()
    assert tag in doc
    assert "nvcr.io#nvidia/pytorch:" + tag.split(":")[1] in doc  # the enroot/pyxis spelling


def test_lint_catches_what_it_is_for():
    good = "ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3\nFROM ${BASE_IMAGE}\nRUN pip install .\nUSER phi4\n"
    assert lint(good) == []
    assert "not a pinned" in lint(good.replace("25.12-py3", "latest"))[0]
    assert "not a pinned" in lint("FROM python:3.12\nUSER a\n")[0]
    assert "USER" in lint(good.replace("USER phi4\n", ""))[0]
    assert "USER" in lint(good + "USER root\n")[0]
    assert "torch" in lint(good.replace("pip install .", "pip install . \\\n    torch==2.13.0"))[0]
    assert "torch" in lint(good.replace("pip install .", "echo x && pip3 install 'torch>=2.5'"))[0]
    assert "replace" in lint(good.replace("pip install .", "pip install --upgrade ."))[0]
