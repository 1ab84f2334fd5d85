"""Fingerprints of sdrt's outputs for a fixed set of seeds, to show a refactor changes no image bit.

Run before and after a change, then compare the two JSON files:

    python tools/image_identity.py OUT.json
    diff before.json after.json

It builds the tests' tiny random models (tests/tiny_sd.py, tests/tiny_sdxl.py), exports them with `sdrt export`,
and fingerprints (sha256 of pixels + infotext) txt2img, img2img, inpainting (regular and 9-channel models),
outpainting, SDXL (base and refiner), the CLI (`generate`, `--from-png`) and the HTTP server.
"""

import hashlib
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def fingerprint(item) -> str:
    if isinstance(item, np.ndarray):
        return hashlib.sha256(np.ascontiguousarray(item, dtype=np.float32).tobytes()).hexdigest()[:16]
    pixels = np.asarray(item.convert("RGB")).tobytes()
    info = item.info.get("parameters", "").replace("\n", "|")
    info = re.sub(r"Version: sdrt [^,|]*", "Version: sdrt", info)
    return hashlib.sha256(pixels).hexdigest()[:16] + " " + info


def pattern(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    base = np.concatenate([x.repeat(height, 0), y.repeat(width, 1), np.full((height, width, 1), 128.0)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


def square_mask(width: int, height: int) -> Image.Image:
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    return Image.fromarray(mask, "L")


def main(out_path: str) -> None:
    from tiny_sd import build_tiny_sd
    from tiny_sdxl import build_tiny_sdxl, build_tiny_sdxl_refiner

    from sdrt import Pipeline
    from sdrt.cli import main as cli

    results = {}
    work = Path(tempfile.gettempdir()) / "sdrt-identity"  # one fixed path: configs record where parts came from
    shutil.rmtree(work, ignore_errors=True)
    build_tiny_sd(work / "sd")
    build_tiny_sd(work / "inpaint", seed=2, unet_in_channels=9)
    base = build_tiny_sdxl(work / "xl")
    build_tiny_sdxl_refiner(work / "xl-refiner", base)
    for name in ("sd", "inpaint", "xl", "xl-refiner"):
        assert cli(["export", str(work / name), "-o", str(work / f"{name}-onnx")]) == 0
        results[f"manifest {name}"] = hashlib.sha256((work / f"{name}-onnx/model.json").read_bytes()).hexdigest()[:16]

    sd = Pipeline.load(work / "sd-onnx")
    runs = {
        "euler b2": dict(steps=6, seed=42, batch_size=2, width=64, height=64),
        "dpm2m karras count2": dict(steps=6, seed=7, sampler="DPM++ 2M Karras", batch_count=2),
        "euler a ensd variation": dict(steps=5, seed=3, sampler="Euler a", ensd=31337, subseed=9,
                                       subseed_strength=0.3, rng="gpu"),
        "emphasis clip skip": dict(prompt="a (cat:1.3) [dog:bird:0.5] BREAK tree", steps=6, seed=5, clip_skip=2,
                                   emphasis="No norm"),
        "cfg1 nv": dict(steps=4, seed=11, cfg_scale=1.0, rng="nv"),
        "ddim eta rescale": dict(steps=5, seed=12, sampler="DDIM", eta=0.3, guidance_rescale=0.5,
                                 timestep_spacing="trailing"),
        "heun resize seed": dict(steps=3, seed=13, sampler="Heun", seed_resize_from_w=64, seed_resize_from_h=64),
        "dpm sde": dict(steps=4, seed=14, sampler="DPM++ SDE", scheduler="exponential"),
        "unipc lcm": dict(steps=4, seed=15, sampler="UniPC", scheduler="beta"),
        "img2img crop": dict(steps=8, seed=21, init_image=pattern(80, 64), strength=0.6, resize_mode="crop and resize",
                             width=64, height=64),
        "inpaint fill full res": dict(steps=6, seed=22, init_image=pattern(64, 64), mask=square_mask(64, 64),
                                      inpainting_fill="fill", inpaint_full_res=True, strength=0.8),
        "inpaint latent noise invert": dict(steps=6, seed=23, init_image=pattern(64, 64), mask=square_mask(64, 64),
                                            inpainting_fill="latent noise", inpainting_mask_invert=True, mask_blur=2),
    }
    for name, kwargs in runs.items():
        prompt = kwargs.pop("prompt", "a grey squirrel")
        images = sd.generate(prompt, negative_prompt="blurry", progress=False, **kwargs)
        results[name] = [fingerprint(im) for im in images]
    latent = sd.generate("latents", steps=3, seed=1, output_type="latent", progress=False)
    results["latent output"] = fingerprint(latent)
    results["outpaint"] = [fingerprint(im) for im in sd.outpaint(pattern(64, 64), "a wall", left=16, down=8, steps=5,
                                                                  seed=31, progress=False)]
    inpaint = Pipeline.load(work / "inpaint-onnx")
    results["9ch inpaint"] = [fingerprint(im) for im in inpaint.generate(
        "a hole", init_image=pattern(64, 64), mask=square_mask(64, 64), steps=6, seed=41, progress=False)]
    xl = Pipeline.load(work / "xl-onnx")
    results["sdxl base"] = [fingerprint(im) for im in xl.generate(
        "a castle", prompt_2="oil painting", steps=5, seed=51, original_size=(96, 96), progress=False)]
    results["sdxl refiner"] = [fingerprint(im) for im in xl.generate(
        "a castle", steps=6, seed=52, refiner=work / "xl-refiner-onnx", refiner_switch_at=0.7, aesthetic_score=7,
        progress=False)]

    out = work / "cli"
    assert cli(["generate", "a red boat", "-m", str(work / "sd-onnx"), "--steps", "5", "--seed", "61",
                "--sampler", "DPM++ 2M", "--scheduler", "karras", "--clip-skip", "2", "-o", str(out)]) == 0
    first = sorted(out.glob("*.png"))[0]
    results["cli generate"] = fingerprint(Image.open(first))
    assert cli(["generate", "--from-png", str(first), "-m", str(work / "sd-onnx"), "--steps", "4", "-o",
                str(out)]) == 0
    results["cli from-png"] = fingerprint(Image.open(sorted(out.glob("*.png"))[1]))
    assert cli(["generate", "a blue boat", "-m", str(work / "sd-onnx"), "--steps", "5", "--seed", "62",
                "--init-image", str(save(pattern(64, 64), work / "init.png")), "--mask",
                str(save(square_mask(64, 64), work / "mask.png")), "--mask-blur", "3", "-o", str(out)]) == 0
    results["cli inpaint"] = fingerprint(Image.open(sorted(out.glob("*.png"))[2]))

    from server_fixture import decode_b64, png_b64, running_server

    with running_server(work / "sd-onnx", str(work)) as server:
        r = server.post("/sdapi/v1/txt2img", json={"prompt": "a tree", "steps": 5, "seed": 71, "width": 64,
                                                    "height": 64, "batch_size": 2, "sampler_name": "Euler a",
                                                    "subseed": 5, "override_settings": {"CLIP_stop_at_last_layers": 2}})
        r.raise_for_status()
        body = r.json()
        info = json.loads(body["info"])
        info.pop("job_timestamp")
        info.pop("version")
        results["server txt2img"] = [fingerprint(decode_b64(b)) for b in body["images"]] + [
            json.dumps(info, sort_keys=True), json.dumps(body["parameters"], sort_keys=True)]
        r = server.post("/sdapi/v1/img2img", json={"prompt": "a tree", "steps": 6, "seed": 72, "width": 64,
                                                    "height": 64, "init_images": [png_b64(pattern(64, 64))],
                                                    "mask": png_b64(square_mask(64, 64)), "denoising_strength": 0.7,
                                                    "inpainting_fill": 1})
        r.raise_for_status()
        results["server inpaint"] = [fingerprint(decode_b64(b)) for b in r.json()["images"]]
        r = server.post("/sdapi/v1/txt2img", json={"infotext": results["cli generate"].split(" ", 1)[1]
                                                    .replace("|", "\n"), "steps": 4})
        r.raise_for_status()
        results["server infotext"] = [fingerprint(decode_b64(b)) for b in r.json()["images"]]
    Path(out_path).write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(results)} fingerprints to {out_path}")


def save(image: Image.Image, path: Path) -> Path:
    image.save(path)
    return path


if __name__ == "__main__":
    main(sys.argv[1])
