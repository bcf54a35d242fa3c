"""verify.py: the format gate, answer extraction and the matching rules as a table of cases grouped by rule, each with its
expected score, including every known reward hack and near misses of each (a change that reopens one fails here)."""

import time

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
    # exactly one block of each kind (the release's regex lets these through and grades the first answer block)
    ("<caption>a</caption><think>b</think><answer>A</answer><answer>B</answer>", False),  # two answers
    ("<caption>a</caption><think>b</think><answer>A</answer> <answer>B</answer>", False),
    ("<caption>a</caption><think>draft <answer>A</answer></think><answer>B</answer>", False),  # a draft inside think
    ("<caption>a <caption>b</caption></caption><think>c</think><answer>d</answer>", False),  # nested caption
    ("<caption>a</caption><think>b</think><think>c</think><answer>d</answer>", False),  # two think blocks
    ("<caption>a</caption><think>b</think><answer>c</answer></answer>", False),  # a stray closing tag
]


@pytest.mark.parametrize("text,valid", FORMAT_CASES)
def test_format_gate(text, valid):
    assert (verify.split_response(text) is not None) == valid


def test_segments_keep_tags_and_split_at_caption_end():
    cap, rea = verify.split_response(" " + R.format("7") + " ")
    assert cap == "<caption>\n- a red circle\n</caption>"
    assert rea == "<think>\nstep\n</think>\n<answer>7</answer>"


def test_extract_answer():
    assert verify.extract_answer(R.format(" 42 ")) == "42"
    assert verify.extract_answer("no blocks") is None
    assert verify.extract_answer("<answer>1</answer>") is None  # only a format-valid response has an answer
    assert verify.extract_answer("<caption>a</caption><think>b</think><answer>1</answer><answer>2</answer>") is None


