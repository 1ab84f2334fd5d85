"""Pure-Python CLIP BPE tokenizer giving the same ids as transformers' (tokenizers-backed) CLIPTokenizer."""

from __future__ import annotations

import functools
import json
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import regex

# The regex package's \s (Unicode White_Space) is exactly Oniguruma's, the engine of HF tokenizers; the
# stdlib re's \s would also match \x1c-\x1f.
_WS_RUN = regex.compile(r"\s+")

# tokenizers' NFC uses Unicode 9.0 tables, so to it the characters below (added later, with a non-zero
# combining class or taking part in a composition; through Unicode 17) are plain starters that never
# reorder or compose. Python's NFC knows them, so the text is cut at them and each part normalized alone.
_NFC_UNKNOWN = (
    "5C8-5C9 7FD 897-89F 8CA-8D3 9FE C3C D3B-D3C EBA 1715 1ABF-1AF0 1DF6-1DFA A82C 105C9 105E4 "
    "10D24-10D27 10D69-10D6D 10EAB-10EAC 10ECB-10ECF 10EF0-10EFB 10EFD-10EFF 10F46-10F50 10F82-10F85 "
    "11070 1133B 11383 11385 1138E 11391 113B8 113BB 113C2 113C5 113C7-113C9 113CE-113D0 1145E "
    "11839-1183A 11930 11938 1193D-1193E 11943 119E0 11A34 11A47 11A99 11D42 11D44-11D45 11D97 "
    "11F41-11F42 1611E-16129 1612F 16D67-16D6A 16FF0-16FF1 1D127-1D128 1D250-1D252 1D25B-1D25C 1D25F "
    "1D280-1D281 1E08F 1E130-1E136 1E2AE 1E2EC-1E2EF 1E4EC-1E4EF 1E5EE-1E5EF 1E6E3 1E6E6 1E6EE-1E6EF "
    "1E6F5"
)
_NFC_BARRIER = regex.compile(
    "([" + regex.sub(r"[0-9A-F]+", lambda m: chr(int(m[0], 16)), _NFC_UNKNOWN).replace(" ", "") + "])"
)


# CLIP pre-tokenizer: the matches are kept, everything else (whitespace) is dropped. \p{L}/\p{N} come from
# the regex package's Unicode tables, tokenizers' Oniguruma may know fewer (newest) characters.
_CLIP_PAT = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+")
# The ByteLevel pre-tokenizer then splits each piece with the GPT-2 pattern; CLIP pieces hold no whitespace,
# so this only changes "<|startoftext|>"-like pieces (into "<|", "startoftext", "|>").
_GPT2_PAT = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+")
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_UNSET_MAX_LENGTH = 1_000_000  # transformers writes int(1e30) when model_max_length is unknown


