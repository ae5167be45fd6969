"""Numeric and multiple-choice oracles: the documented extraction rules, exact comparison, and the
traps a substring or lenient match would fall into."""
import subprocess
import sys
from fractions import Fraction

import pytest

from megatron_phi4.posttrain.oracles import (ORACLES, CodeOracle, MultipleChoiceOracle, NumericAnswerOracle,
                                             Oracle, OracleResult, build_oracle, extract_number, parse_number)
from megatron_phi4.registry import UnknownEntryError

numeric = NumericAnswerOracle()
choice = MultipleChoiceOracle()


# -- numeric: substring and sign traps ------------------------------------------------------------

@pytest.mark.parametrize("response, reference", [
    ("The answer is 123.", "12"),          # "12" is a prefix of the answer
    ("The answer is 12.", "123"),          # the answer is a prefix of the reference
    ("The answer is 112.", "12"),          # suffix
    ("\\boxed{-12}", "12"),                # sign
    ("\\boxed{12}", "-12"),
    ("The answer is 1,234.", "234"),       # a thousands group is not a number of its own
    ("The answer is 1,234.", "1"),
    ("The answer is 12.5", "12"),          # decimals are not truncated
    ("The answer is 12.5", "5"),
    ("The answer is 3/4", "3"),            # nor fractions split
    ("The answer is 3/4", "4"),
    ("\\boxed{120}", "12"),
    ("We get x = 12 and y = 5, so the answer is 125.", "12"),  # an earlier 12 is not the answer
    ("#### 1212", "12"),
    ("answer: 0.12", "12"),
])
def test_numeric_never_accepts_a_substring_or_a_sign_flip(response, reference):
    result = numeric.check(response, reference)
    assert not result.passed, result


@pytest.mark.parametrize("response, reference, extracted", [
    ("So the total is \\boxed{1234}.", "1234", "1234"),
    ("\\boxed{1,234}", "1234", "1234"),                    # thousands separators
    ("The answer is 1,234,567.", "1234567", "1234567"),
    ("The answer is $1{,}234$.", "1,234", "1234"),          # LaTeX thousands, reference with commas
    ("\\boxed{12.}", "12", "12"),                           # trailing full stop
    ("The answer is 12.", "12", "12"),
    ("\\boxed{3.50}", "3.5", "7/2"),                        # decimals canonically
    ("\\boxed{0.5}", "1/2", "1/2"),                         # decimal == fraction
    ("\\boxed{\\frac{1}{2}}", "0.5", "1/2"),
    ("\\boxed{\\dfrac{3}{4}}", "3/4", "3/4"),
    ("\\boxed{-\\frac{1}{2}}", "-0.5", "-1/2"),
    ("The answer is \u221212", "-12", "-12"),               # unicode minus
    ("The answer is: **$18**", "18", "18"),                 # currency and markdown
    ("The answer is 50%.", "50", "50"),                     # a trailing % is ignored
    ("\\boxed{50\\%}", "50", "50"),
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72", "72"),  # GSM8K answer line
    ("Final Answer: The final answer is $5$. I hope it is correct.", "5", "5"),  # Minerva format
    ("3 + 4 = 7\n2 * 7 = 14.", "14", "14"),                 # a final '= X'
    ("\\boxed{4} is wrong; we fix it: \\boxed{5}", "5", "5"),  # the last box counts
    ("\\boxed{{10}}", "10", "10"),                          # nested braces balance
    ("\\boxed{007}", "7", "7"),
])
def test_numeric_reads_the_documented_final_answer(response, reference, extracted):
    result = numeric.check(response, reference)
    assert result.passed, result
    assert result.extracted == extracted


@pytest.mark.parametrize("response, reason_part", [
    ("I am not sure.", "no final answer found"),
    ("\\boxed{12 apples}", "is not a number"),             # a box decides, and must hold a number only
    ("\\boxed{1,23}", "is not a number"),                  # invalid thousands grouping
    ("\\boxed{1/0}", "is not a number"),
    ("The answer is twelve.", "no number after the last 'answer is'"),
    ("The answer is 1,23", "no number after"),
    ("x = 5 is one root and there are more", "no final answer found"),  # '= X' only at the very end
])
def test_numeric_failures_say_why(response, reason_part):
    result = numeric.check(response, "12")
    assert not result.passed
    assert reason_part in result.reason, result.reason


def test_numeric_rule_priority_box_then_hashes_then_answer_is_then_equals():
    assert extract_number("The answer is 3. \\boxed{4} = 5") == ("4", "\\boxed{}")
    assert extract_number("The answer is 3.\n#### 4\n= 5") == ("4", "####")
    assert extract_number("The answer is 3.\nso = 5")[0] == "3"
    assert extract_number("the answer is 1 and later the answer is 2")[0] == "2"  # the last marker


