"""ClipTokenizer against transformers' CLIPTokenizer on a tiny learned CLIP vocabulary: identical ids."""

import collections
import copy
import json

import numpy as np
import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from sdrt.runtime.tokenizer import ClipTokenizer

CORPUS = """
a photo of an astronaut riding a horse on the moon, highly detailed, 4k, 8k, trending on artstation!!!
portrait of a beautiful woman with red hair, oil painting by greg rutkowski, masterpiece, best quality
a cat sitting on a table in the kitchen, photorealistic, cinematic lighting, sharp focus, hdr (1.2)
don't it's we're they've i'm you'll he'd what's that's isn't <|startoftext|> <|endoftext|> ... ??? !!!
café naïve résumé über straße ΑΣ δ東京タワー 日本語 😀👍 1234567890 the the the and and of of
zzz zzzz oooo ooo zzzzzz
"""
S, E = "<|startoftext|>", "<|endoftext|>"

TEXTS = [
    "",
    " ",
    "\t\n  \r\n ",
    "a photo of an astronaut riding a horse on the moon",
    "A PHOTO Of An ASTRONAUT, Highly Detailed",
    "Hello,   World!!  How's it going?",
    "don't it's we're they've I'm you'll he'd 'S 'T 'RE '' 'x ''s",
    "1234567890 3.14159 4k 8K 1080p 2x2 -12 +3e5",
    "(masterpiece:1.2), [best quality]; {a|b} <lora:foo:0.8> #tag @user ~!@#$%^&*()_+-=`",
    "café naïve résumé über STRASSE straße",
    "cafe\u0301 nai\u0308ve re\u0301sume\u0301",  # NFD input, NFC'd by the normalizer
    "東京タワー 日本語のテキスト 한국어 텍스트",
    "😀👍🏽👨\u200d👩\u200d👧 🇫🇷 emoji!!",
    "ΑΣ ὈΔΥΣΣΕΎΣ σοφός",  # per-character lowercase: no final sigma
    "İstanbul ǅ Ǆ ß ẞ ﬁ",  # lowercase that changes length
    "Ａｂｃ１２３ ½ ² ٣",  # fullwidth and other numbers, no NFKC
    "x\u0301\u0316\u0345 a\u0345\u0301",  # combining marks reordered by NFC
    "e\u0301\u1715 \U00011935\U00011930 a\u0345\u0d3b",  # marks tokenizers' (Unicode 9) NFC does not know
    "\u00a0non\u2009breaking\u3000spaces\u2028and\u0085lines",
    "\x1c\x1d\x1e\x1f\u200b",  # whitespace to Python's str.isspace, not to tokenizers
    f"{S}a cat{E}",
    f"a{E}b {E} c{E}{E}",
    "<|STARTOFTEXT|> <|EndOfText|> <|startoftext| |endoftext|>",
    "!!! hello!! ! ! !wow!",
    "!!!!!! oooooo oooo ooooooo zzzzzzzz zzz",  # equal-rank pairs: the leftmost merges first
    "a photo of a cat, " * 20,  # > 77 tokens: truncated
    "x" * 300,  # one long word
    " ".join(str(i) for i in range(120)),
]


