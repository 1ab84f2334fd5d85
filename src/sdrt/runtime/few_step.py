"""The settings few-step LoRAs are trained for (LCM-LoRA, Hyper-SD, SDXL-Lightning), as their authors publish them.

A few-step LoRA is an ordinary LoRA file (runtime/lora.py reads it); what makes it work is the sampler, the
timesteps, the step count and the guidance it was distilled for. Other settings give blurred or burnt images, not
an error, so the recipes are kept here once, for programs (`RECIPES["lcm-sd15"].options()`), the docs
(docs/guide/few-step-loras.md) and the tests that check each against diffusers (tests/test_few_step_loras.py).
"""

from dataclasses import dataclass

from sdrt.errors import InvalidOption


@dataclass(frozen=True)
class Recipe:
    """One few-step LoRA family's settings: sdrt's options and the diffusers scheduler they match."""

    title: str
    family: str  # "sd1" | "sdxl": the model the published LoRAs are for
    sampler: str  # sdrt's (A1111's) sampler name
    steps: tuple[int, ...]  # the step counts LoRAs are published for (the first is the default)
    cfg_scale: float  # diffusers' guidance_scale; at or under 1 the negative prompt is not run
    cfg_range: tuple[float, float]
    timestep_spacing: str | None = None  # None: the sampler's own rule (LCM's and TCD's skipping-step grid)
    eta: float | None = None  # the sampler's eta (TCD's gamma); None: the sampler's default
    diffusers: str = ""  # the matching diffusers scheduler, as the authors' examples set it
    note: str = ""

    def options(self, steps: int | None = None) -> dict:
        """Pipeline.generate keyword arguments of this recipe (at STEPS, default the first published count)."""
        out = {"sampler": self.sampler, "steps": steps or self.steps[0], "cfg_scale": self.cfg_scale}
        if self.timestep_spacing:
            out["timestep_spacing"] = self.timestep_spacing
        if self.eta is not None:
            out["eta"] = self.eta
        return out


RECIPES = {
    "lcm-sd15": Recipe("LCM-LoRA (SD 1.5)", "sd1", "LCM", (4, 2, 8), 1.5, (1.0, 2.0),
                       diffusers="LCMScheduler", note="steps 2-8; original_inference_steps 50 (the model's config)"),
    "lcm-sdxl": Recipe("LCM-LoRA (SDXL)", "sdxl", "LCM", (4, 2, 8), 1.0, (1.0, 2.0), diffusers="LCMScheduler",
                       note="steps 2-8"),  # fmt: skip
    "hyper-sd15": Recipe("Hyper-SD N-step LoRA (SD 1.5)", "sd1", "DDIM", (2, 4, 8), 0.0, (0.0, 1.0), "trailing",
                         diffusers='DDIMScheduler(timestep_spacing="trailing")',
                         note="use the file made for the step count; the -CFG files take cfg 5-8"),  # fmt: skip
    "hyper-sdxl": Recipe("Hyper-SD N-step LoRA (SDXL)", "sdxl", "DDIM", (2, 4, 8), 0.0, (0.0, 1.0), "trailing",
                         diffusers='DDIMScheduler(timestep_spacing="trailing")',
                         note="use the file made for the step count"),
    "hyper-sd15-1step": Recipe("Hyper-SD 1-step (unified) LoRA (SD 1.5)", "sd1", "TCD", (1, 2, 4, 8), 0.0, (0.0, 1.0),
                               eta=1.0, diffusers="TCDScheduler, eta=1.0",
                               note="1 to 8 steps with the one file; lower eta (0.3-0.5) keeps more detail at 4-8 "
                                    "steps"),  # fmt: skip
    "hyper-sdxl-1step": Recipe("Hyper-SD 1-step (unified) LoRA (SDXL)", "sdxl", "TCD", (1, 2, 4, 8), 0.0, (0.0, 1.0),
                               eta=1.0, diffusers="TCDScheduler, eta=1.0",
                               note="1 to 8 steps with the one file; lower eta keeps more detail at 4-8 steps"),
    "lightning-sdxl": Recipe("SDXL-Lightning LoRA", "sdxl", "Euler", (4, 2, 8), 0.0, (0.0, 1.0), "trailing",
                             diffusers='EulerDiscreteScheduler(timestep_spacing="trailing")',
                             note="use the file made for the step count (2, 4 or 8)"),  # fmt: skip
}


def recipe_for(name: str) -> Recipe:
    """The recipe NAME (RECIPES' keys), or InvalidOption naming the known ones."""
    if name not in RECIPES:
        raise InvalidOption("recipe", name, ", ".join(RECIPES))
    return RECIPES[name]
