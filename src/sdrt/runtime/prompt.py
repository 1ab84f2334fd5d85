"""A1111 prompt syntax as pure text functions: attention weights and prompt-editing schedules.

Both follow AUTOMATIC1111/stable-diffusion-webui `modules/prompt_parser.py` (v1.10) and return what it returns,
output for output, on every input where it returns at all:

- `parse_prompt_attention`: `(x)` multiplies x's weight by 1.1, `[x]` by 1/1.1, `(x:w)` by w (w matching
  `[+-]?[.\\d]+`, spaces allowed around it), `\\( \\) \\[ \\] \\\\` are literal characters, brackets left open
  are closed at the end, the word `BREAK` gives ("BREAK", -1.0), adjacent runs of equal weight merge.
- `prompt_schedules`: `[from:to:when]`, `[to:when]`, `[from::when]` (nestable) switch text after step `when`
  (a number written with a "." is a fraction of the steps), `[a|b|c]` alternates every step; a prompt that
  A1111's grammar rejects (a `|` outside `[...]`, a trailing `\\`) is used as written for all steps.

The schedule grammar is parsed without lark: a single pass matches brackets (prompt editing inside brackets
must nest strictly; at the top level, brackets that do not form a construct are plain text) and the text for
each step is cut from the original string, so both functions run in one pass with no recursion (a 10,000
character prompt of "(" or "[" works). `parse_prompt_attention` multiplies suffixes of a weight array in the
order A1111 does (floating-point products are bit-identical), which costs O(length x bracket depth) in numpy.

Where A1111 raises or returns infinity we keep going and stay finite:
- weights saturate at +-sys.float_info.max instead of overflowing (A1111: inf, or nan for 0 x inf), so every
  weight A1111 returns as a finite number is returned unchanged;
- `(x:1.2.3)` (a weight float() cannot read; A1111: ValueError) reads as text, like `(x:1e3)` does;
- `[x:1e400]` (A1111: OverflowError from int(inf)) switches at the last step, `[x:-1e400]` never.
"""

from __future__ import annotations

import bisect
import re
import sys
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from sdrt.errors import InvalidOption, is_int

ROUND_MULTIPLIER = 1.1  # "(x)"
SQUARE_MULTIPLIER = 1 / 1.1  # "[x]": A1111 multiplies by this constant (not a division by 1.1)
BREAK_WEIGHT = -1.0  # ("BREAK", -1.0) marks a chunk break
TIMELINES = ("new", "old")  # A1111's default and its "use old prompt editing timelines" compatibility option

_MAX_WEIGHT = sys.float_info.max
_ESCAPED = "()[]\\"  # characters that a backslash makes literal in attention syntax
# "(x:w)": the weight closes the innermost "(" (A1111's re_attention weight alternative: Unicode \s and \d).
_WEIGHT_CLOSE = re.compile(r":\s*([+-]?[\d.]+)\s*\)")
_TEXT_RUN = re.compile(r"[^\\()\[\]:]+")
_BREAK_WORD = re.compile(r"\bBREAK\b")
# lark's common.SIGNED_NUMBER, alternatives in lark's order (the lexer takes the first match, not the longest).
_NUMBER = re.compile(r"[+-]?(?:[0-9]+[eE][+-]?[0-9]+|(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+)")
_SPACES = re.compile(r"\s*")
_OPENER = {")": "(", "]": "["}


def _check_text(value) -> str:
    """A prompt must be a str (A1111 would fail somewhere inside re or lark)."""
    if not isinstance(value, str):
        raise InvalidOption("prompt", value, "a string")
    return value


# ---------------------------------------------------------------------------------------------- attention


def _break_parts(run: str) -> list[str]:
    """run split around each whole-word BREAK and the whitespace on both sides (A1111's re_break)."""
    parts, done = [], 0
    for m in _BREAK_WORD.finditer(run):
        start = m.start()
        while start > done and run[start - 1].isspace():  # str.isspace() is re's \s, code point for code point
            start -= 1
        parts.append(run[done:start])
        done = _SPACES.match(run, m.end()).end()
    parts.append(run[done:])
    return parts


