"""SD 3.5 and FLUX.1 at run time: the flow-matching transformer families (Esser et al. 2024; FLUX.1).

What they say through the seam: a "transformer" graph predicting the velocity (flow.FlowDenoiser: x0 = x - sigma v,
so every deterministic sampler runs on their sigmas), their text encoders (CLIP-L + bigG + T5 / CLIP-L + T5,
flow_conditioning.py), 16-channel latents with a VAE shift, the shifted flow schedule (static for SD 3.5, from the
image's token count for FLUX dev), the forward process x = (1 - sigma) x0 + sigma noise for img2img and inpainting,
and their guidance: classic CFG with a negative prompt when cfg_scale > 1 (SD 3.5's guidance_scale; FLUX's "true
CFG", diffusers' true_cfg_scale, which Forge runs for a CFG scale above 1), SD 3.5's skip-layer guidance, FLUX dev's
distilled guidance fed to the model (Forge's distilled_cfg_scale, diffusers' guidance_scale), and FLUX's own
defaults (dev: 28 steps, CFG 1, distilled 3.5; schnell: 4 steps, CFG 1). Facts come from the manifest's
family_config (and the transformer's inputs: its block gates).
"""

import numpy as np

from sdrt.errors import InvalidOption, ModelError
from sdrt.runtime.families.base import Family
from sdrt.runtime.flow import FlowConfig, FlowDenoiser, flow_schedule, noised
from sdrt.runtime.flow_conditioning import FluxConditioner, Sd3Conditioner, T5Text, clip_encoder
from sdrt.runtime.flow_models import PACK, FluxModel, Sd3Model
from sdrt.runtime.flow_options import (
    DISTILLED_CFG_SCALE,
    FLUX_OPTIONS,
    SLG_OPTIONS,
    SLG_SCALE,
    SLG_START,
    SLG_STOP,
    make_flux_options,
    make_slg_options,
)
from sdrt.runtime.flow_samplers import FLOW_VARIANTS
from sdrt.runtime.flow_specs import TRANSFORMER, gate_count
from sdrt.runtime.flux_parts import transformer_engine
from sdrt.runtime.previews import FLUX_PREVIEW_RGB, SD3_PREVIEW_RGB

# The samplers of these families: the deterministic ones run on flow sigmas as they are; Euler a and DPM++ 2M SDE
# (and its Heun form) in their rectified-flow forms (flow_samplers.py). The other ancestral and SDE samplers add
# noise in the variance-exploding form (not yet).
FLOW_SAMPLERS = ("Euler", "Euler a", "Heun", "DPM++ 2M", "UniPC", "LMS", "DPM2", "DPM++ 2M SDE", "DPM++ 2M SDE Heun")