def _byte_to_unicode() -> list[str]:
    """GPT-2 byte-level alphabet: printable latin-1 bytes map to themselves, the rest to chr(256 + n)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table, extra = [], 0
    for b in range(256):
        if b in printable:
            table.append(chr(b))
        else:
            table.append(chr(256 + extra))
            extra += 1
    return table


_BYTE_CHARS = _byte_to_unicode()


def _nfc(text: str) -> str:
    """NFC as tokenizers computes it (see _NFC_UNKNOWN)."""
    parts = _NFC_BARRIER.split(text)
    parts[::2] = [unicodedata.normalize("NFC", part) for part in parts[::2]]
    return "".join(parts)


def _normalize(text: str) -> str:
    """NFC, whitespace runs -> one space, per-character lowercase (no final-sigma rule, like Rust)."""
    # str.lower follows Python's Unicode tables: characters newer than them (Unicode 15+ on Python 3.11)
    # may lowercase differently from Rust's; everything older matches.
    if text.isascii():
        return _WS_RUN.sub(" ", text).lower()
    return "".join(c.lower() for c in _WS_RUN.sub(" ", _nfc(text)))


def _token_spec(value, from_special_map: bool):
    """(content, normalized, hashable identity) of a special token given as a string or an AddedToken dict."""
    if isinstance(value, str):
        return value, False, ("str", value)
    special = True if from_special_map else bool(value.get("special", False))
    normalized = bool(value.get("normalized", not special))
    if any(value.get(k) for k in ("lstrip", "rstrip", "single_word")):
        raise ValueError(f"added token {value['content']!r}: lstrip/rstrip/single_word are not supported")
    return value["content"], normalized, ("added", value["content"], normalized, special)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


class ClipTokenizer:
    """CLIP byte-level BPE tokenizer (normalizer, pre-tokenizer, BPE and special tokens of CLIPTokenizer)."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        added_tokens: dict[str, tuple[int, bool]],
        bos_token: str = "<|startoftext|>",
        eos_token: str = "<|endoftext|>",
        pad_token: str = "<|endoftext|>",
        unk_token: str = "<|endoftext|>",
        max_length: int = 77,
    ):
        """added_tokens maps content -> (id, normalized); normalized ones are matched after normalization."""
        self.vocab = vocab
        self.ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        self.added_tokens = added_tokens
        ids = {**vocab, **{t: i for t, (i, _) in added_tokens.items()}}
        self.bos_id, self.eos_id, self.pad_id = ids[bos_token], ids[eos_token], ids[pad_token]
        self.unk_id = ids.get(unk_token)
        self.max_length = max_length
        self._raw_pat = self._alternation([t for t, (_, norm) in added_tokens.items() if not norm])
        self._norm_pat = self._alternation([t for t, (_, norm) in added_tokens.items() if norm])
        self._bpe = functools.lru_cache(maxsize=1 << 16)(self._bpe_uncached)

    @staticmethod
    def _alternation(tokens: list[str]):
        """Regex finding the leftmost-longest occurrence of any of tokens (None if there are none)."""
        if not tokens:
            return None
        return regex.compile("|".join(regex.escape(t) for t in sorted(tokens, key=len, reverse=True)))

    @classmethod
    def from_dir(cls, path) -> ClipTokenizer:
        """Load vocab.json + merges.txt (or tokenizer.json) and the special tokens of a tokenizer folder."""
        path = Path(path)
        config = _read_json(path / "tokenizer_config.json")
        tok_json = _read_json(path / "tokenizer.json")
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            vocab = _read_json(path / "vocab.json")
            lines = (path / "merges.txt").read_text(encoding="utf-8").splitlines()
            merges = [tuple(ln.split(" ")) for ln in lines if ln and not ln.startswith("#version")]
        elif tok_json:
            vocab = tok_json["model"]["vocab"]
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in tok_json["model"]["merges"]]
        else:
            raise FileNotFoundError(f"{path}: need vocab.json + merges.txt or tokenizer.json")

        # Token flags follow transformers 5 loading: an explicit added_tokens_decoder wins, otherwise the
        # legacy special_tokens_map.json overrides tokenizer_config.json and tokenizer.json adds its list.
        named = {k: config[k] for k in _SPECIAL_NAMES if config.get(k) is not None}
        explicit: dict[str, tuple[int, bool]] = {}
        if "added_tokens_decoder" in config:
            for idx, tok in config["added_tokens_decoder"].items():
                explicit[tok["content"]] = (int(idx), _token_spec(tok, False)[1])
            from_map = set()
        else:
            special_map = _read_json(path / "special_tokens_map.json")
            from_map = {k for k in _SPECIAL_NAMES if special_map.get(k) is not None}
            named.update({k: special_map[k] for k in from_map})
            for tok in tok_json.get("added_tokens", []):
                explicit[tok["content"]] = (tok["id"], _token_spec(tok, False)[1])
        defaults = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>"}
        defaults |= {"unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
        named = {**defaults, **named}

        # Named tokens not listed above are added in _SPECIAL_NAMES order, skipping exact duplicates; when
        # several differ only in flags, the last one added decides whether the token is matched normalized.
        added = dict(explicit)
        seen = []
        for name in _SPECIAL_NAMES:
            if name not in named:
                continue
            content, normalized, identity = _token_spec(named[name], name in from_map)
            if content in explicit or identity in seen:
                continue
            seen.append(identity)
            token_id = vocab.get(content, added.get(content, (None,))[0])
            if token_id is None:  # not in the vocabulary: appended after it
                token_id = max([*vocab.values(), *(i for i, _ in added.values())]) + 1
            added[content] = (token_id, normalized)

        max_length = config.get("model_max_length", 77)
        if not isinstance(max_length, int) or max_length > _UNSET_MAX_LENGTH:
            max_length = 77
        tokens = {k: _token_spec(named[k], False)[0] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        return cls(vocab, merges, added, max_length=max_length, **tokens)

    def _bpe_uncached(self, word: str) -> tuple[int, ...]:
        """BPE-merge one byte-level word: always the lowest-rank adjacent pair first, leftmost on ties."""
        symbols = list(word)
        symbols[-1] += "</w>"
        while len(symbols) > 1:
            best_rank, best_i = None, -1
            for i in range(len(symbols) - 1):
                rank = self.ranks.get((symbols[i], symbols[i + 1]))
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best_i = rank, i
            if best_rank is None:
                break
            symbols[best_i : best_i + 2] = [symbols[best_i] + symbols[best_i + 1]]
        ids = tuple(self.vocab.get(s, self.unk_id) for s in symbols)
        if None in ids:
            raise KeyError(f"unknown piece in {word!r} and the tokenizer has no unk token")
        return ids

    @staticmethod
    def _split(text: str, pat) -> list[tuple[str, bool]]:
        """Cut text around matches of pat: [(piece, is_added_token), ...]."""
        if pat is None:
            return [(text, False)]
        out, pos = [], 0
        for m in pat.finditer(text):
            out += [(text[pos : m.start()], False), (m.group(), True)]
            pos = m.end()
        out.append((text[pos:], False))
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of text, without BOS/EOS."""
        ids: list[int] = []
        # Non-normalized added tokens are found in the raw text, the normalized ones in each normalized gap.
        for raw, is_raw_added in self._split(text, self._raw_pat):
            if is_raw_added:
                ids.append(self.added_tokens[raw][0])
                continue
            for piece, is_added in self._split(_normalize(raw), self._norm_pat):
                if is_added:
                    ids.append(self.added_tokens[piece][0])
                    continue
                for word in _CLIP_PAT.findall(piece):
                    for sub in _GPT2_PAT.findall(word):
                        ids.extend(self._bpe("".join(_BYTE_CHARS[b] for b in sub.encode("utf-8"))))
        return ids

    def __call__(self, texts: list[str], max_length: int | None = None) -> np.ndarray:
        """(B, max_length) int64 ids: BOS + ids truncated to max_length - 2 + EOS, then right padding."""
        if isinstance(texts, str):
            texts = [texts]
        n = max_length or self.max_length
        out = np.full((len(texts), n), self.pad_id, dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.bos_id, *self.encode(text)[: n - 2], self.eos_id]
            out[row, : len(ids)] = ids
        return out
