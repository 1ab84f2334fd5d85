"""`sdrt export|generate|info`: parse arguments, call export or Pipeline, write files. No logic of its own."""

import argparse
import hashlib
import json
import os
import re
import sys
import warnings
from pathlib import Path

from sdrt import cli_controlnet, cli_upscale
from sdrt.errors import InvalidOption, SdrtError

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
    if not _current_export(target):
        try:
            from sdrt.export import export
        except ImportError as e:
            raise SdrtError(f"{model!r} needs exporting first, which needs `pip install sdrt[export]` ({e})") from None
        print(f"exporting {model} once into {target}", file=sys.stderr)
        export(model, target, overwrite=True)
    return target


def _current_export(folder: Path) -> bool:
    """FOLDER holds a manifest this sdrt reads (a cached export from an older sdrt is made again)."""
    from sdrt.runtime.manifest import MANIFEST_NAME, MANIFEST_VERSION

    try:
        return json.loads((folder / MANIFEST_NAME).read_text()).get("version") == MANIFEST_VERSION
    except (OSError, ValueError, AttributeError):
        return False


def cmd_export(args) -> int:
    try:
        from sdrt.export import export
    except ImportError as e:
        raise SdrtError(f"`sdrt export` needs the export extra: pip install 'sdrt[export]' ({e})") from None
    if cli_controlnet.export_unet_controlnet(args):  # --controlnet on a model already exported: add the graph
        return 0
    manifest = export(
        args.source,
        args.output,
        precision=args.precision,
        original_config=args.original_config,
        config=args.config,
        overwrite=args.overwrite,
        vae=args.vae,
        controlnet=args.controlnet,
    )
    print(f"exported {manifest.family} model ({manifest.precision}) to {args.output}")
    if args.optimize != "none":
        cmd_optimize(argparse.Namespace(model_dir=args.output, target=args.optimize, models=None, no_verify=False))
    if args.target == "tensorrt":
        from sdrt.engines.plan import ShapeRanges
        from sdrt.export.build_trt import build

        build(args.output, ShapeRanges())
    return 0


# The editing options `outpaint` takes (its canvas and mask are made for it).
OUTPAINT_EDITING = ("strength", "mask_blur", "inpainting_fill")


def generate_kwargs(args) -> dict:
    """The generation options the command line gave (GenerationOptions fields), images aside: argparse leaves the
    others out, so the schema's defaults apply and --from-png's values are replaced only by what was given."""
    from sdrt.runtime.options import OPTION_FIELDS, spec

    given = {name: getattr(args, name) for name in OPTION_FIELDS if hasattr(args, name)}
    return {name: tuple(v) if spec(name).kind == "pair" else v for name, v in given.items()
            if spec(name).kind != "image"}  # fmt: skip


def read_images(args) -> dict:
    """--init-image and --mask, read before the model loads, so a bad file costs nothing (InvalidOption naming it)."""
    from sdrt.errors import InvalidOption
    from sdrt.runtime.masks import load_image, open_image
    from sdrt.runtime.options import OPTION_FIELDS, spec

    images = {}
    if getattr(args, "init_image", None) is not None:
        images["init_image"] = load_image(args.init_image, "init_image")
    if getattr(args, "mask", None) is not None:
        if "init_image" not in images:
            raise InvalidOption("mask", args.mask, "a mask together with --init-image (the image to inpaint)")
        images["mask"] = open_image(args.mask, "mask")
    given = [name for name in OPTION_FIELDS if spec(name).group == "editing" and hasattr(args, name)]
    if getattr(args, "hires", False) and "strength" in given:  # --strength is also hires fix's denoising strength
        given.remove("strength")
    if "init_image" not in images and given:
        raise InvalidOption(given[0], getattr(args, given[0]), "only with --init-image")
    masked = [name for name in given if name not in ("init_image", "strength", "resize_mode", "mask")]
    if "mask" not in images and masked:
        raise InvalidOption(masked[0], getattr(args, masked[0]), "only with --mask")
    return images


def memory_kwargs(args) -> dict:
    """Pipeline.load's memory options (runtime/memory.py) as given on the command line."""
    return {"low_vram": args.low_vram, "vram_budget": args.vram_budget, "vae_tile": args.vae_tile}


