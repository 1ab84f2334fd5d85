"""ControlNet: sdrt against diffusers' StableDiffusionControlNetPipeline, ...Img2ImgPipeline, ...InpaintPipeline,
StableDiffusionXLControlNetPipeline and MultiControlNetModel, on tiny random ControlNets (tiny_controlnet.py) with the
same weights and seeds.

Tolerance: images within 2/255 (max abs over all pixels; inpainting inside the mask). Each comparison has a can-fail
twin: a weight of 0.7 instead of 1, a guidance end one step later, balanced instead of guess mode, one ControlNet of
two missing: each moves the image by far more than the tolerance (asserted), so the tolerance can tell them apart.
"""

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from test_parity import PIXEL_TOL, max_diff
from test_parity_editing import MASK_BOX, init_image, mask_image

from sdrt import Pipeline
from sdrt.runtime.controlnet import ControlNetUnit

PROMPT = "a photo of a grey squirrel"
NEGATIVE = "blue sky"
SIZE, STEPS, CFG = 64, 8, 7.0
TWIN_MIN = 3 * PIXEL_TOL  # a wrong option must move the image by at least this much


def control_image(size: int = SIZE, seed: int = 0) -> Image.Image:
    """A black image with white strokes (an edge map's look), deterministic."""
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size, 3), np.uint8)
    for _ in range(6):
        y, x = rng.integers(0, size - 12, 2)
        if rng.random() < 0.5:
            img[y : y + 2, x : x + 12] = 255
        else:
            img[y : y + 12, x : x + 2] = 255
    return Image.fromarray(img)


@pytest.fixture(scope="module")
def sd(tiny_controlnets):
    """(diffusers pipe, sdrt Pipeline with unet_controlnet, [(diffusers ControlNet, exported folder)] x 2)."""
    pipe, model, nets = tiny_controlnets
    return pipe, Pipeline.load(model), nets


def run_diffusers(cls_name, pipe, controlnet, seeds=(3,), **kw):
    import diffusers
    import torch

    parts = {
        k: v for k, v in pipe.components.items() if k not in ("safety_checker", "feature_extractor", "image_encoder")
    }
    ref = getattr(diffusers, cls_name)(**parts, controlnet=controlnet, safety_checker=None, feature_extractor=None,
                                      requires_safety_checker=False)  # fmt: skip
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    out = ref(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=CFG,
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        num_images_per_prompt=len(seeds),
        output_type="np",
        **kw,
    ).images
    return (out * 255).round().astype(np.uint8)


def run_sdrt(pipeline, units, seeds=(3,), **kw):
    kw = {"width": SIZE, "height": SIZE, **kw}
    out = pipeline.generate(
        PROMPT, negative_prompt=NEGATIVE, steps=STEPS, cfg_scale=CFG, sampler="Euler", seed=seeds[0],
        batch_size=len(seeds), progress=False, controlnets=units, **kw,
    )  # fmt: skip
    return np.stack([np.asarray(im) for im in out])


def unit(folder, image=None, **kw):
    return ControlNetUnit(folder, image or control_image(), resize_mode="Just Resize", **kw)


def test_txt2img_weight_matches_diffusers(sd):
    pipe, pipeline, [(net, folder), _] = sd
    want = run_diffusers("StableDiffusionControlNetPipeline", pipe, net, image=control_image(), seeds=(3, 4))
    got = run_sdrt(pipeline, [unit(folder)], seeds=(3, 4))
    assert max_diff(got, want) <= PIXEL_TOL
    plain = run_sdrt(pipeline, None, seeds=(3, 4))
    assert max_diff(plain, want) > TWIN_MIN  # the ControlNet moves the image
    scaled = run_diffusers("StableDiffusionControlNetPipeline", pipe, net, image=control_image(), seeds=(3, 4),
                           controlnet_conditioning_scale=0.7)  # fmt: skip
    assert max_diff(run_sdrt(pipeline, [unit(folder, weight=0.7)], seeds=(3, 4)), scaled) <= PIXEL_TOL
    assert max_diff(got, scaled) > TWIN_MIN  # can fail: weight 1 vs 0.7


