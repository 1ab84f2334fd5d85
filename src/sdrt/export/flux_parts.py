"""FLUX.1's transformer exported block-wise: FLUX.1 [dev] holds 12 B parameters, 24 GB in bf16 and 48 GB in the fp32
an export upcasts to, so it cannot be one graph on a 24 GB machine. The model is built on the meta device, and each
part (the embedders and the first blocks, ..., the last blocks and the output head; ~PART_BYTES of fp32 weights) gets
its weights from the files (lazy_weights: a folder's shards or a single file, only the tensors it needs), is
exported, verified and handed back before the next; runtime/flux_parts.py chains the part graphs.
"""

import torch

from sdrt.export import lazy_weights as lazy
from sdrt.export.flow_parts import exportable_norms, traceable_rotary
from sdrt.export.steps import ModelStep
from sdrt.export.t5 import PART_BYTES
from sdrt.runtime.flux_parts import flux_part_spec

EMBEDDERS = ("x_embedder", "time_text_embed", "context_embedder", "pos_embed")
HEAD = ("norm_out", "proj_out")


def empty_transformer(config: dict):
    """FluxTransformer2DModel of CONFIG with its parameters on the meta device (norms traceable for opset 17)."""
    from diffusers import FluxTransformer2DModel

    with lazy.parameters_on_meta():
        model = FluxTransformer2DModel.from_config(config)
    exportable_norms(model)
    return model


def _blocks(model) -> list[tuple[str, torch.nn.Module]]:
    """(weight prefix, block) for every block in order: double-stream, then single-stream."""
    return [(f"transformer_blocks.{i}.", b) for i, b in enumerate(model.transformer_blocks)] + [
        (f"single_transformer_blocks.{i}.", b) for i, b in enumerate(model.single_transformer_blocks)]  # fmt: skip


def _fp32_bytes(*modules) -> int:
    return 4 * sum(p.numel() for m in modules for p in m.parameters())


def part_bounds(model, part_bytes: int | None = None) -> list[tuple[int, int]]:
    """[(start, stop)] runs of blocks of at most PART_BYTES fp32 weights each (the embedders count in the first, the
    head in the last; at least one block a part)."""
    limit = part_bytes or PART_BYTES
    blocks = _blocks(model)
    costs = [_fp32_bytes(b) for _, b in blocks]
    costs[0] += _fp32_bytes(*(getattr(model, n) for n in EMBEDDERS))
    costs[-1] += _fp32_bytes(*(getattr(model, n) for n in HEAD))
    bounds, start, size = [], 0, 0
    for i, cost in enumerate(costs):
        if i > start and size + cost > limit:
            bounds.append((start, i))
            start, size = i, 0
        size += cost
    return bounds + [(start, len(costs))]


class FluxPart(torch.nn.Module):
    """Blocks [start, stop) of a FLUX transformer, with the embedders first (part 0) and the head last."""

    def __init__(self, model, start: int, stop: int):
        super().__init__()
        blocks = _blocks(model)
        self.first, self.last = start == 0, stop == len(blocks)
        self.prefixes = [p for p, _ in blocks[start:stop]]
        self.blocks = torch.nn.ModuleList(b for _, b in blocks[start:stop])
        self.heads = torch.nn.ModuleDict({n: getattr(model, n) for n in (EMBEDDERS if self.first else ())
                                          + (HEAD if self.last else ())})  # fmt: skip

    def filled(self, source, dtype=torch.float32) -> "FluxPart":
        """This part's weights read from SOURCE (diffusers keys) in DTYPE."""
        for prefix, block in zip(self.prefixes, self.blocks, strict=True):
            lazy.fill(block, source, prefix, dtype)
        for name, module in self.heads.items():
            lazy.fill(module, source, name + ".", dtype)
        return self


def flux_part_forward(part: FluxPart, *inputs):
    """diffusers' FluxTransformer2DModel.forward over this part (no ControlNet, no IP-Adapter).

    Part 0: (hidden_states, timestep, encoder_hidden_states, pooled_projections, img_ids, txt_ids[, guidance]);
    later parts: (hidden_states, encoder_hidden_states, temb, rotary_cos, rotary_sin). See flux_part_spec.
    """
    heads = part.heads
    with traceable_rotary():
        if part.first:
            hidden, timestep, context, pooled, img_ids, txt_ids, *guidance = inputs
            hidden = heads["x_embedder"](hidden)
            timestep = timestep.to(hidden.dtype) * 1000
            if guidance:
                temb = heads["time_text_embed"](timestep, guidance[0].to(hidden.dtype) * 1000, pooled)
            else:
                temb = heads["time_text_embed"](timestep, pooled)
            context = heads["context_embedder"](context)
            cos, sin = (t.float() for t in heads["pos_embed"](torch.cat((txt_ids, img_ids), dim=0)))
        else:
            hidden, context, temb, cos, sin = inputs
        for block in part.blocks:
            context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb,
                                    image_rotary_emb=(cos, sin))  # fmt: skip
        if part.last:
            return heads["proj_out"](heads["norm_out"](hidden, temb))
    return (hidden, context, temb, cos, sin) if part.first else (hidden, context)


def _inputs(config: dict, index: int, batch: int, h: int, w: int, t: list, tokens: int, generator):
    """Trace / check inputs of part INDEX for BATCH images of h x w packed tokens and TOKENS text tokens."""
    width = config["num_attention_heads"] * config["attention_head_dim"]
    if index > 0:
        return (torch.randn(batch, h * w, width, generator=generator),
                torch.randn(batch, tokens, width, generator=generator),
                torch.randn(batch, width, generator=generator),
                torch.rand(tokens + h * w, config["attention_head_dim"], generator=generator) * 2 - 1,
                torch.rand(tokens + h * w, config["attention_head_dim"], generator=generator) * 2 - 1)  # fmt: skip
    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    out = (torch.randn(batch, h * w, config["in_channels"], generator=generator), torch.tensor(t),
           torch.randn(batch, tokens, config["joint_attention_dim"], generator=generator),
           torch.randn(batch, config["pooled_projection_dim"], generator=generator), ids.reshape(h * w, 3),
           torch.zeros(tokens, 3))  # fmt: skip
    return out + ((torch.full((batch,), 3.5),) if config.get("guidance_embeds") else ())


def flux_part_steps(model, config: dict, source, bounds, release=None):
    """The export steps of MODEL's parts BOUNDS, made lazily: each part filled from SOURCE when its turn comes and
    handed back once its graph is written (RELEASE() after the last)."""
    generator = torch.Generator().manual_seed(0)
    width = config["num_attention_heads"] * config["attention_head_dim"]
    dims = (config["in_channels"], config["joint_attention_dim"], config["pooled_projection_dim"],
            bool(config.get("guidance_embeds")), width, config["attention_head_dim"])  # fmt: skip
    for index, (start, stop) in enumerate(bounds):
        part = FluxPart(model, start, stop).filled(source)
        step = ModelStep(
            flux_part_spec(index, len(bounds), *dims),
            part,
            flux_part_forward,
            _inputs(config, index, 1, 3, 5, [0.5], 13, generator),
            _inputs(config, index, 2, 4, 2, [0.999, 0.01], 21, generator),
            manifest_entry={"part": index, "parts": len(bounds), "blocks": [start, stop]},
        )
        step.release = _dropper(part, release if index == len(bounds) - 1 else None)
        yield step
        del part, step


def _dropper(part: FluxPart, then):
    def release():
        lazy.drop(part)
        if then is not None:
            then()

    return release
