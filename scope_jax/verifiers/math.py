"""Math answer checking for rollouts: extract the final answer, compare it with math-verify.

Model output is untrusted text. Nothing here evals or execs it: answers are parsed by
math-verify (LaTeX -> sympy via an ANTLR grammar), and every sympy call runs under a time limit.

Two entry points:

* ``verify(response, gold)`` checks one pair in the calling process. Its time limit is a
  ``signal.setitimer`` alarm, which Python only allows in the main thread, and which cannot
  interrupt a long computation inside C code (a huge big-integer power, say) until that call
  returns. It therefore refuses to run outside the main thread (``RuntimeError``), and it
  rejects absurd answers (power towers, giant factorials, very long or deeply nested answers)
  before they reach sympy.
* ``Verifier`` (scope_jax.verifiers.pool, with the convenience wrapper ``verify_batch``) is the isolation a trainer should
  use: a small pool of worker processes, each checking one pair at a time, with a hard per-item
  wall-clock limit enforced by the parent. A worker that overruns is killed (SIGKILL) and
  replaced and its item scored 0 with reason ``'timeout'``; a worker that dies is replaced and
  its item scored 0 with reason ``'error'``; the rest of the batch carries on.
  ``concurrent.futures.ProcessPoolExecutor`` cannot kill one hung task, hence the own pool.
"""
from __future__ import annotations

import logging
import math
import re
import signal
import threading
from typing import Sequence, Union

from scope_jax.verifiers.result import VerifyResult

Gold = Union[str, int, float, Sequence[Union[str, int, float]]]
log = logging.getLogger(__name__)

REASONS = ("correct", "no_answer", "parse_failure", "timeout", "mismatch", "error")

# Only the tail of a response is searched for the answer: the final answer is at the end, and a
# bounded search keeps a megabyte of output from costing more than a bounded scan.
MAX_RESPONSE_CHARS = 100_000
# An extracted answer longer than this is not a plausible final answer; sympy is not asked.
MAX_ANSWER_CHARS = 1_000
# Deeper brace nesting than this inside an answer is rejected (the ANTLR parser recurses per level).
MAX_BRACE_DEPTH = 40
# Integers with more decimal digits than this are refused: sympy would build them exactly.
MAX_LOG10_MAGNITUDE = 1_000_000
# n! is refused above this n (sympy evaluates factorials of literals exactly).
MAX_FACTORIAL_ARG = 10_000


class _ItemTimeout(BaseException):
    """Raised by the alarm handler. A BaseException so that library code catching Exception
    (math-verify and sympy both do) cannot swallow it."""


# ----------------------------------------------------------------------------- extraction

# Tokens for the brace scan. '\\\\' (a LaTeX line break) and '\\{' '\\}' (literal braces) are
# matched first so that they are skipped rather than read as group braces.
_BOXED_TOKEN = re.compile(r"\\\\|\\[{}]|\\(?:boxed|fbox)\b\s*|[{}]")
_BOXED_BARE = re.compile(r"\\boxed[ \t]+([^\s{}$]+)")
_GSM8K = re.compile(r"####\s*([^\n]*)")
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?|-?\.\d+")


def _tail(text: str, n: int = MAX_RESPONSE_CHARS) -> str:
    return text if len(text) <= n else text[-n:]


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed 5``) in text.

    "Last" means the box that closes last, so for nested boxes the outer one wins. Braces are
    matched by one left-to-right pass over brace tokens with a stack (no backtracking regex),
    so ten thousand nested braces cost linear time. Unclosed boxes are ignored. Only the last
    MAX_RESPONSE_CHARS characters are searched. Returns None when there is no complete box.
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_boxed: expected str, got {type(text).__name__}")
    text = _tail(text)
    stack: list[int] = []  # for each open brace: start of the box content, or -1 if not a box
    pending_end = -1
    pending_box = False  # the previous token was \boxed, so the next '{' opens a box
    best: tuple[int, int] | None = None  # (start, end) of the box content that closes last
    for m in _BOXED_TOKEN.finditer(text):
        tok = m.group()
        if tok == "{":
            stack.append(m.end() if pending_box and m.start() == pending_end else -1)
            pending_box = False
        elif tok == "}":
            pending_box = False
            if stack:
                start = stack.pop()
                if start >= 0:
                    best = (start, m.start())
        elif tok.startswith(("\\boxed", "\\fbox")):  # trailing spaces consumed
            pending_box, pending_end = True, m.end()
        else:  # '\\', '\{' or '\}': not group braces
            pending_box = False
    bare = None
    for bm in _BOXED_BARE.finditer(text):
        bare = bm
    if bare is not None and (best is None or bare.start() > best[1]):
        return bare.group(1).rstrip(".,;")
    if best is None:
        return None
    return text[best[0]:best[1]]


