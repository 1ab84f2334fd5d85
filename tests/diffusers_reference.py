"""Run diffusers' StableDiffusionPipeline the way sdrt's sampler names map onto diffusers' schedulers."""

import numpy as np

# A1111 sampler name -> (diffusers scheduler class name, config overrides)
DIFFUSERS_SAMPLERS = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
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
):
    """uint8 (B, H, W, 3) images, or (B, C, h, w) final latents, from diffusers with one CPU generator per seed."""
    import diffusers
    import torch

    cls_name, overrides = DIFFUSERS_SAMPLERS[sampler]
    if not hasattr(pipe, "base_scheduler_config"):  # the saved model's config, before any swap below
        pipe.base_scheduler_config = dict(pipe.scheduler.config)
    config = pipe.base_scheduler_config
    if scheduler == "karras":
        overrides = {**overrides, "use_karras_sigmas": True}
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
    )
    images = out.images
    if output_type == "latent":
        return images.numpy()
    return (images * 255).round().astype(np.uint8)
