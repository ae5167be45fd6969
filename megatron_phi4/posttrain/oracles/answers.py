"""Oracles for answers read from text: an exact number, and a multiple-choice letter.

Both follow one principle: read *one* final answer by a fixed, documented rule and compare it
exactly; never search the response for something that looks like the reference. A substring test
would call "123" right when the answer is 12, and "-12" right when it is 12 -- and PTS would then
promote the token that produced the wrong answer to a pivotal "good" token.

Numeric extraction, first rule that finds something decides:

1. the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; it must be a
   number as a whole (``\\boxed{12 apples}`` is not);
2. the first number after the last ``####`` (GSM8K's answer line);
3. the first number after the last "answer is" / "answer:" / "answer =" (any case), on the same line
   ("The final answer is $1,234$." -> 1234);
4. a number ending the response's last non-empty line after "=" ("... = 42." -> 42).

A "number" is a whole token -- never part of a longer one: optional sign (``-``, ``+``, ``−``),
digits with valid thousands groups (``1,234,567``; ``1,23`` is no number), an optional decimal part,
an optional ``/denominator``, or ``\\frac{a}{b}`` (also ``\\dfrac``, ``\\tfrac``). ``$``, ``\\$``,
LaTeX thin spaces, a trailing ``.`` and a trailing ``%`` are ignored. Values are compared as exact
rationals: 0.5 == 1/2 == \\frac{1}{2} and 3.50 == 3.5, but 0.333 != 1/3.

Multiple-choice extraction, first rule that finds something decides (letters are the configured
choices, upper case only, and must stand alone: the "A" of "Apple" or "A.I." never counts):

1. the last ``\\boxed{...}``: its content, without ``\\text{}``, parentheses and spaces, must be a
   choice letter;
2. the last "answer is X" / "answer: X" / "answer = X" / "answer would be X" / "correct option is X"
   (any case; X may be wrapped in ``(X)``, ``[X]`` or ``**X**``, or follow "option"/"choice");
3. a response that is nothing but a letter ("B", "(B)", "**B.**");
4. a response that starts with "B)", "B.", "B:" or "(B)".
"""
from __future__ import annotations

import re
from fractions import Fraction

from megatron_phi4.posttrain.oracles.base import Oracle, OracleResult, require_str

# -- numbers ----------------------------------------------------------------------------------

_SIGN = r"[-+\u2212]"
_FRAC_TEX = r"\\[dt]?frac\s*\{\s*" + _SIGN + r"?\d+\s*\}\s*\{\s*\d+\s*\}"
_PLAIN = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?|\.\d+"
# A number token that is not a piece of a longer number or word on either side.
NUMBER_TOKEN = re.compile(
    r"(?<![\w.,/])(?:" + _SIGN + r"\s?)?(?:" + _FRAC_TEX + "|" + _PLAIN + r")(?![\d]|[.,]\d|\s*/\s*\d)")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_IS = re.compile(r"\banswer\b\s*(?:is\b|:|=)", re.IGNORECASE)
