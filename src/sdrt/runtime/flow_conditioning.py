"""Prompts -> the transformer's text inputs for SD 3.5 and FLUX.1, as diffusers' pipelines build them.

SD 3.5 (StableDiffusion3Pipeline.encode_prompt): CLIP-L's and OpenCLIP bigG's penultimate states (77 tokens each,
truncated) side by side, zero-padded to T5's width, then T5's states (256 tokens) after them along the tokens (zeros
when the model has no T5); pooled: both projected EOS states side by side. FLUX.1 (FluxPipeline.encode_prompt):
T5's states (512 tokens) and CLIP-L's pooled state. Prompts are plain text here (no A1111 emphasis), as diffusers.
"""

import numpy as np

from sdrt.errors import InvalidOption
from sdrt.runtime.conditioning import EMPHASES, Chunk, Encoded, TextEncoder
from sdrt.runtime.t5 import T5Encoder, T5Tokenizer
from sdrt.runtime.tokenizer import ClipTokenizer

PENULTIMATE = ("raw", -2)  # SD 3: hidden_states[-2] of each CLIP (diffusers' clip_skip None)


def clip_encoder(engines: dict, manifest, name: str, layer=PENULTIMATE) -> TextEncoder:
    """Text encoder NAME of MANIFEST's folder with its tokenizer (tokenizer, tokenizer_2, ...)."""
    tokenizer = ClipTokenizer.from_dir(manifest.folder / name.replace("text_encoder", "tokenizer"))
    return TextEncoder(engines[name], manifest, name, tokenizer, layer)


def clip_states(encoder: TextEncoder, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(states (B, 77, C), pooled (B, P)) float32: each prompt truncated to 77 tokens, padded (diffusers' CLIP)."""
    ids = encoder.tokenizer(list(texts))  # (B, 77) int64
    return encoder.encode([Chunk(list(row), [1.0] * len(row)) for row in ids.tolist()], clip_skip=1)


class T5Text:
    """A T5 tokenizer and encoder with the pipeline's sequence length."""

    def __init__(self, engines: dict, manifest, name: str, max_length: int):
        self.tokenizer = T5Tokenizer.from_dir(manifest.folder / name.replace("text_encoder", "tokenizer"))
        self.encoder = T5Encoder(engines, manifest, name)
        self.max_length = max_length

    def __call__(self, texts: list[str]) -> np.ndarray:
        """(B, max_length, D) float32."""
        return self.encoder(self.tokenizer(list(texts), self.max_length))


class FlowConditioner:
    """The Conditioner protocol (conditioning.Conditioner: check, encode, empty, encoders) for texts read plain."""

    encoders: list[TextEncoder]

    def check(self, clip_skip: int, emphasis: str) -> None:
        if emphasis not in EMPHASES:
            raise InvalidOption("emphasis", emphasis, ", ".join(EMPHASES))

    def encode(self, texts: list[str], clip_skip: int = 1, emphasis: str = "Original", texts_2=None) -> Encoded:
        raise NotImplementedError

    def empty(self, clip_skip: int = 1) -> np.ndarray:
        return self.encode([""], clip_skip).context


class Sd3Conditioner(FlowConditioner):
    """SD 3.5's texts -> Encoded: context (B, 77 + L, D) (CLIP padded to T5's width, then T5), pooled
    (B, P_l + P_g); the denoiser takes them as encoder_hidden_states and pooled_projections."""

    def __init__(self, clip_l: TextEncoder, clip_g: TextEncoder, t5: T5Text | None, t5_length: int, width: int):
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5
        self.encoders = [clip_l, clip_g]
        self.t5_length, self.width = t5_length, width  # width: T5's (the transformer's joint_attention_dim)

    def encode(self, texts: list[str], clip_skip: int = 1, emphasis: str = "Original", texts_2=None) -> Encoded:
        states_l, pooled_l = clip_states(self.clip_l, texts)
        states_g, pooled_g = clip_states(self.clip_g, texts)
        clip = np.concatenate([states_l, states_g], axis=-1)  # (B, 77, C_l + C_g)
        clip = clip[..., : self.width]  # (torch's pad by a negative width crops: never with SD 3.5's sizes)
        clip = np.pad(clip, ((0, 0), (0, 0), (0, self.width - clip.shape[-1])))  # (B, 77, D)
        if self.t5 is None:  # diffusers without text_encoder_3: zeros in T5's place
            t5 = np.zeros((len(texts), self.t5_length, self.width), dtype=np.float32)
        else:
            t5 = self.t5(texts)  # (B, L, D)
        context = np.concatenate([clip, t5], axis=1).astype(np.float32)
        return Encoded(context, np.concatenate([pooled_l, pooled_g], axis=-1).astype(np.float32))


class FluxConditioner(FlowConditioner):
    """FLUX.1's texts -> Encoded: context (B, 512, D) T5 states, pooled (B, P) CLIP-L's."""

    def __init__(self, clip_l: TextEncoder, t5: T5Text):
        self.clip_l, self.t5 = clip_l, t5
        self.encoders = [clip_l]

    def encode(self, texts: list[str], clip_skip: int = 1, emphasis: str = "Original", texts_2=None) -> Encoded:
        _, pooled = clip_states(self.clip_l, texts)
        return Encoded(self.t5(texts).astype(np.float32), pooled.astype(np.float32))