def cmd_optimize(args) -> int:
    """Fused graph variants for ONNX Runtime's CUDA or CPU provider (sdrt.export.optimize); their counts printed."""
    try:
        from sdrt.export.optimize import optimize
    except ImportError as e:
        raise SdrtError(f"`sdrt optimize` needs the export extra: pip install 'sdrt[export]' ({e})") from None
    models = args.models.split(",") if args.models else None
    entry = optimize(args.model_dir, args.target, models, verify=not args.no_verify)
    for name, variant in entry.items():
        ops = ", ".join(f"{op} {n}" for op, n in variant["fused_ops"].items()) or "nothing fused"
        print(f"{name}: {variant['file']} ({variant['precision']}): {ops}")
    return 0


def cmd_build(args) -> int:
    from sdrt.engines.plan import ShapeRanges, parse_range, parse_size
    from sdrt.export.build_trt import build

    if args.static:
        w, _, h = args.static.partition("x")
        if not (w.isdigit() and h.isdigit()):
            from sdrt.errors import InvalidOption

            raise InvalidOption("--static", args.static, "WIDTHxHEIGHT, e.g. 512x512")
        ranges = ShapeRanges.static(parse_range("--batch", args.batch)[1], int(h), int(w))
    else:
        ranges = ShapeRanges(*(parse_range(f"--{n}", getattr(args, n.replace("-", "_")))
                               for n in ("batch", "height", "width", "text-windows")))  # fmt: skip
    models = tuple(args.models.split(",")) if args.models else None
    workspace = parse_size(args.builder_workspace, "--builder-workspace")
    built = build(args.model_dir, ranges, models, workspace, args.weight_streaming, args.refit)
    for name, path in built.items():
        print(f"{name}: {path}")
    return 0


def cmd_generate(args) -> int:
    from sdrt.runtime.pipeline import Pipeline

    images = read_images(args)
    kwargs = generate_kwargs(args)
    if args.from_png is not None:
        kwargs = {**png_kwargs(args.from_png, "init_image" in images), **kwargs}
    elif "prompt" not in kwargs:
        raise SdrtError("sdrt generate needs a PROMPT (or --from-png IMAGE.png)")
    kwargs |= cli_controlnet.controlnet_kwargs(args)
    pipe = Pipeline.load(
        resolve_model(args.model), backend=args.backend, embeddings=args.embeddings, loras=args.lora_dir,
        upscalers=args.upscaler_dir, **memory_kwargs(args),
    )  # fmt: skip
    if args.from_png is not None and "prompt" in kwargs:  # A1111: a LoRA renamed since is found by its hash
        kwargs["prompt"] = pipe.loras.fix_names(kwargs["prompt"], png_lora_hashes(args.from_png))
    return cli_controlnet.write_outputs(pipe.generate(**images, **kwargs), args.output, write_images, next_index)


def png_lora_hashes(path: str) -> str | None:
    """The "Lora hashes" an image's parameters record."""
    from sdrt.runtime.infotext import parse_infotext, read_parameters
    from sdrt.runtime.masks import open_image

    text, _ = read_parameters(open_image(path, "--from-png"))
    return parse_infotext(text).get("Lora hashes") if text else None


def png_kwargs(path: str, has_init_image: bool) -> dict:
    """Generation options from the parameters an image carries (A1111 or ComfyUI)."""
    from sdrt.errors import InvalidOption
    from sdrt.runtime.infotext import generate_kwargs as infotext_kwargs
    from sdrt.runtime.infotext import parse_infotext, read_parameters
    from sdrt.runtime.masks import open_image

    text, where = read_parameters(open_image(path, "--from-png"))
    if text is None:
        raise InvalidOption("--from-png", path, f"an image carrying generation parameters (found {where})")
    kwargs = infotext_kwargs(parse_infotext(text))
    if "strength" in kwargs and not has_init_image and not kwargs.get("hires"):  # hires fix: txt2img's strength
        raise InvalidOption("--from-png", path, "a txt2img image, or give --init-image to redo an img2img one")
    if not has_init_image:
        kwargs.pop("mask_blur", None)
    return kwargs


def cmd_outpaint(args) -> int:
    from sdrt.runtime.masks import check_outpaint_amounts, load_image
    from sdrt.runtime.pipeline import Pipeline

    amounts = check_outpaint_amounts(args.left, args.right, args.up, args.down)
    image = load_image(args.image, "image")
    pipe = Pipeline.load(
        resolve_model(args.model), backend=args.backend, embeddings=args.embeddings, loras=args.lora_dir,
        **memory_kwargs(args),
    )  # fmt: skip
    kwargs = generate_kwargs(args) | cli_controlnet.controlnet_kwargs(args)
    return cli_controlnet.write_outputs(pipe.outpaint(image, **amounts, **kwargs), args.output, write_images,
                                        next_index)  # fmt: skip


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


