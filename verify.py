"""
Response parsing, answer matching and the verifiable reward. Pure Python, no torch: sft/align/rl/eval all call these.

A response is format-valid iff, ignoring surrounding whitespace, it is exactly
    <caption>...</caption> <think>...</think> <answer>...</answer>
(one regex, DOTALL, non-greedy, anchored at both ends). The reward is 0.8 * acc + 0.2 * format, and 0 when the format gate fails.

    python verify.py "<caption>- a</caption><think>1+1</think><answer>2</answer>" 2    # prints the reward dict
"""

import re
import sys

FORMAT_RE = re.compile(r"^\s*(<caption>.*?</caption>)\s*(<think>.*?</think>\s*<answer>.*?</answer>)\s*$", re.DOTALL)
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
MAX_ANSWER_CHARS = 1024  # an answer this long or longer is never accepted (it would be a dump, not an answer)
REL_TOL = 1e-6

try:  # the symbolic-math fallback is optional: without it the rules below still decide
    from math_verify import parse as mv_parse, verify as mv_verify
except ImportError:  # pragma: no cover - depends on the environment
    mv_parse = mv_verify = None


# -----------------------------------------------------------------------------
# format and segments

def split_response(text):
    """(perception_segment, reasoning_segment) with tags included, or None if the response is format-invalid.
    perception = the caption block; reasoning = everything after it (the think block and the answer block)."""
    m = FORMAT_RE.match(text)
    return (m.group(1), m.group(2)) if m else None


def extract_answer(text):
    """The content of the last <answer> block, stripped; None when there is none."""
    found = ANSWER_RE.findall(text)
    return found[-1].strip() if found else None


# -----------------------------------------------------------------------------
# normalisation

def strip_latex(s):
    """Light LaTeX normalisation: math delimiters, \\dfrac/\\tfrac, \\text{}/\\mathrm{}, \\left/\\right, thousands separators,
    a trailing full stop."""
    s = s.strip()
    for a, b in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(s) >= len(a) + len(b) and s.startswith(a) and s.endswith(b):
            s = s[len(a):len(s) - len(b)].strip()
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\(?:text|mathrm|textbf|mathbf)\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\left|\\right", "", s)
    s = s.replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\ ", " ")
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)  # 1,000 -> 1000 (a comma followed by exactly three digits)
    s = s.rstrip(".").strip()
    return s


def normalize_text(s):
    s = strip_latex(s).lower()
    s = s.strip().strip("\"'`").strip()
    s = re.sub(r"\s+", " ", s)
    return s.rstrip(".").strip()


def split_parts(s):
    """Split a multi-value answer: "(1) a (2) b", "a; b", or top-level commas "a, b" (commas inside brackets stay)."""
    if re.match(r"^\s*\(1\)", s):
        parts = re.split(r"\(\d+\)", s)[1:]
        return [p.strip().rstrip(",;").strip() for p in parts]
    if ";" in s:
        return [p.strip() for p in s.split(";")]
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    return parts


NUM_RE = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?")
UNIT_RE = re.compile(r"^\s*(?:%|°|\^\\circ|\^\{\\circ\}|\\%|degrees?|[a-z]{1,12}(?:\^\d|²|³)?(?:/[a-z]{1,6})?)?\s*$", re.IGNORECASE)


def parse_number(s):
    """A float from "12", "-3.5", "12 cm", "45%", "$5", "\\frac{1}{2}", "3/4"; None when the text is not a number (+ unit)."""
    s = strip_latex(s).replace("\\$", "").lstrip("$").strip()
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}", s) or re.fullmatch(r"(-?)(\d+)\s*/\s*(\d+)", s)
    if m:
        den = float(m.group(3))
        return None if den == 0 else (-1 if m.group(1) else 1) * float(m.group(2)) / den
    m = NUM_RE.match(s)
    if not m or not UNIT_RE.match(s[m.end():]):
        return None
    try:
        return float(m.group(0))
    except ValueError:
        return None


def numbers_close(a, b):
    return abs(a - b) <= REL_TOL * max(abs(a), abs(b)) or (a == 0 and b == 0)


def choice_letter(s):
    """"B", "(B)", "B.", "B)", "(B) text", "B. text" -> "B"; None otherwise. Letters A-H."""
    m = re.fullmatch(r"\(?([A-H])\)?(?:[.:)]?\s+.*|[.:)])?", s.strip(), re.DOTALL)
    return m.group(1) if m else None


def parse_tuple(s):
    m = re.fullmatch(r"\(\s*(.+?)\s*\)", s.strip())
    if not m or "," not in m.group(1):
        return None
    vals = [parse_number(p) for p in m.group(1).split(",")]
    return None if any(v is None for v in vals) else vals


# -----------------------------------------------------------------------------
# matching

def match_single(pred, gold):
    """One value against one gold value: tuple, choice letter, number, normalised text, then symbolic maths."""
    pt, gt = parse_tuple(pred), parse_tuple(gold)
    if gt is not None:
        return pt is not None and len(pt) == len(gt) and all(abs(a - b) <= 1e-6 for a, b in zip(pt, gt))
    gl = choice_letter(gold)
    if gl is not None:  # the gold is a letter ("B", "(B) 12", "B. 12"): compare letters
        return choice_letter(pred) == gl
    pn, gn = parse_number(pred), parse_number(gold)
    if gn is not None and pn is not None:
        return numbers_close(pn, gn)
    if normalize_text(pred) == normalize_text(gold):
        return True
    return symbolic_match(pred, gold)


def symbolic_match(pred, gold):
    if mv_parse is None or not re.search(r"[\d\\^=]", gold):
        return False
    try:
        g, p = mv_parse(f"${strip_latex(gold)}$"), mv_parse(f"${strip_latex(pred)}$")
        return bool(g) and bool(p) and bool(mv_verify(g, p))
    except Exception:  # the fallback must never crash a reward: unparseable means "no match"
        return False


def answers_match(pred, gold):
    """True when the predicted answer text matches the gold answer text."""
    pred, gold = strip_latex(pred), strip_latex(gold)
    if not pred or len(pred) >= MAX_ANSWER_CHARS:
        return False
    gparts = split_parts(gold)
    if len(gparts) > 1:  # multi-value: the same number of parts, each matching in order
        pparts = split_parts(pred)
        return len(pparts) == len(gparts) and all(match_single(p, g) for p, g in zip(pparts, gparts))
    return match_single(pred, gold)


def reward(text, gold, equivalents=()):
    """{"score", "acc", "format"}: 0 when format-invalid, else 0.2 + 0.8 * (answer matches gold or an equivalent)."""
    if split_response(text) is None:
        return {"score": 0.0, "acc": 0.0, "format": 0.0}
    pred = extract_answer(text)
    raw = ANSWER_RE.findall(text)[-1]
    if not pred or len(raw) >= MAX_ANSWER_CHARS:
        return {"score": 0.2, "acc": 0.0, "format": 1.0}
    acc = float(any(answers_match(pred, str(g)) for g in (gold, *equivalents)))
    return {"score": 0.2 + 0.8 * acc, "acc": acc, "format": 1.0}


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python verify.py RESPONSE GOLD [EQUIVALENT ...]")
    print(reward(sys.argv[1], sys.argv[2], sys.argv[3:]))