_HASHES = re.compile(r"####")
_TRAILING_EQUALS = re.compile(r"=\s*(?P<tail>[^=\n]*?)\s*$")
_LATEX_NOISE = re.compile(r"\\[!,;: ]|\\left|\\right|\$|\\\$")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` whose braces balance, else None."""
    for match in reversed(list(_BOXED.finditer(text))):
        depth, i = 1, match.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[match.end():i - 1]
    return None


def parse_number(text: str) -> Fraction | None:
    """The exact value of ``text`` when the whole of it is one number (rules in the module
    docstring), else None."""
    s = _LATEX_NOISE.sub("", text).replace("{,}", ",").replace("\u2212", "-").strip()
    while s.startswith("{") and s.endswith("}") and last_boxed("\\boxed" + s) == s[1:-1]:
        s = s[1:-1].strip()  # {{10}}: braces that enclose the whole
    s = re.sub(r"(?:\\?%)$", "", s).strip()
    s = re.sub(r"(?<=\d)\.$", "", s).strip()  # a sentence's full stop, not a decimal point
    m = re.fullmatch(r"([-+]?)\s*\\[dt]?frac\s*\{\s*([-+]?\d+)\s*\}\s*\{\s*(\d+)\s*\}", s)
    if m:
        if int(m.group(3)) == 0:
            return None
        value = Fraction(int(m.group(2)), int(m.group(3)))
        return -value if m.group(1) == "-" else value
    s = re.sub(r"^([-+])\s+", r"\1", s)
    if re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    m = re.fullmatch(r"([-+]?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)", s)
    if m:
        denominator = Fraction(m.group(2))
        return Fraction(m.group(1)) / denominator if denominator else None
    if re.fullmatch(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?", s):
        return Fraction(s)
    return None


def _format(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def extract_number(text: str) -> tuple[str | None, str]:
    """(the answer text the rules select, which rule); (None, why) when no rule applies."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed, "\\boxed{}"
    for marker, rule in ((_HASHES, "####"), (_ANSWER_IS, "'answer is'")):
        matches = list(marker.finditer(text))
        if matches:
            line = text[matches[-1].end():].split("\n", 1)[0]
            line = re.sub(r"\\[!,;: ]", "", line.replace("{,}", ","))  # LaTeX spacing inside numbers
            token = NUMBER_TOKEN.search(line)
            if token:
                return token.group(0), rule
            return None, f"no number after the last {rule} on its line"
    lines = [line for line in text.splitlines() if line.strip()]
    if lines:
        m = _TRAILING_EQUALS.search(lines[-1])
        if m and parse_number(m.group("tail")) is not None:
            return m.group("tail"), "final '= X'"
    return None, "no final answer found (expected \\boxed{...}, '#### X', 'the answer is X' or a final '= X')"


class NumericAnswerOracle(Oracle):
    """Exact numeric answers (math word problems). ``check(response, reference)``: the reference is
    a number in any form :func:`parse_number` reads ("1,234", "0.5", "\\frac{1}{2}")."""

    name = "numeric"

    def check(self, candidate: str, reference: str) -> OracleResult:
        expected = self.parse_reference(reference)
        answer, rule = extract_number(require_str(candidate, "candidate"))
        if answer is None:
            return OracleResult(False, rule)
        value = parse_number(answer)
        if value is None:
            return OracleResult(False, f"answer {answer.strip()[:80]!r} (from {rule}) is not a number")
        if value == expected:
            return OracleResult(True, f"{_format(value)} (from {rule}) equals the reference", _format(value))
        return OracleResult(False, f"{_format(value)} (from {rule}) != reference {_format(expected)}", _format(value))

    @staticmethod
    def parse_reference(reference: str) -> Fraction:
        value = parse_number(require_str(reference, "reference"))
        if value is None:
            raise ValueError(f"numeric oracle: reference {reference!r} is not a number "
                             "(integers, decimals, a/b, \\frac{a}{b}, thousands as 1,234)")
        return value


# -- choice letters ---------------------------------------------------------------------------

class MultipleChoiceOracle(Oracle):
    """The chosen letter (rules in the module docstring) against the reference letter.
    ``choices``: the letters a question may have, upper case (default "ABCD")."""

    name = "multiple_choice"

    def __init__(self, choices: str = "ABCD"):
        if not (isinstance(choices, str) and choices and re.fullmatch(r"[A-Z]+", choices)
                and len(set(choices)) == len(choices)):
            raise ValueError(f"MultipleChoiceOracle.choices: distinct upper-case letters like 'ABCD', got {choices!r}")
        self.choices = choices
        letter = f"([{choices}])"
        alone = r"(?![A-Za-z0-9]|\.[A-Za-z0-9])"  # not the A of "Apple" nor of "A.I."
        self._answer = re.compile(
            r"(?i:\banswer\b(?:\s+(?:is|would\s+be|should\s+be))?|\bcorrect\s+(?:option|choice)\s+is)"
            r"\s*[:=]?[\s*_]*(?i:(?:option|choice)\s+)?[(\[]?" + letter + r"[)\]]?" + alone)
        self._alone = re.compile(r"[\s*_(\[]*" + letter + r"[\s*_)\].:]*")
        self._leading = re.compile(r"\s*(?:\*\*)?\(?" + letter + r"(?:\)|\.|:)" + alone)

    def extract(self, text: str) -> tuple[str | None, str]:
        """(letter, rule) or (None, why)."""
        boxed = last_boxed(text)
        if boxed is not None:
            inner = re.sub(r"\\(?:text|mathrm|textbf)\s*\{([^{}]*)\}", r"\1", boxed)
            inner = re.sub(r"[\s()\[\]*]", "", inner)
            if len(inner) == 1 and inner in self.choices:
                return inner, "\\boxed{}"
            return None, f"boxed answer {boxed.strip()[:40]!r} is not one of the choices {self.choices}"
        matches = list(self._answer.finditer(text))
        if matches:
            return matches[-1].group(1), "'answer is'"
        m = self._alone.fullmatch(text)
        if m:
            return m.group(1), "the whole response"
        m = self._leading.match(text)
        if m:
            return m.group(1), "the leading letter"
        return None, f"no chosen letter found (expected \\boxed{{X}}, 'the answer is X' or a lone letter; X in {self.choices})"

    def check(self, candidate: str, reference: str) -> OracleResult:
        expected = self.parse_reference(reference)
        letter, rule = self.extract(require_str(candidate, "candidate"))
        if letter is None:
            return OracleResult(False, rule)
        if letter == expected:
            return OracleResult(True, f"{letter} (from {rule}) equals the reference", letter)
        return OracleResult(False, f"{letter} (from {rule}) != reference {expected}", letter)

    def parse_reference(self, reference: str) -> str:
        letter = re.sub(r"[\s()\[\]]", "", require_str(reference, "reference")).upper()
        if len(letter) != 1 or letter not in self.choices:
            raise ValueError(f"multiple-choice oracle: reference {reference!r} is not one of the choices {self.choices}")
        return letter
