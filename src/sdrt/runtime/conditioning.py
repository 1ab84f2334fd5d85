"""Prompts -> UNet text conditioning, built as A1111 builds it (modules/sd_hijack_clip.py, sd_emphasis.py).

A prompt is parsed for emphasis (prompt.parse_prompt_attention), tokenized, and cut into chunks of 75 tokens:
at BREAK, and at the last comma when one lies within 20 tokens of the cut. Each chunk is encoded as
BOS + 75 + EOS by every text encoder of the model; the chosen layer is weighted token by token (A1111's
"Original" emphasis restores the mean afterwards), and the chunks are concatenated to (N, 77 k, C).
With several encoders (SDXL) each does this on its own and the results are concatenated along C.
"""

from dataclasses import dataclass, field

import numpy as np

from sdrt.errors import InvalidOption, check_int
from sdrt.runtime.embeddings import Embedding, EmbeddingDB
from sdrt.runtime.prompt import parse_prompt_attention
from sdrt.runtime.tokenizer import ClipTokenizer

CHUNK_TOKENS = 75  # prompt tokens per chunk; BOS and EOS make it 77
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default
# A1111's emphasis modes: "Original" weights then restores the mean, "No norm" only weights, "None" ignores
# the syntax (the prompt is read as plain text).
EMPHASES = ("Original", "No norm", "None")
MAX_CLIP_SKIP = 12  # A1111's slider maximum
MAX_WEIGHT = 1e4  # emphasis weights are clipped to +-this: the parser saturates at 1.8e308, beyond float32


@dataclass
class Chunk:
    """One 77-token window of a prompt (A1111's PromptChunk)."""

    ids: list[int] = field(default_factory=list)  # 77: BOS, tokens (0 under embedding vectors), EOS padding, EOS
    weights: list[float] = field(default_factory=list)  # one emphasis multiplier per id
    fixes: list[tuple[int, Embedding]] = field(default_factory=list)  # (offset after BOS, embedding placed there)


def chunk_prompt(text: str, tokenizer: ClipTokenizer, embeddings: EmbeddingDB, emphasis: str = "Original"):
    """A1111's tokenize_line: (chunks of 77 ids with weights, token count)."""
    text = embeddings.resolve_references(text)
    parsed = parse_prompt_attention(text) if emphasis != "None" else [(text, 1.0)]
    comma = tokenizer.vocab.get(",</w>")
    chunks: list[Chunk] = []
    chunk = Chunk()
    state = {"count": 0, "last_comma": -1}

    def close(is_last: bool = False) -> None:
        nonlocal chunk
        state["count"] += len(chunk.ids) if is_last else CHUNK_TOKENS
        pad = CHUNK_TOKENS - len(chunk.ids)
        chunk.ids = [tokenizer.bos_id, *chunk.ids, *[tokenizer.eos_id] * pad, tokenizer.eos_id]
        chunk.weights = [1.0, *chunk.weights, *[1.0] * pad, 1.0]
        state["last_comma"] = -1
        chunks.append(chunk)
        chunk = Chunk()

    for piece, weight in parsed:
        if piece == "BREAK" and weight == -1:
            close()
            continue
        weight = min(max(weight, -MAX_WEIGHT), MAX_WEIGHT)
        tokens = tokenizer.encode(piece)
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == comma:
                state["last_comma"] = len(chunk.ids)
            elif (
                len(chunk.ids) == CHUNK_TOKENS
                and state["last_comma"] != -1
                and len(chunk.ids) - state["last_comma"] <= COMMA_BACKTRACK
            ):  # move the words after the last comma into the next chunk
                cut = state["last_comma"] + 1
                moved_ids, moved_weights = chunk.ids[cut:], chunk.weights[cut:]
                chunk.ids, chunk.weights = chunk.ids[:cut], chunk.weights[:cut]
                close()
                chunk.ids, chunk.weights = moved_ids, moved_weights
            if len(chunk.ids) == CHUNK_TOKENS:
                close()
            embedding, length = embeddings.find_at(tokenizer, tokens, position)
            if embedding is None:
                chunk.ids.append(token)
                chunk.weights.append(weight)
                position += 1
                continue
            if len(chunk.ids) + embedding.length > CHUNK_TOKENS:
                close()
            chunk.fixes.append((len(chunk.ids), embedding))
            chunk.ids += [0] * embedding.length
            chunk.weights += [weight] * embedding.length
            position += length
    if chunk.ids or not chunks:
        close(is_last=True)
    return chunks, state["count"]