def learn_merges(text: str, count: int) -> list[tuple[str, str]]:
    """Plain BPE training on byte-level words (each word's last symbol carries </w>)."""
    byte_chars = bytes_to_unicode()
    words = collections.Counter()
    for word in regex.findall(r"\p{L}+|\p{N}|[^\s\p{L}\p{N}]+", text.lower()):
        symbols = [byte_chars[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        words[tuple(symbols)] += 1
    merges = []
    for _ in range(count):
        pairs = collections.Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged = collections.Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i : i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return merges


def added(content, normalized=True):
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": normalized}


def write_legacy(folder, vocab, merges, pad, tokens=None):
    """A diffusers-style tokenizer folder (as on the Hub for SD 1.x / 2.x): vocab, merges and two configs."""
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokens = tokens or {"bos_token": added(S), "eos_token": added(E), "unk_token": added(E), "pad_token": pad}
    config = {"model_max_length": 77, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True, **tokens}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps(tokens))
    return folder


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """name -> (transformers CLIPTokenizer, ClipTokenizer) loaded from the same folder."""
    root = tmp_path_factory.mktemp("clip_tok")
    merges = learn_merges(CORPUS, 300)
    chars = list(bytes_to_unicode().values())  # "!" first, as in CLIP
    tokens = [*chars, *(c + "</w>" for c in chars), *(a + b for a, b in merges), S, E]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    folders = {
        "sd1": write_legacy(root / "sd1", vocab, merges, E),
        "sd2": write_legacy(root / "sd2", vocab, merges, "!"),  # SD 2.x pads with "!" (id 0)
        "bare": write_legacy(root / "bare", vocab, merges, E),
        # eos, unk and pad share a content but disagree on "normalized": transformers' own merge rule decides
        "mixed": write_legacy(
            root / "mixed",
            vocab,
            merges,
            None,
            {"bos_token": S, "eos_token": added(E), "unk_token": added(E, False), "pad_token": added(E)},
        ),
    }
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (folders["bare"] / name).unlink()
    for name in ("sd1", "sd2"):  # transformers 5 saves tokenizer.json + tokenizer_config.json only
        CLIPTokenizer.from_pretrained(folders[name]).save_pretrained(root / f"{name}_saved")
        folders[f"{name}_saved"] = root / f"{name}_saved"
    assert not (folders["sd1_saved"] / "vocab.json").exists()
    return {
        name: (CLIPTokenizer.from_pretrained(folder), ClipTokenizer.from_dir(folder))
        for name, folder in folders.items()
    }


LAYOUTS = ["sd1", "sd2", "bare", "mixed", "sd1_saved", "sd2_saved"]


def reference(hf, texts, max_length=77):
    return np.array(hf(texts, padding="max_length", max_length=max_length, truncation=True).input_ids, dtype=np.int64)


@pytest.mark.parametrize("name", LAYOUTS)
def test_encode_matches_transformers(layouts, name):
    hf, ours = layouts[name]
    for text in TEXTS:
        assert ours.encode(text) == hf(text, add_special_tokens=False).input_ids, repr(text)


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("max_length", [None, 77, 16])
def test_batch_matches_transformers(layouts, name, max_length):
    hf, ours = layouts[name]
    got = ours(TEXTS, max_length=max_length)
    assert got.dtype == np.int64 and got.shape == (len(TEXTS), max_length or 77)
    np.testing.assert_array_equal(got, reference(hf, TEXTS, max_length or 77))


@pytest.mark.parametrize("name", LAYOUTS)
def test_special_ids_match_transformers(layouts, name):
    hf, ours = layouts[name]
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    assert ours.max_length == 77


def test_sd2_pads_with_exclamation_mark_and_splits_it_out(layouts):
    """pad "!" is an added token: every "!" in the prompt becomes id 0, never merged into "!!" pieces."""
    _, sd1 = layouts["sd1"]
    hf, sd2 = layouts["sd2"]
    assert sd2.pad_id == 0 and sd1.pad_id == sd1.eos_id
    assert sd2.encode("wow!!")[-2:] == [0, 0] == hf("wow!!", add_special_tokens=False).input_ids[-2:]
    assert sd1.encode("wow!!") != sd2.encode("wow!!")
    row = sd2(["a cat"])[0]
    assert row[0] == sd2.bos_id and row[3] == sd2.eos_id and (row[4:] == 0).all()


def test_special_token_flags_follow_the_config(layouts):
    """Hub configs mark <|startoftext|> normalized (so upper case matches too); a bare folder does not."""
    assert layouts["sd1"][1].encode("<|STARTOFTEXT|>") == [layouts["sd1"][1].bos_id]
    assert layouts["bare"][1].encode("<|STARTOFTEXT|>") != [layouts["bare"][1].bos_id]
    assert layouts["sd1"][1].encode("<|ENDOFTEXT|>") != [layouts["sd1"][1].eos_id]


def test_comparison_detects_mistakes(layouts):
    """The reference comparison is sensitive: a wrong pad id or wrong merge order would be caught."""
    hf, ours = layouts["sd2"]
    expected = reference(hf, TEXTS[:4])
    wrong_pad = copy.copy(ours)
    wrong_pad.pad_id = ours.eos_id
    assert not np.array_equal(wrong_pad(TEXTS[:4]), expected)
    merges = sorted(ours.ranks, key=ours.ranks.get)[::-1]
    wrong_merges = ClipTokenizer(ours.vocab, merges, ours.added_tokens, pad_token="!")
    assert not np.array_equal(wrong_merges(TEXTS[:4]), expected)
    np.testing.assert_array_equal(ours(TEXTS[:4]), expected)


def test_single_string_and_single_row(layouts):
    hf, ours = layouts["sd1"]
    np.testing.assert_array_equal(ours("a cat"), reference(hf, ["a cat"]))


# Characters assigned in Python's unicodedata (Unicode 14 on 3.11): the engines agree on all of them.
_chars = st.characters(exclude_categories=("Cs", "Cn"))
_snippets = st.sampled_from([S, E, "'s", "'t", "'re", "!", "!!", " ", "\t", "\n", "\u3000", "\u0301", "A", "1"])
_texts = st.lists(st.one_of(st.text(_chars, max_size=8), _snippets), max_size=12).map("".join)


@settings(max_examples=200, deadline=None)
@given(text=_texts)
def test_fuzz_unicode_matches_transformers(layouts, text):
    for name in ("sd1", "sd2"):
        hf, ours = layouts[name]
        assert ours.encode(text) == hf(text, add_special_tokens=False).input_ids