def extract_gsm8k_gold(text: str) -> str | None:
    """The answer after the last ``####`` (GSM8K gold format), commas removed; None if absent."""
    matches = _GSM8K.findall(text)
    if not matches:
        return None
    return matches[-1].replace(",", "").strip().rstrip(".") or None


def extract_final_number(text: str) -> str | None:
    """The answer for datasets that grade the final number: the ``#### N`` answer if present,
    else the last number in the text (thousands commas removed, trailing '.' dropped)."""
    text = _tail(text)
    hashed = extract_gsm8k_gold(text)
    # Only a number counts after '####': models also write markdown headings '#### Step 2'.
    if hashed is not None and _NUMBER.fullmatch(hashed.replace("$", "").strip()):
        return hashed.replace("$", "").strip()
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    return numbers[-1].replace(",", "").rstrip(".") or None


def extract_answer(response: str, mode: str = "boxed") -> str | None:
    """Final answer of a response. mode 'boxed': the last box (extract_boxed); mode
    'final_number': extract_final_number. Returns None when the response has no answer."""
    if not isinstance(response, str):
        raise TypeError(f"response: expected str, got {type(response).__name__}")
    if mode == "boxed":
        ans = extract_boxed(response)
    elif mode == "final_number":
        ans = extract_final_number(response)
    else:
        raise ValueError(f"mode: expected 'boxed' or 'final_number', got {mode!r}")
    if ans is None:
        return None
    ans = ans.strip()
    return ans or None


_MATH_DOLLAR = re.compile(r"(?<!\\)\$")


def gold_answers(gold: Gold) -> list[str]:
    """Normalise a gold answer to a non-empty list of answer strings.

    Accepts a string (a bare answer; a GSM8K answer with '#### N'; a solution whose last
    \\boxed{} is the answer, as in minerva_math), an int, a float (27.0 -> '27', as in amc23),
    or a list of those (OlympiadBench: correct if any matches). Raises ValueError / TypeError
    naming the problem otherwise.
    """
    if isinstance(gold, (list, tuple)):
        if not gold:
            raise ValueError("gold: empty list of answers")
        out: list[str] = []
        for g in gold:
            if isinstance(g, (list, tuple)):
                raise TypeError("gold: nested lists are not answers")
            out.extend(gold_answers(g))
        return out
    if isinstance(gold, bool):
        raise TypeError("gold: bool is not an answer")
    if isinstance(gold, int):
        return [str(gold)]
    if isinstance(gold, float):
        if not math.isfinite(gold):
            raise ValueError(f"gold: non-finite float {gold!r}")
        return [str(int(gold)) if gold.is_integer() else repr(gold)]
    if not isinstance(gold, str):
        raise TypeError(f"gold: expected str, number or list, got {type(gold).__name__}")
    g = gold.strip()
    if "####" in g:
        g = extract_gsm8k_gold(g) or ""
    elif "\\boxed" in g or "\\fbox" in g:
        g = extract_boxed(g) or ""
    g = g.strip()
    # Inline-math delimiters are not content ('$6764$,$10945$' in OlympiadBench is the pair
    # 6764, 10945); an escaped dollar sign '\$' is kept.
    g = _MATH_DOLLAR.sub("", g).strip()
    if not g:
        raise ValueError(f"gold: no answer in {gold!r}")
    return [g]


# ----------------------------------------------------------------------------- safety checks