MATCH_CASES = {  # rule -> [(pred, gold, match?)]
    "integers: exact, by value": [
        ("2", "2", True), ("2.0", "2", True), ("12.0", "12", True), ("12.000", "12", True), ("3", "2", False),
        ("-1", "-1", True), ("1", "-1", False), ("+3", "3", True), ("0", "0", True), ("-0", "0", True), ("0.0", "0", True),
        ("1e3", "1000", True), ("1E3", "1000", True), ("999999", "1000000", False), ("1000001", "1000000", False),
        ("1000000", "1000000", True), ("12.5", "12", False), ("11.9999999", "12", False), ("12.0000001", "12", False),
        ("123456789012345678", "123456789012345678", True), ("123456789012345679", "123456789012345678", False),
        ("0.0000001", "0", False), ("0", "0.0", True), ("1e-9", "0", False),
    ],
    "decimals: strict relative tolerance 1e-6": [
        ("0.1234567", "0.1234567", True), ("1000.5", "1000.4", False), ("1000000.5", "1000000.4", True),
        ("3.14159", "3.14159", True), ("3.1416", "3.14159", False), ("0.5000004", "0.5", True), ("0.5000006", "0.5", False),
        ("2.000002", "2.0", False), ("2.0000019", "2.0", True), ("2", "2.0", True), ("2", "2.5", False),
        ("6.02E+23", "6.02e23", True), ("6.02e+23", "6.02E23", True), ("6.03e23", "6.02e23", False),
        ("1.5e-3", "0.0015", True), ("-2.5", "-2.5", True), ("2.5", "-2.5", False), (".5", "0.5", True),
    ],
    "non-finite and huge numbers never match": [
        ("1e400", "12", False), ("-1e999", "12", False), ("9e99999", "12", False), ("9e99999", "12.5", False),
        ("1e99999999999", "3.5", False), ("inf", "12", False), ("-inf", "12", False), ("nan", "12", False),
        ("Infinity", "12", False), ("1e400", "1e400", True), ("1e400", "1e401", False), ("1e308", "1e308", True),
        ("\\infty", "12", False), ("1/0", "12", False),
    ],
    "numbers with units, symbols, separators": [
        ("12 cm", "12", True), ("12", "12 cm", True), ("12 cm", "12 cm", True), ("12 cm", "12 m", False),
        ("5 kg", "5 lb", False), ("45%", "45", True), ("45\\%", "45", True), ("45%", "45\\%", True), ("30°", "30", True),
        ("30^\\circ", "30", True), ("30 degrees", "30°", True), ("$5", "5", True), ("\\$5", "5", True),
        ("12 apples and 3 pears", "12", False), ("1,000", "1000", True), ("1000", "1,000", True),
        ("12,345,678", "12345678", True), ("1,000.5", "1000.5", True),
    ],
    "fractions": [
        ("1/2", "0.5", True), ("\\frac{3}{4}", "0.75", True), ("-\\frac{1}{2}", "-0.5", True), ("1/3", "0.33", False),
        ("0.3333333", "1/3", True), ("2/4", "1/2", True), ("\\frac{1}{2}", "\\frac{2}{4}", True), ("3/4", "0.7", False),
        ("\\dfrac{1}{2}", "\\frac{1}{2}", True), ("\\tfrac{1}{2}", "0.5", True),
    ],
    "wrappers: LaTeX delimiters, boxed, bold, answer prefixes": [
        ("$2$", "2", True), ("\\(2\\)", "2", True), ("\\[2\\]", "2", True), ("$$2$$", "2", True), ("\\boxed{2}", "2", True),
        ("$\\boxed{2}$", "2", True), ("\\boxed{3}", "2", False), ("\\boxed{2} \\boxed{3}", "2", False),
        ("\\boxed{2} or \\boxed{3}", "3", False), ("\\boxed{2} and again \\boxed{2}", "2", True), ("**12**", "12", True),
        ("__12__", "12", True), ("**13**", "12", False), ("The answer is 12", "12", True), ("The answer is 12.", "12", True),
        ("The final answer is: 12", "12", True), ("Answer: 12", "12", True), ("answer: B", "B", True),
        ("Final answer: blue", "blue", True), ("**The answer is $\\boxed{12}$.**", "12", True),
        ("The answer is 13", "12", False), ("I think the answer is 12", "12", False), ("\\text{red}", "red", True),
        ("\\mathrm{cm}", "cm", True), ("7.", "7", True), ("\\left(1, 2\\right)", "(1, 2)", True),
        ("\\boxed{(1, 2)}", "(1, 2)", True), ("\\boxed{\\frac{1}{2}}", "0.5", True),
    ],
    "option letters: one letter, any case": [
        ("B", "B", True), ("b", "B", True), ("(B)", "B", True), ("(b)", "B", True), ("[B]", "B", True), ("B.", "B", True),
        ("B:", "B", True), ("B) 12", "B", True), ("(B) 12", "B", True), ("B. a circle", "B", True), ("b. a circle", "B", True),
        ("(B) A circle", "B", True), ("B", "(B) 12", True), ("B", "B. 12", True), ("b", "(B) 12", True), ("C", "B", False),
        ("c", "B", False), ("H", "H", True), ("Option B", "B", True), ("option (b)", "B", True), ("choice C", "C", True),
        ("The answer is B", "B", True), ("The answer is (B).", "B", True), ("Answer: B", "B", True), ("**B**", "B", True),
        ("\\boxed{B}", "B", True), ("I", "B", False), ("12", "(B) 12", False), ("B12", "B", False),
    ],
    "option letters: hedges never match": [
        ("B or C", "B", False), ("B or C", "C", False), ("A and B", "A", False), ("A and B", "B", False),
        ("A B C D", "A", False), ("A B C D", "B", False), ("(B) or (C)", "B", False), ("(C) or (B)", "B", False),
        ("B, C", "B", False), ("B/C", "B", False), ("B. or C", "B", False), ("The answer is B or C", "B", False),
        ("B) or C)", "B", False), ("(B) (C)", "B", False), ("B. and (C)", "B", False), ("either B or C", "B", False),
        ("\\boxed{B} \\boxed{C}", "B", False), ("B C", "B", False),
    ],
    "gold text that starts like a letter is text": [
        ("a square", "A square", True), ("A square", "A square", True), ("A circle", "A square", False),
        ("A", "A square", False), ("B square", "B square", True), ("A. square", "A square", False),
    ],
    "multi-value answers: counts match, parts in order": [
        ("2, 1", "2, 1", True), ("2,1", "2, 1", True), ("1, 2", "2, 1", False), ("2", "2, 1", False),
        ("2, 1, 0", "2, 1", False), ("3; 4", "3; 4", True), ("(1) 3 (2) 4", "3; 4", True), ("(1) 3 (2) 5", "3; 4", False),
        ("red, 2", "red, 2", True), ("2.0, 1", "2, 1", True), ("2, 3", "2", False), ("2; 3", "2", False),
        ("(1) 2 (2) 3", "2", False), ("2 or 3", "2", False), ("2 and 3", "3", False), ("A, C", "A, C", True),
        ("C, A", "A, C", False),
    ],
    "coordinate tuples, element-wise": [
        ("(1, 2)", "(1, 2)", True), ("(1.0, 2.0)", "(1, 2)", True), ("(2, 1)", "(1, 2)", False), ("(1, 2, 3)", "(1, 2)", False),
        ("(0.5, -3)", "(1/2, -3)", True), ("(1, 2.0000001)", "(1, 2)", False), ("(1,2)", "(1, 2)", True),
        ("(1e400, 2)", "(1, 2)", False), ("1, 2", "(1, 2)", False),
    ],
    "normalised text": [
        ("Red", "red", True), ("  red  ", "red", True), ("'red'", "red", True), ("red circle", "red  circle", True),
        ("blue", "red", False), ("reds", "red", False), ("red.", "red", True), ("RED", "red", True),
        ("red or blue", "red", False), ("not red", "red", False),
    ],
    "symbolic fallback (math-verify)": [
        ("x^2+2x+1", "(x+1)^2", True), ("\\sqrt{4}", "2", True), ("x+1", "x+2", False), ("2x", "x \\cdot 2", True),
        ("\\frac{\\pi}{2}", "\\pi/2", True), ("\\pi", "\\frac{\\pi}{2}", False), ("x = 2", "2", True),
        ("\\frac{4}{2}", "2", True), ("2^{1}", "2", True),
        # hedges and non-answers the symbolic parser would read as a value
        ("2 \\vee 3", "3", False), ("2 \\lor 3", "2", False), ("\\pm 2", "2", False), ("x > 2", "2", False),
        ("2 \\leq x", "2", False), ("\\{2, 3\\}", "3", False), ("[2, 3]", "2", False), ("(2, 3)", "2", False),
        ("2 \\text{ or } 3", "2", False), ("\\infty", "12", False), ("1e400", "\\infty", False),
    ],
    "empty and over-long answers never match; whitespace does not count": [
        ("", "2", False), ("   ", "2", False), ("2" * 1024, "2" * 1024, False), ("2" * 1023, "2" * 1023, True),
        ("12" + " " * 1030, "12", True), (" " * 1030 + "12", "12", True), ("1" + " " * 1030 + "2", "1 2", True),
        ("**  **", "2", False),
    ],
}
CASES = [(rule, *c) for rule, cs in MATCH_CASES.items() for c in cs]


