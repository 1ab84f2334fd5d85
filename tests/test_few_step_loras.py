"""Few-step LoRAs (LCM-LoRA, Hyper-SD, SDXL-Lightning) on the tiny SD 1.x and SDXL models, each with the recipe its
authors publish: a UNet-only LoRA over every Linear and conv of the UNet (as LCM-LoRA's and Lightning's files are),
against diffusers' load_lora_weights + fuse_lora with the matching scheduler (LCMScheduler, DDIMScheduler or
EulerDiscreteScheduler with trailing timesteps). Images within PIXEL_TOL /255; each recipe has a can-fail twin
(the recipe's scheduler setting changed) and the LoRA must move the image.

docs/guide/few-step-loras.md lists the settings; sdrt.runtime.few_step.RECIPES holds them for programs.
"""

import numpy as np
import pytest
import torch
from diffusers_reference import diffusers_run
from tiny_lora import make_lora

from sdrt.runtime.few_step import RECIPES

PIXEL_TOL = 2
PROMPT = "a photo of a grey squirrel"
SEED = 5


def max_diff(a, b) -> int:
    return int(np.abs(np.asarray(a).astype(np.int16) - np.asarray(b).astype(np.int16)).max())


def every_unet_layer(unet) -> dict:
    """{diffusers name: module} of every Linear and Conv2d of the UNet (the layers LCM-LoRA and Lightning train) but
    SDXL's add_embedding, which diffusers' kohya reader drops ("unexpected keys add.embedding.linear")."""
    return {name: m for name, m in unet.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and not name.startswith("add_embedding")}  # fmt: skip


# recipe name -> (the tiny model, diffusers scheduler class, its overrides, the can-fail twin's sdrt options)
CASES = {
    "lcm-sd15": ("sd", "LCMScheduler", {}, dict(sampler="Euler")),
    "hyper-sd15": ("sd", "DDIMScheduler", {"timestep_spacing": "trailing"}, dict(timestep_spacing="leading")),
    "lcm-sdxl": ("sdxl", "LCMScheduler", {}, dict(sampler="Euler")),
    "lightning-sdxl": ("sdxl", "EulerDiscreteScheduler", {"timestep_spacing": "trailing"},
                       dict(timestep_spacing="leading")),  # fmt: skip
    "hyper-sdxl": ("sdxl", "DDIMScheduler", {"timestep_spacing": "trailing"}, dict(timestep_spacing="linspace")),
    # one step: LCM's estimate is TCD's up to the sigma of timestep 0 (1/255 apart here); DDIM's first timestep is 1
    "hyper-sd15-1step": ("sd", "TCDScheduler", {}, dict(sampler="DDIM")),
    "hyper-sdxl-1step": ("sdxl", "TCDScheduler", {}, dict(sampler="DDIM")),
}


def fresh(kind, tiny_sd, tiny_sdxl):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if kind == "sd":
        pipe = StableDiffusionPipeline.from_pretrained(tiny_sd[1].parent / "diffusers", dtype=torch.float32)
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl["base"][1].parent / "base", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def few_step(tiny_sd, tiny_sdxl, tmp_path_factory):
    """{kind: (LoRA folder, state dict, sdrt Pipeline with the folder)} for "sd" and "sdxl"."""
    from safetensors.torch import save_file

    from sdrt import Pipeline

    out = {}
    for kind, model in (("sd", tiny_sd[1]), ("sdxl", tiny_sdxl["base"][1])):
        folder = tmp_path_factory.mktemp(f"few_step_{kind}")
        pipe = fresh(kind, tiny_sd, tiny_sdxl)
        sd = make_lora({"unet": every_unet_layer(pipe.unet)}, "kohya", rank=4, alpha=4.0, scale=0.3, seed=21)
        save_file(sd, str(folder / "fast.safetensors"))
        out[kind] = (folder, sd, Pipeline.load(model, loras=folder))
    return out


def diffusers_image(kind, tiny_sd, tiny_sdxl, sd, scheduler, overrides, **run):
    pipe = fresh(kind, tiny_sd, tiny_sdxl)
    pipe.load_lora_weights(dict(sd))
    pipe.fuse_lora(lora_scale=1.0)
    return diffusers_run(pipe, PROMPT, seeds=(SEED,), reference=(scheduler, overrides), **run)


@pytest.mark.parametrize("name", list(CASES))
def test_recipe_matches_diffusers(tiny_sd, tiny_sdxl, few_step, name):
    kind, scheduler, overrides, wrong = CASES[name]
    recipe = RECIPES[name]
    folder, sd, pipeline = few_step[kind]
    run = dict(width=64, height=64, steps=recipe.steps[0], cfg_scale=recipe.cfg_scale)
    call = {} if recipe.eta is None else {"eta": recipe.eta}  # TCD's gamma: a pipeline call argument in diffusers
    want = diffusers_image(kind, tiny_sd, tiny_sdxl, sd, scheduler, overrides, **run, **call)

    def image(prompt, **change):
        options = {**recipe.options(), **run, **change}
        return np.asarray(pipeline.generate(prompt, seed=SEED, progress=False, **options)[0])[None]

    got = image(f"{PROMPT} <lora:fast:1>")
    assert max_diff(got, want) <= PIXEL_TOL
    assert max_diff(image(f"{PROMPT} <lora:fast:1>", **wrong), want) > 4 * PIXEL_TOL, f"{wrong} went unnoticed"
    assert max_diff(image(PROMPT), want) > 10 * PIXEL_TOL, "the LoRA hardly moves the image"


@pytest.mark.parametrize("steps,eta", [(4, None), (4, 1.0), (8, 0.0), (8, 0.5)])
def test_tcd_matches_diffusers_at_other_steps_and_eta(tiny_sd, tiny_sdxl, few_step, steps, eta):
    """The TCD sampler against diffusers' TCDScheduler beyond the recipe's one step: several steps (fresh noise
    between them, drawn as diffusers draws it), eta from 0 (deterministic) to 1; unset, sdrt's default is
    TCDScheduler.step's 0.3 (a diffusers pipeline passes its own eta=0 unless told). The twin: eta at the other
    end of its range."""
    folder, sd, pipeline = few_step["sd"]
    run = dict(width=64, height=64, steps=steps, cfg_scale=0.0)
    want = diffusers_image("sd", tiny_sd, tiny_sdxl, sd, "TCDScheduler", {}, **run, eta=0.3 if eta is None else eta)

    def image(**change):
        options = {**run, "sampler": "TCD", **({} if eta is None else {"eta": eta}), **change}
        return np.asarray(pipeline.generate(f"{PROMPT} <lora:fast:1>", seed=SEED, progress=False, **options)[0])[None]

    assert max_diff(image(), want) <= PIXEL_TOL
    other = 0.0 if (eta if eta is not None else 0.3) >= 0.5 else 1.0
    assert max_diff(image(eta=other), want) > 4 * PIXEL_TOL, f"eta {other} went unnoticed"


def test_recipes_are_valid_options(tiny_pipeline):
    """Every recipe's options are accepted by the option table (names, ranges) at each of its step counts."""
    from sdrt.runtime.few_step import recipe_for

    for name, recipe in RECIPES.items():
        assert recipe_for(name) is recipe
        for steps in recipe.steps:
            if recipe.family == "sd1":
                tiny_pipeline.generate("x", seed=1, width=64, height=64, progress=False,
                                       **{**recipe.options(), "steps": steps})  # fmt: skip
