"""Block gates for SD 3's transformer, so one graph runs with chosen blocks skipped (skip-layer guidance).

diffusers' SD3Transformer2DModel skips the blocks listed in `skip_layers` (a Python list, fixed when traced); the
exported graph instead takes `block_gates` (blocks,) float32: each block still computes, and a Where keeps its
output (gate 1) or its input (gate 0) — exact for 0 and 1, for both the image and the text stream. The cost on the
normal path (all gates 1) is one select per block and stream (docs/guide/sd3-flux.md, measured there).
"""

import torch


class GatedBlock(torch.nn.Module):
    """A JointTransformerBlock whose output is replaced by its input where gates[index] is 0."""

    def __init__(self, inner, index: int, gates: dict):
        super().__init__()
        self.inner, self.index = inner, index
        self.gates = gates  # {"gates": the (blocks,) tensor of the current call}; a dict, not a submodule

    def forward(self, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs=None):
        context, image = self.inner(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                                    temb=temb, joint_attention_kwargs=joint_attention_kwargs)  # fmt: skip
        run = self.gates["gates"][self.index] > 0.5  # () bool
        image = torch.where(run, image, hidden_states)
        if context is not None:  # the last block returns no text stream (context_pre_only)
            context = torch.where(run, context, encoder_hidden_states)
        return context, image


def gate_blocks(transformer) -> dict:
    """Wrap every block of TRANSFORMER in a GatedBlock; returns the dict the forward puts its gates into."""
    gates = {"gates": None}
    blocks = transformer.transformer_blocks
    for index, block in enumerate(blocks):
        blocks[index] = GatedBlock(block, index, gates)
    return gates
