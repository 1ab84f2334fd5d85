"""`sdrt export --lora FILE:WEIGHT`: LoRAs merged into the exported graphs (export/bake.py), on the tiny SD 1.x model.

The baked export's image against diffusers' load_lora_weights + fuse_lora within PIXEL_TOL /255; two baked LoRAs
(one with split te/unet weights) against the same LoRAs applied at run time to the plain export; model.json and the
infotext record what was baked; bad --lora values are refused before anything is written.
"""

import hashlib
import json

import numpy as np
import pytest
import torch
from diffusers_reference import diffusers_run
from test_lora import PIXEL_TOL, PROMPT, RUN, SEED, max_diff  # the LoRA suites' settings
from tiny_lora import make_lora, text_layers, unet_layers

from sdrt.cli import main


def fresh_diffusers(tiny_sd):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd[1].parent / "diffusers", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image(pipeline, prompt=PROMPT):
    out = pipeline.generate(prompt, seed=SEED, progress=False, **RUN)[0]
    return np.asarray(out)[None], out


@pytest.fixture(scope="module")
def bake_loras(tiny_sd, tmp_path_factory):
    """{name: (path, state dict)}: a kohya file (attention + text encoder, fp16), a LoCon (convs) and a PEFT file."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("bake_loras")
    pipe = fresh_diffusers(tiny_sd)
    attention = {"unet": unet_layers(pipe.unet), "text_encoder": text_layers(pipe.text_encoder)}
    dicts = {"style": make_lora(attention, "kohya", seed=1, dtype=torch.float16),
             "locon": make_lora({"unet": unet_layers(pipe.unet, convs=True)}, "kohya", seed=2),
             "peft": make_lora(attention, "peft", seed=3)}  # fmt: skip
    out = {}
    for name, sd in dicts.items():
        save_file(sd, str(folder / f"{name}.safetensors"))
        out[name] = (folder / f"{name}.safetensors", sd)
    return out


def export_with(tiny_sd, folder, *loras) -> int:
    args = ["export", str(tiny_sd[1].parent / "diffusers"), "-o", str(folder)]
    for lora in loras:
        args += ["--lora", lora]
    return main(args)


def test_baked_matches_diffusers(tiny_sd, bake_loras, tmp_path):
    from sdrt import Pipeline

    path, sd = bake_loras["style"]
    assert export_with(tiny_sd, tmp_path / "baked", f"{path}:0.8") == 0
    pipe = fresh_diffusers(tiny_sd)
    pipe.load_lora_weights(dict(sd))
    pipe.fuse_lora(lora_scale=0.8)
    want = diffusers_run(pipe, PROMPT, seeds=(SEED,), **RUN)
    got, out = image(Pipeline.load(tmp_path / "baked"))
    assert max_diff(got, want) <= PIXEL_TOL
    assert max_diff(image(Pipeline.load(tiny_sd[1]))[0], want) > 10 * PIXEL_TOL, "the LoRA hardly moves the image"

    record = json.loads((tmp_path / "baked" / "model.json").read_text())["source"]["loras"]
    assert record == [{"name": "style", "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                       "shorthash": record[0]["shorthash"], "te": 0.8, "unet": 0.8}]  # fmt: skip
    assert f'Baked LoRAs: "style:0.8: {record[0]["shorthash"]}"' in out.info["parameters"]


def test_two_baked_equal_runtime_merge(tiny_sd, bake_loras, tmp_path):
    """LoCon at 0.5 and PEFT at te 0.7 / unet 0.3 baked == the same LoRAs merged at run time into the plain export;
    the twin (te and unet weights swapped at run time) must differ."""
    from sdrt import Pipeline

    locon, peft = bake_loras["locon"][0], bake_loras["peft"][0]
    assert export_with(tiny_sd, tmp_path / "baked", f"{locon}:0.5", f"{peft}:0.7:0.3") == 0
    got, _ = image(Pipeline.load(tmp_path / "baked"))
    runtime = Pipeline.load(tiny_sd[1], loras=locon.parent)
    want, _ = image(runtime, f"{PROMPT} <lora:locon:0.5><lora:peft:0.7:0.3>")
    assert max_diff(got, want) <= 1
    swapped, _ = image(runtime, f"{PROMPT} <lora:locon:0.5><lora:peft:0.3:0.7>")
    assert max_diff(got, swapped) > 4 * PIXEL_TOL, "te and unet weights swapped went unnoticed"
    assert max_diff(got, image(Pipeline.load(tiny_sd[1]))[0]) > 10 * PIXEL_TOL


@pytest.mark.parametrize(
    ("value", "message"),
    [("missing.safetensors:0.8", "an existing"), ("{style}:heavy", "an existing"), ("{sdxl}:1", "sdxl"),
     ("{nothing}:1", "matches none")],  # fmt: skip
    ids=["missing file", "bad weight", "other family", "no layer"],
)
def test_bad_lora_refused(tiny_sd, bake_loras, tmp_path, capsys, value, message):
    from safetensors.torch import save_file

    sdxl = {"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 32),
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(37, 2)}  # fmt: skip
    save_file(sdxl, str(tmp_path / "sdxl.safetensors"), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    nothing = {"lora_unet_no_such_block_to_q.lora_down.weight": torch.zeros(2, 32),
               "lora_unet_no_such_block_to_q.lora_up.weight": torch.zeros(32, 2)}  # fmt: skip
    save_file(nothing, str(tmp_path / "nothing.safetensors"))
    value = value.format(style=bake_loras["style"][0], sdxl=tmp_path / "sdxl.safetensors",
                         nothing=tmp_path / "nothing.safetensors")  # fmt: skip
    assert export_with(tiny_sd, tmp_path / "out", value) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists(), "a half-written export was left"


def test_fp16_export_baked_and_at_run_time(tiny_sd, bake_loras, tmp_path):
    """An fp16 export: baked (merged in float32, stored fp16) and merged at run time both within PIXEL_TOL of
    diffusers' fp32 load + fuse. At run time the CPU engine's optimised graph holds the fp16 weights as folded
    float32 initializers (found by value as such: nchwc.find_slots); before, the LoRA was merged into a session
    that folded the Casts from the file's values and the image was 93/255 off."""
    from sdrt import Pipeline

    path, sd = bake_loras["locon"]
    diffusers_dir = str(tiny_sd[1].parent / "diffusers")
    assert main(["export", diffusers_dir, "-o", str(tmp_path / "baked"), "--precision", "fp16",
                 "--lora", f"{path}:0.8"]) == 0  # fmt: skip
    assert main(["export", diffusers_dir, "-o", str(tmp_path / "plain"), "--precision", "fp16"]) == 0
    pipe = fresh_diffusers(tiny_sd)
    pipe.load_lora_weights(dict(sd))
    pipe.fuse_lora(lora_scale=0.8)
    want = diffusers_run(pipe, PROMPT, seeds=(SEED,), **RUN)
    baked, _ = image(Pipeline.load(tmp_path / "baked"))
    runtime = Pipeline.load(tmp_path / "plain", loras=path.parent)
    at_run_time, _ = image(runtime, f"{PROMPT} <lora:locon:0.8>")
    assert max_diff(baked, want) <= PIXEL_TOL and max_diff(at_run_time, want) <= PIXEL_TOL
    assert max_diff(image(runtime)[0], want) > 10 * PIXEL_TOL, "the LoRA hardly moves the image"