def test_guidance_start_end_match_diffusers(sd):
    pipe, pipeline, [(net, folder), _] = sd
    want = run_diffusers("StableDiffusionControlNetPipeline", pipe, net, image=control_image(),
                         control_guidance_start=0.25, control_guidance_end=0.5)  # fmt: skip
    got = run_sdrt(pipeline, [unit(folder, guidance_start=0.25, guidance_end=0.5)])
    assert max_diff(got, want) <= PIXEL_TOL
    earlier = run_sdrt(pipeline, [unit(folder, guidance_start=0.125, guidance_end=0.5)])
    assert max_diff(earlier, want) > TWIN_MIN  # can fail: one step more at the start
    # late steps move the image less: the end one step earlier still breaks the tolerance
    assert max_diff(run_sdrt(pipeline, [unit(folder, guidance_start=0.25, guidance_end=0.375)]), want) > PIXEL_TOL


def test_controlnet_more_important_is_guess_mode(sd):
    pipe, pipeline, [(net, folder), _] = sd
    want = run_diffusers("StableDiffusionControlNetPipeline", pipe, net, image=control_image(), guess_mode=True)
    got = run_sdrt(pipeline, [unit(folder, control_mode="ControlNet is more important")])
    assert max_diff(got, want) <= PIXEL_TOL
    balanced = run_sdrt(pipeline, [unit(folder)])
    assert max_diff(balanced, want) > TWIN_MIN  # can fail: balanced vs guess mode


def test_my_prompt_more_important_is_soft_injection_on_both_halves(sd):
    """diffusers has no such mode: its ControlNet with guess_mode's soft scales, called for both guidance halves."""
    import copy

    pipe, pipeline, [(net, folder), _] = sd

    class SoftControlNet(type(net)):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **{**kwargs, "guess_mode": True})

    soft = copy.deepcopy(net)
    soft.__class__ = SoftControlNet
    want = run_diffusers("StableDiffusionControlNetPipeline", pipe, soft, image=control_image())
    got = run_sdrt(pipeline, [unit(folder, control_mode="My prompt is more important")])
    assert max_diff(got, want) <= PIXEL_TOL
    guess = run_sdrt(pipeline, [unit(folder, control_mode="ControlNet is more important")])
    assert max_diff(guess, want) > TWIN_MIN  # can fail: the unconditional half's control matters


def test_multi_controlnet_matches_diffusers(sd):
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    pipe, pipeline, [(net0, folder0), (net1, folder1)] = sd
    images = [control_image(seed=0), control_image(seed=5)]
    want = run_diffusers("StableDiffusionControlNetPipeline", pipe, MultiControlNetModel([net0, net1]), image=images,
                         controlnet_conditioning_scale=[0.8, 0.6], control_guidance_end=[1.0, 0.5])  # fmt: skip
    units = [unit(folder0, images[0], weight=0.8), unit(folder1, images[1], weight=0.6, guidance_end=0.5)]
    got = run_sdrt(pipeline, units)
    assert max_diff(got, want) <= PIXEL_TOL
    assert max_diff(run_sdrt(pipeline, units[:1]), want) > TWIN_MIN  # can fail: the second ControlNet matters


def test_img2img_matches_diffusers(sd):
    pipe, pipeline, [(net, folder), _] = sd
    want = run_diffusers("StableDiffusionControlNetImg2ImgPipeline", pipe, net, image=init_image(),
                         control_image=control_image(), strength=0.75, controlnet_conditioning_scale=1.0)  # fmt: skip
    got = run_sdrt(pipeline, [unit(folder)], init_image=init_image(), strength=0.75)
    assert max_diff(got, want) <= PIXEL_TOL
    assert (
        max_diff(run_sdrt(pipeline, [unit(folder, weight=0.7)], init_image=init_image(), strength=0.75), want)
        > TWIN_MIN
    )


def test_inpaint_matches_diffusers(sd):
    pipe, pipeline, [(net, folder), _] = sd
    want = run_diffusers("StableDiffusionControlNetInpaintPipeline", pipe, net, image=init_image(),
                         mask_image=mask_image(), control_image=control_image(), strength=0.75,
                         controlnet_conditioning_scale=1.0)  # fmt: skip
    got = run_sdrt(pipeline, [unit(folder)], init_image=init_image(), mask=mask_image(), strength=0.75, mask_blur=0)
    x1, y1, x2, y2 = MASK_BOX
    assert max_diff(got[:, y1:y2, x1:x2], want[:, y1:y2, x1:x2]) <= PIXEL_TOL
    twin = run_sdrt(pipeline, [unit(folder, weight=0.7)], init_image=init_image(), mask=mask_image(), strength=0.75,
                    mask_blur=0)  # fmt: skip
    assert max_diff(twin[:, y1:y2, x1:x2], want[:, y1:y2, x1:x2]) > TWIN_MIN