_SPACING = re.compile(r"\\[,!;: ]|\\q?quad\b|\\left\b|\\right\b|\\displaystyle\b|\s+")
_NUM_LIT = re.compile(r"\d+(?:\.\d+)?")


def _match_group(s: str, i: int) -> int:
    """Index just past the group opened at s[i] ('{' or '('); len(s) if unclosed."""
    close = "}" if s[i] == "{" else ")"
    opening = s[i]
    depth = 0
    for j in range(i, len(s)):
        if s[j] == opening:
            depth += 1
        elif s[j] == close:
            depth -= 1
            if depth == 0:
                return j + 1
    return len(s)


def _numeric_log10(s: str) -> float | None:
    """log10 of a purely numeric power expression ('7', '9^{9^{9}}', '(10^{100})^{5}'), or
    None if s is anything else. Used only to refuse numbers too large to build, never to
    compute an answer."""
    s = s.strip()
    while len(s) >= 2 and s[0] in "{(" and _match_group(s, 0) == len(s):
        s = s[1:-1].strip()
    if not s:
        return None
    if s[0] in "{(":
        j = _match_group(s, 0)
    else:
        m = _NUM_LIT.match(s)
        if not m:
            return None
        j = m.end()
    if j == len(s):
        return math.log10(max(float(s), 1.0)) if s[0] not in "{(" else None
    if s[j] != "^" or j + 1 == len(s):
        return None
    exp_txt = s[j + 1:]
    if exp_txt[0] in "{(":
        if _match_group(exp_txt, 0) != len(exp_txt):
            return None
    elif len(exp_txt) != 1:
        return None
    return _power_log10(s[:j], exp_txt)


def _power_log10(base: str, exponent: str) -> float | None:
    """log10(base ** exponent) for numeric base and exponent texts; None if not numeric."""
    b = _numeric_log10(base)
    e = _numeric_log10(exponent)
    if b is None or e is None:
        return None
    if b <= 0.0:
        return 0.0
    return math.inf if e > 300 else (10.0 ** e) * b


def refuse_reason(answer: str) -> str | None:
    """Why an extracted answer is refused before parsing (None when it is acceptable).

    Refused: answers longer than MAX_ANSWER_CHARS, braces nested deeper than MAX_BRACE_DEPTH,
    numeric powers with more than MAX_LOG10_MAGNITUDE digits (9^{9^{9^{9}}}, 2^{10^{9}}), and
    factorials of numbers above MAX_FACTORIAL_ARG. These are never plausible final answers
    and would make sympy build astronomically large integers.
    """
    if len(answer) > MAX_ANSWER_CHARS:
        return f"answer has {len(answer)} characters (limit {MAX_ANSWER_CHARS})"
    depth = max_depth = 0
    for ch in answer:
        if ch in "{(":
            depth += 1
            max_depth = max(max_depth, depth)
        elif ch in "})":
            depth -= 1
    if max_depth > MAX_BRACE_DEPTH:
        return f"answer nests brackets {max_depth} deep (limit {MAX_BRACE_DEPTH})"
    s = _SPACING.sub("", answer).replace("**", "^")
    # Every numeric literal or bracketed group followed by '^' starts a candidate power:
    # estimate its size.
    group_end: dict[int, int] = {}  # opening bracket index -> index just past its match
    stack: list[int] = []
    for i, ch in enumerate(s):
        if ch in "({":
            stack.append(i)
        elif ch in ")}" and stack:
            group_end[stack.pop()] = i + 1
    starts = [(m.start(), m.end()) for m in _NUM_LIT.finditer(s)] + list(group_end.items())
    for i, j in starts:
        if j < len(s) and s[j] == "^":
            k = j + 1
            k = group_end.get(k, len(s)) if k < len(s) and s[k] in "{(" else k + 1
            mag = _power_log10(s[i:j], s[j + 1:k])
            if mag is not None and mag > MAX_LOG10_MAGNITUDE:
                return "answer is a number with more than 10^6 digits (power tower)"
    for m in re.finditer(r"(\d+)!|([)}])!", s):
        if m.group(1) is not None:
            if len(m.group(1)) > 6 or int(m.group(1)) > MAX_FACTORIAL_ARG:
                return f"answer takes the factorial of {m.group(1)[:20]}"
        else:
            # (expr)! : refuse when expr is a numeric power that is too large to factorise
            close = m.start(2)
            opening = "(" if s[close] == ")" else "{"
            depth, i = 0, close
            while i >= 0:
                depth += s[i] == s[close]
                depth -= s[i] == opening
                if depth == 0:
                    break
                i -= 1
            mag = _numeric_log10(s[i:close + 1]) if i >= 0 else None
            if mag is not None and mag > math.log10(MAX_FACTORIAL_ARG):
                return "answer takes the factorial of a large number"
    return None