def cmd_serve(args) -> int:
    from sdrt.errors import InvalidOption

    if not 0 <= args.port <= 65535:
        raise InvalidOption("--port", args.port, "0 to 65535")
    for name in ("max_queue", "max_steps", "max_batch_size", "max_images", "max_pixels", "max_body_mb"):
        if getattr(args, name) <= 0:
            raise InvalidOption("--" + name.replace("_", "-"), getattr(args, name), "a positive number")
    try:
        from sdrt.server.app import Limits, parse_credentials, serve
    except ImportError as e:
        raise SdrtError(f"`sdrt serve` needs the serve extra: pip install 'sdrt[serve]' ({e})") from None
    if args.api_auth is not None:
        parse_credentials(args.api_auth)  # a malformed value fails before the model loads
    limits = Limits(
        max_pixels=args.max_pixels,
        max_steps=args.max_steps,
        max_batch_size=args.max_batch_size,
        max_images=args.max_images,
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_queue=args.max_queue,
    )
    if args.ray:
        return serve_ray(args, limits)
    for name in RAY_ONLY:
        if getattr(args, name) not in (None, "1"):
            raise InvalidOption("--" + name.replace("_", "-"), getattr(args, name), "only with --ray")
    model = resolve_model(args.model)
    return serve(model, args.host, args.port, args.api_auth, args.backend or "cpu", limits, args.lora_dir,
                 args.controlnet_dir, args.upscaler_dir)  # fmt: skip


RAY_ONLY = ("address", "replicas", "min_replicas", "max_replicas", "target_ongoing_requests", "gpus_per_replica",
            "cpus_per_replica", "ray_batch_size", "batch_wait_s", "max_ongoing_requests")  # fmt: skip


def serve_ray(args, limits) -> int:
    """`sdrt serve --ray`: the same app over Ray Serve replicas (server/ray_app.py)."""
    if args.upscaler_dir is not None:
        raise InvalidOption("--upscaler-dir", args.upscaler_dir, "not with --ray (the replicas have only Latent modes, "
                            "None, Lanczos and Nearest)")  # fmt: skip
    if args.address is None:
        # A cluster of this machine alone: Ray binds its processes to loopback, not the machine's network
        # address, when it counts as a one-machine cluster. Read when ray is imported.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        from sdrt.server.ray_app import RayOptions, serve_ray
    except ImportError as e:
        raise SdrtError(f"`sdrt serve --ray` needs the ray extra: pip install 'sdrt[ray]' ({e})") from None
    from sdrt.runtime.manifest import Manifest

    model = resolve_model(args.model)
    Manifest.load(Path(model))  # a bad folder fails here, not inside a replica
    if args.controlnet_dir is not None:
        raise InvalidOption("--controlnet-dir", args.controlnet_dir, "none with --ray (ControlNet: sdrt serve only)")
    values = {"model": str(model), "backend": args.backend, "replicas": args.replicas}
    if args.lora_dir is not None:
        values["lora_dir"] = str(Path(args.lora_dir).resolve())
    for name in RAY_ONLY[2:]:
        if getattr(args, name) is not None:
            values["max_batch_size" if name == "ray_batch_size" else name] = getattr(args, name)
    values["max_queued_requests"] = args.max_queue
    options = RayOptions.from_args(values)
    return serve_ray(options, args.host, args.port, args.api_auth, limits, args.address)


