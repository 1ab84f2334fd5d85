"""The options schema (runtime/options.py): one field per option, from which the CLI's flags, the A1111 request
mapping and the infotext writer and reader are derived. Each test here can fail: a field left out of one
interface, a value that does not survive the infotext, options that do not give the keyword call's image."""

import math

import numpy as np
import pytest

from sdrt.runtime.infotext import generate_kwargs, parse_infotext, write_infotext
from sdrt.runtime.options import OPTION_FIELDS, GenerationOptions, build_options, make_options, spec


def test_every_field_has_a_spec_and_the_interfaces_see_it():
    from sdrt.cli import build_parser

    parser = build_parser()
    generate = parser._subparsers._group_actions[0].choices["generate"]  # argparse keeps subparsers here
    flags = {opt for action in generate._actions for opt in action.option_strings}
    for name in OPTION_FIELDS:
        s = spec(name)
        kinds = ("str", "int", "float", "bool", "pair", "ints", "image", "path", "array", "dict", "units")
        assert s.kind in kinds, name
        if s.cli:
            assert "--" + name.replace("_", "-") in flags, name
    assert "--eta" in flags and "--s-churn" in flags and "--negative-target-size" in flags  # derived, not listed


def test_options_object_and_overrides_give_the_keyword_calls_image(tiny_pipeline):
    kwargs = dict(steps=4, seed=3, sampler="DPM++ 2M", scheduler="karras", cfg_scale=6.0, progress=False)
    by_keywords = tiny_pipeline.generate("a cat", **kwargs)[0]
    progress = kwargs.pop("progress")
    options = GenerationOptions(prompt="a dog", **{k: v for k, v in kwargs.items() if k != "seed"})
    by_options = tiny_pipeline.generate("a cat", options, seed=3, progress=progress)[0]
    assert np.array_equal(np.asarray(by_keywords), np.asarray(by_options))
    assert by_keywords.info["parameters"] == by_options.info["parameters"]
    other = tiny_pipeline.generate(options=options, seed=3, progress=False)[0]  # the options' own prompt
    assert not np.array_equal(np.asarray(other), np.asarray(by_options))


def test_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match="'stepz'"):
        build_options(stepz=3)


def test_infotext_reads_back_every_field_it_writes(tiny_pipeline):
    manifest = tiny_pipeline.manifest
    opts = make_options(
        manifest, prompt="a (cat:1.2)", negative_prompt="dog", steps=7, sampler="DPM2 a", scheduler="karras",
        cfg_scale=6.5, seed=11, width=64, height=72, subseed=5, subseed_strength=0.25, seed_resize_from_w=64,
        seed_resize_from_h=64, clip_skip=2, ensd=31337, rng="nv", eta=0.5, timestep_spacing=None,
        guidance_rescale=0.3,
    )  # fmt: skip
    text = write_infotext(opts, 11, 5, {"Model hash": "abc", "Model": "tiny"}, {"Emphasis": "No norm"})
    read = generate_kwargs(parse_infotext(text))
    assert read["emphasis"] == "No norm" and read["scheduler"] == "Karras"  # A1111's label, resolved below
    again = make_options(manifest, **read)
    for name in OPTION_FIELDS:
        if spec(name).infotext and name not in ("strength", "mask_blur", "timestep_spacing", "emphasis"):
            assert getattr(again, name) == getattr(opts, name), name
    assert write_infotext(again, 11, 5, {"Model hash": "abc", "Model": "tiny"}, {"Emphasis": "No norm"}) == text


def test_infotext_writer_can_fail_on_a_changed_value(tiny_pipeline):
    opts = make_options(tiny_pipeline.manifest, steps=7, seed=11, cfg_scale=6.5, sampler="Euler a", ensd=5)
    text = write_infotext(opts, 11, 0, {}, {})
    assert "ENSD: 5" in text and "CFG scale: 6.5" in text
    changed = make_options(tiny_pipeline.manifest, steps=7, seed=11, cfg_scale=6.0, sampler="Euler", ensd=5)
    assert generate_kwargs(parse_infotext(write_infotext(changed, 11, 0, {}, {}))) != generate_kwargs(
        parse_infotext(text)
    )


def test_a1111_request_maps_through_the_schema():
    from sdrt.server.a1111 import DEFAULT_OPTIONS, Img2ImgRequest, Txt2ImgRequest, generate_kwargs, request_field

    req = Txt2ImgRequest(prompt="x", n_iter=3, sampler_index="Euler a", s_tmax=0, seed_resize_from_w=-1)
    kwargs = generate_kwargs(req, dict(DEFAULT_OPTIONS, randn_source="NV", eta_noise_seed_delta=7))
    assert kwargs["batch_count"] == 3 and kwargs["sampler"] == "Euler a" and kwargs["rng"] == "nv"
    assert kwargs["ensd"] == 7 and kwargs["s_tmax"] == math.inf and kwargs["seed_resize_from_w"] == 0
    assert "mask_blur" not in kwargs and "init_image" not in kwargs
    img = Img2ImgRequest(init_images=["x"], denoising_strength=0.4, mask_blur_x=3, mask_blur_y=3)
    kwargs = generate_kwargs(img, DEFAULT_OPTIONS)
    assert kwargs["strength"] == 0.4 and "mask_blur" not in kwargs  # no mask: the mask options stay unset
    img = Img2ImgRequest(init_images=["x"], mask="m", mask_blur_x=3, mask_blur_y=3, inpainting_fill=2)
    kwargs = generate_kwargs(img, DEFAULT_OPTIONS)
    assert kwargs["mask_blur"] == 3 and kwargs["inpainting_fill"] == 2 and kwargs["inpainting_mask_invert"] is False
    assert request_field("batch_count") == "n_iter" and request_field("ensd") == (
        "override_settings.eta_noise_seed_delta"
    )
