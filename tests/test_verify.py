"""verify.py: format gate, answer extraction and matching rules, reward values. Each row could fail on its own."""

import pytest

import verify

R = "<caption>\n- a red circle\n</caption>\n<think>\nstep\n</think>\n<answer>{}</answer>"

FORMAT_CASES = [  # (response, format-valid?)
    (R.format("2"), True),
    ("  \n" + R.format("2") + "\n\n", True),  # surrounding whitespace is ignored
    ("<caption>a</caption><think>b</think><answer>c</answer>", True),  # no whitespace between blocks
    ("<caption></caption><think></think><answer></answer>", True),  # empty blocks are still the format
    ("<think>b</think><caption>a</caption><answer>c</answer>", False),  # wrong order
    ("<caption>a</caption><answer>c</answer><think>b</think>", False),  # wrong order
    ("<caption>a</caption><think>b</think>", False),  # missing answer
    ("<think>b</think><answer>c</answer>", False),  # missing caption
    ("<caption>a</caption><answer>c</answer>", False),  # missing think
    ("Sure! <caption>a</caption><think>b</think><answer>c</answer>", False),  # text before
    ("<caption>a</caption><think>b</think><answer>c</answer> hope this helps", False),  # text after
    ("<caption>a</caption> x <think>b</think><answer>c</answer>", False),  # text between caption and think
    ("<caption>a</caption><think>b</think> x <answer>c</answer>", False),  # text between think and answer
    ("<caption>a<think>b</think><answer>c</answer>", False),  # unclosed caption
    ("<caption>a</caption><think>b</think><answer>c", False),  # unclosed answer
    ("", False),
    ("2", False),
]


@pytest.mark.parametrize("text,valid", FORMAT_CASES)
def test_format_gate(text, valid):
    assert (verify.split_response(text) is not None) == valid


def test_segments_keep_tags_and_split_at_caption_end():
    cap, rea = verify.split_response(" " + R.format("7") + " ")
    assert cap == "<caption>\n- a red circle\n</caption>"
    assert rea == "<think>\nstep\n</think>\n<answer>7</answer>"


MATCH_CASES = [  # (pred, gold, match?)
    # integers and decimals, relative tolerance 1e-6
    ("2", "2", True), ("2.0", "2", True), ("3", "2", False), ("-1", "-1", True), ("1", "-1", False),
    ("0.1234567", "0.1234567", True), ("1000.5", "1000.4", False), ("1000000.5", "1000000.4", True), ("1e3", "1000", True), ("0", "0", True),
    # numbers with units and symbols stripped
    ("12 cm", "12", True), ("12", "12 cm", True), ("45%", "45", True), ("45\\%", "45", True), ("30°", "30", True),
    ("30^\\circ", "30", True), ("$5", "5", True), ("12 apples and 3 pears", "12", False),
    # thousands separators
    ("1,000", "1000", True), ("1000", "1,000", True), ("12,345,678", "12345678", True),
    # LaTeX normalisation
    ("$2$", "2", True), ("\\(2\\)", "2", True), ("\\[2\\]", "2", True), ("\\text{red}", "red", True),
    ("\\mathrm{cm}", "cm", True), ("\\dfrac{1}{2}", "\\frac{1}{2}", True), ("\\tfrac{1}{2}", "0.5", True),
    ("\\left(1, 2\\right)", "(1, 2)", True), ("7.", "7", True),
    # fractions
    ("1/2", "0.5", True), ("\\frac{3}{4}", "0.75", True), ("-\\frac{1}{2}", "-0.5", True), ("1/3", "0.33", False),
    # multiple-choice letters A-H
    ("B", "B", True), ("(B)", "B", True), ("B.", "B", True), ("B) 12", "B", True), ("(B) 12", "B", True),
    ("B", "(B) 12", True), ("B", "B. 12", True), ("C", "B", False), ("b", "B", False), ("H", "H", True),
    ("The answer is B", "B", False),
    # multi-value answers: counts must match, parts in order
    ("2, 1", "2, 1", True), ("2,1", "2, 1", True), ("1, 2", "2, 1", False), ("2", "2, 1", False),
    ("2, 1, 0", "2, 1", False), ("3; 4", "3; 4", True), ("(1) 3 (2) 4", "3; 4", True), ("(1) 3 (2) 5", "3; 4", False),
    ("red, 2", "red, 2", True),
    # coordinate tuples, element-wise
    ("(1, 2)", "(1, 2)", True), ("(1.0, 2.0)", "(1, 2)", True), ("(2, 1)", "(1, 2)", False), ("(1, 2, 3)", "(1, 2)", False),
    ("(0.5, -3)", "(1/2, -3)", True),
    # normalised text
    ("Red", "red", True), ("  red  ", "red", True), ("'red'", "red", True), ("red circle", "red  circle", True),
    ("blue", "red", False), ("reds", "red", False),
    # symbolic fallback (math-verify)
    ("x^2+2x+1", "(x+1)^2", True), ("\\sqrt{4}", "2", True), ("x+1", "x+2", False),
    # empty and over-long answers never match
    ("", "2", False), ("2" * 1024, "2" * 1024, False),
]


@pytest.mark.parametrize("pred,gold,ok", MATCH_CASES)
def test_answers_match(pred, gold, ok):
    if "x^2" in gold + pred or "sqrt" in pred:
        pytest.importorskip("math_verify")
    assert verify.answers_match(pred, gold) == ok


def test_extract_answer():
    assert verify.extract_answer(R.format(" 42 ")) == "42"
    assert verify.extract_answer("no blocks") is None
    assert verify.extract_answer("<answer>1</answer> then <answer>2</answer>") == "2"  # the last block counts


@pytest.mark.parametrize("text,gold,eq,score", [
    (R.format("2"), "2", (), 1.0),  # right answer, right format
    (R.format("3"), "2", (), 0.2),  # wrong answer, right format
    (R.format(""), "2", (), 0.2),  # empty answer
    (R.format("2" * 1024), "2" * 1024, (), 0.2),  # 1024+ characters
    ("<answer>2</answer>", "2", (), 0.0),  # right answer, format-invalid
    (R.format("red"), "B", ("red",), 1.0),  # an equivalent answer counts
    (R.format("green"), "B", ("red",), 0.2),
    (R.format("B"), "B", ("red",), 1.0),
])
def test_reward_values(text, gold, eq, score):
    r = verify.reward(text, gold, eq)
    assert r["score"] == pytest.approx(score)
    assert r["score"] == pytest.approx(0.8 * r["acc"] + 0.2 * r["format"])


def test_verify_has_no_torch_import():
    import subprocess
    import sys
    code = "import sys, verify; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=__import__("os").path.dirname(verify.__file__))
