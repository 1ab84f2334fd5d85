"""A1111's prompt styles: a styles.csv (columns name, prompt, negative_prompt; an old file's `text` for prompt),
applied to a request's prompts as A1111's modules/styles.py does: a style text holding "{prompt}" has it replaced
by the prompt, any other is appended after ", " (empty parts dropped); styles apply in the order given."""

import csv
import sys
from dataclasses import dataclass
from pathlib import Path

from sdrt.errors import InvalidOption, SdrtError

NO_STYLE = "None"  # A1111's placeholder name: no style
MAX_STYLES_BYTES = 16 * 2**20  # a styles file is text; refuse an absurd one before reading it


@dataclass(frozen=True)
class PromptStyle:
    name: str
    prompt: str
    negative_prompt: str


def merge_prompts(style_text: str, prompt: str) -> str:
    """One style's text applied to PROMPT (A1111's merge_prompts)."""
    if "{prompt}" in style_text:
        return style_text.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style_text.strip()) if part)


class StyleDatabase:
    """The styles of one styles.csv, by name; `warnings` names each row skipped and why."""

    def __init__(self, path=None):
        self.path = None if path is None else Path(path)
        self.styles: dict[str, PromptStyle] = {}
        self.warnings: list[str] = []
        self.reload()

    def reload(self) -> None:
        self.styles, self.warnings = {}, []
        if self.path is None:
            return
        if not self.path.is_file():
            raise SdrtError(f"styles file {str(self.path)!r} does not exist")
        if self.path.stat().st_size > MAX_STYLES_BYTES:
            raise SdrtError(f"styles file {str(self.path)!r} is over {MAX_STYLES_BYTES} bytes")
        with open(self.path, encoding="utf-8-sig", errors="replace", newline="") as file:
            reader = csv.DictReader(file, skipinitialspace=True)
            try:
                for row in reader:
                    self.add_row(row, reader.line_num)
            except csv.Error as e:
                self.warn(f"{self.path.name} line {reader.line_num}: unreadable CSV ({e}); rows after it skipped")

    def add_row(self, row: dict, line: int) -> None:
        """One CSV row, or a warning naming it (line number, name) and why it is skipped."""
        name = (row.get("name") or "").strip()
        prompt = row.get("prompt", row.get("text"))
        negative = row.get("negative_prompt") or ""
        where = f"{self.path.name} line {line}" + (f" ({name!r})" if name else "")
        if not name:
            return self.warn(f"{where}: no name; row skipped")
        if prompt is None:
            return self.warn(f"{where}: no prompt column (name, prompt, negative_prompt); row skipped")
        if None in row:  # more fields than the header has
            return self.warn(f"{where}: {len(row[None])} fields more than the header; row skipped")
        self.styles[name] = PromptStyle(name, prompt, negative)

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        print(f"sdrt serve: warning: styles: {text}", file=sys.stderr, flush=True)

    def listing(self) -> list[dict]:
        """A1111's PromptStyleItem list."""
        return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt}
                for s in self.styles.values()]  # fmt: skip

    def apply(self, prompt: str, negative_prompt: str, names) -> tuple[str, str]:
        """(prompt, negative prompt) with the styles NAMES applied in order; an unknown name is an InvalidOption
        listing the styles that exist ("None" is no style, as in A1111)."""
        for i, name in enumerate(names or ()):
            if name == NO_STYLE:
                continue
            style = self.styles.get(name)
            if style is None:
                known = ", ".join(repr(n) for n in self.styles) or "none: the server has no styles file (--styles-file)"
                raise InvalidOption(f"styles[{i}]", name, f"a style of the server: {known}")
            prompt = merge_prompts(style.prompt, prompt)
            negative_prompt = merge_prompts(style.negative_prompt, negative_prompt)
        return prompt, negative_prompt
