"""Model I/O of the flow-matching transformer families (SD 3.5, FLUX.1) and their T5 encoder, declared as data.

Export writes graphs with these names and axes and the runtime feeds them (as modelspec.py does for the UNet
families). Inputs keep diffusers' names and units: SD 3's timestep is sigma x 1000, FLUX's is sigma itself (its
transformer multiplies by 1000), FLUX's guidance is the guidance scale.
"""

from sdrt.runtime.modelspec import ModelSpec, TensorSpec

TRANSFORMER = "transformer"
BLOCK_GATES = "block_gates"  # SD 3's per-block gates (skip-layer guidance)
T5_PART_SEPARATOR = "_part"  # the T5 encoder's part i > 0 is the model "<name>_part<i>"


def sd3_transformer_spec(latent_channels: int, joint_dim: int, pooled_size: int, blocks: int = 0) -> ModelSpec:
    """SD 3 MMDiT (Esser et al. 2024): noisy latents, timestep in [0, 1000], per-token text states (CLIP padded
    to T5's width, then T5's tokens), pooled CLIP states and, with BLOCKS, one gate per transformer block (1: run
    it, 0: pass its input through: skip-layer guidance) -> the predicted velocity (noise - x0)."""
    latent = ("batch", latent_channels, "latent_height", "latent_width")
    gates = (TensorSpec(BLOCK_GATES, "float32", (blocks,)),) if blocks else ()
    return ModelSpec(
        TRANSFORMER,
        inputs=(
            TensorSpec("hidden_states", "float32", latent),
            TensorSpec("timestep", "float32", ("batch",)),
            TensorSpec("encoder_hidden_states", "float32", ("batch", "tokens", joint_dim)),
            TensorSpec("pooled_projections", "float32", ("batch", pooled_size)),
            *gates,
        ),
        outputs=(TensorSpec("out_sample", "float32", latent),),
    )


def gate_count(manifest) -> int | None:
    """The number of block gates MANIFEST's transformer graph takes, or None (exported without them)."""
    for tensor in manifest.models.get(TRANSFORMER, {}).get("inputs", ()):
        if tensor["name"] == BLOCK_GATES:
            return int(tensor["shape"][0])
    return None


def flux_transformer_spec(packed_channels: int, joint_dim: int, pooled_size: int, guidance: bool) -> ModelSpec:
    """FLUX.1 transformer: 2x2-packed latents (B, h/2 * w/2, 4C), sigma in [0, 1], T5 states, pooled CLIP state,
    the position ids of image and text tokens (3 axes each), and for guidance-distilled models (dev) the guidance
    scale -> the predicted velocity, packed."""
    packed = ("batch", "image_tokens", packed_channels)
    inputs = [
        TensorSpec("hidden_states", "float32", packed),
        TensorSpec("timestep", "float32", ("batch",)),
        TensorSpec("encoder_hidden_states", "float32", ("batch", "tokens", joint_dim)),
        TensorSpec("pooled_projections", "float32", ("batch", pooled_size)),
        TensorSpec("img_ids", "float32", ("image_tokens", 3)),
        TensorSpec("txt_ids", "float32", ("tokens", 3)),
    ]
    if guidance:
        inputs.append(TensorSpec("guidance", "float32", ("batch",)))
    return ModelSpec(TRANSFORMER, inputs=tuple(inputs), outputs=(TensorSpec("out_sample", "float32", packed),))


def t5_part_name(name: str, index: int) -> str:
    """The model name of part INDEX of the T5 encoder NAME (part 0 keeps NAME)."""
    return name if index == 0 else f"{name}{T5_PART_SEPARATOR}{index}"


def t5_part_spec(name: str, index: int, count: int, width: int, heads: int) -> ModelSpec:
    """Part INDEX of COUNT of a T5 encoder (Raffel et al. 2020), split by blocks so each exports within memory.

    Part 0 takes token ids and also returns the relative position bias (1, heads, T, T) that its first block
    computes; later parts take the hidden states (the previous part's block_output) and that bias; the last part
    ends with the final RMS norm and returns last_hidden_state. With one part: input_ids -> last_hidden_state.
    """
    hidden = ("batch", "tokens", width)
    bias = TensorSpec("position_bias", "float32", (1, heads, "tokens", "tokens"))
    first, last = index == 0, index == count - 1
    inputs = (TensorSpec("input_ids", "int64", ("batch", "tokens")),) if first else (
        TensorSpec("hidden_states", "float32", hidden), bias)  # fmt: skip
    out_name = "last_hidden_state" if last else "block_output"  # (an output cannot share its input's name)
    outputs = (TensorSpec(out_name, "float32", hidden),) + (() if last or not first else (bias,))
    return ModelSpec(t5_part_name(name, index), inputs=inputs, outputs=outputs)
