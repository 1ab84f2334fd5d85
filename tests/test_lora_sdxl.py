"""LoRAs on the tiny SDXL base: a kohya file in SDXL's own layout (UNet layers in the original SGM names,
input_blocks / middle_block / output_blocks; both text encoders as lora_te1_ / lora_te2_) against diffusers'
load_lora_weights + fuse_lora, within PIXEL_TOL /255; an SD 1.x LoRA is refused."""

import numpy as np
import pytest
import torch
from diffusers_reference import diffusers_run
from ldm_layout import RESNET_PARTS, _rename, unet_prefix_map
from tiny_lora import make_lora, text_layers, unet_layers

from sdrt.runtime.errors import InvalidOption

PIXEL_TOL = 2
PROMPT = "a photo of a grey squirrel"
RUN = dict(negative_prompt="blue sky", width=64, height=64, steps=6, cfg_scale=5.0, sampler="Euler")
SEED = 3


def max_diff(a, b) -> int:
    return int(np.abs(np.asarray(a).astype(np.int16) - np.asarray(b).astype(np.int16)).max())


def fresh_sdxl(folder):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sgm_kohya(sd: dict, unet_config) -> dict:
    """lora_unet_<diffusers name> keys -> lora_unet_<SGM name> (kohya's SDXL layout), via the tests' LDM map."""
    prefixes = unet_prefix_map(unet_config)
    out = {}
    for key, value in sd.items():
        if key.startswith("lora_unet_"):
            layer, _, suffix = key.partition(".")
            # the diffusers name is recovered from the module table make_lora used (dots -> underscores is lossy)
            name = _UNDERSCORED[layer.removeprefix("lora_unet_")]
            sgm = _rename(name + ".", prefixes, RESNET_PARTS).rstrip(".")
            key = "lora_unet_" + sgm.replace(".", "_") + "." + suffix
        out[key] = value
    return out


_UNDERSCORED: dict[str, str] = {}


@pytest.fixture(scope="module")
def sdxl_loras(tiny_sdxl, tmp_path_factory):
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("sdxl_loras")
    base_dir = tiny_sdxl["base"][1].parent / "base"
    pipe = fresh_sdxl(base_dir)
    unet = unet_layers(pipe.unet, convs=True)
    _UNDERSCORED.update({name.replace(".", "_"): name for name in unet})
    parts = {"unet": unet, "text_encoder": text_layers(pipe.text_encoder),
             "text_encoder_2": text_layers(pipe.text_encoder_2)}  # fmt: skip
    sd = sgm_kohya(make_lora(parts, "kohya", seed=7, scale=0.6), pipe.unet.config)
    assert any("input_blocks" in k for k in sd) and any("lora_te2_" in k for k in sd)
    save_file(sd, str(folder / "xl.safetensors"), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    sd1 = {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.ones(2, 32),
           "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.ones(64, 2)}
    save_file(sd1, str(folder / "sd1.safetensors"))
    return folder, sd, base_dir


def test_sdxl_kohya_matches_diffusers(tiny_sdxl, sdxl_loras):
    from sdrt import Pipeline

    folder, sd, base_dir = sdxl_loras
    pipe = fresh_sdxl(base_dir)
    pipe.load_lora_weights(dict(sd))
    pipe.fuse_lora(lora_scale=0.8)
    want = diffusers_run(pipe, PROMPT, seeds=(SEED,), **RUN)
    sdrt = Pipeline.load(tiny_sdxl["base"][1], loras=folder)

    def image(prompt):
        return np.asarray(sdrt.generate(prompt, seed=SEED, progress=False, **RUN)[0])[None]

    got = image(f"{PROMPT} <lora:xl:0.8>")
    assert max_diff(got, want) <= PIXEL_TOL
    assert max_diff(image(f"{PROMPT} <lora:xl:0.8:0>"), want) > 4 * PIXEL_TOL, "the UNet part went unnoticed"
    assert max_diff(image(f"{PROMPT} <lora:xl:0:0.8>"), want) > 4 * PIXEL_TOL, "the text encoders went unnoticed"
    with pytest.raises(InvalidOption, match="sd1.safetensors targets unet"):
        sdrt.generate(f"{PROMPT} <lora:sd1:1>", steps=1, progress=False)
