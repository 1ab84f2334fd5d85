"""SD 3.5 and FLUX.1 as families: what each says about its graphs, prompts, latents, schedule and denoiser, read from
its manifest (family_config, written by export/sd3.py and export/flux.py). The family seam (runtime/families/) plugs
these in; `flow_latents` runs one batch through them (txt2img and img2img) for callers and tests until it does.
"""

from dataclasses import dataclass

import numpy as np

from sdrt.errors import InvalidOption, ModelError
from sdrt.runtime import samplers
from sdrt.runtime.denoiser import TextConditioning
from sdrt.runtime.flow import FlowConfig, FlowDenoiser, flow_schedule, noised
from sdrt.runtime.flow_conditioning import FluxConditioner, Sd3Conditioner, T5Text, clip_encoder
from sdrt.runtime.flow_models import PACK, FluxModel, Sd3Model, check_packable
from sdrt.runtime.flow_specs import TRANSFORMER


@dataclass(frozen=True)
class FlowFamily:
    """One flow family's facts: SPACING of its pipeline's sigmas (flow.SPACINGS), PATCH latent cells per image token
    (for the dynamic shift), whether it takes classic CFG with a negative prompt (SD 3.5) or a distilled guidance
    input (FLUX dev), and the default guidance scale of its diffusers pipeline."""

    name: str
    spacing: str
    patch: int
    cfg: bool
    default_guidance: float

    def config(self, manifest) -> FlowConfig:
        return FlowConfig.from_dict(manifest.family_config.get("flow", {}))

    def image_tokens(self, h: int, w: int) -> int:
        """Transformer image tokens of an (h, w) latent (FLUX's dynamic shift grows with them)."""
        return (h // self.patch) * (w // self.patch)

    def schedule(self, manifest, steps: int, h: int, w: int):
        return flow_schedule(steps, self.config(manifest), self.spacing, self.image_tokens(h, w))

    def conditioner(self, engines: dict, manifest):
        """The family's prompt -> text feeds (flow_conditioning.py)."""
        facts = manifest.family_config
        t5_name, t5_length = facts.get("t5"), int(facts.get("t5_max_length", 256))
        t5 = T5Text(engines, manifest, t5_name, t5_length) if t5_name else None
        clip_l = clip_encoder(engines, manifest, "text_encoder")
        if self.name == "flux":
            if t5 is None:
                raise ModelError(f"{manifest.folder}: a FLUX.1 model needs its T5 encoder; re-export it")
            return FluxConditioner(clip_l, t5)
        clip_g = clip_encoder(engines, manifest, "text_encoder_2")
        return Sd3Conditioner(clip_l, clip_g, t5, t5_length, int(manifest.text_hidden_size))

    def model(self, engines: dict, manifest, guidance: float):
        """MODEL(x, t, feeds) -> v around the transformer engine; GUIDANCE feeds FLUX dev's guidance input."""
        if self.name == "flux":
            return FluxModel(engines[TRANSFORMER], guidance if manifest.family_config.get("guidance_embeds") else None)
        return Sd3Model(engines[TRANSFORMER])

    def check_size(self, manifest, h: int, w: int) -> None:
        """Latent sizes the transformer takes: even (2x2 patches) and, for SD 3, within its position embedding."""
        down = manifest.latent_downsample
        if self.name == "flux":
            check_packable(h, w, down)
            return
        largest = int(manifest.family_config.get("max_latent_size", 0)) or None
        for field, cells in (("height", h), ("width", w)):
            if cells % self.patch:
                raise InvalidOption(field, cells * down, f"a multiple of {self.patch * down} for SD 3.5 models")
            if largest and cells > largest:
                raise InvalidOption(field, cells * down, f"at most {largest * down} for this SD 3.5 model")


# The samplers that run on flow sigmas as they are: the deterministic ones. The ancestral and SDE samplers add noise
# in the variance-exploding form (x0 + sigma noise); flow models need their rectified-flow variants (not yet).
FLOW_SAMPLERS = ("Euler", "Heun", "DPM++ 2M", "UniPC", "LMS", "DPM2")
FAMILIES = {
    "sd3": FlowFamily("sd3", spacing="timesteps", patch=2, cfg=True, default_guidance=7.0),
    "flux": FlowFamily("flux", spacing="sigmas", patch=PACK, cfg=False, default_guidance=3.5),
}


def flow_family(manifest) -> FlowFamily:
    try:
        return FAMILIES[manifest.family]
    except KeyError:
        raise ModelError(f"{manifest.folder}: family {manifest.family!r} is not a flow family") from None


def flow_latents(manifest, engines: dict, prompts: list[str], noise: np.ndarray, steps: int, guidance: float,
                 negative: list[str] | None = None, sampler: str = "Euler", init: np.ndarray | None = None,
                 strength: float = 1.0, mask: np.ndarray | None = None, callback=None) -> np.ndarray:  # fmt: skip
    """One batch: (B, C, h, w) float32 NOISE -> the final (B, C, h, w) latents for the VAE (scaled, shifted).

    GUIDANCE: SD 3.5's CFG scale (uncond = NEGATIVE, "" by default; off at <= 1, as diffusers) or FLUX dev's
    distilled guidance. INIT: (B, C, h, w) scaled latents of an init image (img2img): sampling starts at the
    schedule's step int(steps - steps * STRENGTH), from (1 - sigma) INIT + sigma NOISE (diffusers' scale_noise).
    MASK: (1 or B, 1, h, w) float32, 1 = repaint: inpainting with a regular transformer, the kept area reset after
    each step to INIT noised to the next sigma (clean after the last), as diffusers' SD 3 / FLUX inpaint pipelines.
    """
    family = flow_family(manifest)
    _, _, h, w = noise.shape
    family.check_size(manifest, h, w)
    schedule = family.schedule(manifest, steps, h, w)
    conditioner = family.conditioner(engines, manifest)
    feeds = conditioner(prompts)
    guided = family.cfg and guidance > 1
    if guided:
        uncond = conditioner(negative or [""] * len(prompts))
        feeds = {k: np.concatenate([uncond[k], feeds[k]]) for k in feeds}
    text = TextConditioning.fixed(feeds, guided)
    sigmas, timesteps = schedule.sigmas, schedule.timesteps
    x = noise.astype(np.float32)
    if init is not None:  # diffusers' get_timesteps: the last int(steps * strength) steps
        start = int(max(steps - min(steps * strength, steps), 0))
        sigmas, timesteps = sigmas[start:], timesteps[start:]
        x = noised(init, noise, sigmas[0])
    model = family.model(engines, manifest, guidance)
    denoiser = FlowDenoiser(model, text, guidance, dict(zip(sigmas[:-1].tolist(), timesteps.tolist(), strict=True)))
    if sampler not in FLOW_SAMPLERS:
        raise InvalidOption("sampler", sampler, f"one of {', '.join(FLOW_SAMPLERS)} for flow models (for now)")
    fn, _ = samplers.sampler_function(sampler)
    hook = callback
    if mask is not None:
        if init is None:
            raise InvalidOption("mask", "given", "a mask with an init image (inpainting)")
        hook = inpaint_blend(init, noise, mask, sigmas, callback)
    kwargs = {"callback": hook} if hook is not None else {}
    return fn(denoiser, x, sigmas, **kwargs).astype(np.float32)


def inpaint_blend(init: np.ndarray, noise: np.ndarray, mask: np.ndarray, sigmas: np.ndarray, then=None):
    """The samplers' callback(i, x, denoised) that keeps the unmasked area on INIT's path: after step i, x there is
    INIT noised to sigmas[i + 1] (INIT itself after the last step); THEN(i, x, denoised) runs after it."""
    last = len(sigmas) - 2
    keep = (np.float32(1.0) - mask).astype(np.float32)

    def hook(i, x, denoised):
        known = init if i >= last else noised(init, noise, sigmas[i + 1])
        x[...] = keep * known + mask * x
        if then is not None:
            then(i, x, denoised)

    return hook
