"""The one place that wires the runtime together: prompt -> text encoder -> sampler(UNet) -> VAE -> images.

Never imports torch, diffusers or transformers.
"""

import inspect
import math
from pathlib import Path

import numpy as np

from sdrt import __version__
from sdrt.engines import create_engine
from sdrt.runtime import samplers
from sdrt.runtime.denoiser import Denoiser
from sdrt.runtime.errors import InvalidOption, ModelError
from sdrt.runtime.image import format_number, infotext, to_pil
from sdrt.runtime.manifest import Manifest
from sdrt.runtime.options import SAMPLERS, SCHEDULERS, GenerationOptions, make_options
from sdrt.runtime.rng import A1111_RNG_LABELS, ImageNoise
from sdrt.runtime.schedules import Schedule, build_schedule, resolve_config, train_sigmas
from sdrt.runtime.tokenizer import ClipTokenizer


class Pipeline:
    """A loaded model: `Pipeline.load(model_dir).generate(prompt, ...)` returns PIL images with infotext."""

    def __init__(self, manifest: Manifest, backend: str):
        self.manifest = manifest
        self.backend = backend
        self.tokenizer = ClipTokenizer.from_dir(manifest.folder / "tokenizer")
        self.engines = {name: create_engine(manifest.model_path(name), backend) for name in manifest.models}
        self.train_sigmas = train_sigmas(manifest.scheduler)  # (N,) float32

    @classmethod
    def load(cls, model_dir, backend: str = "cpu") -> "Pipeline":
        """Read MODEL_DIR (made by `sdrt export`), validate it, and load its engines."""
        pipe = cls(Manifest.load(Path(model_dir)), backend)
        for name in ("text_encoder", "unet", "vae_decoder"):
            pipe.engines[name].load()
        return pipe

    def generate(
        self,
        prompt: str,
        negative_prompt: str = "",
        width: int | None = None,
        height: int | None = None,
        steps: int = 20,
        cfg_scale: float = 7.0,
        sampler: str = "Euler",
        scheduler: str = "automatic",
        seed: int = -1,
        batch_size: int = 1,
        batch_count: int = 1,
        latents: np.ndarray | None = None,
        output_type: str = "pil",
        rng: str = "torch",
        subseed: int = -1,
        subseed_strength: float = 0.0,
        seed_resize_from_w: int = 0,
        seed_resize_from_h: int = 0,
        ensd: int = 0,
        eta: float | None = None,
        s_noise: float = 1.0,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = math.inf,
        timestep_spacing: str | None = None,
        guidance_rescale: float = 0.0,
        progress: bool = True,
    ):
        """txt2img. Returns batch_size * batch_count PIL images, or their final latents with output_type="latent".

        `latents` (batch_size * batch_count, C, height/8, width/8) float32 replaces the drawn initial noise.
        `eta`, `s_noise`, `s_churn`, `s_tmin`, `s_tmax` reach the samplers that take them (k-diffusion's meanings).
        `rng`, `subseed`, `subseed_strength`, `seed_resize_from_w`/`_h` and `ensd` are A1111's seed options (rng.py).
        `timestep_spacing` ("leading", "linspace", "trailing") replaces the model config's spacing;
        `guidance_rescale` is Lin et al. 2023's phi (diffusers' guidance_rescale), with guidance only.
        """
        if self.manifest.unet_in_channels != self.manifest.latent_channels:
            raise ModelError(
                f"{self.manifest.folder} is an inpainting model (UNet takes {self.manifest.unet_in_channels} "
                "channels: latents, mask and masked-image latents); this version of sdrt runs it only for inpainting, "
                "which is not supported yet"
            )
        opts = make_options(
            self.manifest,
            prompt=prompt,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            steps=steps,
            cfg_scale=cfg_scale,
            sampler=sampler,
            scheduler=scheduler,
            seed=seed,
            batch_size=batch_size,
            batch_count=batch_count,
            rng=rng,
            subseed=subseed,
            subseed_strength=subseed_strength,
            seed_resize_from_w=seed_resize_from_w,
            seed_resize_from_h=seed_resize_from_h,
            ensd=ensd,
            output_type=output_type,
            eta=eta,
            s_noise=s_noise,
            s_churn=s_churn,
            s_tmin=s_tmin,
            s_tmax=s_tmax,
            timestep_spacing=timestep_spacing,
            guidance_rescale=guidance_rescale,
        )
        latent_shape = (
            self.manifest.latent_channels,
            opts.height // self.manifest.latent_downsample,
            opts.width // self.manifest.latent_downsample,
        )
        total = opts.batch_size * opts.batch_count
        if latents is not None:
            latents = np.asarray(latents, dtype=np.float32)
            if latents.shape != (total, *latent_shape):
                raise InvalidOption(
                    "latents",
                    f"array of shape {latents.shape}",
                    f"shape {(total, *latent_shape)} (batch_size * batch_count, C, height/8, width/8)",
                )
        schedule = build_schedule(
            self.manifest.scheduler, opts.steps, SAMPLERS[opts.sampler][1], opts.scheduler, opts.timestep_spacing
        )
        cond, uncond = self.encode_prompts(opts)  # (1, L, C) each
        results = []
        bar = _progress(total * opts.steps, progress)
        for b in range(opts.batch_count):
            seeds = opts.seeds[b * opts.batch_size : (b + 1) * opts.batch_size]
            start = None if latents is None else latents[b * opts.batch_size : (b + 1) * opts.batch_size]
            subseeds = opts.subseeds[b * opts.batch_size : (b + 1) * opts.batch_size]
            final = self.sample(opts, schedule, seeds, latent_shape, cond, uncond, start, bar, subseeds=subseeds)
            results.append(final if opts.output_type == "latent" else self.decode(final))
        bar.close()
        if opts.output_type == "latent":
            return np.concatenate(results)
        images = [im for batch in results for im in to_pil(batch)]
        for im, seed, subseed in zip(images, opts.seeds, opts.subseeds, strict=True):
            im.info["parameters"] = self.infotext(opts, seed, subseed)
        return images

    def encode_prompts(self, opts: GenerationOptions) -> tuple[np.ndarray, np.ndarray | None]:
        """(1, L, C) float32 embeddings of the prompt and, with guidance, of the negative prompt."""
        texts = [opts.prompt, opts.negative_prompt] if opts.guided else [opts.prompt]
        ids = self.tokenizer(texts, self.manifest.text_max_length)  # (1 or 2, L) int64
        hidden = self.engines["text_encoder"].run({"input_ids": ids})["last_hidden_state"]  # (1 or 2, L, C)
        return hidden[:1], (hidden[1:2] if opts.guided else None)

    def sample(self, opts, schedule: Schedule, seeds, latent_shape, cond, uncond, start, bar, subseeds=None):
        """One batch: initial noise per image seed, the sampler, then the latent the VAE decodes."""
        resize = opts.seed_resize_from
        noise = ImageNoise(  # noise() -> (B, C, h, w) float32, each image's own generator
            opts.rng,
            latent_shape,
            seeds,
            subseeds,
            opts.subseed_strength,
            None if resize is None else tuple(size // self.manifest.latent_downsample for size in resize),
            opts.ensd,
        )
        if start is None:
            start = noise.initial()  # (B, C, h, w) float32
        else:
            noise.skip_initial()
        x = (start * np.float32(schedule.initial_noise_scale)).astype(np.float32)

        batch = len(seeds)
        timesteps = dict(zip(schedule.sigmas[:-1].tolist(), schedule.timesteps.tolist(), strict=True))
        denoise = Denoiser(
            self.engines["unet"],
            self.manifest.prediction_type,
            self.train_sigmas,
            timesteps,
            np.repeat(cond, batch, axis=0),
            None if uncond is None else np.repeat(uncond, batch, axis=0),
            opts.cfg_scale,
            guidance_rescale=opts.guidance_rescale,
        )
        fn = getattr(samplers, SAMPLERS[opts.sampler][0])
        kwargs = sampler_kwargs(fn, opts.sampler_kwargs())
        ddim_cfg = resolve_config(self.manifest.scheduler, "ddim")
        if "clip_denoised" in kwargs_accepted(fn) and ddim_cfg.clip_sample:
            kwargs["clip_denoised"] = ddim_cfg.clip_sample_range
        if "timesteps" in kwargs_accepted(fn):  # LCM's boundary condition is a function of the UNet timestep
            kwargs["timesteps"] = schedule.timesteps
            kwargs["timestep_scaling"] = self.manifest.scheduler.timestep_scaling
        x = fn(denoise, x, schedule.sigmas, noise=noise, callback=lambda i, x, d: bar.update(), **kwargs)
        return (x * np.float32(schedule.final_scale)).astype(np.float32)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """(B, C, h, w) latents -> (B, 3, H, W) float32 images in [-1, 1], one image per VAE call."""
        scaled = latents / np.float32(self.manifest.vae_scaling_factor)
        if self.manifest.vae_shift_factor is not None:
            scaled = scaled + np.float32(self.manifest.vae_shift_factor)
        vae = self.engines["vae_decoder"]
        return np.concatenate([vae.run({"latent_sample": z[None]})["sample"] for z in scaled.astype(np.float32)])

    def infotext(self, opts: GenerationOptions, seed: int, subseed: int | None = None) -> str:
        """The "parameters" text of one image, with A1111's keys in A1111's order."""
        params = {
            "Steps": opts.steps,
            "Sampler": opts.sampler,
            "Schedule type": SCHEDULERS[opts.scheduler],
            "CFG scale": format_number(opts.cfg_scale),
            "Seed": seed,
            "Size": f"{opts.width}x{opts.height}",
            "Model hash": self.manifest.model_hash or None,
            "Model": self.manifest.model_name,
            "Variation seed": subseed if opts.subseed_strength else None,
            "Variation seed strength": format_number(opts.subseed_strength) if opts.subseed_strength else None,
            "Seed resize from": opts.seed_resize_from and f"{opts.seed_resize_from_w}x{opts.seed_resize_from_h}",
            "ENSD": opts.ensd if opts.records_ensd else None,
            "RNG": A1111_RNG_LABELS[opts.rng],
            "Timestep spacing": opts.timestep_spacing,
            "Guidance rescale": format_number(opts.guidance_rescale) if opts.guidance_rescale else None,
            "Version": f"sdrt {__version__}",
        }
        return infotext(opts.prompt, opts.negative_prompt, params)


def kwargs_accepted(fn) -> set[str]:
    return set(inspect.signature(fn).parameters)


def sampler_kwargs(fn, knobs: dict) -> dict:
    """The knobs FN takes; the others do not apply to it (as in A1111, where Euler ignores eta)."""
    accepted = kwargs_accepted(fn)
    return {k: v for k, v in knobs.items() if k in accepted}


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="generate", unit="step", disable=not enabled, leave=False)
