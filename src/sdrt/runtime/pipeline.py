"""The one place that wires the runtime together: options -> conditioning -> initial latents -> sampling -> VAE
decode -> images. Each stage lives in its own module (options, conditioning, editing, sampling, vae, infotext).

Never imports torch, diffusers or transformers.
"""

from pathlib import Path

import numpy as np

from sdrt.engines import resolve_backend
from sdrt.errors import InvalidOption
from sdrt.runtime import editing, hires, masks
from sdrt.runtime.conditioning import encode_prompts
from sdrt.runtime.controlnet import prepare_controls
from sdrt.runtime.controlnet_models import ControlNetCache
from sdrt.runtime.denoiser import TextConditioning
from sdrt.runtime.embeddings import EmbeddingDB
from sdrt.runtime.families import family_of
from sdrt.runtime.generation import Batch, Model, SecondStage, prepare_run, run_batches
from sdrt.runtime.lora import Loras, infotext_hashes, parse_prompt
from sdrt.runtime.lora_baked import baked_infotext
from sdrt.runtime.manifest import Manifest
from sdrt.runtime.memory import memory_plan
from sdrt.runtime.options import GenerationOptions, build_options, resolve
from sdrt.runtime.sampling import Progress
from sdrt.runtime.upscale import UpscalerSet
from sdrt.runtime.vae import Vae