def cmd_info(args) -> int:
    """A model folder's manifest, or the generation parameters an image carries."""
    from sdrt.runtime.manifest import Manifest

    if Path(args.model_dir).is_file():
        from sdrt.runtime.infotext import parse_infotext, read_parameters
        from sdrt.runtime.masks import open_image

        text, where = read_parameters(open_image(args.model_dir, "image"))
        if text is None:
            print(f"{args.model_dir}: {where}")
            return 0
        print(text)
        print(f"\n# parsed ({where}):")
        print(json.dumps(parse_infotext(text), indent=2, ensure_ascii=False))
        return 0
    print(json.dumps(Manifest.load(Path(args.model_dir)).to_json(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from sdrt.version import __version__

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
    p.add_argument("--vae", help="another VAE (diffusers folder or hub id), e.g. one fixed for fp16 for SDXL")
    p.add_argument("--target", default="onnx", choices=("onnx", "tensorrt"), help="tensorrt: also `sdrt build` it")
    p.add_argument("--optimize", default="none", choices=("none", "cuda", "cpu"),
                   help="also write fused graphs for ONNX Runtime's CUDA (fp16) or CPU provider (`sdrt optimize`)")
    p.add_argument("--controlnet", action="store_true", help="also the UNet graph that takes ControlNet residuals")
    p.set_defaults(func=cmd_export)
    cli_controlnet.add_export_controlnet_parser(sub)
    cli_upscale.add_parsers(sub)

    z = sub.add_parser("optimize", help="fused graphs (attention, GroupNorm, NHWC conv; fp16 for CUDA) of an export")
    z.add_argument("model_dir")
    z.add_argument("--target", default="cuda", choices=("cuda", "cpu"), help="cuda (default, fp16) or cpu (fp32)")
    z.add_argument("--models", help="comma-separated subset: text_encoder,unet,vae_decoder,vae_encoder")
    z.add_argument("--no-verify", action="store_true", help="skip the check against the unfused graphs")
    z.set_defaults(func=cmd_optimize)

    g = sub.add_parser("generate", help="txt2img, img2img (--init-image) and inpainting (--mask): write PNGs")
    g.add_argument("prompt", nargs="?", default=argparse.SUPPRESS, help="the prompt (optional with --from-png)")
    add_generation_arguments(g, editing=None)
    g.add_argument("--from-png", help="regenerate from the parameters an image carries; given options override them")
    g.set_defaults(func=cmd_generate)

    o = sub.add_parser("outpaint", help="extend IMAGE by multiples of 8 pixels and paint the new area")
    o.add_argument("image")
    o.add_argument("prompt")
    for side in ("left", "right", "up", "down"):
        o.add_argument(f"--{side}", type=int, default=0, help=f"pixels to add ({side}), a multiple of 8")
    add_generation_arguments(o, editing=OUTPAINT_EDITING)
    o.set_defaults(func=cmd_outpaint)

    s = sub.add_parser("serve", help="HTTP server: A1111-compatible API (/sdapi/v1) and a web page at /")
    s.add_argument("-m", "--model", required=True, help="exported folder, checkpoint file, diffusers folder or hub id")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--api-auth", help="user:password[,user2:password2]: HTTP basic auth on every route")
    s.add_argument("--lora-dir", help="folder of LoRA files, used as <lora:NAME:WEIGHT> in prompts (A1111)")
    s.add_argument("--backend", help="cpu (default), or with --ray each replica's: auto (default), cuda, tensorrt")
    s.add_argument("--max-queue", type=int, default=8, help="jobs waiting behind the running one (then HTTP 429)")
    s.add_argument("--max-steps", type=int, default=150)
    s.add_argument("--max-batch-size", type=int, default=8)
    s.add_argument("--max-images", type=int, default=64, help="batch_size * n_iter per request")
    s.add_argument("--max-pixels", type=int, default=2048 * 2048, help="width * height per image")
    s.add_argument("--max-body-mb", type=float, default=64, help="request body size limit (HTTP 413)")
    s.add_argument("--controlnet-dir", help="folder of exported ControlNets (`sdrt export-controlnet`) the API offers")
    s.add_argument("--upscaler-dir", help="folder of exported upscalers (`sdrt export-upscaler`): hires fix, extras")
    r = s.add_argument_group("Ray Serve (pip install 'sdrt[ray]'): replicas on a Ray cluster, README 'Ray Serve'")
    r.add_argument("--ray", action="store_true", help="serve through Ray Serve: replicas, batching, autoscaling")
    r.add_argument("--address", help="the Ray cluster (auto, ray://head:10001, ...); default: start a local one")
    r.add_argument("--replicas", default="1", help="replicas (each one Pipeline), or auto: autoscaling (default 1)")
    r.add_argument("--min-replicas", type=int, help="with --replicas auto (default 1)")
    r.add_argument("--max-replicas", type=int, help="with --replicas auto (default 4)")
    r.add_argument("--target-ongoing-requests", type=float, help="autoscaling's requests per replica (default 2)")
    r.add_argument("--gpus-per-replica", type=float, help="default: 1 if the cluster has GPUs, else 0")
    r.add_argument("--cpus-per-replica", type=float, help="default 1")
    r.add_argument("--ray-batch-size", type=int, help="images per UNet batch of compatible requests (default 4)")
    r.add_argument("--batch-wait-s", type=float, help="how long a batch waits for more requests (default 0.05)")
    r.add_argument("--max-ongoing-requests", type=int, help="per replica, batch queue included (default 2x batch)")
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("build", help="TensorRT engines for an exported model (needs sdrt[tensorrt] and a GPU)")
    b.add_argument("model_dir")
    b.add_argument("--static", help="one size WIDTHxHEIGHT (fastest, CUDA-graph replay) instead of ranges")
    b.add_argument("--batch", default="1:1:4", help="images per batch: N, MIN-MAX or MIN:OPT:MAX (default 1:1:4)")
    b.add_argument("--height", default="256:512:1024", help="pixels (default 256:512:1024)")
    b.add_argument("--width", default="256:512:1024", help="pixels (default 256:512:1024)")
    b.add_argument("--text-windows", default="1:1:3", help="77-token prompt windows (default 1:1:3)")
    b.add_argument("--models", help="comma-separated subset: text_encoder,unet,vae_decoder,vae_encoder")
    b.add_argument("--builder-workspace", default="4GB", help="scratch memory the builder may use (default 4GB)")
    b.add_argument("--weight-streaming", action="store_true", help="build the UNet for weight streaming (low VRAM)")
    b.add_argument("--refit", action="store_true", help="refittable engines (new weights without a rebuild)")
    b.set_defaults(func=cmd_build)

    sub.add_parser("bench", help="sdrt vs diffusers on random full-size weights (`sdrt bench --help`)")

    i = sub.add_parser("info", help="print a model folder's manifest, or the generation parameters of an image")
    i.add_argument("model_dir", metavar="MODEL_DIR|IMAGE")
    i.set_defaults(func=cmd_info)
    return parser


GROUP_TITLES = {
    "generation": "generation options",
    "editing": "img2img and inpainting (A1111's names)",
    "sdxl": "SDXL (diffusers' names; refused on SD 1.x/2.x models)",
    "hires": "hires fix (A1111's enable_hr, hr_*; --strength is its denoising strength)",
}


def add_generation_arguments(c, editing: tuple[str, ...] | None) -> None:
    """The model and load options, and one flag per GenerationOptions field (options.py), grouped as the schema
    groups them; EDITING: the editing options this command takes (None: all). Defaults stay the schema's."""
    from sdrt.runtime.options import OPTION_FIELDS, spec

    c.add_argument("-m", "--model", required=True, help="exported folder, checkpoint file, diffusers folder or hub id")
    groups = {group: c.add_argument_group(title) for group, title in GROUP_TITLES.items()}
    for name, field in OPTION_FIELDS.items():
        s = spec(name)
        if not s.cli or s.group not in groups or (s.group == "editing" and editing is not None and name not in editing):
            continue
        default = field.default
        help_text = s.help + ("" if default is None or s.kind == "bool" else f" (default: {default})")
        flag = {"dest": name, "default": argparse.SUPPRESS, "help": help_text.replace("%", "%%")}
        if s.kind == "bool":
            flag |= {"action": "store_const", "const": True}
        elif s.kind == "pair":
            flag |= {"type": int, "nargs": 2, "metavar": ("TOP", "LEFT") if "crops" in name else ("H", "W")}
        else:
            flag["type"] = {"int": int, "float": float}.get(s.kind, str)
        groups[s.group].add_argument("--" + name.replace("_", "-"), **flag)
    c.add_argument("--embeddings", help="folder of textual inversion embeddings, used by file name in prompts")
    c.add_argument("--lora-dir", help="folder of LoRA files, used as <lora:NAME:WEIGHT> in prompts (A1111)")
    c.add_argument("--backend", default="cpu", help="cpu (default), cuda, tensorrt, openvino[-gpu|-npu][-f32|-bf16], "
                   "or auto (TensorRT > CUDA > OpenVINO > CPU)")  # fmt: skip
    c.add_argument("--low-vram", action="store_true", help="one engine loaded at a time, tiled VAE")
    c.add_argument("--vram-budget", help="plan staging, UNet weight streaming and VAE tiling to fit, e.g. 2GB")
    c.add_argument("--vae-tile", type=int, help="decode/encode the VAE in tiles of this many pixels (e.g. 512)")
    c.add_argument("-o", "--output", default="outputs", help="folder for the PNGs (default: outputs)")
    cli_controlnet.add_generation_arguments(c)
    cli_upscale.add_generation_arguments(c)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its own parser (sdrt.bench): options pass through untouched
        from sdrt.bench import main as bench_main

        return bench_main(argv[1:])
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