# ----------------------------------------------------------------------------- comparison

_NORM_SUBS = (
    (re.compile(r"\\[dt]frac"), r"\\frac"),
    (re.compile(r"\\text\{\s*([^{}]*?)\s*\}"), r"\1"),
    (re.compile(r"\\mathrm\{\s*([^{}]*?)\s*\}"), r"\1"),
)


def _normalise_text(s: str) -> str:
    """Cheap textual normal form used only to declare obviously identical answers equal
    (e.g. '\\text{Yes}' vs 'Yes.'); never to declare answers different."""
    s = _SPACING.sub("", s)
    for pat, rep in _NORM_SUBS:
        s = pat.sub(rep, s)
    return s.strip("$").rstrip(".")


def _quiet_math_verify() -> None:
    # math-verify warns once per process when its own signal timeouts are switched off; here
    # they are off on purpose (one alarm of ours bounds the whole item), so mark it as shown.
    import math_verify.grader
    import math_verify.parser

    math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    math_verify.grader.TIMEOUT_WARNING_SHOWN = True


_REPEATING = re.compile(r"(-?)(\d*)\.(\d*)\\overline\{?(\d+)\}?")
_TRAILING_POINT = re.compile(r"(\d)\.(?!\d)")
_BARE_LETTER_EXPONENT = re.compile(r"\^\s*([A-Za-z])(?![A-Za-z0-9])")
# A whole answer written as text starting with a number: '\text{5 cm}' -> '5 cm'.
_TEXT_NUMBER = re.compile(r"^\s*\\(?:text|textbf|textrm|mathrm|mbox)\{\s*([-+]?\d[^{}]*)\}\s*$")


def _repeating_to_frac(m: re.Match) -> str:
    # a.b(rrr repeating) = (abr - ab) / (10^len(b) * (10^len(r) - 1)), exactly
    sign, whole, fixed, rep = m.groups()
    num = int(whole + fixed + rep or "0") - int(whole + fixed or "0")
    den = (10 ** len(rep) - 1) * 10 ** len(fixed)
    return f"{sign}\\frac{{{num}}}{{{den}}}"


def _parse(answer: str) -> list:
    """math-verify's parse of one answer string: a list of sympy objects, [] if unreadable."""
    # Deferred import: math_verify pulls in sympy, which a process that only runs the pool
    # (the parent) does not need.
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    _quiet_math_verify()
    # Rewrites for what math-verify misreads, both exact: repeating decimals 0.\overline{3}
    # (unread) become fractions; a number with a trailing point '-1./3' (read as -1!) loses it.
    answer = _TRAILING_POINT.sub(r"\1", _REPEATING.sub(_repeating_to_frac, answer))
    # Unwrap a number-with-unit written as text (math-verify strips units only outside \text),
    # and spell the empty set one way.
    answer = _TEXT_NUMBER.sub(r"\1", answer).replace("\\varnothing", "\\emptyset")
    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    # The answer is wrapped in \boxed{} so math-verify takes it whole rather than searching it.
    # fallback_mode='no_fallback': math-verify's string fallback is the text its regex matched,
    # sometimes cut short ('f = g' -> 'f ='), and comparing those strings would pass 'f = h';
    # exact textual equality is checked separately (_normalise_text) on the whole answers.
    # parsing_timeout=None: our own alarm (verify) bounds the whole call instead.
    # Last resort for 'e^e' (unread): brace a bare one-letter exponent. Only as a retry, since
    # math-verify reads '2^10' as 2^{10}, as writers mean it, not as LaTeX's 2^{1}0.
    retry = _BARE_LETTER_EXPONENT.sub(r"^{\1}", answer)
    for text in dict.fromkeys((answer, retry)):
        for wrapped in ("\\boxed{" + text + "}", "$" + text + "$"):
            parsed = parse(wrapped, extraction_config=config, fallback_mode="no_fallback",
                           parsing_timeout=None)
            if parsed:
                return parsed
    return []


