"""The sampling loop of one batch: initial noise per image seed (or the img2img start), the denoiser around the
UNet, the sampler (samplers.py) over the schedule, SDXL's refiner handoff, and the per-step hook."""

import numpy as np

from sdrt.runtime import editing, samplers, sdxl
from sdrt.runtime.checks import require_finite
from sdrt.runtime.denoiser import Denoiser
from sdrt.runtime.rng import ImageNoise
from sdrt.runtime.schedules import Schedule, resolve_config


def sample(pipe, opts, schedule: Schedule, seeds, latent_shape, text, start, bar, subseeds, edit=None, refiner=None,
           control=None):  # fmt: skip
    """One batch -> (B, C, h, w) float32 latents for the VAE. PIPE: the Pipeline (engines, manifest, VAE).

    START: (B, C, h, w) latents replacing the drawn noise, or None. REFINER: (refiner Pipeline, its
    TextConditioning), SDXL's second stage. CONTROL: the generation's ControlNets (controlnet.ControlSet), on the
    base model's steps (the schedule after the img2img cut: guidance start/end are fractions of the steps run)."""
    manifest = pipe.manifest
    resize = opts.seed_resize_from
    noise = ImageNoise(  # noise() -> (B, C, h, w) float32, each image's own generator
        opts.rng,
        latent_shape,
        seeds,
        subseeds,
        opts.subseed_strength,
        None if resize is None else tuple(size // manifest.latent_downsample for size in resize),
        opts.ensd,
    )
    batch = len(seeds)
    conditioning, blend = None, None
    if edit is not None:
        schedule, x, conditioning, blend = editing.start_edit(manifest, pipe.vae, opts, schedule, edit, noise, batch,
                                                              start)  # fmt: skip
    elif start is None:
        x = (noise.initial() * np.float32(schedule.initial_noise_scale)).astype(np.float32)  # (B, C, h, w)
    else:
        noise.skip_initial()
        x = (start * np.float32(schedule.initial_noise_scale)).astype(np.float32)
    timesteps = dict(zip(schedule.sigmas[:-1].tolist(), schedule.timesteps.tolist(), strict=True))
    control_hook = None if control is None else control.hook(schedule.sigmas)
    stages = [(schedule, denoiser(pipe, opts, timesteps, text.repeat(batch), conditioning, control_hook))]
    if refiner is not None:  # SDXL: the refiner's UNet takes over at refiner_switch_at (diffusers' handoff)
        refiner_pipe, refiner_text = refiner
        parts = sdxl.split_schedule(schedule, opts.sdxl.refiner_switch_at, manifest.scheduler.num_train_timesteps)
        refined = denoiser(refiner_pipe, opts, timesteps, refiner_text.repeat(batch))
        stages = [(parts[0], stages[0][1]), (parts[1], refined)]
    fn, takes = samplers.sampler_function(opts.sampler)
    kwargs = {k: v for k, v in opts.sampler_kwargs().items() if k in takes}
    ddim = resolve_config(manifest.scheduler, "ddim")
    if "clip_denoised" in takes and ddim.clip_sample:
        kwargs["clip_denoised"] = ddim.clip_sample_range
    for part, stage in stages:
        if len(part.timesteps) == 0:
            continue
        if "timesteps" in takes:  # LCM's boundary condition is a function of the UNet timestep
            kwargs["timesteps"] = part.timesteps
            kwargs["timestep_scaling"] = manifest.scheduler.timestep_scaling
        hook = step_hook(part, blend, bar, final=stage is stages[-1][1])
        x = fn(stage, x, part.sigmas, noise=noise, callback=hook, **kwargs)
    return require_finite((x * np.float32(schedule.final_scale)).astype(np.float32), "latents", manifest)


def denoiser(pipe, opts, timesteps: dict, text, conditioning=None, control=None) -> Denoiser:
    """D(x, sigma) around PIPE's UNet with guidance; CONDITIONING: an inpainting UNet's extra channels; CONTROL: a
    controlnet.ControlHook adding ControlNet residuals."""
    return Denoiser(
        pipe.engines["unet"],
        pipe.manifest.prediction_type,
        pipe.train_sigmas,
        timesteps,
        text,
        opts.cfg_scale,
        guidance_rescale=opts.guidance_rescale,
        conditioning=conditioning,
        control=control,
    )


def step_hook(schedule: Schedule, blend, bar, final: bool = True):
    """The samplers' callback(i, x, denoised): for inpainting with a regular UNet the blend (editing.blend_known),
    then progress. FINAL False: SCHEDULE is a first stage (SDXL's base before its refiner), whose last step is not
    the end."""
    last = len(schedule.sigmas) - 2 if final else -1

    def hook(i, x, denoised):
        if blend is not None:
            editing.blend_known(x, blend, schedule, i, last)
        bar.update(denoised)

    return hook


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
