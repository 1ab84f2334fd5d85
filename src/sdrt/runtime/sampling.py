"""The sampling loop of one batch: initial noise per image seed (or the img2img start), the denoiser around the
family's denoiser graph, the sampler (samplers.py) over the schedule, a second stage's handoff (SDXL's refiner),
and the per-step hook."""

import numpy as np

from sdrt.runtime import editing
from sdrt.runtime.checks import require_finite
from sdrt.runtime.rng import ImageNoise
from sdrt.runtime.schedules import Schedule, resolve_config, train_sigmas


def sample(model, run, batch, bar) -> np.ndarray:
    """One batch (generation.Batch) of a generation.Run on MODEL (generation.Model) -> (B, C, h, w) float32 latents
    for the VAE.

    batch.start: (B, C, h, w) latents replacing the drawn noise, or None. run.second: the model that takes over
    (SDXL's refiner). run.control: the ControlNets (controlnet.ControlSet), on the first model's steps (the schedule
    after the img2img cut: guidance start/end are fractions of the steps run)."""
    manifest, opts, schedule = model.manifest, run.opts, run.schedule
    resize = opts.seed_resize_from
    noise = ImageNoise(  # noise() -> (B, C, h, w) float32, each image's own generator
        opts.rng,
        run.latent_shape,
        batch.seeds,
        batch.subseeds,
        opts.subseed_strength,
        None if resize is None else tuple(size // manifest.latent_downsample for size in resize),
        opts.ensd,
    )
    size = len(batch.seeds)
    conditioning, blend = None, None
    if run.edit is not None:
        vae = model.vae.using(opts.vae_file)  # the swapped VAE encodes too (A1111's sd_vae)
        schedule, x, conditioning, blend = editing.start_edit(manifest, vae, opts, schedule, run.edit, noise,
                                                              size, model.family.add_noise, batch.start)  # fmt: skip
    elif batch.start is None:
        x = (noise.initial() * np.float32(schedule.initial_noise_scale)).astype(np.float32)  # (B, C, h, w)
    else:
        noise.skip_initial()
        x = (batch.start * np.float32(schedule.initial_noise_scale)).astype(np.float32)
    timesteps = dict(zip(schedule.sigmas[:-1].tolist(), schedule.timesteps.tolist(), strict=True))
    control_hook = None if run.control is None else run.control.hook(schedule.sigmas)
    stages = [(schedule, denoiser(model, opts, timesteps, batch.text.repeat(size), conditioning, control_hook))]
    if run.second is not None:  # the second model takes over at switch_at (diffusers' denoising_end/_start)
        second = run.second
        parts = model.family.split_schedule(schedule, second.switch_at, manifest)
        refined = denoiser(second.model, opts, timesteps, second.text.repeat(size))
        stages = [(parts[0], stages[0][1]), (parts[1], refined)]
    fn, takes = model.family.sampler_function(opts.sampler)
    kwargs = {k: v for k, v in opts.sampler_kwargs().items() if k in takes}
    ddim = resolve_config(manifest.scheduler, "ddim")
    if "clip_denoised" in takes and ddim.clip_sample:
        kwargs["clip_denoised"] = ddim.clip_sample_range
    for part, stage in stages:
        if len(part.timesteps) == 0:
            continue
        if "timesteps" in takes:  # LCM's boundary condition and TCD's steps are functions of the UNet timestep
            kwargs["timesteps"] = part.timesteps
        if "timestep_scaling" in takes:
            kwargs["timestep_scaling"] = manifest.scheduler.timestep_scaling
        if "train_sigmas" in takes:
            kwargs["train_sigmas"] = train_sigmas(manifest.scheduler)
        hook = step_hook(part, blend, bar, final=stage is stages[-1][1], denoiser=stage)
        x = fn(stage, x, part.sigmas, noise=noise, callback=hook, **kwargs)
    return require_finite((x * np.float32(schedule.final_scale)).astype(np.float32), "latents", manifest)


def denoiser(model, opts, timesteps: dict, text, conditioning=None, control=None):
    """D(x, sigma) around MODEL's denoiser graph, as its family makes it (Family.denoiser)."""
    return model.family.denoiser(model, opts, timesteps, text, conditioning, control)


def step_hook(schedule: Schedule, blend, bar, final: bool = True, denoiser=None):
    """The samplers' callback(i, x, denoised): for inpainting with a regular UNet the blend (editing.blend_known),
    then progress. FINAL False: SCHEDULE is a first stage (SDXL's base before its refiner), whose last step is not
    the end."""
    last = len(schedule.sigmas) - 2 if final else -1

    def hook(i, x, denoised):
        if blend is not None:
            editing.blend_known(x, blend, schedule, i, last)
        bar.update(denoised, denoiser)

    return hook


class Progress:
    """A run's sampler steps: a tqdm bar, and the caller's callback(step, total_steps, denoised) after each.

    CONTENT (A1111's live_preview_content): the callback's denoised is the guided x0 ("Combined"), or that of the
    step's last call's "Prompt" or "Negative prompt" half (the guided x0 where the call had only one)."""

    def __init__(self, total: int, enabled: bool, callback=None, content: str = "Combined"):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="generate", unit="step", disable=not enabled, leave=False)
        self.total, self.done, self.callback, self.content = total, 0, callback, content
        self.denoised = None  # the latest step's x0 estimate, (B, C, h, w) float32: what a skipped batch returns

    def update(self, denoised: np.ndarray | None = None, denoiser=None) -> None:
        self.bar.update()
        self.done += 1
        self.denoised = denoised
        if self.callback is not None:
            if self.content != "Combined" and denoiser is not None:
                half = denoiser.half_x0(self.content)
                denoised = denoised if half is None else half
            self.callback(self.done, self.total, denoised)

    def skip_to(self, done: int) -> None:
        """A skipped batch's remaining steps count as done (the next batch's steps number on from DONE)."""
        self.bar.update(done - self.done)
        self.done = done

    def close(self) -> None:
        self.bar.close()