def _compare(gold_parsed, pred_parsed) -> bool:
    from math_verify import verify as mv_verify

    # allow_set_relation_comp: an answer "x \ge 3" equals the gold interval "[3, \infty)".
    return bool(mv_verify(gold_parsed, pred_parsed, allow_set_relation_comp=True,
                          timeout_seconds=None))


def _check(answer: str | None, golds: list[str], mode: str) -> VerifyResult:
    """Score an extracted answer (None: there was none) against normalised gold answers."""
    if answer is None:
        return VerifyResult(0.0, "no_answer", None, "no final answer found" +
                            (" (no \\boxed{})" if mode == "boxed" else ""))
    refused = refuse_reason(answer)
    if refused is not None:
        return VerifyResult(0.0, "parse_failure", answer[:200], refused)
    norm = _normalise_text(answer)
    if any(norm and norm == _normalise_text(g) for g in golds):
        return VerifyResult(1.0, "correct", answer)
    pred = _parse(answer)
    if not pred:
        return VerifyResult(0.0, "parse_failure", answer, "math-verify could not parse the answer")
    unparsed_golds = 0
    for g in golds:
        gold_parsed = _parse(g)
        if not gold_parsed:
            unparsed_golds += 1  # such a gold can only match textually (checked above)
        elif _compare(gold_parsed, pred):
            return VerifyResult(1.0, "correct", answer)
    note = f"{unparsed_golds} gold answer(s) not parseable, compared as text" if unparsed_golds else ""
    return VerifyResult(0.0, "mismatch", answer, note)


def _on_alarm(signum, frame):
    raise _ItemTimeout()


def verify(response: str, gold: Gold, *, timeout_s: float = 5.0, mode: str = "boxed") -> VerifyResult:
    """Check one response against its gold answer(s) in this process.

    Args:
      response: the model's output text (untrusted).
      gold: the gold answer: str, int, float or a list of them (any match counts); see
        gold_answers for the accepted formats.
      timeout_s: wall-clock limit for extraction, parsing and comparison together. Enforced by
        a SIGALRM timer, so this must run in the main thread (RuntimeError otherwise), and a
        computation stuck inside C code is only interrupted when it returns; use Verifier /
        verify_batch for hard isolation. The SIGALRM handler is restored afterwards, but the
        process's ITIMER_REAL timer is left disarmed.
      mode: 'boxed' (the last \\boxed{}) or 'final_number' (the '#### N' answer or last number).
    Returns:
      VerifyResult with reward 1.0 / 0.0 and a reason in REASONS. Bad gold input is reported as
      reason 'error' rather than raised, so one bad row cannot stop a training step.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            "scope_jax.verifiers.math.verify needs the main thread (its time limit is a SIGALRM "
            "timer); from other threads use Verifier / verify_batch, which run a process pool")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    try:
        golds = gold_answers(gold)
    except (TypeError, ValueError) as e:
        return VerifyResult(0.0, "error", None, f"bad gold answer: {e}")
    answer = None
    old = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            answer = extract_answer(response, mode)
            return _check(answer, golds, mode)
        finally:
            # Disarm inside the try, so an alarm landing here is still caught below.
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _ItemTimeout:
        return VerifyResult(0.0, "timeout", answer if answer is None else answer[:200],
                            f"verification took longer than {timeout_s} s")
    except Exception as e:  # anything sympy raises on odd input: score 0, keep the step going
        return VerifyResult(0.0, "error", answer if answer is None else answer[:200],
                            f"{type(e).__name__}: {e}"[:300])
    finally:
        signal.signal(signal.SIGALRM, old)
