"""
Response parsing, answer matching and the verifiable reward. Pure Python, no torch: sft/align/rl/eval all call these.

A response is format-valid iff, ignoring surrounding whitespace, it is exactly
    <caption>...</caption> <think>...</think> <answer>...</answer>
with one block of each kind and no other of these tags inside them. The reward is 0.8 * acc + 0.2 * format, and 0 when the
format gate fails. The matching rules, in the order they are tried (README "The verifier" lists where they differ from the
release's two reward functions, and why):
  1. the answer is the answer block's content with surrounding whitespace stripped; empty or >= 1024 characters: no match;
  2. common wrappers are removed: $..$, \\( \\), \\[ \\], \\boxed{..} (one box; several different boxes are a hedge),
     **bold**, "The (final) answer is X", "Answer: X", a trailing full stop;
  3. a multi-value gold ("2, 1", "3; 4", "(1) 3 (2) 4") needs the same number of parts, each matching in order; a single-value
     gold never matches several values;
  4. a coordinate tuple gold matches a tuple of the same length element by element (numbers as in 6);
  5. an option-letter gold ("B", "(B)", "B. text", "(B) text") matches exactly one letter, in any case ("b", "(b)",
     "Option B", "B. a circle"); a hedge ("B or C", "A and B", "A B C D", "(B) or (C)") matches nothing;
  6. numbers compare by value, units stripped (12 cm, 45%, 30 degrees; two different units do not match): an integer gold
     exactly ("12.0" = "12", 999999 != 1000000), a decimal, fraction or scientific gold within a strict relative tolerance
     of 1e-6; infinities and NaN never match; a number never matches a gold that is not one;
  7. normalised text (case, quotes, whitespace, LaTeX text wrappers);
  8. a symbolic-maths fallback (math-verify, time-bounded) for LaTeX / algebraic golds.

    python verify.py "<caption>- a</caption><think>1+1</think><answer>2</answer>" 2    # prints the reward dict
"""

import re
import sys
from decimal import Decimal, InvalidOperation

FORMAT_RE = re.compile(r"^\s*(<caption>.*?</caption>)\s*(<think>.*?</think>\s*<answer>.*?</answer>)\s*$", re.DOTALL)
TAG_RE = re.compile(r"</?(?:caption|think|answer)>")
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
MAX_ANSWER_CHARS = 1024  # an answer this long or longer is never accepted (it would be a dump, not an answer)
REL_TOL = Decimal("1e-6")  # decimals: |pred - gold| < REL_TOL * |gold|, strictly
SYMBOLIC_TIMEOUT_S = 1  # each of math-verify's parse and verify calls
SYMBOLIC_MAX_CHARS = 200  # longer answers skip the symbolic fallback (its cost grows with the expression)

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
    if not m or len(TAG_RE.findall(text)) != 6:  # exactly one block of each kind: no second answer, no draft inside think
        return None
    return m.group(1), m.group(2)


def extract_answer(text):
    """The content of the answer block, stripped, when the response is format-valid; else None."""
    return ANSWER_RE.search(text).group(1).strip() if split_response(text) else None


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
    return s.rstrip(".").strip()


BOXED_RE = re.compile(r"\\boxed\s*\{")
PREFIX_RE = re.compile(r"^(?:the\s+)?(?:final\s+)?answer\s*(?:is\s*:?|:)\s*", re.IGNORECASE)


def boxed_contents(s):
    """The contents of every \\boxed{...} in s (braces balanced)."""
    out = []
    for m in BOXED_RE.finditer(s):
        depth, i = 1, m.end()
        while i < len(s) and depth:
            depth += {"{": 1, "}": -1}.get(s[i], 0)
            i += 1
        if depth == 0:
            out.append(s[m.end():i - 1])
    return out


