"""SD 3.5 skip-layer guidance (diffusers' StableDiffusion3Pipeline skip_guidance_layers, skip_layer_guidance_scale,
_start, _stop) through the exported transformer's block gates: parity within 2/255 with can-fail twins (other
layers, scale, SLG off), the gates exact on the normal path, infotext written and read back, the HTTP API and CLI,
and clear refusals (an export without gates, layers out of range, SLG without CFG)."""

import dataclasses

import numpy as np
import pytest
from flow_helpers import diffusers_run, exported, max_diff_255, sdrt_run
from tiny_sd3 import build_tiny_sd3

from sdrt.errors import InvalidOption
from sdrt.runtime.options import make_options

PROMPT = "a photo of a grey squirrel in the sky"
STEPS = 6  # SLG runs at steps strictly between steps x start and steps x stop
SLG = dict(skip_guidance_layers=[1], skip_layer_guidance_scale=2.8, skip_layer_guidance_start=0.01,
           skip_layer_guidance_stop=0.5)  # fmt: skip


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """A tiny SD 3.5 of 3 blocks, without T5 (SLG does not involve the text encoders)."""
    return exported(tmp_path_factory.mktemp("sd3_slg"), build_tiny_sd3, with_t5=False, num_layers=3)


def test_the_transformer_takes_one_gate_per_block(sd3):
    inputs = {t["name"]: t["shape"] for t in sd3[1].manifest.models["transformer"]["inputs"]}
    assert inputs["block_gates"] == [3]


def test_skip_layer_guidance_matches_diffusers(sd3):
    pipe, pipeline = sd3
    reference = diffusers_run(pipe, PROMPT, [2], steps=STEPS, guidance_scale=5.0, **SLG)
    ours = sdrt_run(pipeline, PROMPT, [2], steps=STEPS, cfg_scale=5.0, **SLG)
    assert max_diff_255(ours, reference) <= 2.0
    # can-fail twins: SLG off; another block skipped; another scale
    assert max_diff_255(sdrt_run(pipeline, PROMPT, [2], steps=STEPS, cfg_scale=5.0), reference) > 8.0
    other_layer = {**SLG, "skip_guidance_layers": [0]}
    assert max_diff_255(sdrt_run(pipeline, PROMPT, [2], steps=STEPS, cfg_scale=5.0, **other_layer), reference) > 8.0
    other_scale = {**SLG, "skip_layer_guidance_scale": 0.5}
    assert max_diff_255(sdrt_run(pipeline, PROMPT, [2], steps=STEPS, cfg_scale=5.0, **other_scale), reference) > 8.0


def test_diffusers_defaults_and_two_blocks_skipped(sd3):
    """Scale 2.8, start 0.01, stop 0.2 (diffusers' defaults): at 10 steps SLG runs at step 1 only."""
    pipe, pipeline = sd3
    layers = dict(skip_guidance_layers=[0, 2])
    reference = diffusers_run(pipe, PROMPT, [3], steps=10, guidance_scale=4.0, **layers)
    assert max_diff_255(sdrt_run(pipeline, PROMPT, [3], steps=10, cfg_scale=4.0, **layers), reference) <= 2.0
    assert max_diff_255(sdrt_run(pipeline, PROMPT, [3], steps=10, cfg_scale=4.0), reference) > 8.0


def test_all_gates_open_is_exactly_the_ungated_transformer(sd3):
    """The normal path through the gated graph equals diffusers' transformer without skip_layers (the 0/1 select is
    exact); with a block gated off, its skip_layers call."""
    import torch

    pipe, pipeline = sd3
    engine = pipeline.engines["transformer"]
    config, rng = pipe.transformer.config, np.random.default_rng(0)
    feeds = {
        "hidden_states": rng.standard_normal((1, 16, 8, 8)).astype(np.float32),
        "timestep": np.array([500.0], np.float32),
        "encoder_hidden_states": rng.standard_normal((1, 90, config.joint_attention_dim)).astype(np.float32),
        "pooled_projections": rng.standard_normal((1, config.pooled_projection_dim)).astype(np.float32),
    }
    torch_in = {k: torch.from_numpy(v) for k, v in feeds.items()}
    for skipped in ([], [1]):
        gates = np.ones(3, np.float32)
        gates[skipped] = 0
        ours = engine.run({**feeds, "block_gates": gates})["out_sample"]
        with torch.no_grad():
            theirs = pipe.transformer(**torch_in, skip_layers=skipped or None, return_dict=False)[0].numpy()
        assert np.abs(ours - theirs).max() < 1e-4
    assert np.abs(engine.run({**feeds, "block_gates": np.ones(3, np.float32)})["out_sample"] - ours).max() > 1e-2


