"""The one generation loop: a prepared run (Run) applied to batches of images (Batch), each sampled
(sampling.py), decoded and labelled with its infotext. `Pipeline.generate` runs one request's batch_count
batches through it; `batching.generate_batch` (`sdrt serve --ray`) runs several requests' images as one batch.

The stages see a Model (what they use of a loaded model), never the Pipeline.
"""

from dataclasses import dataclass, field

import numpy as np

from sdrt.errors import Interrupted, SkipImage
from sdrt.runtime.checks import require_finite
from sdrt.runtime.denoiser import TextConditioning
from sdrt.runtime.image import to_pil
from sdrt.runtime.infotext import write_infotext
from sdrt.runtime.vae_swap import vae_infotext


@dataclass
class Model:
    """What the generation stages use of a loaded model: its manifest and family, engines, VAE, the Conditioner of
    its text encoders and the training schedule's sigmas."""

    manifest: object  # runtime.manifest.Manifest
    family: object  # runtime.families.Family
    engines: dict  # graph name -> engine
    vae: object  # runtime.vae.Vae
    conditioner: object  # runtime.conditioning.Conditioner
    train_sigmas: np.ndarray  # (N,) float32
    # the denoiser graphs loaded now: "plain" (the UNet), "deepcache" (its two graphs); deepcache_memory.py
    denoiser_kinds: set = field(default_factory=lambda: {"plain"})

    @property
    def denoiser_engine(self):
        """The engine of the graph that predicts the noise (the family's denoiser_model: "unet", ...)."""
        return self.engines[self.family.denoiser_model]

    def decode(self, latents: np.ndarray, vae: str = "full", vae_file=None) -> np.ndarray:
        """(B, C, h, w) latents -> (B, 3, H, W) float32 images in [-1, 1]: the VAE (vae.py; VAE_FILE: a swapped one,
        vae_swap.py), or with VAE "taesd" the folder's TAESD decoder (previews.py)."""
        if vae == "taesd":
            from sdrt.runtime.previews import taesd_decode

            return taesd_decode(self.manifest, self.engines, latents)
        return self.vae.using(vae_file).decode(latents)

    def model_infotext(self) -> dict:
        """The infotext's model entries (A1111's "Model hash" and "Model")."""
        return {"Model hash": self.manifest.model_hash or None, "Model": self.manifest.model_name}


@dataclass(frozen=True)
class SecondStage:
    """A second model that finishes the denoising (SDXL's refiner): its Model, its TextConditioning for one image,
    and the fraction of the schedule where it takes over."""

    model: Model
    text: TextConditioning
    switch_at: float


@dataclass(frozen=True)
class Run:
    """What every batch of one generation shares: its options (the per-image ones excepted), the schedule, one
    image's latent shape, and the optional img2img/inpainting edit, ControlNets and second stage."""

    opts: object  # GenerationOptions
    schedule: object  # schedules.Schedule
    latent_shape: tuple[int, int, int]  # (C, h, w)
    edit: object = None  # editing.Edit
    control: object = None  # controlnet.ControlSet
    second: SecondStage | None = None

    @property
    def decoder(self) -> Model | None:
        """The model whose VAE decodes the result: the second stage's when there is one (None: the base's)."""
        return None if self.second is None else self.second.model


@dataclass
class Batch:
    """Images denoised together: their seeds, their conditioning (repeat(B) lays it out for B images), optional
    start latents (B, C, h, w), and per image the options and infotext notes its parameters are written from."""

    seeds: list
    subseeds: list
    text: TextConditioning
    start: np.ndarray | None = None
    labels: list = field(default_factory=list)  # per image: (GenerationOptions, notes dict)


def prepare_run(model: Model, opts, edit=None, control=None, second=None) -> Run:
    """The Run of OPTS on MODEL: its family's schedule and latent shape."""
    shape = model.family.latent_shape(model.manifest, opts.width, opts.height)
    return Run(opts, model.family.schedule(model.manifest, opts), shape, edit, control, second)


def run_batches(model: Model, run: Run, batches: list[Batch], bar, decode: bool = True) -> list:
    """Each batch sampled then, with DECODE, decoded into its labelled PIL images (else its final (B, C, h, w)
    latents), in order; a callback raising errors.Interrupted stops the run and returns the batches already
    finished (possibly none)."""
    from sdrt.runtime.sampling import sample

    finished = []
    for batch in batches:
        try:
            latents = sample(model, run, batch, bar)
        except SkipImage:  # A1111's Skip: this batch ends with its current x0 estimate; the run goes on
            if getattr(bar, "denoised", None) is None:
                break
            latents = (bar.denoised * np.float32(run.schedule.final_scale)).astype(np.float32)
            bar.skip_to((len(finished) + 1) * run.opts.steps_run)
        except Interrupted:
            break
        finished.append(images_of(model, run, batch, latents) if decode else latents)
    return finished


def images_of(model: Model, run: Run, batch: Batch, latents: np.ndarray) -> list:
    """BATCH's final LATENTS decoded (by the second stage's VAE when there is one) into PIL images, each with the
    infotext of its label."""
    decoder = run.decoder or model
    pixels = require_finite(decoder.decode(latents, run.opts.vae, run.opts.vae_file), "images", decoder.manifest)
    images = to_pil(pixels)
    for image, seed, subseed, (opts, notes) in zip(images, batch.seeds, batch.subseeds, batch.labels, strict=True):
        model_keys = model.model_infotext() | vae_infotext(opts)  # A1111: Model hash, Model, VAE hash, VAE
        image.info["parameters"] = write_infotext(opts, seed, subseed, model_keys, notes)
    return images