def empty_chunk(tokenizer: ClipTokenizer) -> Chunk:
    """The chunk a shorter prompt of a batch is filled with (A1111's empty_chunk)."""
    return Chunk([tokenizer.bos_id, *[tokenizer.eos_id] * (CHUNK_TOKENS + 1)], [1.0] * (CHUNK_TOKENS + 2))


class TextEncoder:
    """One exported CLIP text encoder: its tokenizer, token embedding table and engine.

    `layer` picks the conditioning: "normed" = normed_hidden_states[offset - (clip_skip - 1)] (SD 1/2:
    A1111's and diffusers' CLIP skip), "raw" = hidden_states[offset - (clip_skip - 1)] (SDXL's penultimate).
    """

    def __init__(self, engine, manifest, name: str, tokenizer: ClipTokenizer, layer=("normed", -1)):
        entry = manifest.models[name]
        self.engine = engine
        self.tokenizer = tokenizer
        self.table = np.load(manifest.folder / entry["token_embedding"], mmap_mode="r")  # (vocab, C) float32
        self.width = int(self.table.shape[1])
        self.layers = int(entry["layers"])
        self.pool_at = entry["pool_at"]
        self.layer_kind, self.layer_offset = layer

    def check_clip_skip(self, clip_skip: int) -> None:
        deepest = min(MAX_CLIP_SKIP, self.layers + self.layer_offset + 1)
        check_int("clip_skip", clip_skip, 1, deepest)

    def embed(self, chunks: list[Chunk]) -> tuple[np.ndarray, np.ndarray]:
        """(inputs_embeds (N, 77, C) float32, eos_index (N,) int64) of a batch of chunks."""
        ids = np.array([c.ids for c in chunks], dtype=np.int64)  # (N, 77)
        tok = self.tokenizer
        if tok.pad_id != tok.eos_id:  # SD 2's "!" padding: everything after the first EOS (A1111's process_tokens)
            first_eos = (ids == tok.eos_id).argmax(axis=1)
            ids[np.arange(ids.shape[1])[None, :] > first_eos[:, None]] = tok.pad_id
        embeds = np.asarray(self.table[ids], dtype=np.float32)  # (N, 77, C)
        for row, chunk in enumerate(chunks):
            for offset, embedding in chunk.fixes:  # textual inversion vectors replace the placeholders after BOS
                vectors = embedding.vectors_for(self.width)
                n = min(len(vectors), embeds.shape[1] - offset - 1)
                embeds[row, offset + 1 : offset + 1 + n] = vectors[:n]
        eos = ids.argmax(axis=1) if self.pool_at == "argmax" else (ids == tok.eos_id).argmax(axis=1)
        return embeds, eos.astype(np.int64)

    def encode(self, chunks: list[Chunk], clip_skip: int) -> tuple[np.ndarray, np.ndarray]:
        """(conditioning (N, 77, C), pooled (N, P)) of a batch of chunks, before emphasis."""
        embeds, eos = self.embed(chunks)
        out = self.engine.run({"inputs_embeds": embeds, "eos_index": eos})
        stack = out["normed_hidden_states" if self.layer_kind == "normed" else "hidden_states"]  # (L+1, N, 77, C)
        return stack[self.layer_offset - (clip_skip - 1)], out["pooled"]


