"""Run diffusers' StableDiffusionPipeline the way sdrt's sampler names map onto diffusers' schedulers."""

import numpy as np

# A1111 sampler name -> (diffusers scheduler class name, config overrides)
# Final latents, relative part of the tolerance (beside the per-backend absolute latent_atol of conftest): float32
# rounding grows with the latents' magnitude (values up to ~216 with conv_out gain 10), where 2.0e-3 to 2.4e-3
# (1.3e-5 to 3.5e-5 relative) were measured on an AMD EPYC under load; a wrong step or weight is off by far more.
LATENT_RTOL = 1e-4

DIFFUSERS_SAMPLERS = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),  # bh2, order 2
    "LCM": ("LCMScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),  # step(order=4), as StableDiffusionPipeline calls it
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
}


def diffusers_run(
    pipe,
    prompt,
    negative_prompt="",
    width=64,
    height=64,
    steps=8,
    cfg_scale=7.0,
    sampler="Euler",
    scheduler="automatic",
    seeds=(0,),
    latents=None,
    output_type="np",
    reference=None,
    timestep_spacing=None,
    **call_kwargs,
):
    """uint8 (B, H, W, 3) images, or (B, C, h, w) final latents, from diffusers with one CPU generator per seed.

    REFERENCE, (diffusers class name, config overrides), replaces DIFFUSERS_SAMPLERS[sampler].
    TIMESTEP_SPACING overrides the config's; CALL_KWARGS (eta, guidance_rescale, ...) go to the pipeline call.
    """
    import diffusers
    import torch

    cls_name, overrides = DIFFUSERS_SAMPLERS[sampler] if reference is None else reference
    if not hasattr(pipe, "base_scheduler_config"):  # the saved model's config, before any swap below
        pipe.base_scheduler_config = dict(pipe.scheduler.config)
    config = pipe.base_scheduler_config
    if scheduler in ("karras", "exponential", "beta"):
        overrides = {**overrides, f"use_{scheduler}_sigmas": True}
    elif scheduler != "automatic":
        raise ValueError(f"diffusers has no {scheduler!r} schedule")
    if timestep_spacing is not None:
        overrides = {**overrides, "timestep_spacing": timestep_spacing}
    pipe.scheduler = getattr(diffusers, cls_name).from_config(config, **overrides)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    out = pipe(
        prompt,
        negative_prompt=negative_prompt or None,
        width=width,
        height=height,
        num_inference_steps=steps,
        guidance_scale=cfg_scale,
        generator=generators,
        num_images_per_prompt=len(seeds),
        latents=None if latents is None else torch.from_numpy(latents),
        output_type="latent" if output_type == "latent" else "np",
        **call_kwargs,
    )
    images = out.images
    if output_type == "latent":
        return images.numpy()
    return (images * 255).round().astype(np.uint8)
