"""The one place that wires the runtime together: prompt -> text encoder -> sampler(UNet) -> VAE -> images.

Never imports torch, diffusers or transformers.
"""

import inspect
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sdrt import __version__
from sdrt.engines import resolve_backend
from sdrt.engines.memory import memory_plan
from sdrt.runtime import masks, samplers, sdxl
from sdrt.runtime.checks import require_finite
from sdrt.runtime.conditioning import Conditioner, Encoded, TextEncoder, pad_to
from sdrt.runtime.denoiser import Denoiser, TextConditioning
from sdrt.runtime.embeddings import EmbeddingDB
from sdrt.runtime.errors import Interrupted, InvalidOption, ModelError
from sdrt.runtime.image import format_number, from_pil, infotext, to_pil
from sdrt.runtime.manifest import TEXT_ENCODER_NAMES, Manifest
from sdrt.runtime.options import SAMPLERS, SCHEDULERS, GenerationOptions, make_options
from sdrt.runtime.prompt import prompt_schedules
from sdrt.runtime.rng import A1111_RNG_LABELS, ImageNoise
from sdrt.runtime.schedules import Schedule, build_schedule, resolve_config, train_sigmas
from sdrt.runtime.tiling import decode_tiled, encode_tiled
from sdrt.runtime.tokenizer import ClipTokenizer