@pytest.mark.parametrize("rule,pred,gold,ok", CASES, ids=[f"{r}: {p[:30]!r} vs {g[:20]!r}" for r, p, g, _ in CASES])
def test_answers_match(rule, pred, gold, ok):
    if rule.startswith("symbolic") or "sqrt" in pred:
        pytest.importorskip("math_verify")
    assert verify.answers_match(pred, gold) == ok
    # the same through the reward: 1.0 when it matches, 0.2 (format only) when it does not
    assert verify.reward(R.format(pred), gold)["score"] == pytest.approx(1.0 if ok else 0.2)


def test_the_table_is_large_and_fast():
    """At least 150 cases; the whole table, through reward(), runs at hundreds of calls per second (the symbolic fallback
    is time-bounded). Measured, not asserted as a speed: the assertion only guards against a hang."""
    assert len(CASES) >= 150
    t0 = time.time()
    for _, pred, gold, _ in CASES:
        verify.reward(R.format(pred), gold)
    rate = len(CASES) / (time.time() - t0)
    print(f"verify.reward: {rate:.0f} calls/s over the {len(CASES)}-case table")
    assert rate > 5


@pytest.mark.parametrize("text,gold,eq,score", [
    (R.format("2"), "2", (), 1.0),  # right answer, right format
    (R.format("3"), "2", (), 0.2),  # wrong answer, right format
    (R.format(""), "2", (), 0.2),  # empty answer
    (R.format("2" * 1024), "2" * 1024, (), 0.2),  # 1024+ characters
    ("<answer>2</answer>", "2", (), 0.0),  # right answer, format-invalid
    (R.format("red"), "B", ("red",), 1.0),  # an equivalent answer counts
    (R.format("green"), "B", ("red",), 0.2),
    (R.format("B"), "B", ("red",), 1.0),
    (R.format("blue"), "B", ("blue",), 1.0),
    ("<caption>a</caption><think>b</think><answer>A</answer><answer>B</answer>", "B", (), 0.0),  # two answers: invalid
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