def test_parse_number_is_exact_and_strict():
    assert parse_number("1,234.50") == Fraction(246900, 200)
    assert parse_number("0.1") == Fraction(1, 10)  # exact, not a float
    assert parse_number("0.333") != Fraction(1, 3)
    for bad in ("", "12a", "1,2345", "1.2.3", "--3", "1 2", "abc", "1e", "\\frac{1}{0}"):
        assert parse_number(bad) is None, bad


def test_numeric_reference_must_be_a_number():
    with pytest.raises(ValueError, match="reference 'twelve' is not a number"):
        numeric.check("\\boxed{12}", "twelve")
    with pytest.raises(TypeError, match="candidate must be a str"):
        numeric.check(12, "12")


# -- multiple choice ------------------------------------------------------------------------------

@pytest.mark.parametrize("response", [
    "The answer is Apple.",             # "A" inside a word
    "The answer is A.I. research",      # "A" of an abbreviation
    "Apples are red.",
    "As we saw, Bananas are yellow.",
    "The answer is a good question.",   # lower-case article
    "I think it is probably something.",
    "The answer is E",                  # not one of ABCD
])
def test_choice_letter_inside_words_or_outside_the_choices_does_not_count(response):
    result = choice.check(response, "A")
    assert not result.passed, result
    assert result.extracted is None, result


@pytest.mark.parametrize("response, letter", [
    ("The answer is (B).", "B"),
    ("The answer is B", "B"),
    ("Answer: C", "C"),
    ("**Answer:** D", "D"),
    ("The final answer is: **A**", "A"),
    ("answer is option C because ...", "C"),
    ("The correct option is D.", "D"),
    ("Looking at A and B, A is wrong. The answer is [C].", "C"),
    ("The answer is A. Then again, the answer is B.", "B"),   # the last statement counts
    ("\\boxed{B}", "B"),
    ("\\boxed{\\text{(C)}}", "C"),
    ("B", "B"),
    ("(D)", "D"),
    ("**C.**", "C"),
    ("B) Paris, because it is the capital.", "B"),
    ("(A) It is the largest.", "A"),
    ("C. The mitochondria.", "C"),
])
def test_choice_extraction_rules(response, letter):
    assert choice.extract(response)[0] == letter
    assert choice.check(response, letter).passed
    other = "A" if letter != "A" else "B"
    assert not choice.check(response, other).passed


def test_choice_box_decides_even_when_wrong_and_must_hold_a_letter():
    assert not choice.check("The answer is A. \\boxed{B}", "A").passed
    result = choice.check("\\boxed{Paris}", "A")
    assert not result.passed and "not one of the choices" in result.reason


def test_choice_options_and_reference_validation():
    five = MultipleChoiceOracle("ABCDE")
    assert five.check("The answer is E", "E").passed
    assert choice.check("answer: B", "(b)").passed  # reference normalised
    with pytest.raises(ValueError, match="not one of the choices ABCD"):
        choice.check("B", "E")
    with pytest.raises(ValueError, match="choices"):
        MultipleChoiceOracle("abcd")
    with pytest.raises(ValueError, match="choices"):
        MultipleChoiceOracle("AAB")


# -- the shared interface and the registry --------------------------------------------------------

def test_every_oracle_shares_the_interface_and_check_many_keeps_order():
    assert isinstance(numeric, Oracle) and isinstance(choice, Oracle)
    results = numeric.check_many(["\\boxed{12}", "\\boxed{123}", "answer is 12"], "12")
    assert [r.passed for r in results] == [True, False, True]
    assert all(isinstance(r, OracleResult) for r in results)
    assert [r.passed for r in choice.check_many(["A", "B"], ["A", "A"])] == [True, False]
    assert bool(OracleResult(True, "x")) and not bool(OracleResult(False, "x"))
    with pytest.raises(ValueError, match="2 candidates but 3 references"):
        numeric.check_many(["1", "2"], ["1", "2", "3"])


def test_oracles_are_selected_by_name():
    assert set(ORACLES.names()) == {"numeric", "multiple_choice", "code"}
    assert isinstance(build_oracle("numeric"), NumericAnswerOracle)
    assert build_oracle("multiple_choice", choices="ABCDE").choices == "ABCDE"
    assert ORACLES.get("code") is CodeOracle
    with pytest.raises(UnknownEntryError, match="oracle: got 'regex', allowed: 'numeric', 'multiple_choice', 'code'"):
        build_oracle("regex")


def test_importing_the_oracles_loads_no_torch():
    code = "import sys, megatron_phi4.posttrain.oracles; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
