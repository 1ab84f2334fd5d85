"""`sdrt export|generate|info`: parse arguments, call export or Pipeline, write files. No logic of its own."""

import argparse
import hashlib
import json
import os
import re
import sys
import warnings
from pathlib import Path

from sdrt.runtime.errors import SdrtError

EXIT_BAD_INPUT = 2


def cache_dir() -> Path:
    return Path(os.environ.get("SDRT_CACHE", Path.home() / ".cache" / "sdrt")) / "models"


def resolve_model(model: str) -> Path:
    """A model folder as is; a checkpoint file, diffusers folder or hub id exported once into the cache."""
    path = Path(model)
    is_checkpoint = path.is_file() or (path / "model_index.json").is_file()
    looks_like_hub_id = not path.exists() and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model) is not None
    if not (is_checkpoint or looks_like_hub_id):
        return path  # an exported folder (or a bad path: Manifest.load says what is wrong)
    identity = str(path.resolve()) if path.exists() else model
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    identity += "".join(f":{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    target = cache_dir() / (
        re.sub(r"[^A-Za-z0-9._-]", "_", path.name or model)[:60]
        + "-"
        + hashlib.sha256(identity.encode()).hexdigest()[:12]
    )
    if not (target / "model.json").is_file():
        try:
            from sdrt.export import export
        except ImportError as e:
            raise SdrtError(f"{model!r} needs exporting first, which needs `pip install sdrt[export]` ({e})") from None
        print(f"exporting {model} once into {target}", file=sys.stderr)
        export(model, target, overwrite=True)
    return target


def cmd_export(args) -> int:
    try:
        from sdrt.export import export
    except ImportError as e:
        raise SdrtError(f"`sdrt export` needs the export extra: pip install 'sdrt[export]' ({e})") from None
    manifest = export(
        args.source,
        args.output,
        precision=args.precision,
        original_config=args.original_config,
        config=args.config,
        overwrite=args.overwrite,
    )
    print(f"exported {manifest.family} model ({manifest.precision}) to {args.output}")
    return 0


EDITING_OPTIONS = (  # passed on only when given, so generate's defaults (A1111's) apply otherwise
    "strength",
    "resize_mode",
    "mask_blur",
    "inpainting_fill",
    "inpaint_full_res",
    "inpaint_full_res_padding",
    "inpainting_mask_invert",
)
MASK_OPTIONS = EDITING_OPTIONS[2:]


def generate_kwargs(args) -> dict:
    """The generation options shared by `generate` and `outpaint`, as Pipeline.generate's keyword arguments."""
    kwargs = dict(
        negative_prompt=args.negative_prompt,
        width=args.width,
        height=args.height,
        steps=args.steps,
        cfg_scale=args.cfg_scale,
        sampler=args.sampler,
        scheduler=args.scheduler,
        timestep_spacing=args.timestep_spacing,
        guidance_rescale=args.guidance_rescale,
        seed=args.seed,
        batch_size=args.batch_size,
        batch_count=args.batch_count,
        rng=args.rng,
        subseed=args.subseed,
        subseed_strength=args.subseed_strength,
        seed_resize_from_w=args.seed_resize_from_w,
        seed_resize_from_h=args.seed_resize_from_h,
        ensd=args.ensd,
    )
    for name in EDITING_OPTIONS:
        if getattr(args, name, None) is not None:
            kwargs[name] = getattr(args, name)
    return kwargs


def read_images(args) -> dict:
    """--init-image and --mask, read before the model loads, so a bad file costs nothing (InvalidOption naming it)."""
    from sdrt.runtime.errors import InvalidOption
    from sdrt.runtime.masks import load_image, open_image

    images = {}
    if args.init_image is not None:
        images["init_image"] = load_image(args.init_image, "init_image")
    if args.mask is not None:
        if "init_image" not in images:
            raise InvalidOption("mask", args.mask, "a mask together with --init-image (the image to inpaint)")
        images["mask"] = open_image(args.mask, "mask")
    given = [name for name in EDITING_OPTIONS if getattr(args, name) is not None]
    if "init_image" not in images and given:
        raise InvalidOption(given[0], getattr(args, given[0]), "only with --init-image")
    if "mask" not in images and set(given) & set(MASK_OPTIONS):
        name = next(n for n in given if n in MASK_OPTIONS)
        raise InvalidOption(name, getattr(args, name), "only with --mask")
    return images


def cmd_generate(args) -> int:
    from sdrt.runtime.pipeline import Pipeline

    images = read_images(args)
    pipe = Pipeline.load(resolve_model(args.model), backend=args.backend)
    return write_images(pipe.generate(args.prompt, **images, **generate_kwargs(args)), args.output)


def cmd_outpaint(args) -> int:
    from sdrt.runtime.masks import check_outpaint_amounts, load_image
    from sdrt.runtime.pipeline import Pipeline

    amounts = check_outpaint_amounts(args.left, args.right, args.up, args.down)
    image = load_image(args.image, "image")
    pipe = Pipeline.load(resolve_model(args.model), backend=args.backend)
    return write_images(pipe.outpaint(image, args.prompt, **amounts, **generate_kwargs(args)), args.output)


def write_images(images, output) -> int:
    """Save each image as NNNNN-SEED.png (atomically, with its infotext) and print its path."""
    from sdrt.runtime.image import save_png

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    index = next_index(out)
    for i, image in enumerate(images):
        seed = re.search(r"Seed: (\d+)", image.info["parameters"]).group(1)
        print(save_png(image, out / f"{index + i:05d}-{seed}.png"))
    return 0