def test_inpainting_unet_matches_diffusers(tiny_inpaint, tiny_controlnets, tmp_path):
    """A 9-channel inpainting UNet: its ControlNet (4 channels) sees the latents alone, as in diffusers."""
    from sdrt.export.controlnet import add_unet_controlnet

    pipe, loaded = tiny_inpaint
    _, _, [(net, folder), _] = tiny_controlnets  # made from the tiny SD UNet: the same blocks, 4 input channels
    shutil.copytree(loaded.manifest.folder, tmp_path / "model")
    add_unet_controlnet(str(loaded.manifest.folder.parent / "diffusers"), tmp_path / "model", progress=False)
    pipeline = Pipeline.load(tmp_path / "model")
    kw = dict(init_image=init_image(), mask=mask_image(), strength=0.75, mask_blur=0)
    want = run_diffusers("StableDiffusionControlNetInpaintPipeline", pipe, net, image=init_image(),
                         mask_image=mask_image(), control_image=control_image(), strength=0.75,
                         controlnet_conditioning_scale=1.0)  # fmt: skip
    x1, y1, x2, y2 = MASK_BOX
    got = run_sdrt(pipeline, [unit(folder)], **kw)
    assert max_diff(got[:, y1:y2, x1:x2], want[:, y1:y2, x1:x2]) <= PIXEL_TOL
    plain = run_sdrt(pipeline, None, **kw)
    assert max_diff(plain[:, y1:y2, x1:x2], want[:, y1:y2, x1:x2]) > TWIN_MIN  # can fail: the ControlNet acts


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl, tmp_path_factory):
    """(diffusers SDXL base, sdrt Pipeline with unet_controlnet, diffusers ControlNet, its exported folder)."""
    from tiny_controlnet import build_tiny_controlnet

    from sdrt.cli import main
    from sdrt.export.controlnet import export_controlnet

    pipe, exported = tiny_sdxl["base"]
    root = tmp_path_factory.mktemp("controlnet_sdxl")
    model = root / "model"  # `--controlnet` on a folder already exported: only the graph is added
    shutil.copytree(exported, model)  # (the shared fixture's folder stays as it is)
    assert main(["export", str(exported.parent / "base"), "-o", str(model), "--controlnet"]) == 0
    assert json.loads((model / "model.json").read_text())["models"]["unet_controlnet"]["inputs"][-1]["name"] == (
        "mid_block_res"
    )
    net = build_tiny_controlnet(pipe.unet, root / "cn", seed=2)
    export_controlnet(str(root / "cn"), root / "cn-onnx", progress=False)
    return pipe, Pipeline.load(model), net, root / "cn-onnx"


def test_sdxl_matches_diffusers(sdxl):
    import diffusers
    import torch

    pipe, pipeline, net, folder = sdxl
    parts = {k: v for k, v in pipe.components.items() if k not in ("feature_extractor", "image_encoder")}
    ref = diffusers.StableDiffusionXLControlNetPipeline(**parts, controlnet=net)
    ref.set_progress_bar_config(disable=True)

    def diffusers_image(**kw):
        out = ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=5.0, width=SIZE,
                  height=SIZE, image=control_image(), generator=torch.Generator("cpu").manual_seed(3), output_type="np",
                  **kw).images  # fmt: skip
        return (out * 255).round().astype(np.uint8)

    for kw, mode in (({}, "Balanced"), ({"guess_mode": True}, "ControlNet is more important")):
        want = diffusers_image(controlnet_conditioning_scale=0.9, **kw)
        got = pipeline.generate(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, cfg_scale=5.0, sampler="Euler", seed=3,
                                width=SIZE, height=SIZE, progress=False,
                                controlnets=[unit(folder, weight=0.9, control_mode=mode)])  # fmt: skip
        got = np.asarray(got[0])[None]
        assert max_diff(got, want) <= PIXEL_TOL, mode
    plain = pipeline.generate(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, cfg_scale=5.0, sampler="Euler", seed=3,
                              width=SIZE, height=SIZE, progress=False)  # fmt: skip
    assert max_diff(np.asarray(plain[0])[None], want) > TWIN_MIN  # can fail: the ControlNet moves the image