def _read_weight(digits: str) -> float | None:
    """The (x:w) weight as float(); None where float() fails ("1.2.3", "."), saturated where it overflows."""
    try:
        value = float(digits)
    except ValueError:
        return None
    return min(max(value, -_MAX_WEIGHT), _MAX_WEIGHT)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """[(text, weight)] of A1111's parse_prompt_attention: () x1.1, [] /1.1, (x:w), escapes, BREAK -> -1.0."""
    text = _check_text(text)
    pieces: list[str] = []
    weights = np.ones(len(text) + 1)  # (entries,) float64; a piece takes at least one character
    rounds: list[int] = []  # index of the first piece inside each open "(", innermost last
    squares: list[int] = []

    def close(start: int, multiplier: float) -> None:
        """Multiply the weights of every piece since `start` (A1111's multiply_range), saturating."""
        if start == len(pieces):
            return
        span = weights[start : len(pieces)]
        if abs(multiplier) <= 1:  # cannot overflow
            span *= multiplier
            return
        with np.errstate(over="ignore"):
            span *= multiplier
        np.clip(span, -_MAX_WEIGHT, _MAX_WEIGHT, out=span)

    def add_text(run: str) -> None:
        for k, part in enumerate(_break_parts(run)):
            if k:
                weights[len(pieces)] = BREAK_WEIGHT
                pieces.append("BREAK")
            pieces.append(part)

    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            escaped = text[i + 1 : i + 2]
            literal = escaped if escaped and escaped in _ESCAPED else ""  # a lone backslash yields ""
            pieces.append(literal)
            i += 1 + len(literal)
        elif c == "(":
            rounds.append(len(pieces))
            i += 1
        elif c == "[":
            squares.append(len(pieces))
            i += 1
        elif c == ":":
            m = _WEIGHT_CLOSE.match(text, i)
            if m is None:
                add_text(":")
                i += 1
            elif not rounds:
                add_text(m.group(0))  # ":1.2)" with no "(" open is text
                i = m.end()
            elif (weight := _read_weight(m.group(1))) is None:
                add_text(":")  # "(x:1.2.3)": the ":" and what follows are text
                i += 1
            else:
                close(rounds.pop(), weight)
                i = m.end()
        elif c == ")" or c == "]":
            stack = rounds if c == ")" else squares
            if stack:
                close(stack.pop(), ROUND_MULTIPLIER if c == ")" else SQUARE_MULTIPLIER)
            else:
                add_text(c)
            i += 1
        else:
            m = _TEXT_RUN.match(text, i)
            add_text(m.group(0))
            i = m.end()
    for start in rounds:  # unclosed brackets, outermost first, rounds before squares
        close(start, ROUND_MULTIPLIER)
    for start in squares:
        close(start, SQUARE_MULTIPLIER)
    if not pieces:
        return [("", 1.0)]
    merged: list[tuple[str, float]] = []
    for piece, weight in zip(pieces, weights[: len(pieces)].tolist(), strict=True):
        if merged and merged[-1][1] == weight:  # == as A1111: -0.0 joins 0.0, keeping the first weight
            merged[-1] = (merged[-1][0] + piece, merged[-1][1])
        else:
            merged.append((piece, weight))
    return merged


# ---------------------------------------------------------------------------------------- prompt editing


@dataclass
class _Frame:
    """An open "(" or "[" while matching brackets: its separators at depth 1 and whether it can still parse."""

    start: int
    kind: str
    colons: list[int]
    pipes: list[int]
    ok: bool = True


@dataclass(frozen=True)
class _Edit:
    """A parsed [from:to:when] (when set) or [a|b|...] (options set); regions are (start, end) of the text."""

    end: int  # index of the closing "]"
    before: tuple[int, int] | None = None
    after: tuple[int, int] | None = None
    when: int = 0
    options: tuple[tuple[int, int], ...] = ()

    def region(self, step: int) -> tuple[int, int]:
        """The text this construct stands for at `step` (1-based): A1111's AtStep transformer."""
        if self.options:
            return self.options[(step - 1) % len(self.options)]
        if step <= self.when:
            return self.before or (0, 0)
        return self.after


def _when(number: str, steps: int, timeline: str) -> int:
    """A1111's switch step: a number with "." is a fraction of steps (old timeline: any number < 1), else a step."""
    value = float(number)
    if timeline == "old":
        value = value * steps if value < 1 else value
    elif "." in number:
        value *= steps
    if value >= steps:  # also inf, where A1111's int() raises
        return steps
    return int(value) if value >= 1 else 0  # below 1 never switches, as A1111's int(value) <= 0 does