class Pipeline:
    """A loaded model: `Pipeline.load(model_dir).generate(prompt, ...)` returns PIL images with infotext."""

    def __init__(self, manifest: Manifest, backend: str, low_vram: bool = False, vram_budget=None, vae_tile=None,
                 static=None, fused: bool = True, new_weights: bool = False, ram_budget=None):  # fmt: skip
        self.manifest = manifest
        self.family = family_of(manifest)  # what differs between model families (families/)
        self.backend = resolve_backend(backend, manifest.folder, new_weights=new_weights)
        self.memory = memory_plan(manifest, self.backend, low_vram, vram_budget, vae_tile, fused, ram_budget)
        self.engines = self.memory.create_engines(manifest, self.backend, fused, static)
        self.embeddings = EmbeddingDB()  # textual inversions, used by name in prompts
        self.loras = Loras(manifest, self.engines, self.family.lora_bases)  # by name in prompts, merged per run
        self.conditioner = self.family.conditioner(manifest, self.engines, self.embeddings)
        self.tokenizer = self.conditioner.encoders[0].tokenizer
        self.vae = Vae(manifest, self.engines, self.memory, self.backend)
        self.model = Model(manifest, self.family, self.engines, self.vae, self.conditioner,
                           self.family.train_sigmas(manifest))  # fmt: skip
        self.loras.denoiser_kinds = self.model.denoiser_kinds  # DeepCache's graphs not in use stay unloaded on merges
        self.second_stages = {}  # second-stage model folder (SDXL's refiner) -> its Pipeline, loaded once
        self.controlnets = ControlNetCache(self.backend)  # ControlNets by folder, loaded once (controlnet.py)
        self.upscalers = UpscalerSet(self.backend)  # hires fix's image upscalers: None, Lanczos, Nearest, models

    @classmethod
    def load(
        cls, model_dir, backend: str = "cpu", embeddings=None, low_vram: bool = False, vram_budget=None, vae_tile=None,
        static=None, fused: bool | None = None, loras=None, ram_budget=None, upscalers=None,
    ) -> "Pipeline":  # fmt: skip
        """Read MODEL_DIR (made by `sdrt export`), validate it, and load its engines.

        `embeddings`: a folder of textual inversion files (.pt, .bin, .safetensors), used by file name in prompts.
        `loras`: a folder of LoRA files (.safetensors, .pt, .ckpt, .bin; subfolders too), used by file name as
        A1111's `<lora:name:weight>` in prompts (lora.py).
        `backend`: "auto" (TensorRT, then CUDA, then CPU), "cpu", "cuda" or "tensorrt".
        `low_vram`: load one engine at a time (text encoder -> UNet -> VAE, each freed after use) and tile the VAE;
        `vram_budget` ("2GB") plans staging, TensorRT UNet weight streaming and tiling to fit it; `vae_tile`: VAE
        tile size in pixels (tiling.py). `ram_budget` ("6GB"), on the CPU backends: the same staging and tiling plan
        in host memory (ram_budget.py), refused when the UNet alone does not fit.
        `static`: (width, height, batch), one size: the UNet and VAE decoder fixed at it (faster; CUDA graphs on
        "cuda"); other sizes are refused. `fused`: the fused graphs `sdrt optimize` wrote for this backend, if any;
        by default yes, but not with `loras` (LoRAs merge into the export's own graphs; fused=True merges them into
        the fused CPU or CUDA variant's packed weights), and with `loras` backend "auto" weighs OpenVINO's LoRA steps
        against ONNX Runtime's (engines/auto.py, docs/guide/lora-engines.md).
        """
        fused = loras is None if fused is None else fused
        manifest = Manifest.load(Path(model_dir))
        pipe = cls(manifest, backend, low_vram, vram_budget, vae_tile, static, fused, new_weights=loras is not None,
                   ram_budget=ram_budget)  # fmt: skip
        if embeddings is not None:
            pipe.embeddings.load_dir(embeddings)
        if loras is not None:
            pipe.loras.load_dir(loras)
            pipe.loras.prepare_engines()  # engines that can ready their LoRA layers now (the first LoRA: a switch)
        if upscalers is not None:  # a folder of exported upscalers (`sdrt export-upscaler`), for hires fix
            pipe.upscalers.load_dir(upscalers)
        resident = (*pipe.family.text_models(pipe.manifest), pipe.family.denoiser_model, "vae_decoder")
        for name in () if pipe.memory.staged else resident:
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
        text, notes = self.encode_prompts(opts)
        notes["Lora hashes"] = infotext_hashes(active_loras, self.loras.files)
        notes["Baked LoRAs"] = baked_infotext(self.manifest)  # merged in at export (sdrt export --lora)
        controls = prepare_controls(self.manifest, self.engines, self.controlnets, opts.controlnets, opts.width,
                                    opts.height)  # fmt: skip
        if controls is not None:
            notes = {**notes, **controls.infotext()}
        second = self.second_stage(opts)
        if second is not None:
            notes = {**notes, **self.family.second_stage_infotext(second.model.manifest, second.switch_at)}
        run = prepare_run(self.model, opts, edit, controls, second)
        batches = []
        for b in range(opts.batch_count):
            rows = slice(b * opts.batch_size, (b + 1) * opts.batch_size)
            given = opts.latents if opts.init_latents is None else opts.init_latents  # noise, or init_latents
            start = None if given is None else given[rows]
            batches.append(Batch(opts.seeds[rows], opts.subseeds[rows], text, start, [(opts, notes)] * opts.batch_size))
        bar = Progress(opts.batch_count * opts.steps_run, progress, callback, opts.live_preview_content)
        latent = opts.output_type == "latent"
        finished = run_batches(self.model, run, batches, bar, decode=not latent)
        bar.close()
        if latent:
            return np.concatenate(finished) if finished else np.zeros((0, *run.latent_shape), np.float32)
        images = [image for batch in finished for image in batch]
        pasted = editing.paste_back(images, edit)  # new images: they keep the infotext
        for image, original in zip(pasted, images, strict=True):
            image.info["parameters"] = original.info["parameters"]
        images = pasted
        return images + (controls.maps if opts.control_maps and controls is not None else [])

    def second_stage(self, opts) -> SecondStage | None:
        """The family's second stage for OPTS (SDXL's refiner): its model, loaded once per folder and checked to
        continue this model's latents, with its conditioning of OPTS' prompts."""
        wanted = self.family.second_stage(opts)
        if wanted is None:
            return None
        source, switch_at = wanted
        if isinstance(source, Pipeline):
            loaded = source
        else:
            key = str(Path(source).resolve())
            if key not in self.second_stages:
                self.second_stages[key] = Pipeline.load(source, backend=self.backend)
            loaded = self.second_stages[key]
        self.family.check_second_stage(self.manifest, loaded.manifest)
        return SecondStage(loaded.model, loaded.encode_prompts(opts)[0], switch_at)

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
        return encode_prompts(self.conditioner, self.family, self.manifest, opts)

    def decode(self, latents: np.ndarray, vae: str = "full") -> np.ndarray:
        """(B, C, h, w) latents -> (B, 3, H, W) float32 images in [-1, 1] (vae.py; VAE "taesd": previews.py)."""
        return self.model.decode(latents, vae)

    def preview(self, latents: np.ndarray, method: str = "TAESD") -> list:
        """PIL previews of (B, C, h, w) latents (a callback's denoised) by A1111's live preview METHOD: "Full",
        "Approx NN", "Approx cheap" or "TAESD" (previews.py; without its graph in the folder Approx NN falls back to
        TAESD, and TAESD to Approx cheap)."""
        from sdrt.runtime.image import to_pil
        from sdrt.runtime.previews import preview_images

        return to_pil(preview_images(self.model, latents, method))

    def model_infotext(self) -> dict:
        """The infotext's model entries (A1111's "Model hash" and "Model")."""
        return self.model.model_infotext()
