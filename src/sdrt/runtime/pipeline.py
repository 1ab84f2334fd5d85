"""The one place that wires the runtime together: options -> conditioning -> initial latents -> sampling -> VAE
decode -> images. Each stage lives in its own module (options, conditioning, editing, sampling, vae, infotext).

Never imports torch, diffusers or transformers.
"""

from pathlib import Path

import numpy as np

from sdrt.engines import resolve_backend
from sdrt.errors import Interrupted, InvalidOption
from sdrt.runtime import editing, hires, masks, sdxl
from sdrt.runtime.checks import require_finite
from sdrt.runtime.conditioning import Conditioner, TextEncoder, encode_prompts
from sdrt.runtime.controlnet import ControlNetCache, prepare_controls
from sdrt.runtime.denoiser import TextConditioning
from sdrt.runtime.embeddings import EmbeddingDB
from sdrt.runtime.image import to_pil
from sdrt.runtime.infotext import write_infotext
from sdrt.runtime.lora import Loras, infotext_hashes, parse_prompt
from sdrt.runtime.manifest import TEXT_ENCODER_NAMES, Manifest
from sdrt.runtime.memory import memory_plan
from sdrt.runtime.options import SAMPLERS, GenerationOptions, build_options, resolve
from sdrt.runtime.sampling import Progress, sample
from sdrt.runtime.schedules import build_schedule, train_sigmas
from sdrt.runtime.tokenizer import ClipTokenizer
from sdrt.runtime.upscale import UpscalerSet
from sdrt.runtime.vae import Vae