def unwrap(s):
    """The answer inside the common wrappers (rule 2); None when it is a hedge of several different boxed answers."""
    for _ in range(4):  # wrappers nest ("**The answer is $\\boxed{2}$.**")
        before = s
        s = strip_latex(s)
        boxes = boxed_contents(s)
        if boxes:
            if len({b.strip() for b in boxes}) > 1:
                return None
            s = boxes[0]
        m = re.fullmatch(r"(\*\*|__)(.+)\1", s.strip(), re.DOTALL)
        if m:
            s = m.group(2)
        s = PREFIX_RE.sub("", s.strip())
        if s == before:
            break
    return s.strip()


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


# -----------------------------------------------------------------------------
# numbers, letters, tuples

NUM_RE = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?", re.IGNORECASE)
UNIT_RE = re.compile(r"^\s*(%|°|\^\\circ|\^\{\\circ\}|\\%|degrees?|[a-z]{1,12}(?:\^\d|²|³)?(?:/[a-z]{1,6})?)?\s*$", re.IGNORECASE)
UNIT_ALIASES = {"\\%": "%", "°": "deg", "^\\circ": "deg", "^{\\circ}": "deg", "degree": "deg", "degrees": "deg"}


def parse_number(s):
    """(value: Decimal, is_integer_literal, unit) from "12", "-3.5", "6.02E+23", "12 cm", "45%", "$5", "\\frac{1}{2}",
    "3/4"; None when the text is not one number (+ unit) or not finite ("inf", "nan"). Decimal is exact: "1e400" is a
    (wrong) number, never an infinity that equals another."""
    s = strip_latex(s).replace("\\$", "").lstrip("$").strip()
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}", s) or re.fullmatch(r"(-?)(\d+)\s*/\s*(\d+)", s)
    if m:
        den = Decimal(m.group(3))
        return None if den == 0 else ((-1 if m.group(1) else 1) * Decimal(m.group(2)) / den, False, "")
    m = NUM_RE.match(s)
    u = UNIT_RE.match(s[m.end():]) if m else None
    if not m or not u:
        return None
    try:
        v = Decimal(m.group(0))
    except InvalidOperation:
        return None
    if not v.is_finite():
        return None
    unit = (u.group(1) or "").lower()
    return v, re.fullmatch(r"[-+]?\d+", m.group(0)) is not None, UNIT_ALIASES.get(unit, unit)


def numbers_match(p, g):
    """parse_number results: an integer gold exactly, any other within the strict relative tolerance; units must agree
    when both are given."""
    (pv, _, pu), (gv, g_int, gu) = p, g
    if pu and gu and pu != gu:
        return False
    if g_int or gv == 0:
        return pv == gv
    try:
        return abs(pv - gv) < REL_TOL * abs(gv)
    except ArithmeticError:  # exponents past Decimal's range ("1e99999999"): not close to any gold
        return False


GOLD_LETTER_RE = re.compile(r"\(?([A-H])\)?[.:]?|\(([A-H])\)\s+.+|([A-H])[.:)]\s+.+", re.DOTALL)
PRED_LETTER_RE = re.compile(r"[(\[]?\s*([A-Ha-h])\s*[)\]]?\s*[.:]?|(?:\(([A-Ha-h])\)|([A-Ha-h])[.:)])\s+(.+)", re.DOTALL)
OTHER_OPTION_RE = re.compile(r"\(\s*[A-Ha-h]\s*\)|(?:^|\s)[A-H][.:)](?:\s|$)|\b(?:or|and)\s+\(?[A-H]\b")


def gold_letter(s):
    """"B", "(B)", "B.", "(B) text", "B. text", "B) text" -> "B" (upper case only: "A square" is text); else None."""
    m = GOLD_LETTER_RE.fullmatch(s.strip())
    return next(g for g in m.groups() if g) if m else None


def pred_letter(s):
    """The one option letter a prediction names ("b", "(B)", "Option B", "B. a circle"), or None (none, or a hedge)."""
    s = re.sub(r"^(?:option|choice)\s+", "", s.strip(), flags=re.IGNORECASE)
    m = PRED_LETTER_RE.fullmatch(s)
    if not m:
        return None
    if m.group(4) is not None and OTHER_OPTION_RE.search(m.group(4)):  # "(B) or (C)", "B. or C": a second option named
        return None
    return next(g for g in m.groups()[:3] if g).upper()


