"""One export step per model: its spec, trace inputs, verification inputs, and the export itself."""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sdrt.errors import ModelError
from sdrt.export import to_onnx, weight_map
from sdrt.runtime.modelspec import (
    TOKEN_EMBEDDING_FILE,
    ModelSpec,
    text_encoder_spec,
    unet_spec,
    vae_decoder_spec,
    vae_encoder_spec,
)


@dataclass
class ModelStep:
    spec: ModelSpec
    module: torch.nn.Module
    forward: object  # (module, *inputs) -> output(s)
    trace_inputs: tuple  # shapes chosen to exercise dynamic paths while tracing
    check_inputs: tuple  # other shapes (batch 2), to prove the dynamic axes work
    fp16_capable: bool = True  # False: the model stays fp32 in an fp16 export
    arrays: dict = field(default_factory=dict)  # file name -> np.ndarray saved as .npy beside model.onnx
    manifest_entry: dict = field(default_factory=dict)  # extra keys of this model's entry in model.json
    release: object = None  # () -> None: drops every other reference to the module once its graph is written

    def precision(self, requested: str) -> str:
        return requested if self.fp16_capable else "fp32"

    def tolerance(self, precision: str) -> float:
        return to_onnx.TOLERANCE[precision]

    def run(self, folder: Path, precision: str) -> float:
        """Export to FOLDER/<name>/model.onnx, verify against PyTorch, return the relative max error."""
        precision = self.precision(precision)
        self.module.eval().float()
        reference = to_onnx.reference_outputs(self.module, self.forward, self.check_inputs)
        if precision == "fp16":
            self.module.half()
        out_file = folder / self.spec.name / "model.onnx"
        to_onnx.export_onnx(self.module, self.forward, self.spec, self.trace_inputs, out_file)
        if self.spec.name in weight_map.MAPPED_MODELS:  # LoRA merging finds each layer's initializer through it
            self.manifest_entry["weight_map"] = weight_map.write_weight_map(self.module, out_file)
        # The module stays in its export dtype (the next step sharing it, the VAE encoder, converts it back first);
        # with `release` it is freed before ONNX Runtime loads the graph to verify it.
        if self.release is not None:
            self.module = None
            self.release()
        for file_name, array in self.arrays.items():
            np.save(out_file.parent / file_name, array)
        feeds = {name: x.numpy() for name, x in zip(self.spec.input_names, self.check_inputs, strict=True)}
        error = to_onnx.max_error(out_file, feeds, reference)
        if not error <= self.tolerance(precision):
            raise ModelError(
                f"{self.spec.name}: ONNX output differs from PyTorch by {error:.3g} (relative), "
                f"over the {precision} tolerance {self.tolerance(precision):g}"
            )
        return error


def text_encoder_step(text_encoder, name: str = "text_encoder") -> ModelStep:
    """A CLIP text encoder fed token embeddings; its token embedding table is saved for the runtime."""
    config = text_encoder.config
    generator = torch.Generator().manual_seed(0)
    width, tokens = config.hidden_size, config.max_position_embeddings
    projection = getattr(text_encoder, "text_projection", None)
    pooled = width if projection is None else projection.out_features

    def inputs(batch):
        embeds = torch.randn(batch, tokens, width, generator=generator) * 0.02  # the scale of CLIP's token table
        return embeds, torch.randint(1, tokens, (batch,), generator=generator)

    table = text_encoder.get_input_embeddings().weight.detach().float().numpy()  # (vocab, width)
    return ModelStep(
        text_encoder_spec(name, width, config.num_hidden_layers, pooled),
        text_encoder,
        to_onnx.text_encoder_forward,
        inputs(1),
        inputs(2),
        # CLIP traced in half precision mixes fp16 and fp32 in its layer norms; it runs once per image.
        fp16_capable=False,
        arrays={TOKEN_EMBEDDING_FILE: table},
        manifest_entry={
            "token_embedding": f"{name}/{TOKEN_EMBEDDING_FILE}",
            "layers": config.num_hidden_layers,
            # transformers' CLIP pools the state at argmax(input_ids) when a config keeps the legacy eos id 2
            # (the EOS token then has the largest id), else at the first EOS token.
            "pool_at": "argmax" if config.eos_token_id == 2 else "first_eos",
        },
    )


def model_steps(pipe) -> list[ModelStep]:
    """The four models of an SD 1.x/2.x pipeline, with inputs sized from its configs."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    text_encoder, unet, vae = pipe.text_encoder, pipe.unet, pipe.vae
    max_len = text_encoder.config.max_position_embeddings
    context = unet.config.cross_attention_dim
    in_ch, latent_ch = unet.config.in_channels, vae.config.latent_channels
    # Latent sizes that are not multiples of the UNet's total upsampling factor make the traced graph
    # resize each skip connection to its partner's dynamic shape (diffusers' forward_upsample_size path).
    up = 2 ** (len(unet.config.block_out_channels) - 1)
    down = pipe.vae_scale_factor

    return [
        text_encoder_step(text_encoder),
        ModelStep(
            unet_spec(latent_ch, in_ch, context),
            unet,
            to_onnx.unet_forward,
            (randn(1, in_ch, 2 * up + 1, 2 * up - 1), torch.tensor([500.0]), randn(1, max_len, context)),
            (randn(2, in_ch, 2 * up, 3 * up), torch.tensor([999.0, 1.0]), randn(2, 2 * max_len, context)),
        ),
        *vae_steps(vae, down),
    ]


def vae_steps(vae, down: int, fp16_capable: bool = True) -> list[ModelStep]:
    """The VAE's decoder and encoder; DOWN pixels per latent cell. FP16_CAPABLE False keeps both fp32 (SDXL's VAE)."""
    generator = torch.Generator().manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    latent_ch = vae.config.latent_channels
    return [
        ModelStep(
            vae_decoder_spec(latent_ch),
            vae,
            to_onnx.vae_decoder_forward,
            (randn(1, latent_ch, 5, 7),),
            (randn(2, latent_ch, 8, 6),),
            fp16_capable=fp16_capable,
        ),
        ModelStep(
            vae_encoder_spec(latent_ch),
            vae,
            to_onnx.vae_encoder_forward,
            (randn(1, 3, 5 * down, 7 * down),),
            (randn(2, 3, 8 * down, 6 * down),),
            fp16_capable=fp16_capable,
        ),
    ]
