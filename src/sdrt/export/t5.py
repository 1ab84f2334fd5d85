"""The T5 encoder's export, part by part: T5-XXL's encoder holds 4.7 B parameters (19 GB in fp32), more than one
graph export can hold twice on a 24 GB machine. The encoder is loaded in the dtype its files store (fp16/bf16 for
the published ones), and each part (a run of blocks, ~PART_BYTES of fp32 weights) is upcast, exported, verified
and dropped before the next, so the peak is the stored model plus one fp32 part and the exporter's copy of it.
"""

import math

import torch

from sdrt.export.steps import ModelStep
from sdrt.runtime.flow_specs import t5_part_spec

PART_BYTES = 4_000_000_000  # fp32 weight bytes per part: T5-XXL (0.77 GB a block) -> 5 parts


class T5Part(torch.nn.Module):
    """Blocks [start, stop) of a T5 encoder, with its token embedding first (part 0) and final norm last."""

    def __init__(self, encoder, start: int, stop: int):
        super().__init__()
        stack = encoder.encoder
        self.embed = stack.embed_tokens if start == 0 else None
        self.blocks = torch.nn.ModuleList(stack.block[start:stop])
        self.norm = stack.final_layer_norm if stop == len(stack.block) else None


def t5_part_forward(part: T5Part, x, position_bias=None):
    """transformers' T5Stack.forward without an attention mask (diffusers passes none), over this part's blocks.

    x: (B, T) int64 ids (part 0) or (B, T, D) hidden states; position_bias (1, heads, T, T) from part 0's first
    block -> hidden states (after the final norm in the last part) and, from part 0 of several, the bias.
    """
    first = part.embed is not None
    if first:
        x = part.embed(x)
    for block in part.blocks:
        x, position_bias, _ = block(x, None, position_bias, None, None, None, cache=None)
    if part.norm is not None:
        return part.norm(x)
    return (x, position_bias) if first else x


def part_bounds(encoder, part_bytes: int) -> list[tuple[int, int]]:
    """[(start, stop)] block ranges of at most PART_BYTES fp32 weights each (the embedding counts in part 0)."""
    blocks = encoder.encoder.block
    per_block = 4 * sum(p.numel() for p in blocks[0].parameters())
    count = max(1, min(len(blocks), math.ceil(len(blocks) * per_block / part_bytes)))
    size = math.ceil(len(blocks) / count)
    return [(start, min(start + size, len(blocks))) for start in range(0, len(blocks), size)]


def t5_steps(encoder, name: str, release=None, part_bytes: int | None = None) -> list[ModelStep]:
    """The export steps of T5 encoder ENCODER as model NAME (parts NAME, NAME_part1, ...); RELEASE() runs once the
    last part is written. Each part's blocks leave the encoder once their graph is written."""
    config = encoder.config
    bounds = part_bounds(encoder, part_bytes or PART_BYTES)
    generator = torch.Generator().manual_seed(0)
    width, heads = config.d_model, config.num_heads

    def inputs(index, batch, tokens):
        if index == 0:
            return (torch.randint(0, config.vocab_size, (batch, tokens), generator=generator),)
        hidden = torch.randn(batch, tokens, width, generator=generator)
        bias = torch.randn(1, heads, tokens, tokens, generator=generator)
        return hidden, bias

    steps = []
    for index, (start, stop) in enumerate(bounds):
        part = T5Part(encoder, start, stop)
        step = ModelStep(
            t5_part_spec(name, index, len(bounds), width, heads),
            part,
            t5_part_forward,
            inputs(index, 1, 13),
            inputs(index, 2, 21),
            # T5 overflows in fp16 (transformers keeps its feed-forward outputs in fp32 for it): fp32 graphs.
            fp16_capable=False,
            manifest_entry={"part": index, "parts": len(bounds), "blocks": [start, stop]},
        )
        step.release = _dropper(encoder, start, stop, release if index == len(bounds) - 1 else None)
        steps.append(step)
    return steps


def _dropper(encoder, start: int, stop: int, then):
    """A release that frees blocks [start, stop) of ENCODER (and calls THEN, if given)."""

    def release():
        for i in range(start, stop):
            encoder.encoder.block[i] = torch.nn.Identity()
        if then is not None:
            then()

    return release