def apply_emphasis(z: np.ndarray, weights: np.ndarray, emphasis: str) -> np.ndarray:
    """A1111's emphasis on z (N, 77, C) with weights (N, 77): "Original" scales then restores z's mean."""
    if emphasis == "None" or (weights == 1).all():  # all ones: A1111's rescale is by exactly 1
        return z
    weighted = (z * weights[:, :, None].astype(np.float32)).astype(np.float32)
    if emphasis == "No norm":
        return weighted
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = z.mean(dtype=np.float32) / weighted.mean(dtype=np.float32)
    # A mean of 0 (a layer norm without bias, as in untrained models) has no scale to restore: A1111 would
    # give NaN there; keep the weighted values instead.
    return (weighted * ratio).astype(np.float32) if np.isfinite(ratio) else weighted


@dataclass(frozen=True)
class Encoded:
    """The conditioning of N texts: context (N, 77 k, C_total) and the pooled vector (N, P) or None."""

    context: np.ndarray
    pooled: np.ndarray | None
    used: tuple[Embedding, ...] = ()  # the textual inversion embeddings the texts used


class Conditioner:
    """Texts -> Encoded, over the model's text encoders (A1111's FrozenCLIPEmbedderWithCustomWords)."""

    def __init__(self, encoders: list[TextEncoder], embeddings: EmbeddingDB, pooled_from: int | None = None):
        self.encoders = encoders
        self.embeddings = embeddings
        self.pooled_from = pooled_from  # index of the encoder whose pooled output the UNet takes (SDXL: 1)

    def check(self, clip_skip: int, emphasis: str) -> None:
        if emphasis not in EMPHASES:
            raise InvalidOption("emphasis", emphasis, ", ".join(EMPHASES))
        for encoder in self.encoders:
            encoder.check_clip_skip(clip_skip)

    def encode(self, texts: list[str], clip_skip: int = 1, emphasis: str = "Original", texts_2=None) -> Encoded:
        """Encode TEXTS (one batch: their weights' means are taken together, as A1111 does for the texts of one
        prompt's editing schedule); TEXTS_2, if given, go to the second encoder instead (SDXL's prompt_2)."""
        parts, pooled, used = [], None, {}
        for index, encoder in enumerate(self.encoders):
            lines = texts_2 if index == 1 and texts_2 is not None else texts
            per_text = [chunk_prompt(line, encoder.tokenizer, self.embeddings, emphasis)[0] for line in lines]
            count = max(len(chunks) for chunks in per_text)
            zs = []
            for i in range(count):
                batch = [chunks[i] if i < len(chunks) else empty_chunk(encoder.tokenizer) for chunks in per_text]
                used |= {e.name: e for c in batch for _, e in c.fixes}
                z, pooled_out = encoder.encode(batch, clip_skip)
                weights = np.array([c.weights for c in batch], dtype=np.float32)  # (N, 77)
                zs.append(apply_emphasis(z, weights, emphasis))
                if i == 0 and index == self.pooled_from:
                    pooled = pooled_out  # A1111 takes the first chunk's pooled output
            parts.append(np.concatenate(zs, axis=1))  # (N, 77 k, C)
        if len({p.shape[1] for p in parts}) > 1:  # encoders that chunked differently: fill with empty chunks
            longest = max(p.shape[1] for p in parts)
            parts = [
                pad_to(part, longest, encoder.encode([empty_chunk(encoder.tokenizer)], clip_skip)[0])
                for part, encoder in zip(parts, self.encoders, strict=True)
            ]
        context = np.concatenate(parts, axis=2).astype(np.float32)  # (N, 77 k, C_total)
        return Encoded(context, pooled, tuple(used.values()))

    def empty(self, clip_skip: int = 1) -> np.ndarray:
        """(1, 77, C_total): the empty prompt's conditioning, what a shorter cond or uncond is padded with."""
        return self.encode([""], clip_skip).context


def pad_to(context: np.ndarray, length: int, empty: np.ndarray) -> np.ndarray:
    """CONTEXT (N, L, C) extended to LENGTH tokens with copies of EMPTY (1, 77, C) (A1111's pad_cond)."""
    repeats = (length - context.shape[1]) // empty.shape[1]
    if repeats <= 0:
        return context
    return np.concatenate([context, np.repeat(np.tile(empty, (1, repeats, 1)), len(context), axis=0)], axis=1)