class Pipeline:
    """A loaded model: `Pipeline.load(model_dir).generate(prompt, ...)` returns PIL images with infotext."""

    def __init__(self, manifest: Manifest, backend: str, low_vram: bool = False, vram_budget=None, vae_tile=None):
        self.manifest = manifest
        self.backend = resolve_backend(backend, manifest.folder)
        self.memory = memory_plan(manifest, self.backend, low_vram, vram_budget, vae_tile)  # staging, tiling
        self.engines = self.memory.create_engines(manifest, self.backend)
        self.embeddings = EmbeddingDB()  # textual inversions, used by name in prompts
        if manifest.family == "sdxl":  # two text encoders (a refiner: the second only), sdxl.py
            self.conditioner = sdxl.sdxl_conditioner(manifest, self.engines, self.embeddings)
            self.tokenizer = self.conditioner.encoders[0].tokenizer
        else:
            self.tokenizer = ClipTokenizer.from_dir(manifest.folder / "tokenizer")
            encoder = TextEncoder(self.engines["text_encoder"], manifest, "text_encoder", self.tokenizer)
            self.conditioner = Conditioner([encoder], self.embeddings)
        self.train_sigmas = train_sigmas(manifest.scheduler)  # (N,) float32
        self.refiners = {}  # SDXL refiner folder -> its Pipeline, loaded once (sdxl.load_refiner)

    @classmethod
    def load(
        cls, model_dir, backend: str = "cpu", embeddings=None, low_vram: bool = False, vram_budget=None, vae_tile=None
    ) -> "Pipeline":
        """Read MODEL_DIR (made by `sdrt export`), validate it, and load its engines.

        `embeddings`: a folder of textual inversion files (.pt, .bin, .safetensors), used by file name in prompts.
        `backend`: "auto" (TensorRT, then CUDA, then CPU), "cpu", "cuda" or "tensorrt".
        `low_vram`: load one engine at a time (text encoder -> UNet -> VAE, each freed after use) and tile the VAE;
        `vram_budget` ("2GB") plans staging, TensorRT UNet weight streaming and tiling to fit it; `vae_tile`: VAE
        tile size in pixels (tiling.py).
        """
        pipe = cls(Manifest.load(Path(model_dir)), backend, low_vram, vram_budget, vae_tile)
        if embeddings is not None:
            pipe.embeddings.load_dir(embeddings)
        text_encoders = [name for name in TEXT_ENCODER_NAMES if name in pipe.manifest.models]
        for name in () if pipe.memory.staged else (*text_encoders, "unet", "vae_decoder"):
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
        init_image=None,
        strength: float = 0.75,
        resize_mode: str = "just resize",
        mask=None,
        mask_blur: int = 4,
        inpainting_fill: str = "original",
        inpaint_full_res: bool = False,
        inpaint_full_res_padding: int = 32,
        inpainting_mask_invert: bool = False,
        clip_skip: int = 1,
        emphasis: str = "Original",
        progress: bool = True,
        callback=None,
        prompt_2: str | None = None,
        negative_prompt_2: str | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] | None = None,
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] | None = None,
        negative_target_size: tuple[int, int] | None = None,
        aesthetic_score: float | None = None,
        negative_aesthetic_score: float | None = None,
        refiner=None,
        refiner_switch_at: float | None = None,
    ):
        """txt2img. Returns batch_size * batch_count PIL images, or their final latents with output_type="latent".

        `latents` (batch_size * batch_count, C, height/8, width/8) float32 replaces the drawn initial noise.
        `eta`, `s_noise`, `s_churn`, `s_tmin`, `s_tmax` reach the samplers that take them (k-diffusion's meanings).
        `rng`, `subseed`, `subseed_strength`, `seed_resize_from_w`/`_h` and `ensd` are A1111's seed options (rng.py).
        `timestep_spacing` ("leading", "linspace", "trailing") replaces the model config's spacing;
        `guidance_rescale` is Lin et al. 2023's phi (diffusers' guidance_rescale), with guidance only.

        img2img: `init_image` (PIL image or path) is resized to width x height (default: its own size, rounded down
        to a multiple of 8) by `resize_mode`, encoded, noised to the schedule's sigma after the first
        steps - int(steps * strength) steps, and sampled for the int(steps * strength) left (diffusers' rule).
        Inpainting: `mask` (white = repaint) with A1111's `mask_blur`, `inpainting_fill`, `inpaint_full_res`(+
        `_padding`) and `inpainting_mask_invert`; pixels outside the (blurred) mask are the init image's.

        `callback(step, total_steps, denoised)` runs after each sampler step: step counts 1..batch_count * steps run
        over the whole run; denoised (batch_size, C, h, w) float32 is the sampler's current x0 estimate. If it raises
        errors.Interrupted, the run stops there and returns the batches already finished (possibly none).

        SDXL only (sdxl.py, diffusers' names): `prompt_2`/`negative_prompt_2` for the second text encoder (default:
        the first's), micro-conditioning `original_size`, `crops_coords_top_left`, `target_size` and their
        `negative_` variants ((height, width) and (top, left) pixels; default: the generated size, no crop), the
        refiner's `aesthetic_score`/`negative_aesthetic_score` (6, 2.5), and `refiner` (a refiner model folder)
        taking over at `refiner_switch_at` (0.8) of the noise schedule (diffusers' denoising_end/_start).
        """
        sdxl_options = {name: value for name, value in locals().items() if name in sdxl.SDXL_OPTIONS}
        editing = init_image is not None
        if not editing:
            if mask is not None:
                raise InvalidOption("mask", "a mask", "None without init_image (the image to inpaint)")
            if self.manifest.unet_in_channels != self.manifest.latent_channels:
                raise ModelError(
                    f"{self.manifest.folder} is an inpainting model (UNet takes {self.manifest.unet_in_channels} "
                    "channels: latents, mask and masked-image latents); sdrt runs it for img2img and inpainting "
                    "(pass init_image, and a mask), not txt2img"
                )
        else:
            if latents is not None:
                raise InvalidOption("latents", "an array", "None with init_image (the init image gives the start)")
            init_image = masks.load_image(init_image, "init_image")
            step = self.manifest.latent_downsample
            width = init_image.width // step * step if width is None else width
            height = init_image.height // step * step if height is None else height
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
            strength=strength if editing else None,
            mask_blur=mask_blur if mask is not None else None,
            clip_skip=clip_skip,
            emphasis=emphasis,
            sdxl=sdxl_options,
        )
        self.conditioner.check(opts.clip_skip, opts.emphasis)
        edit = None
        if editing:
            edit = self.prepare_edit(
                opts,
                init_image,
                masks.check_resize_mode(resize_mode),
                mask,
                masks.check_inpainting_fill(inpainting_fill),
                inpaint_full_res,
                inpaint_full_res_padding,
                inpainting_mask_invert,
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
        text, notes = self.encode_prompts(opts)
        refiner, decoder = None, self
        if opts.sdxl is not None and opts.sdxl.refiner is not None:  # SDXL's second stage, and its VAE decodes
            decoder = sdxl.load_refiner(self, opts.sdxl.refiner)
            refiner = (decoder, decoder.encode_prompts(opts)[0])
            notes = {**notes, **sdxl.refiner_infotext(decoder.manifest, opts.sdxl.refiner_switch_at)}
        results = []
        bar = Progress(opts.batch_count * opts.steps_run, progress, callback)
        for b in range(opts.batch_count):
            seeds = opts.seeds[b * opts.batch_size : (b + 1) * opts.batch_size]
            start = None if latents is None else latents[b * opts.batch_size : (b + 1) * opts.batch_size]
            subseeds = opts.subseeds[b * opts.batch_size : (b + 1) * opts.batch_size]
            try:
                final = self.sample(
                    opts, schedule, seeds, latent_shape, text, start, bar, subseeds=subseeds, edit=edit, refiner=refiner
                )
            except Interrupted:  # the callback stopped the run: keep the batches already finished
                break
            if opts.output_type != "latent":
                final = require_finite(decoder.decode(final), "images", decoder.manifest)
            results.append(final)
        bar.close()
        if opts.output_type == "latent":
            return np.concatenate(results) if results else np.zeros((0, *latent_shape), np.float32)
        images = [im for batch in results for im in to_pil(batch)]
        if edit is not None and edit.overlay is not None:
            images = [masks.paste_back(im, edit.original, edit.overlay, edit.paste_box) for im in images]
        for im, seed, subseed in zip(images, opts.seeds[: len(images)], opts.subseeds[: len(images)], strict=True):
            im.info["parameters"] = self.infotext(opts, seed, subseed, notes)
        return images

    def outpaint(self, image, prompt: str, left: int = 0, right: int = 0, up: int = 0, down: int = 0, **kwargs):
        """Extend IMAGE by multiples of 8 pixels and inpaint the new area (masks.outpaint_canvas), on any model.

        The canvas is the image plus edge-extended, noised borders; its mask covers the new area and
        overlaps the old border by masks.OUTPAINT_OVERLAP pixels, feathered, so the seam is repainted.
        Pixels farther than that (plus the mask blur's reach) inside the old image are kept exactly.
        `kwargs` go to generate(); `strength` defaults to 1 (the new area is drawn from noise),
        the other editing options to A1111's. The image's sides must be multiples of 8, and the canvas is
        the output size (width/height, if given, must match it).
        """
        amounts = masks.check_outpaint_amounts(left, right, up, down)
        image = masks.load_image(image, "image", self.manifest.min_size // 8, self.manifest.max_size)
        step = self.manifest.latent_downsample
        if image.width % step or image.height % step:
            raise InvalidOption("image", f"{image.width}x{image.height}", f"sides that are multiples of {step} pixels")
        seed = kwargs.get("seed", -1)
        prefill_seed = seed if isinstance(seed, int) and seed >= 0 else 0  # the prefill noise follows the seed
        canvas, mask = masks.outpaint_canvas(image, **amounts, seed=prefill_seed)
        for field, size in (("width", canvas.width), ("height", canvas.height)):
            if kwargs.setdefault(field, size) not in (None, size):
                raise InvalidOption(field, kwargs[field], f"{size}: the outpainted canvas's {field}")
            kwargs[field] = size
        kwargs.setdefault("strength", 1.0)
        return self.generate(prompt, init_image=canvas, mask=mask, **kwargs)

    def encode_prompts(self, opts: GenerationOptions) -> tuple[TextConditioning, dict]:
        """The prompt's (and with guidance the negative prompt's) conditioning for each denoiser call, for one image,
        and the infotext fields it adds. Prompt editing gives one entry per switch (A1111's schedules over opts.steps);
        cond and uncond are padded to the same length with the empty prompt's chunk (A1111's "Pad conds")."""
        prompts = [opts.prompt, opts.negative_prompt] if opts.guided else [opts.prompt]
        schedules = prompt_schedules(prompts, opts.steps)  # per prompt: [(last step, text)]
        encoded = []  # per prompt: [(last step, Encoded)]
        for index, schedule in enumerate(schedules):
            texts = [text for _, text in schedule]
            second = sdxl.second_texts(opts, index, len(texts))  # SDXL's prompt_2 / negative_prompt_2
            result = self.conditioner.encode(texts, opts.clip_skip, opts.emphasis, texts_2=second)
            if index == 1 and sdxl.zeroes_negative(self.manifest, opts):
                result = sdxl.zeroed(result)
            encoded.append([(end, self._row(result, i)) for i, (end, _) in enumerate(schedule)])
        length = max(e.context.shape[1] for entries in encoded for _, e in entries)
        padded = any(e.context.shape[1] != length for entries in encoded for _, e in entries)
        if padded:
            empty = self.conditioner.empty(opts.clip_skip)
            encoded = [[(end, Encoded(pad_to(e.context, length, empty), e.pooled, e.used)) for end, e in entries]
                       for entries in encoded]
        ends = sorted({end for entries in encoded for end, _ in entries})
        feeds = []
        for end in ends:
            at = [next((e for last, e in entries if end <= last), entries[-1][1]) for entries in encoded]
            feeds.append(self.text_feeds(at[0], at[1] if opts.guided else None, opts))
        used = {e.name: e for entries in encoded for _, enc in entries for e in enc.used}
        notes = {
            "Emphasis": opts.emphasis if opts.emphasis != "Original" and _has_emphasis(prompts) else None,
            "TI hashes": ", ".join(f"{_clean(n)}: {e.shorthash}" for n, e in used.items()) or None,
            "Pad conds": True if padded else None,
        }
        return TextConditioning(tuple(ends), tuple(feeds), opts.guided), notes

    @staticmethod
    def _row(encoded: Encoded, i: int) -> Encoded:
        pooled = None if encoded.pooled is None else encoded.pooled[i : i + 1]
        return Encoded(encoded.context[i : i + 1], pooled, encoded.used)

    def text_feeds(self, cond: Encoded, uncond: Encoded | None, opts: GenerationOptions) -> dict:
        """UNet text inputs for one image, uncond first: {"encoder_hidden_states": (2 or 1, L, C) float32}, and
        for SDXL the pooled text_embeds (2 or 1, P) and micro-conditioning time_ids (2 or 1, 6 or 5)."""
        halves = [cond] if uncond is None else [uncond, cond]
        feeds = {"encoder_hidden_states": np.concatenate([h.context for h in halves]).astype(np.float32)}
        if self.manifest.family == "sdxl":
            feeds |= sdxl.added_feeds(self.manifest, opts, cond.pooled, None if uncond is None else uncond.pooled)
        return feeds

    def sample(
        self, opts, schedule: Schedule, seeds, latent_shape, text, start, bar, subseeds=None, edit=None, refiner=None
    ):
        """One batch: initial noise per image seed, the sampler, then the latent the VAE decodes.

        REFINER: (refiner Pipeline, its TextConditioning), SDXL's second stage."""
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
        batch = len(seeds)
        conditioning, blend = None, None
        if edit is not None:
            schedule, x, conditioning, blend = self.start_edit(opts, schedule, edit, noise, batch)
        elif start is None:
            x = (noise.initial() * np.float32(schedule.initial_noise_scale)).astype(np.float32)  # (B, C, h, w)
        else:
            noise.skip_initial()
            x = (start * np.float32(schedule.initial_noise_scale)).astype(np.float32)
        timesteps = dict(zip(schedule.sigmas[:-1].tolist(), schedule.timesteps.tolist(), strict=True))
        denoise = Denoiser(
            self.engines["unet"],
            self.manifest.prediction_type,
            self.train_sigmas,
            timesteps,
            text.repeat(batch),
            opts.cfg_scale,
            guidance_rescale=opts.guidance_rescale,
            conditioning=conditioning,
        )
        fn = getattr(samplers, SAMPLERS[opts.sampler][0])
        kwargs = sampler_kwargs(fn, opts.sampler_kwargs())
        ddim_cfg = resolve_config(self.manifest.scheduler, "ddim")
        if "clip_denoised" in kwargs_accepted(fn) and ddim_cfg.clip_sample:
            kwargs["clip_denoised"] = ddim_cfg.clip_sample_range
        stages = [(schedule, denoise)]
        if refiner is not None:  # SDXL: the refiner's UNet takes over at refiner_switch_at (diffusers' handoff)
            refiner_pipe, refiner_text = refiner
            base_part, refiner_part = sdxl.split_schedule(
                schedule, opts.sdxl.refiner_switch_at, self.manifest.scheduler.num_train_timesteps
            )
            refined = Denoiser(
                refiner_pipe.engines["unet"],
                refiner_pipe.manifest.prediction_type,
                refiner_pipe.train_sigmas,
                timesteps,
                refiner_text.repeat(batch),
                opts.cfg_scale,
                guidance_rescale=opts.guidance_rescale,
            )
            stages = [(base_part, denoise), (refiner_part, refined)]
        for part, stage in stages:
            if len(part.timesteps) == 0:
                continue
            if "timesteps" in kwargs_accepted(fn):  # LCM's boundary condition is a function of the UNet timestep
                kwargs["timesteps"] = part.timesteps
                kwargs["timestep_scaling"] = self.manifest.scheduler.timestep_scaling
            hook = step_hook(part, blend, bar, final=stage is stages[-1][1])
            x = fn(stage, x, part.sigmas, noise=noise, callback=hook, **kwargs)
        return require_finite((x * np.float32(schedule.final_scale)).astype(np.float32), "latents", self.manifest)

    def prepare_edit(self, opts, image, resize_mode, mask, fill, full_res, full_res_padding, invert) -> "Edit":
        """The init image and mask as the sampler needs them (A1111's StableDiffusionProcessingImg2Img.init order:
        invert, blur, crop for "only masked" or resize, fill), and what the paste-back needs."""
        size = (opts.width, opts.height)
        inpaint_unet = self.manifest.unet_in_channels != self.manifest.latent_channels
        if mask is None and not inpaint_unet:
            return Edit(image=from_pil(masks.resize_image(image, *size, resize_mode)))
        if mask is None:  # an inpainting UNet without a mask repaints everything (A1111's img2img conditioning)
            pixel_mask, overlay = Image.new("L", image.size, 255), None
        else:
            pixel_mask, notes = masks.load_mask(mask, image.size)
            for note in notes:
                warnings.warn(note, stacklevel=3)
            if invert:
                pixel_mask = masks.invert_mask(pixel_mask)
            masks.check_mask_not_empty(pixel_mask)
            if opts.mask_blur:
                pixel_mask = masks.blur_mask(pixel_mask, opts.mask_blur)
            overlay = pixel_mask if full_res else masks.overlay_mask(pixel_mask)
        original, paste_box = image, None
        if full_res:
            if mask is None:
                raise InvalidOption("inpaint_full_res", full_res, "False without a mask")
            padding = _int_option("inpaint_full_res_padding", full_res_padding, 0, max(image.size))
            image, pixel_mask, paste_box = masks.crop_for_inpaint(image, pixel_mask, *size, padding)
        else:
            image = masks.resize_image(image, *size, resize_mode)
            pixel_mask = masks.resize_image(pixel_mask, *size, resize_mode)
            if overlay is not None:
                original, overlay = image, masks.resize_image(overlay, *size, resize_mode)
        image = masks.fill_init_image(image, pixel_mask, fill)
        step = self.manifest.latent_downsample
        repaint = (np.asarray(pixel_mask, dtype=np.float32) / 255 >= 0.5).astype(np.float32)  # (H, W), binarised
        pixels = from_pil(image)  # (1, 3, H, W) float32 in [-1, 1]
        return Edit(
            image=pixels,
            latent_mask=masks.latent_mask(pixel_mask, opts.width // step, opts.height // step),
            conditioning_mask=repaint[None, None, ::step, ::step],  # nearest, as torch's interpolate
            masked_image=(pixels * (1 - repaint)).astype(np.float32),  # masked area grey (0)
            fill=fill,
            original=original,
            overlay=overlay,
            paste_box=paste_box,
        )

    def start_edit(self, opts, schedule: Schedule, edit: "Edit", noise: ImageNoise, batch: int):
        """(schedule cut to the steps run, starting x, UNet conditioning, blend state) of img2img / inpainting.

        Each image's generator draws in diffusers' order (StableDiffusionImg2ImgPipeline / InpaintPipeline
        prepare_latents, then prepare_mask_latents): init image latents, initial noise, masked-image latents.
        """
        inpaint_unet = self.manifest.unet_in_channels != self.manifest.latent_channels
        inpainting = edit.latent_mask is not None
        first = len(schedule.timesteps) - opts.steps_run
        cut = Schedule(schedule.sigmas[first:], schedule.timesteps[first:], schedule.initial_noise_scale)
        pure_noise = inpainting and opts.strength == 1.0  # diffusers' inpaint starts from noise alone at strength 1
        x0 = None if inpaint_unet and pure_noise else self.encode(edit.image, noise)  # (B, C, h, w)
        eps = noise.initial()  # (B, C, h, w) float32
        if x0 is not None and inpainting and edit.fill in ("latent noise", "latent nothing"):
            x0 = masks.fill_init_latents(x0, edit.latent_mask, edit.fill, eps)
        if pure_noise:
            x = eps * np.float32(cut.initial_noise_scale)
        elif opts.steps_run == 0:  # strength 0 (or steps * strength < 1): the init image through the VAE
            x = x0 / np.float32(cut.final_scale)
        else:  # x0 + sigma eps: every scheduler's add_noise in x0 + sigma * eps units
            x = x0 + np.float32(cut.sigmas[0]) * eps
        conditioning = None
        if inpaint_unet:
            masked = self.encode(edit.masked_image, noise)  # (B, C, h, w)
            conditioning = np.concatenate([np.repeat(edit.conditioning_mask, batch, axis=0), masked], axis=1)
        elif inpainting:  # diffusers samples the masked image's latents with regular UNets too, unused: skip a draw
            noise()
        blend = (x0, eps, edit.latent_mask) if inpainting and not inpaint_unet else None
        return cut, x.astype(np.float32), conditioning, blend

    def encode(self, images: np.ndarray, noise: ImageNoise) -> np.ndarray:
        """(1, 3, H, W) image in [-1, 1] -> (B, C, h, w) scaled latents: one sample of the VAE posterior per image,
        from that image's generator (diffusers' retrieve_latents in "sample" mode)."""
        if "vae_encoder" not in self.engines:
            raise ModelError(f"{self.manifest.folder} has no VAE encoder: re-export the model with this sdrt")
        if self.memory.tiles([side // self.manifest.latent_downsample for side in images.shape[2:]]):
            out = encode_tiled(self.engines["vae_encoder"], images.astype(np.float32), *self.memory.tiling)
        else:
            out = self.engines["vae_encoder"].run({"sample": images.astype(np.float32)})
        mean, logvar = out["latent_mean"], out["latent_logvar"]  # (1, C, h, w) float32 each
        z = mean + np.exp(np.float32(0.5) * logvar) * noise()  # (B, C, h, w)
        if self.manifest.vae_shift_factor is not None:
            z = z - np.float32(self.manifest.vae_shift_factor)
        return (z * np.float32(self.manifest.vae_scaling_factor)).astype(np.float32)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """(B, C, h, w) latents -> (B, 3, H, W) float32 images in [-1, 1], one image per VAE call."""
        scaled = latents / np.float32(self.manifest.vae_scaling_factor)
        if self.manifest.vae_shift_factor is not None:
            scaled = scaled + np.float32(self.manifest.vae_shift_factor)
        vae = self.engines["vae_decoder"]
        if self.memory.tiles(scaled.shape):  # overlapping tiles, blended (tiling.py)
            return np.concatenate([decode_tiled(vae, z[None], *self.memory.tiling) for z in scaled.astype(np.float32)])
        return np.concatenate([vae.run({"latent_sample": z[None]})["sample"] for z in scaled.astype(np.float32)])

    def infotext(self, opts: GenerationOptions, seed: int, subseed: int | None = None, notes=None) -> str:
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
            "Denoising strength": None if opts.strength is None else format_number(opts.strength),
            "Clip skip": opts.clip_skip if opts.clip_skip > 1 else None,
            "ENSD": opts.ensd if opts.records_ensd else None,
            "RNG": A1111_RNG_LABELS[opts.rng],
            "Eta": None if opts.eta is None else format_number(opts.eta),
            "Mask blur": opts.mask_blur,
            **(notes or {}),
            "Timestep spacing": opts.timestep_spacing,
            "Guidance rescale": format_number(opts.guidance_rescale) if opts.guidance_rescale else None,
            "Version": f"sdrt {__version__}",
        }
        return infotext(opts.prompt, opts.negative_prompt, params)


@dataclass(frozen=True)
class Edit:
    """img2img / inpainting inputs at the generated size. Masks: 1 (or 255) = repaint."""

    image: np.ndarray  # (1, 3, H, W) float32 in [-1, 1]: the (filled) init image the VAE encodes
    latent_mask: np.ndarray | None = None  # (1, 1, h, w) float32 0/1: where the sampler's result is kept
    conditioning_mask: np.ndarray | None = None  # (1, 1, h, w) float32 0/1: inpainting UNets' mask channel
    masked_image: np.ndarray | None = None  # (1, 3, H, W) float32: init image with the repainted area at 0
    fill: str = "original"  # A1111's inpainting_fill
    original: Image.Image | None = None  # what the result is pasted onto
    overlay: Image.Image | None = None  # L mask of the paste-back (None: no paste-back)
    paste_box: tuple[int, int, int, int] | None = None  # (x, y, w, h) with inpaint_full_res


def step_hook(schedule: Schedule, blend, bar, final: bool = True):
    """The samplers' callback(i, x, denoised): progress, and for inpainting with a regular UNet the blend of
    StableDiffusionInpaintPipeline: after step i, x outside the mask is replaced in place by the init latents
    noised to sigmas[i + 1] with the initial noise (clean after the last step), so the next step starts from it.
    FINAL False: SCHEDULE is a first stage (SDXL's base before its refiner), whose last step is not the end."""
    last = len(schedule.sigmas) - 2 if final else -1

    def hook(i, x, denoised):
        if blend is not None:
            x0, eps, mask = blend  # (B, C, h, w), (B, C, h, w), (1, 1, h, w)
            if i == last:
                known = x0 / np.float32(schedule.final_scale)
            else:
                known = x0 + np.float32(schedule.sigmas[i + 1]) * eps
            np.copyto(x, (1 - mask) * known + mask * x)
        bar.update(denoised)

    return hook


def _has_emphasis(texts) -> bool:
    """A1111 records a non-default emphasis only for prompts with brackets."""
    return any("(" in t or "[" in t for t in texts)


def _clean(name: str) -> str:
    return name.replace(":", "").replace(",", "")


def _int_option(field: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise InvalidOption(field, value, f"an integer from {low} to {high}")
    return int(value)


def kwargs_accepted(fn) -> set[str]:
    return set(inspect.signature(fn).parameters)


def sampler_kwargs(fn, knobs: dict) -> dict:
    """The knobs FN takes; the others do not apply to it (as in A1111, where Euler ignores eta)."""
    accepted = kwargs_accepted(fn)
    return {k: v for k, v in knobs.items() if k in accepted}


class Progress:
    """A run's sampler steps: a tqdm bar, and the caller's callback(step, total_steps, denoised) after each."""

    def __init__(self, total: int, enabled: bool, callback=None):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="generate", unit="step", disable=not enabled, leave=False)
        self.total, self.done, self.callback = total, 0, callback

    def update(self, denoised: np.ndarray | None = None) -> None:
        self.bar.update()
        self.done += 1
        if self.callback is not None:
            self.callback(self.done, self.total, denoised)

    def close(self) -> None:
        self.bar.close()