class FlowFamily(Family):
    """What SD 3.5 and FLUX.1 share. SPACING: how the pipeline spaces sigmas before the shift (flow.SPACINGS)."""

    denoiser_model = TRANSFORMER
    lora_bases = ()  # no LoRA for these families yet: every LoRA file is refused
    spacing = "timesteps"
    patch = 2  # latent cells per image token side (the dynamic shift counts tokens)

    def conditioner(self, manifest, engines, embeddings):
        raise NotImplementedError

    def schedule(self, manifest, opts):
        """The shifted flow sigmas (flow.flow_sigmas) for OPTS' steps and image size."""
        _, h, w = self.latent_shape(manifest, opts.width, opts.height)
        config = FlowConfig.from_dict(manifest.family_config.get("flow", {}))
        return flow_schedule(opts.steps, config, self.spacing, (h // self.patch) * (w // self.patch))

    def added_feeds(self, manifest, opts, pooled_cond, pooled_uncond) -> dict[str, np.ndarray]:
        halves = [pooled_cond] if pooled_uncond is None else [pooled_uncond, pooled_cond]
        return {"pooled_projections": np.concatenate(halves).astype(np.float32)}

    def edit_steps(self, steps: int, strength: float) -> int:
        """The flow pipelines' get_timesteps: they skip int(steps - steps x strength) steps, so a fractional product
        runs one step more than int(steps x strength) (5 x 0.7: 4 steps, not 3)."""
        return steps - int(max(steps - min(steps * strength, steps), 0))

    def add_noise(self, x0: np.ndarray, eps: np.ndarray, sigma) -> np.ndarray:
        return noised(x0, eps, sigma)

    def sampler_function(self, name: str):
        return FLOW_VARIANTS.get(name) or super().sampler_function(name)

    def denoiser(self, model, opts, timesteps: dict, text, conditioning=None, control=None):
        if conditioning is not None or control is not None:
            raise ModelError(f"{model.manifest.folder}: {self.title} runs without ControlNet or inpainting channels")
        engine = transformer_engine(model.engines, model.manifest)  # one graph, or FLUX's part chain
        return FlowDenoiser(self.model(engine, model.manifest, opts), text, opts.cfg_scale, timesteps,
                            self.layer_skip(opts))

    def model(self, engine, manifest, opts):
        raise NotImplementedError

    def layer_skip(self, opts):
        """Skip-layer guidance's settings (flow_options.SlgOptions) when it runs, else None."""
        return None

    def check_options(self, manifest, opts) -> None:
        """Options this family cannot honour, refused by name: other samplers and schedules, ControlNet, LoRA, sizes
        the transformer cannot patch, guidance rescale, CLIP skip."""
        if opts.sampler not in FLOW_SAMPLERS:
            raise InvalidOption("sampler", opts.sampler, f"one of {', '.join(FLOW_SAMPLERS)} for {self.title} models")
        if opts.scheduler != "automatic":
            raise InvalidOption("scheduler", opts.scheduler, f"automatic: {self.title} models use their shifted sigmas")
        if opts.timestep_spacing is not None:
            raise InvalidOption("timestep_spacing", opts.timestep_spacing, f"None for {self.title} models")
        for field in ("guidance_rescale", "s_min_uncond", "skip_early_cond"):  # not in the flow denoiser (yet)
            if getattr(opts, field):
                raise InvalidOption(field, getattr(opts, field), f"0 for {self.title} models")
        if opts.controlnets:
            raise InvalidOption("controlnets", f"{len(opts.controlnets)} unit(s)", f"none: ControlNet for {self.title} "
                                "models is not supported yet")  # fmt: skip
        from sdrt.runtime.lora import parse_prompt

        loras = parse_prompt(opts.prompt)[1]
        if loras:
            raise InvalidOption("lora", loras[0].name, f"none: LoRA for {self.title} models is not supported yet")
        if opts.clip_skip != 1:
            raise InvalidOption("clip_skip", opts.clip_skip, f"1 for {self.title} models (as diffusers)")
        step = self.patch * manifest.latent_downsample
        largest = int(manifest.family_config.get("max_latent_size", 0)) * manifest.latent_downsample
        for field in ("width", "height"):
            size = getattr(opts, field)
            if size % step or (largest and size > largest):
                limit = f" up to {largest}" if largest else ""
                raise InvalidOption(field, size, f"a multiple of {step}{limit} for {self.title} models")


class SD3(FlowFamily):
    """SD 3 / 3.5 (Medium, Large, Large Turbo): MMDiT, CLIP-L + OpenCLIP bigG + optional T5-XXL, CFG."""

    name, title = "sd3", "SD 3.5"
    option_group, option_names = "sd3", SLG_OPTIONS
    preview_rgb = SD3_PREVIEW_RGB

    def conditioner(self, manifest, engines, embeddings):
        facts = manifest.family_config
        length = int(facts.get("t5_max_length", 256))
        t5 = T5Text(engines, manifest, facts["t5"], length) if facts.get("t5") else None
        clip_l = clip_encoder(engines, manifest, "text_encoder")
        clip_g = clip_encoder(engines, manifest, "text_encoder_2")
        return Sd3Conditioner(clip_l, clip_g, t5, length, int(manifest.text_hidden_size))

    def resolve_options(self, manifest, given: dict):
        return make_slg_options(given, gate_count(manifest))

    def check_options(self, manifest, opts) -> None:
        super().check_options(manifest, opts)
        if opts.family_options.skip_guidance_layers and not opts.guided:
            layers = list(opts.family_options.skip_guidance_layers)
            raise InvalidOption("skip_guidance_layers", layers, "None when cfg_scale <= 1: skip-layer guidance runs "
                                "with CFG, as in diffusers")  # fmt: skip

    def layer_skip(self, opts):
        return opts.family_options if opts.family_options.skip_guidance_layers else None

    def form(self, manifest) -> dict:
        slg = {"skip_guidance_layers": "", "skip_layer_guidance_scale": SLG_SCALE, "skip_layer_guidance_start":
               SLG_START, "skip_layer_guidance_stop": SLG_STOP}  # fmt: skip
        return {**super().form(manifest), "fields": slg if gate_count(manifest) else {}}

    def model(self, engine, manifest, opts):
        return Sd3Model(engine, gate_count(manifest))


class Flux(FlowFamily):
    """FLUX.1 dev (guidance-distilled: distilled_cfg_scale is fed to the model) and schnell (timestep-distilled, no
    guidance input): CLIP-L pooled + T5-XXL, packed 2x2 latents; cfg_scale > 1 runs true CFG (two passes a step)."""

    name, title = "flux", "FLUX.1"
    spacing, patch = "sigmas", PACK
    option_group, option_names = "flux", FLUX_OPTIONS
    dev_steps, schnell_steps = 28, 4  # FluxPipeline's default; FLUX.1 schnell's model card
    preview_rgb = FLUX_PREVIEW_RGB

    def conditioner(self, manifest, engines, embeddings):
        facts = manifest.family_config
        if not facts.get("t5"):
            raise ModelError(f"{manifest.folder}: a FLUX.1 model needs its T5 encoder; re-export it")
        t5 = T5Text(engines, manifest, facts["t5"], int(facts.get("t5_max_length", 512)))
        return FluxConditioner(clip_encoder(engines, manifest, "text_encoder"), t5)

    def option_defaults(self, manifest) -> dict:
        """CFG 1 (no true CFG: one transformer call a step, as Forge's FLUX preset and diffusers' true_cfg_scale 1);
        dev 28 steps, schnell 4."""
        distilled = bool(manifest.family_config.get("guidance_embeds"))
        return {"steps": self.dev_steps if distilled else self.schnell_steps, "cfg_scale": 1.0}

    def resolve_options(self, manifest, given: dict):
        return make_flux_options(given, bool(manifest.family_config.get("guidance_embeds")), self.title)

    def form(self, manifest) -> dict:
        """Dev: the distilled guidance field; the negative prompt only with true CFG (cfg_scale > 1)."""
        dev = manifest.family_config.get("guidance_embeds")
        fields = {"distilled_cfg_scale": DISTILLED_CFG_SCALE} if dev else {}
        return {**super().form(manifest), "fields": fields, "negative_prompt": "with_cfg"}

    def model(self, engine, manifest, opts):
        return FluxModel(engine, opts.family_options.distilled_cfg_scale)


FAMILIES = (SD3(), Flux())