def test_infotext_written_and_read_back(sd3):
    from sdrt.runtime.infotext import generate_kwargs, parse_infotext

    _, pipeline = sd3
    image = pipeline.generate(PROMPT, steps=STEPS, cfg_scale=5.0, seed=4, width=64, height=64, progress=False,
                              **{**SLG, "skip_guidance_layers": [0, 2]})[0]  # fmt: skip
    text = image.info["parameters"]
    assert 'SLG layers: "0,2", SLG scale: 2.8, SLG start: 0.01, SLG stop: 0.5' in text
    kwargs = generate_kwargs(parse_infotext(text))
    assert kwargs["skip_guidance_layers"] == (0, 2)
    again = pipeline.generate(progress=False, **kwargs)[0]
    assert np.array_equal(np.asarray(again), np.asarray(image))
    plain = pipeline.generate(PROMPT, steps=2, seed=4, width=64, height=64, progress=False)[0]
    assert "SLG" not in plain.info["parameters"]


@pytest.mark.parametrize(
    "options, field",
    [
        (dict(skip_guidance_layers=[3]), "skip_guidance_layers"),  # 3 blocks: 0, 1, 2
        (dict(skip_guidance_layers="1,x"), "skip_guidance_layers"),
        (dict(skip_guidance_layers=[1], cfg_scale=1.0), "skip_guidance_layers"),  # no CFG, no SLG (diffusers)
        (dict(skip_guidance_layers=[1], skip_layer_guidance_start=0.5, skip_layer_guidance_stop=0.2),
         "skip_layer_guidance_stop"),
        (dict(skip_layer_guidance_scale=3.0), "skip_layer_guidance_scale"),  # without layers
        (dict(distilled_cfg_scale=3.5), "distilled_cfg_scale"),  # FLUX's
        (dict(s_min_uncond=1.0), "s_min_uncond"),  # A1111's negative-guidance skips: not in the flow denoiser
        (dict(skip_early_cond=0.2), "skip_early_cond"),
    ],
)  # fmt: skip
def test_bad_settings_are_refused_by_name(sd3, options, field):
    with pytest.raises(InvalidOption, match=field):
        make_options(sd3[1].manifest, prompt=PROMPT, **options)


def test_an_export_without_gates_refuses_slg_and_still_runs(sd3):
    manifest = sd3[1].manifest
    transformer = dict(manifest.models["transformer"])
    transformer["inputs"] = [t for t in transformer["inputs"] if t["name"] != "block_gates"]
    old = dataclasses.replace(manifest, models={**manifest.models, "transformer": transformer})
    with pytest.raises(InvalidOption, match="re-export"):
        make_options(old, prompt=PROMPT, skip_guidance_layers=[1])
    assert make_options(old, prompt=PROMPT).family_options.skip_guidance_layers == ()


def test_http_api_and_cli(sd3, tmp_path):
    import json

    from fastapi.testclient import TestClient

    from sdrt.cli import main
    from sdrt.server.app import create_app

    _, pipeline = sd3
    request = {"prompt": PROMPT, "steps": 3, "cfg_scale": 4.0, "width": 64, "height": 64, "seed": 2, **SLG}
    with TestClient(create_app(pipeline)) as client:
        answer = client.post("/sdapi/v1/txt2img", json=request)
        assert answer.status_code == 200 and 'SLG layers: 1,' in json.loads(answer.json()["info"])["infotexts"][0]
        bad = client.post("/sdapi/v1/txt2img", json={**request, "skip_guidance_layers": [9]})
        assert bad.status_code == 422 and "skip_guidance_layers" in bad.text
    args = ["generate", PROMPT, "-m", str(pipeline.manifest.folder), "--steps", "3", "--width", "64", "--height", "64",
            "-o", str(tmp_path)]  # fmt: skip
    assert main([*args, "--skip-guidance-layers", "0", "2", "--skip-layer-guidance-stop", "0.5"]) == 0
    assert main([*args, "--skip-guidance-layers", "5"]) == 2


def test_skip_layer_guidance_in_a_batch_matches_diffusers(sd3):
    """Two images in one batch: the skip-layer call takes the conditional half of each (diffusers'
    original_prompt_embeds)."""
    pipe, pipeline = sd3
    reference = diffusers_run(pipe, PROMPT, [5, 6], steps=STEPS, guidance_scale=5.0, **SLG)
    ours = sdrt_run(pipeline, PROMPT, [5, 6], steps=STEPS, cfg_scale=5.0, **SLG)
    assert max_diff_255(ours, reference) <= 2.0 and max_diff_255(ours[0], ours[1]) > 8.0