def parse_tuple(s):
    m = re.fullmatch(r"\(\s*(.+?)\s*\)", s.strip())
    if not m or "," not in m.group(1):
        return None
    vals = [parse_number(p) for p in m.group(1).split(",")]
    return None if any(v is None for v in vals) else vals


# -----------------------------------------------------------------------------
# matching

def match_single(pred, gold):
    """One value against one gold value: tuple, option letter, number, normalised text, then symbolic maths."""
    gt = parse_tuple(gold)
    if gt is not None:
        pt = parse_tuple(pred)
        return pt is not None and len(pt) == len(gt) and all(numbers_match(a, b) for a, b in zip(pt, gt))
    gl = gold_letter(gold)
    if gl is not None:
        return pred_letter(pred) == gl
    gn = parse_number(gold)
    if gn is not None:
        pn = parse_number(pred)
        if pn is not None:
            return numbers_match(pn, gn)
    if normalize_text(pred) == normalize_text(gold):
        return True
    return symbolic_match(pred, gold)


HEDGE_OPS_RE = re.compile(r"\\(?:lor|vee|land|wedge|cup|cap|pm|mp|lt|gt|le|leq|ge|geq|ne|neq|in|setminus)(?![A-Za-z])|[<>]")


def looks_like_math(s):
    """Digits, LaTeX, operators and one-letter variables only: no word of two or more letters outside LaTeX commands
    (so "A square" or "2 or 3" never reach the symbolic parser, which would read them as products of variables)."""
    return not re.search(r"[A-Za-z]{2,}", re.sub(r"\\[A-Za-z]+", " ", s))


def symbolic_match(pred, gold):
    """math-verify on mathematical golds, time-bounded; a prediction it reads as several values never matches."""
    if mv_parse is None or len(pred) > SYMBOLIC_MAX_CHARS or not (looks_like_math(gold) and looks_like_math(pred)):
        return False
    if HEDGE_OPS_RE.search(pred) and not HEDGE_OPS_RE.search(gold):  # "2 \\vee 3", "\\pm 2", "x > 2": several values
        return False
    try:
        g = mv_parse(f"${strip_latex(gold)}$", parsing_timeout=SYMBOLIC_TIMEOUT_S)
        p = mv_parse(f"${strip_latex(pred)}$", parsing_timeout=SYMBOLIC_TIMEOUT_S)
        if not g or not p or type(p[0]).__name__ in ("FiniteSet", "Interval", "Union"):
            return False
        return bool(mv_verify(g, p, timeout_seconds=SYMBOLIC_TIMEOUT_S))
    except Exception:  # the fallback must never crash a reward: unparseable means "no match"
        return False


def answers_match(pred, gold):
    """True when the predicted answer text matches the gold answer text (rules 2-8 of the module docstring)."""
    pred = re.sub(r"\s+", " ", pred).strip()  # whitespace never counts toward the length cap
    if not pred or len(pred) >= MAX_ANSWER_CHARS:
        return False
    pred = unwrap(pred)
    if not pred:
        return False
    gold = unwrap(gold) or gold
    gparts, pparts = split_parts(strip_latex(gold)), split_parts(strip_latex(pred))
    if len(gparts) > 1 or len(pparts) > 1:  # multi-value: the same number of parts, each matching in order
        return len(pparts) == len(gparts) and all(match_single(p, g) for p, g in zip(pparts, gparts))
    return match_single(pred, gold)


def reward(text, gold, equivalents=()):
    """{"score", "acc", "format"}: 0 when format-invalid, else 0.2 + 0.8 * (answer matches gold or an equivalent)."""
    pred = extract_answer(text)
    if pred is None:
        return {"score": 0.0, "acc": 0.0, "format": 0.0}
    acc = float(any(answers_match(pred, str(g)) for g in (gold, *equivalents)))
    return {"score": 0.2 + 0.8 * acc, "acc": acc, "format": 1.0}


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python verify.py RESPONSE GOLD [EQUIVALENT ...]")
    print(reward(sys.argv[1], sys.argv[2], sys.argv[3:]))