def encode_prompts(conditioner: Conditioner, family, manifest, opts) -> tuple:
    """The prompt's (and with guidance the negative prompt's) conditioning for each denoiser call, for one image,
    and the infotext fields it adds. Prompt editing gives one entry per switch (A1111's schedules over opts.steps);
    cond and uncond are padded to the same length with the empty prompt's chunk (A1111's "Pad conds")."""
    from sdrt.runtime.denoiser import TextConditioning
    from sdrt.runtime.lora import strip_tags
    from sdrt.runtime.prompt import prompt_schedules

    prompt = strip_tags(opts.prompt)  # A1111 takes <lora:...> (extra network) tags out before encoding
    prompts = [prompt, opts.negative_prompt] if opts.guided else [prompt]
    schedules = prompt_schedules(prompts, opts.steps)  # per prompt: [(last step, text)]
    encoded = []  # per prompt: [(last step, Encoded)]
    for index, schedule in enumerate(schedules):
        texts = [text for _, text in schedule]
        second = family.second_texts(opts, index, len(texts))  # e.g. SDXL's prompt_2 / negative_prompt_2
        result = conditioner.encode(texts, opts.clip_skip, opts.emphasis, texts_2=second)
        if index == 1 and family.zeroes_negative(manifest, opts):
            result = zeroed(result)
        encoded.append([(end, _row(result, i)) for i, (end, _) in enumerate(schedule)])
    length = max(e.context.shape[1] for entries in encoded for _, e in entries)
    padded = any(e.context.shape[1] != length for entries in encoded for _, e in entries)
    if padded:
        empty = conditioner.empty(opts.clip_skip)
        encoded = [[(end, Encoded(pad_to(e.context, length, empty), e.pooled, e.used)) for end, e in entries]
                   for entries in encoded]  # fmt: skip
    ends = sorted({end for entries in encoded for end, _ in entries})
    feeds = []
    for end in ends:
        at = [next((e for last, e in entries if end <= last), entries[-1][1]) for entries in encoded]
        feeds.append(text_feeds(family, manifest, at[0], at[1] if opts.guided else None, opts))
    used = {e.name: e for entries in encoded for _, enc in entries for e in enc.used}
    notes = {
        "Emphasis": opts.emphasis if opts.emphasis != "Original" and _has_emphasis(prompts) else None,
        "TI hashes": ", ".join(f"{_clean(n)}: {e.shorthash}" for n, e in used.items()) or None,
        "Pad conds": True if padded else None,
    }
    return TextConditioning(tuple(ends), tuple(feeds), opts.guided), notes


def _row(encoded: Encoded, i: int) -> Encoded:
    pooled = None if encoded.pooled is None else encoded.pooled[i : i + 1]
    return Encoded(encoded.context[i : i + 1], pooled, encoded.used)


def text_feeds(family, manifest, cond: Encoded, uncond: Encoded | None, opts) -> dict:
    """Denoiser text inputs for one image, uncond first: {"encoder_hidden_states": (2 or 1, L, C) float32}, and
    the family's added inputs (SDXL: the pooled text_embeds (2 or 1, P) and micro-conditioning time_ids)."""
    halves = [cond] if uncond is None else [uncond, cond]
    feeds = {"encoder_hidden_states": np.concatenate([h.context for h in halves]).astype(np.float32)}
    return feeds | family.added_feeds(manifest, opts, cond.pooled, None if uncond is None else
                                                   uncond.pooled)  # fmt: skip


def zeroed(encoded: Encoded) -> Encoded:
    """ENCODED with zero context and pooled vectors (a family's zeroed negative prompt)."""
    from dataclasses import replace

    return replace(encoded, context=np.zeros_like(encoded.context), pooled=np.zeros_like(encoded.pooled))


def _has_emphasis(texts) -> bool:
    """A1111 records a non-default emphasis only for prompts with brackets."""
    return any("(" in t or "[" in t for t in texts)


def _clean(name: str) -> str:
    return name.replace(":", "").replace(",", "")
