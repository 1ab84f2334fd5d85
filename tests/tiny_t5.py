"""A tiny T5 v1.1-like encoder (gated GELU, relative position buckets) and a T5 tokenizer built offline.

The tokenizer is transformers' T5Tokenizer (a `tokenizers` Unigram model behind it) over a small vocabulary of
whole words and single characters, ids 0/1/2 = <pad>/</s>/<unk> as in T5's SentencePiece model, no sentinels.
"""

from pathlib import Path

from sdrt.bench.fixtures import CORPUS_WORDS

T5_WIDTH = 96  # wider than both CLIPs side by side (80), as in SD 3.5 / FLUX: 4096 (T5-XXL d_model)
LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789,.!?-'"


def t5_vocab() -> list[tuple[str, float]]:
    """(piece, log-probability) pairs: specials, the word-start mark, words (likelier than their letters), letters."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    words = sorted({w.lower() for w in CORPUS_WORDS})
    pieces += [("\u2581" + w, -3.0 - 0.01 * i) for i, w in enumerate(words)]
    pieces += [(w, -6.0 - 0.01 * i) for i, w in enumerate(words)]
    pieces += [(c, -10.0 - 0.01 * i) for i, c in enumerate(LETTERS) if c not in words]
    pieces += [("\u2581" + c, -11.0 - 0.01 * i) for i, c in enumerate(LETTERS) if c not in words]
    return pieces


def write_tiny_t5_tokenizer(folder: Path):
    """Save a T5Tokenizer (tokenizer.json + configs) to FOLDER and return it."""
    from transformers import T5Tokenizer

    tokenizer = T5Tokenizer(vocab=t5_vocab(), extra_ids=0)
    tokenizer.save_pretrained(folder)
    return T5Tokenizer.from_pretrained(folder)


def tiny_t5_encoder(vocab_size: int, width: int = T5_WIDTH, layers: int = 2):
    """T5EncoderModel with T5 v1.1's gated GELU feed-forward and relative attention buckets (T5-XXL: 24 layers)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=width,
        d_kv=8,
        d_ff=40,
        num_layers=layers,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
    )
    return T5EncoderModel(config)