def _close_square(frame: _Frame, end: int, text: str, steps: int, timeline: str) -> _Edit | bool:
    """The construct "[...]" ending at `end`: an _Edit, True for plain emphasis "[x]", False if it cannot parse."""
    colons, pipes = frame.colons, frame.pipes
    if pipes:
        if colons:
            return False
        return _Edit(end, options=tuple((a + 1, b) for a, b in pairwise([frame.start, *pipes, end])))
    if not colons:
        return True
    if len(colons) > 2:
        return False
    # ":" [WHITESPACE] NUMBER [WHITESPACE] "]", NUMBER being the lexer's one match at that position
    number = _NUMBER.match(text, _SPACES.match(text, colons[-1] + 1).end())
    if number is None or _SPACES.match(text, number.end()).end() != end:
        return False
    before = (frame.start + 1, colons[0]) if len(colons) == 2 else None
    after = (colons[-2] + 1 if len(colons) == 2 else frame.start + 1, colons[-1])
    return _Edit(end, before=before, after=after, when=_when(number.group(0), steps, timeline))


def _parse_edits(text: str, steps: int, timeline: str) -> dict[int, _Edit] | None:
    """Start index -> _Edit for every editing construct of A1111's schedule grammar; None if it rejects text."""
    edits: dict[int, _Edit] = {}
    stack: list[_Frame] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":  # plain text escapes any character but a newline; nothing else takes a backslash
            if i + 1 == n or text[i + 1] == "\n":
                return None
            i += 2
            continue
        if c == "(" or c == "[":
            stack.append(_Frame(i, c, [], []))
        elif c == ")" or c == "]":
            if stack and stack[-1].kind == _OPENER[c]:
                frame = stack.pop()
                parsed: _Edit | bool = False
                if frame.ok and c == "]":
                    parsed = _close_square(frame, i, text, steps, timeline)
                elif frame.ok:
                    parsed = len(frame.colons) <= 1 and not frame.pipes  # "(x)" or "(x:y)"
                if isinstance(parsed, _Edit):
                    edits[frame.start] = parsed
                if not parsed:
                    if frame.pipes:  # a "|" belongs to the innermost bracket, which is no [a|b] here
                        return None
                    if stack:  # inside brackets, every bracket must parse
                        stack[-1].ok = False
            elif stack:  # a stray closer: the innermost open bracket cannot parse (nor, in turn, its parents)
                stack[-1].ok = False
        elif c == ":" and stack:
            stack[-1].colons.append(i)
        elif c == "|":
            if not stack:
                return None
            stack[-1].pipes.append(i)
        i += 1
    if any(frame.pipes for frame in stack):
        return None
    return edits


def _text_at(text: str, edits: dict[int, _Edit], starts: list[int], step: int) -> str:
    """The prompt at `step`: the text with each editing construct replaced by its region for that step."""
    out: list[str] = []
    resume: list[tuple[int, int]] = []  # (position, end) to continue at after a construct's region
    pos, end = 0, len(text)
    while True:
        if pos >= end:
            if not resume:
                return "".join(out)
            pos, end = resume.pop()
            continue
        k = bisect.bisect_left(starts, pos)
        nxt = starts[k] if k < len(starts) else end
        if nxt >= end:
            out.append(text[pos:end])
            pos = end
            continue
        out.append(text[pos:nxt])
        edit = edits[nxt]
        resume.append((edit.end + 1, end))
        pos, end = edit.region(step)


def _schedule(prompt: str, steps: int, timeline: str) -> list[tuple[int, str]]:
    """[(last step, text)] for one prompt: A1111's get_schedule."""
    edits = _parse_edits(prompt, steps, timeline)
    if edits is None:
        return [(steps, prompt)]
    switch = {steps}
    for edit in edits.values():
        if edit.options:
            switch.update(range(1, steps + 1))
            break
    switch.update(edit.when for edit in edits.values() if not edit.options and edit.when >= 1)
    starts = sorted(edits)
    return [(step, _text_at(prompt, edits, starts, step)) for step in sorted(switch)]


def prompt_schedules(prompts: list[str], steps: int, timeline: str = "new") -> list[list[tuple[int, str]]]:
    """Per prompt, [(last step, text)]: A1111's get_learned_conditioning_prompt_schedules(prompts, steps)."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise InvalidOption("prompts", prompts, "a list of strings")
    if not is_int(steps) or steps < 1:
        raise InvalidOption("steps", steps, "an integer >= 1")
    if timeline not in TIMELINES:
        raise InvalidOption("timeline", timeline, " or ".join(map(repr, TIMELINES)))
    cache: dict[str, list[tuple[int, str]]] = {}
    for prompt in prompts:
        if _check_text(prompt) not in cache:
            cache[prompt] = _schedule(prompt, int(steps), timeline)
    return [list(cache[prompt]) for prompt in prompts]
