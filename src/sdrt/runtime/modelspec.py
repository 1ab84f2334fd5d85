"""Model I/O declared once, as data: export writes graphs with these names and axes, the runtime feeds them.

Dimension names are symbolic (dynamic) axes; ints are fixed sizes. Shapes use ONNX's layout (NCHW).
"""

from dataclasses import dataclass


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


def text_encoder_spec(hidden_size: int) -> ModelSpec:
    """CLIP text encoder: token ids -> last hidden state (and the penultimate one, for CLIP skip)."""
    return ModelSpec(
        "text_encoder",
        inputs=(TensorSpec("input_ids", "int64", ("batch", "tokens")),),
        outputs=(TensorSpec("last_hidden_state", "float32", ("batch", "tokens", hidden_size)),),
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