def next_index(folder: Path) -> int:
    """A1111's file numbering: one past the largest NNNNN- prefix in FOLDER."""
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := re.match(r"(\d{5})-", p.name))]
    return max(numbers, default=-1) + 1


def cmd_info(args) -> int:
    from sdrt.runtime.manifest import Manifest

    print(json.dumps(Manifest.load(Path(args.model_dir)).to_json(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from sdrt import __version__

    parser = argparse.ArgumentParser(prog="sdrt", description="Stable Diffusion on ONNX Runtime, without PyTorch.")
    parser.add_argument("--version", action="version", version=f"sdrt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="export a checkpoint to ONNX models + model.json")
    p.add_argument("source", help="diffusers folder, .safetensors/.ckpt file, or hub id")
    p.add_argument("-o", "--output", required=True, help="folder to create")
    p.add_argument("--precision", default="fp32", help="fp32 (default) or fp16")
    p.add_argument("--original-config", help="the checkpoint's YAML (e.g. v2-inference-v.yaml)")
    p.add_argument("--config", help="for a single file: a diffusers folder (or hub id) with the component configs")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=cmd_export)

    g = sub.add_parser("generate", help="txt2img, img2img (--init-image) and inpainting (--mask): write PNGs")
    g.add_argument("prompt")
    add_generation_arguments(g)
    e = g.add_argument_group("img2img and inpainting (A1111's names)")
    e.add_argument("--init-image", help="img2img: the starting image (any mode; see README 'Image inputs')")
    e.add_argument("--strength", type=float, help="denoising strength, 0 to 1 (default 0.75)")
    e.add_argument("--resize-mode", help="just resize (default), crop and resize, resize and fill")
    e.add_argument("--mask", help="inpainting: white = repaint (alpha or colour masks are converted)")
    e.add_argument("--mask-blur", type=int, help="Gaussian sigma in pixels (default 4)")
    e.add_argument("--inpainting-fill", help="masked content: fill, original (default), latent noise, latent nothing")
    e.add_argument("--inpaint-full-res", action="store_const", const=True, help="only masked: crop, generate, paste")
    e.add_argument("--inpaint-full-res-padding", type=int, help="pixels around the mask's box (default 32)")
    e.add_argument("--inpainting-mask-invert", action="store_const", const=True, help="repaint the black part")
    g.set_defaults(func=cmd_generate)

    o = sub.add_parser("outpaint", help="extend IMAGE by multiples of 8 pixels and paint the new area")
    o.add_argument("image")
    o.add_argument("prompt")
    for side in ("left", "right", "up", "down"):
        o.add_argument(f"--{side}", type=int, default=0, help=f"pixels to add ({side}), a multiple of 8")
    add_generation_arguments(o)
    o.add_argument("--mask-blur", type=int, help="Gaussian sigma in pixels (default 4)")
    o.add_argument("--inpainting-fill", help="fill, original (default: the prefilled canvas), latent noise, ...")
    o.add_argument("--strength", type=float, help="denoising strength, 0 to 1 (default 1)")
    o.set_defaults(func=cmd_outpaint)

    i = sub.add_parser("info", help="print a model folder's manifest")
    i.add_argument("model_dir")
    i.set_defaults(func=cmd_info)
    return parser


def add_generation_arguments(c) -> None:
    """The options `generate` and `outpaint` share."""
    c.add_argument("-m", "--model", required=True, help="exported folder, checkpoint file, diffusers folder or hub id")
    c.add_argument("--negative-prompt", default="")
    c.add_argument("--width", type=int, help="default: the model's native size")
    c.add_argument("--height", type=int, help="default: the model's native size")
    c.add_argument("--steps", type=int, default=20)
    c.add_argument("--cfg-scale", type=float, default=7.0)
    c.add_argument("--sampler", default="Euler", help="Euler, Euler a, DDIM, DPM++ 2M (or 'DPM++ 2M Karras')")
    c.add_argument(
        "--scheduler",
        default="automatic",
        help="schedule type: automatic, uniform, karras, exponential, sgm_uniform, simple, beta",
    )
    c.add_argument("--timestep-spacing", help="leading, linspace or trailing (default: the model's config)")
    c.add_argument("--guidance-rescale", type=float, default=0.0, help="0 to 1: Lin et al. 2023's phi (with cfg > 1)")
    c.add_argument("--seed", type=int, default=-1, help="-1: random")
    c.add_argument("--batch-size", type=int, default=1)
    c.add_argument("--batch-count", type=int, default=1)
    c.add_argument("--rng", default="torch", help="noise source: torch (= cpu, A1111 'CPU'), gpu (A1111's default), nv")
    c.add_argument("--subseed", type=int, default=-1, help="A1111 variation seed (-1: random)")
    c.add_argument("--subseed-strength", type=float, default=0.0, help="0 to 1: blend towards the variation seed")
    c.add_argument("--seed-resize-from-w", type=int, default=0, help="width the seed was first used at (0: off)")
    c.add_argument("--seed-resize-from-h", type=int, default=0, help="height the seed was first used at (0: off)")
    c.add_argument("--ensd", type=int, default=0, help="A1111 eta noise seed delta (31337 in many shared infotexts)")
    c.add_argument("--backend", default="cpu")
    c.add_argument("-o", "--output", default="outputs", help="folder for the PNGs (default: outputs)")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def note(message, category, *_, **__):  # the runtime's notes (a mask resized, ...): one plain line each
        print(f"sdrt {args.command}: note: {message}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", UserWarning)
            warnings.showwarning = note
            return args.func(args)
    except SdrtError as e:
        print(f"sdrt {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
