"""Model I/O declared once, as data: export writes graphs with these names and axes, the runtime feeds them.

Dimension names are symbolic (dynamic) axes; ints are fixed sizes. Shapes use ONNX's layout (NCHW).
"""

from dataclasses import dataclass

TOKEN_EMBEDDING_FILE = "token_embedding.npy"  # (vocab, C) float32 beside each text encoder's model.onnx


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple  # str = dynamic axis name, int = fixed size


@dataclass(frozen=True)
class ModelSpec:
    name: str  # sub-folder of the exported model and key in model.json
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """{tensor name: {axis index: axis name}} for torch.onnx.export."""
        return {
            t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in (*self.inputs, *self.outputs)
        }

    def to_json(self) -> dict:
        def tensors(ts):
            return [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in ts]

        return {"inputs": tensors(self.inputs), "outputs": tensors(self.outputs)}


def text_encoder_spec(name: str, hidden_size: int, layers: int, pooled_size: int) -> ModelSpec:
    """CLIP text transformer from token embeddings (the runtime looks them up, so textual inversion needs no
    re-export) -> every layer's hidden states, raw and through the final layer norm, and the pooled EOS state.

    hidden_states[0] is the embedding output and hidden_states[-1] the last layer's (transformers' order);
    pooled is the projected EOS state (CLIPTextModelWithProjection's text_embeds) or, without a projection,
    the final-normed EOS state (pooler_output).
    """
    stack = (layers + 1, "batch", "tokens", hidden_size)
    return ModelSpec(
        name,
        inputs=(
            TensorSpec("inputs_embeds", "float32", ("batch", "tokens", hidden_size)),
            TensorSpec("eos_index", "int64", ("batch",)),
        ),
        outputs=(
            TensorSpec("hidden_states", "float32", stack),
            TensorSpec("normed_hidden_states", "float32", stack),
            TensorSpec("pooled", "float32", ("batch", pooled_size)),
        ),
    )


def unet_spec(latent_channels: int, in_channels: int, context_dim: int) -> ModelSpec:
    """UNet: noisy latents, timestep, text embeddings -> predicted noise (or v)."""
    return ModelSpec(
        "unet",
        inputs=(
            TensorSpec("sample", "float32", ("batch", in_channels, "latent_height", "latent_width")),
            TensorSpec("timestep", "float32", ("batch",)),
            TensorSpec("encoder_hidden_states", "float32", ("batch", "tokens", context_dim)),
        ),
        outputs=(TensorSpec("out_sample", "float32", ("batch", latent_channels, "latent_height", "latent_width")),),
    )


def sdxl_unet_spec(latent_channels: int, in_channels: int, context_dim: int, pooled_size: int, time_ids: int):
    """SDXL UNet: unet_spec's inputs plus the added conditioning (Podell et al. 2023, sec. 2.2): the pooled text
    embedding and the micro-conditioning numbers (6 for the base: original size, crop, target size; 5 for the
    refiner: original size, crop, aesthetic score)."""
    base = unet_spec(latent_channels, in_channels, context_dim)
    added = (
        TensorSpec("text_embeds", "float32", ("batch", pooled_size)),
        TensorSpec("time_ids", "float32", ("batch", time_ids)),
    )
    return ModelSpec(base.name, inputs=base.inputs + added, outputs=base.outputs)


def vae_decoder_spec(latent_channels: int) -> ModelSpec:
    """VAE decoder: unscaled latents -> image in [-1, 1]."""
    return ModelSpec(
        "vae_decoder",
        inputs=(TensorSpec("latent_sample", "float32", ("batch", latent_channels, "latent_height", "latent_width")),),
        outputs=(TensorSpec("sample", "float32", ("batch", 3, "height", "width")),),
    )


def vae_encoder_spec(latent_channels: int) -> ModelSpec:
    """VAE encoder: image in [-1, 1] -> mean and log-variance of the latent distribution (unscaled)."""
    latent = ("batch", latent_channels, "latent_height", "latent_width")
    return ModelSpec(
        "vae_encoder",
        inputs=(TensorSpec("sample", "float32", ("batch", 3, "height", "width")),),
        outputs=(
            TensorSpec("latent_mean", "float32", latent),
            TensorSpec("latent_logvar", "float32", latent),
        ),
    )


@dataclass(frozen=True)
class Residual:
    """One ControlNet residual: its tensor name, channels, and latent cells per residual cell (1, 2, 4, ...)."""

    name: str
    channels: int
    downscale: int

    def tensor(self) -> TensorSpec:
        axes = ("latent_height", "latent_width") if self.downscale == 1 else (
            f"height_{self.downscale}", f"width_{self.downscale}")  # fmt: skip
        return TensorSpec(self.name, "float32", ("batch", self.channels, *axes))


def controlnet_residuals(block_out_channels, layers_per_block: int) -> tuple[Residual, ...]:
    """The residuals a ControlNet adds to a UNet of this shape (Zhang et al. 2023, fig. 3): conv_in's output, each
    down block's resnet outputs and downsampler, then the mid block's (12 + 1 for SD 1.x/2.x, 9 + 1 for SDXL)."""
    out = [Residual("down_block_res_0", int(block_out_channels[0]), 1)]
    for level, channels in enumerate(block_out_channels):
        for _ in range(layers_per_block):
            out.append(Residual(f"down_block_res_{len(out)}", int(channels), 2**level))
        if level < len(block_out_channels) - 1:  # every block but the last ends with a downsampler
            out.append(Residual(f"down_block_res_{len(out)}", int(channels), 2 ** (level + 1)))
    out.append(Residual("mid_block_res", int(block_out_channels[-1]), 2 ** (len(block_out_channels) - 1)))
    return tuple(out)


def controlnet_spec(
    latent_channels: int, context_dim: int, residuals, cond_channels: int = 3, added: tuple = ()
) -> ModelSpec:
    """ControlNet: the UNet's inputs plus the control image in [0, 1] at pixel size -> unscaled residuals (the runtime
    applies the weight). ADDED: SDXL's text_embeds/time_ids TensorSpecs."""
    return ModelSpec(
        "controlnet",
        inputs=(
            TensorSpec("sample", "float32", ("batch", latent_channels, "latent_height", "latent_width")),
            TensorSpec("timestep", "float32", ("batch",)),
            TensorSpec("encoder_hidden_states", "float32", ("batch", "tokens", context_dim)),
            TensorSpec("controlnet_cond", "float32", ("batch", cond_channels, "height", "width")),
            *added,
        ),
        outputs=tuple(r.tensor() for r in residuals),
    )


def unet_controlnet_spec(unet: ModelSpec, residuals) -> ModelSpec:
    """A UNet (SD or SDXL spec) that also adds ControlNet residuals to its skip connections and mid block."""
    return ModelSpec("unet_controlnet", inputs=unet.inputs + tuple(r.tensor() for r in residuals), outputs=unet.outputs)