class Pipeline:
    """A loaded model: `Pipeline.load(model_dir).generate(prompt, ...)` returns PIL images with infotext."""

    def __init__(self, manifest: Manifest, backend: str, low_vram: bool = False, vram_budget=None, vae_tile=None,
                 static=None, fused: bool = True, new_weights: bool = False):  # fmt: skip
        self.manifest = manifest
        self.backend = resolve_backend(backend, manifest.folder, new_weights=new_weights)
        self.memory = memory_plan(manifest, self.backend, low_vram, vram_budget, vae_tile, fused)  # staging, tiling
        self.engines = self.memory.create_engines(manifest, self.backend, fused, static)
        self.embeddings = EmbeddingDB()  # textual inversions, used by name in prompts
        self.loras = Loras(manifest, self.engines)  # LoRAs, by name in prompts (<lora:name:w>), merged per run
        if manifest.family == "sdxl":  # two text encoders (a refiner: the second only), sdxl.py
            self.conditioner = sdxl.sdxl_conditioner(manifest, self.engines, self.embeddings)
            self.tokenizer = self.conditioner.encoders[0].tokenizer
        else:
            self.tokenizer = ClipTokenizer.from_dir(manifest.folder / "tokenizer")
            encoder = TextEncoder(self.engines["text_encoder"], manifest, "text_encoder", self.tokenizer)
            self.conditioner = Conditioner([encoder], self.embeddings)
        self.train_sigmas = train_sigmas(manifest.scheduler)  # (N,) float32
        self.refiners = {}  # SDXL refiner folder -> its Pipeline, loaded once (sdxl.load_refiner)
        self.vae = Vae(manifest, self.engines, self.memory)
        self.controlnets = ControlNetCache(self.backend)  # ControlNets by folder, loaded once (controlnet.py)
        self.upscalers = UpscalerSet(self.backend)  # hires fix's image upscalers: None, Lanczos, Nearest, models

    @classmethod
    def load(
        cls, model_dir, backend: str = "cpu", embeddings=None, low_vram: bool = False, vram_budget=None, vae_tile=None,
        static=None, fused: bool | None = None, loras=None, upscalers=None,
    ) -> "Pipeline":  # fmt: skip
        """Read MODEL_DIR (made by `sdrt export`), validate it, and load its engines.

        `embeddings`: a folder of textual inversion files (.pt, .bin, .safetensors), used by file name in prompts.
        `loras`: a folder of LoRA files (.safetensors, .pt, .ckpt, .bin; subfolders too), used by file name as
        A1111's `<lora:name:weight>` in prompts (lora.py).
        `backend`: "auto" (TensorRT, then CUDA, then CPU), "cpu", "cuda" or "tensorrt".
        `low_vram`: load one engine at a time (text encoder -> UNet -> VAE, each freed after use) and tile the VAE;
        `vram_budget` ("2GB") plans staging, TensorRT UNet weight streaming and tiling to fit it; `vae_tile`: VAE
        tile size in pixels (tiling.py).
        `static`: (width, height, batch), one size: the UNet and VAE decoder fixed at it (faster; CUDA graphs on
        "cuda"); other sizes are refused. `fused`: the fused graphs `sdrt optimize` wrote for this backend, if any;
        by default yes, but not with `loras` (LoRAs merge into the export's own graphs, whose weights the fused ones
        hold packed), and with `loras` backend "auto" passes over OpenVINO (its engines take no new weights yet).
        """
        fused = loras is None if fused is None else fused
        manifest = Manifest.load(Path(model_dir))
        pipe = cls(manifest, backend, low_vram, vram_budget, vae_tile, static, fused, new_weights=loras is not None)
        if embeddings is not None:
            pipe.embeddings.load_dir(embeddings)
        if loras is not None:
            pipe.loras.load_dir(loras)
        if upscalers is not None:  # a folder of exported upscalers (`sdrt export-upscaler`), for hires fix
            pipe.upscalers.load_dir(upscalers)
        text_encoders = [name for name in TEXT_ENCODER_NAMES if name in pipe.manifest.models]
        for name in () if pipe.memory.staged else (*text_encoders, "unet", "vae_decoder"):
            pipe.engines[name].load()
        return pipe

    def generate(self, prompt: str | None = None, options: GenerationOptions | None = None, *, progress: bool = True,
                 callback=None, **overrides):
        """PIL images (or their final latents with output_type="latent"): batch_size * batch_count of them.

        OPTIONS (GenerationOptions, every field documented there and in the README) with OVERRIDES by field name:
        `pipe.generate("a cat", steps=30, sampler="DPM++ 2M")`. PROMPT, when given, replaces the options' prompt.
        img2img: `init_image`; inpainting: also `mask` (white = repaint) and A1111's mask options.

        `callback(step, total_steps, denoised)` runs after each sampler step: step counts 1..batch_count * steps run
        over the whole run; denoised (batch_size, C, h, w) float32 is the sampler's current x0 estimate. If it raises
        errors.Interrupted, the run stops there and returns the batches already finished (possibly none).
        """
        if prompt is not None:
            overrides["prompt"] = prompt
        opts = resolve(build_options(options, **overrides), self.manifest)
        if opts.hires:  # txt2img, upscale, img2img: two runs of this method (hires.py)
            return hires.run(self, opts, progress, callback)
        self.conditioner.check(opts.clip_skip, opts.emphasis)
        active_loras = parse_prompt(opts.prompt)[1]
        self.loras.apply(active_loras)  # merged into the text encoders and UNet before they run
        editing_run = opts.init_image is not None or opts.init_latents is not None
        edit = editing.prepare_edit(self.manifest, opts) if editing_run else None
        step = self.manifest.latent_downsample
        latent_shape = (self.manifest.latent_channels, opts.height // step, opts.width // step)
        schedule = build_schedule(
            self.manifest.scheduler, opts.steps, SAMPLERS[opts.sampler][1], opts.scheduler, opts.timestep_spacing
        )
        text, notes = self.encode_prompts(opts)
        notes["Lora hashes"] = infotext_hashes(active_loras, self.loras.files)
        controls = prepare_controls(self, opts.controlnets, opts.width, opts.height)  # None without ControlNets
        if controls is not None:
            notes = {**notes, **controls.infotext()}
        refiner, decoder = None, self
        if opts.sdxl is not None and opts.sdxl.refiner is not None:  # SDXL's second stage, and its VAE decodes
            decoder = sdxl.load_refiner(self, opts.sdxl.refiner)
            refiner = (decoder, decoder.encode_prompts(opts)[0])
            notes = {**notes, **sdxl.refiner_infotext(decoder.manifest, opts.sdxl.refiner_switch_at)}
        results = []
        bar = Progress(opts.batch_count * opts.steps_run, progress, callback)
        for b in range(opts.batch_count):
            batch = slice(b * opts.batch_size, (b + 1) * opts.batch_size)
            given = opts.latents if opts.init_latents is None else opts.init_latents  # noise, or init_latents
            start = None if given is None else given[batch]
            try:
                final = sample(self, opts, schedule, opts.seeds[batch], latent_shape, text, start, bar,
                               opts.subseeds[batch], edit=edit, refiner=refiner, control=controls)  # fmt: skip
            except Interrupted:  # the callback stopped the run: keep the batches already finished
                break
            if opts.output_type != "latent":
                final = require_finite(decoder.decode(final), "images", decoder.manifest)
            results.append(final)
        bar.close()
        if opts.output_type == "latent":
            return np.concatenate(results) if results else np.zeros((0, *latent_shape), np.float32)
        images = editing.paste_back([im for batch in results for im in to_pil(batch)], edit)
        for im, seed, subseed in zip(images, opts.seeds[: len(images)], opts.subseeds[: len(images)], strict=True):
            im.info["parameters"] = write_infotext(opts, seed, subseed, self.model_infotext(), notes)
        return images + (controls.maps if opts.control_maps and controls is not None else [])

    def outpaint(self, image, prompt: str | None = None, left: int = 0, right: int = 0, up: int = 0, down: int = 0,
                 options: GenerationOptions | None = None, **kwargs):
        """Extend IMAGE by multiples of 8 pixels and inpaint the new area (masks.outpaint_canvas), on any model.

        The canvas is the image plus edge-extended, noised borders; its mask covers the new area and
        overlaps the old border by masks.OUTPAINT_OVERLAP pixels, feathered, so the seam is repainted.
        Pixels farther than that (plus the mask blur's reach) inside the old image are kept exactly.
        `options`/`kwargs` go to generate(); `strength` defaults to 1 (the new area is drawn from noise),
        the other editing options to A1111's. The image's sides must be multiples of 8, and the canvas is
        the output size (width/height, if given, must match it).
        """
        amounts = masks.check_outpaint_amounts(left, right, up, down)
        image = masks.load_image(image, "image", self.manifest.min_size // 8, self.manifest.max_size)
        step = self.manifest.latent_downsample
        if image.width % step or image.height % step:
            raise InvalidOption("image", f"{image.width}x{image.height}", f"sides that are multiples of {step} pixels")
        seed = kwargs.get("seed", -1 if options is None else options.seed)
        prefill_seed = seed if isinstance(seed, int) and seed >= 0 else 0  # the prefill noise follows the seed
        canvas, mask = masks.outpaint_canvas(image, **amounts, seed=prefill_seed)
        for field, size in (("width", canvas.width), ("height", canvas.height)):
            given = kwargs.get(field, None if options is None else getattr(options, field))
            if given not in (None, size):
                raise InvalidOption(field, given, f"{size}: the outpainted canvas's {field}")
            kwargs[field] = size
        kwargs.setdefault("strength", 1.0 if options is None else options.strength)
        return self.generate(prompt, options, init_image=canvas, mask=mask, **kwargs)

    def encode_prompts(self, opts: GenerationOptions) -> tuple[TextConditioning, dict]:
        """The conditioning of each denoiser call for one image, and its infotext notes (conditioning.py)."""
        return encode_prompts(self.conditioner, self.manifest, opts)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """(B, C, h, w) latents -> (B, 3, H, W) float32 images in [-1, 1] (vae.py)."""
        return self.vae.decode(latents)

    def model_infotext(self) -> dict:
        """The infotext's model entries (A1111's "Model hash" and "Model")."""
        return {"Model hash": self.manifest.model_hash or None, "Model": self.manifest.model_name}
