"""What the runtime asks a model family. The defaults are the UNet families' (SD 1.x/2.x): one CLIP text encoder,
a UNet predicting eps or v over the discrete DDPM schedule, 4-channel latents at 1/8 size."""

import numpy as np

from sdrt.errors import InvalidOption, ModelError
from sdrt.runtime.a1111_schedules import AYS_SIGMAS_SD15
from sdrt.runtime.previews import SD_PREVIEW_RGB

DEFAULT_STEPS, DEFAULT_CFG_SCALE = 20, 7.0  # A1111's txt2img defaults


class Family:
    """One model family: subclass it and override what differs (sd.py, sdxl.py)."""

    name = ""  # the manifest's "family"
    title = ""  # how users call it ("SD 1.x", "SDXL")
    denoiser_model = "unet"  # the graph that predicts the noise (a DiT family: "transformer")
    option_group = None  # GenerationOptions' group of options only this family takes (e.g. "sdxl")
    option_names: tuple[str, ...] = ()  # those options' names
    lora_bases: tuple[str, ...] = ("sd_v1", "sd_v2")  # kohya's ss_base_model_version prefixes of LoRAs that fit
    align_your_steps = AYS_SIGMAS_SD15  # the Align Your Steps schedule's table (a1111_schedules.py)
    fp32_models: tuple[str, ...] = ()  # graphs an fp16 variant keeps in fp32 (they overflow in fp16)
    preview_rgb = SD_PREVIEW_RGB  # A1111's "Approx cheap" preview: (latent channels, 3) latent -> RGB (previews.py)

    def check(self, manifest) -> None:
        """ModelError naming model.json when MANIFEST lists no graph of one this family needs."""
        where = repr(str(manifest.folder / "model.json"))
        for name in (self.denoiser_model, "vae_decoder"):
            if name not in manifest.models:
                raise ModelError(f"{where} lists no {name!r} model")
        if not self.text_models(manifest):
            raise ModelError(f"{where} lists no text encoder (text_encoder or text_encoder_2)")

    def text_models(self, manifest) -> list[str]:
        """The model's text encoder graphs, in the order they are loaded."""
        return [name for name in manifest.models if name.startswith("text_encoder")]

    def conditioner(self, manifest, engines, embeddings):
        """The Conditioner that turns texts into the denoiser's text inputs (conditioning.py)."""
        from sdrt.runtime.conditioning import Conditioner, TextEncoder
        from sdrt.runtime.tokenizer import ClipTokenizer

        tokenizer = ClipTokenizer.from_dir(manifest.folder / "tokenizer")
        encoder = TextEncoder(engines["text_encoder"], manifest, "text_encoder", tokenizer)
        return Conditioner([encoder], embeddings)

    def resolve_options(self, manifest, given: dict):
        """This family's own options (GenerationOptions.family_options), validated; GIVEN holds those the caller set
        (not None). The UNet families have none."""
        return None

    def option_defaults(self, manifest) -> dict:
        """Steps and cfg_scale where the caller gives none: A1111's 20 and 7 (a distilled family has its own)."""
        return {"steps": DEFAULT_STEPS, "cfg_scale": DEFAULT_CFG_SCALE}

    def form(self, manifest) -> dict:
        """What a form for MANIFEST's model shows (the web page, server/family_form.py): the steps and CFG defaults,
        this family's own fields {option name: default}, and when the negative prompt applies ("always", or
        "with_cfg": only with cfg_scale > 1)."""
        return {"defaults": self.option_defaults(manifest), "fields": {}, "negative_prompt": "always"}

    def edit_steps(self, steps: int, strength: float) -> int:
        """The steps img2img and inpainting run of STEPS at STRENGTH: int(steps x strength), as A1111 and diffusers'
        StableDiffusionImg2ImgPipeline (the schedule's last ones)."""
        return min(int(steps * strength), steps)

    def refuse_options(self, manifest, given: dict) -> None:
        """InvalidOption for the first of GIVEN (options of another family, not None) on a model of this family."""
        from sdrt.runtime.families import family_option_names

        owners = family_option_names()
        for field, value in given.items():
            owner = owners[field]
            if owner.option_group != self.option_group:
                raise InvalidOption(field, value, f"None: {field} is an {owner.title} option, and this model is "
                                                  f"{manifest.family}")  # fmt: skip

    def guided(self, opts) -> bool:
        """Whether classifier-free guidance runs (the negative prompt encoded, two halves a call): cfg_scale > 1."""
        return opts.guided

    def check_options(self, manifest, opts) -> None:
        """InvalidOption for a resolved option this family cannot honour (the UNet families take them all)."""

    def denoiser(self, model, opts, timesteps: dict, text, conditioning=None, control=None):
        """D(x, sigma) around MODEL's denoiser graph with guidance (denoiser.Denoiser: eps / v; DeepCache's graphs and
        A1111's negative-guidance skip when OPTS ask). CONDITIONING: an inpainting UNet's extra channels; CONTROL: a
        controlnet.ControlHook adding ControlNet residuals."""
        from sdrt.runtime import deepcache
        from sdrt.runtime.denoiser import Denoiser
        from sdrt.runtime.guidance_skip import uncond_skip

        engine = deepcache.denoiser_engine(model, opts)  # the plain graph, or DeepCache's two when it is on
        return Denoiser(engine, model.manifest.prediction_type, model.train_sigmas, timesteps, text, opts.cfg_scale,
                        guidance_rescale=opts.guidance_rescale, conditioning=conditioning, control=control,
                        skip_uncond=uncond_skip(opts))  # fmt: skip

    def sampler_function(self, name: str):
        """(function, the keyword arguments it takes) of the A1111 sampler NAME on this family (samplers.py)."""
        from sdrt.runtime.samplers import sampler_function

        return sampler_function(name)

    def add_noise(self, x0: np.ndarray, eps: np.ndarray, sigma) -> np.ndarray:
        """x at SIGMA from the clean latents X0 and unit noise EPS (img2img's start, inpainting's kept area): x0 +
        sigma eps, every discrete scheduler's add_noise in sigma units."""
        return (x0 + np.float32(sigma) * eps).astype(np.float32)

    def second_texts(self, opts, index: int, count: int) -> list[str] | None:
        """The second text encoder's own texts for prompt INDEX (0: prompt, 1: negative), or None: the same texts."""
        return None

    def zeroes_negative(self, manifest, opts) -> bool:
        """True when the negative prompt's conditioning is zeros instead of the encoded empty prompt."""
        return False

    def added_feeds(self, manifest, opts, pooled_cond, pooled_uncond) -> dict[str, np.ndarray]:
        """Denoiser inputs beyond the per-token text (uncond first), e.g. SDXL's pooled text and micro-conditioning."""
        return {}

    def latent_shape(self, manifest, width: int, height: int) -> tuple[int, int, int]:
        """(C, h, w) of one image's latents at WIDTH x HEIGHT pixels."""
        step = manifest.latent_downsample
        return manifest.latent_channels, height // step, width // step

    def schedule(self, manifest, opts):
        """The sampler's sigmas and the denoiser's timesteps for OPTS (schedules.build_schedule)."""
        from sdrt.runtime.samplers import SAMPLERS
        from sdrt.runtime.schedules import build_schedule

        rule = SAMPLERS[opts.sampler][1]
        return build_schedule(manifest.scheduler, opts.steps, rule, opts.scheduler, opts.timestep_spacing,
                              self.align_your_steps)  # fmt: skip

    def train_sigmas(self, manifest) -> np.ndarray:
        """(N,) float32 sigmas of the training schedule, for timesteps of sigmas off the schedule."""
        from sdrt.runtime.schedules import train_sigmas

        return train_sigmas(manifest.scheduler)

    def second_stage(self, opts):
        """(model folder or loaded Pipeline, fraction of the schedule where it takes over) of a second model that
        finishes the denoising (SDXL's refiner), or None."""
        return None

    def check_second_stage(self, base, second) -> None:
        """ModelError unless the manifest SECOND can continue BASE's latents."""

    def split_schedule(self, schedule, switch_at: float, manifest):
        """(first part, second part) of SCHEDULE where the second stage takes over at SWITCH_AT."""
        raise NotImplementedError

    def second_stage_infotext(self, second_manifest, switch_at: float) -> dict:
        return {}
