"""What each `sdrt` command does, called by cli.py once its arguments are parsed: export, generate, serve, ..."""

import argparse
import json
import os
import re
from pathlib import Path

from sdrt import cli_controlnet, cli_outputs
from sdrt.errors import InvalidOption, SdrtError
from sdrt.export.cache import resolve_model
from sdrt.export.vae_files import export_vae


def cmd_export(args) -> int:
    try:
        from sdrt.export import export
    except ImportError as e:
        raise SdrtError(f"`sdrt export` needs the export extra: pip install 'sdrt[export]' ({e})") from None
    if cli_controlnet.export_unet_controlnet(args):  # --controlnet on a model already exported: add the graph
        return 0
    adding = args.taesd or args.vae_approx or args.deepcache is not None
    if adding and not args.overwrite and (Path(args.output) / "model.json").is_file():
        return export_additions(args)  # --taesd / --vae-approx / --deepcache on an exported model: those graphs only
    manifest = export(
        args.source,
        args.output,
        precision=args.precision,
        original_config=args.original_config,
        config=args.config,
        overwrite=args.overwrite,
        vae=args.vae,
        controlnet=args.controlnet,
        loras=args.lora,
        deepcache=args.deepcache,
        files={"--clip-l": args.clip_l, "--clip-g": args.clip_g, "--t5xxl": args.t5xxl},
        part_size=args.part_size,
    )
    print(f"exported {manifest.family} model ({manifest.precision}) to {args.output}")
    if args.taesd or args.vae_approx:
        export_additions(argparse.Namespace(**{**vars(args), "deepcache": None}))
    if args.optimize != "none":
        cmd_optimize(argparse.Namespace(model_dir=args.output, target=args.optimize, models=None, no_verify=False))
    if args.target == "tensorrt":
        from sdrt.engines.plan import ShapeRanges
        from sdrt.export.build_trt import build

        build(args.output, ShapeRanges())
    return 0


def export_additions(args) -> int:
    """--taesd, --vae-approx and --deepcache on an exported folder: their graphs added to it."""
    if args.deepcache is not None:
        from sdrt.export.deepcache import add_deepcache

        add_deepcache(args.source, args.output, args.deepcache, original_config=args.original_config,
                      config=args.config)  # fmt: skip
        print(f"{args.output}: DeepCache graphs added (branch {args.deepcache}; --deepcache N to use them)")
    if args.taesd:
        from sdrt.export.taesd import add_taesd

        add_taesd(args.taesd, args.output)
        print(f"{args.output}: TAESD decoder added (previews, --vae taesd)")
    if args.vae_approx:
        from sdrt.export.vae_approx import add_vae_approx

        add_vae_approx(args.vae_approx, args.output)
        print(f"{args.output}: Approx NN added (live previews)")
    return 0


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
    return {"low_vram": args.low_vram, "vram_budget": args.vram_budget, "vae_tile": args.vae_tile,
            "ram_budget": args.ram_budget}  # fmt: skip


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

    cli_outputs.check_output_folder(args.output)  # before any work: a bad folder costs nothing
    images = read_images(args)
    kwargs = generate_kwargs(args)
    if args.from_png is not None:
        kwargs = {**png_kwargs(args.from_png, "init_image" in images), **kwargs}
    elif "prompt" not in kwargs:
        raise SdrtError("sdrt generate needs a PROMPT (or --from-png IMAGE.png)")
    kwargs |= cli_controlnet.controlnet_kwargs(args)
    model = resolve_model(args.model)
    kwargs = vae_kwargs(kwargs, model)  # --vae FILE_OR_FOLDER: exported once into the cache
    pipe = Pipeline.load(
        model, backend=args.backend, embeddings=args.embeddings, loras=args.lora_dir, upscalers=args.upscaler_dir,
        **memory_kwargs(args),
    )  # fmt: skip
    if args.from_png is not None and "prompt" in kwargs:  # A1111: a LoRA renamed since is found by its hash
        kwargs["prompt"] = pipe.loras.fix_names(kwargs["prompt"], png_lora_hashes(args.from_png))
    generated = pipe.generate(**images, **kwargs)
    return cli_outputs.write_or_rescue(lambda out: cli_controlnet.write_outputs(generated, out, write_images,
                                                                                next_index), args.output)  # fmt: skip


def vae_kwargs(kwargs: dict, model) -> dict:
    """--vae FILE_OR_FOLDER (not full or taesd): that VAE file or diffusers VAE folder, exported once into the cache
    and checked against MODEL, as the option vae_file (A1111's sd_vae)."""
    from sdrt.runtime.previews import VAE_DECODERS

    vae = kwargs.get("vae")
    if vae is None or vae in VAE_DECODERS:
        return kwargs
    return {**kwargs, "vae": "full", "vae_file": str(export_vae(vae, model))}


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

    cli_outputs.check_output_folder(args.output)
    amounts = check_outpaint_amounts(args.left, args.right, args.up, args.down)
    image = load_image(args.image, "image")
    model = resolve_model(args.model)
    kwargs = vae_kwargs(generate_kwargs(args) | cli_controlnet.controlnet_kwargs(args), model)
    pipe = Pipeline.load(model, backend=args.backend, embeddings=args.embeddings, loras=args.lora_dir,
                         **memory_kwargs(args))  # fmt: skip
    generated = pipe.outpaint(image, **amounts, **kwargs)
    return cli_outputs.write_or_rescue(lambda out: cli_controlnet.write_outputs(generated, out, write_images,
                                                                                next_index), args.output)  # fmt: skip


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
    from sdrt.server.extra_routes import Extras
    from sdrt.server.models import ModelsFolder

    extras = Extras.from_args(args, export_vae)  # --embeddings-dir, --styles-file, --vae-dir, cmd-flags
    if args.models_dir is not None:
        return serve(None, args.host, args.port, args.api_auth, args.backend or "cpu", limits, args.lora_dir,
                     args.controlnet_dir, folder=ModelsFolder.from_args(args, resolve_model), extras=extras,
                     upscaler_dir=args.upscaler_dir)  # fmt: skip
    model = resolve_model(args.model)
    return serve(model, args.host, args.port, args.api_auth, args.backend or "cpu", limits, args.lora_dir,
                 args.controlnet_dir, extras=extras, upscaler_dir=args.upscaler_dir)  # fmt: skip


RAY_ONLY = ("address", "replicas", "min_replicas", "max_replicas", "target_ongoing_requests", "gpus_per_replica",
            "cpus_per_replica", "ray_batch_size", "batch_wait_s", "max_ongoing_requests")  # fmt: skip


def serve_ray(args, limits) -> int:
    """`sdrt serve --ray`: the same app over Ray Serve replicas (server/ray_app.py)."""
    if args.address is None:
        # A cluster of this machine alone: Ray binds its processes to loopback, not the machine's network
        # address, when it counts as a one-machine cluster. Read when ray is imported.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        from sdrt.server.ray_app import RayOptions, serve_ray
    except ImportError as e:
        raise SdrtError(f"`sdrt serve --ray` needs the ray extra: pip install 'sdrt[ray]' ({e})") from None
    for name in ("embeddings_dir", "styles_file"):
        if getattr(args, name) is not None:
            raise InvalidOption("--" + name.replace("_", "-"), getattr(args, name), "none with --ray (sdrt serve only)")
    values = ray_model_values(args)
    if args.controlnet_dir is not None:
        raise InvalidOption("--controlnet-dir", args.controlnet_dir, "none with --ray (ControlNet: sdrt serve only)")
    if args.upscaler_dir is not None:
        from sdrt.server.ray_app import upscaler_set

        upscaler_set(args.upscaler_dir)  # a bad folder fails here, not inside a replica
        values["upscaler_dir"] = str(Path(args.upscaler_dir).resolve())
    values.update(backend=args.backend, replicas=args.replicas)
    if args.vae_dir is not None:
        if not Path(args.vae_dir).is_dir():
            raise InvalidOption("--vae-dir", args.vae_dir, "a folder of VAE files or diffusers VAE folders")
        values["vae_dir"] = str(Path(args.vae_dir).resolve())
    if args.lora_dir is not None:
        values["lora_dir"] = str(Path(args.lora_dir).resolve())
    for name in RAY_ONLY[2:]:
        if getattr(args, name) is not None:
            values["max_batch_size" if name == "ray_batch_size" else name] = getattr(args, name)
    values["max_queued_requests"] = args.max_queue
    options = RayOptions.from_args(values)
    return serve_ray(options, args.host, args.port, args.api_auth, limits, args.address, exporter=resolve_model,
                     vae_exporter=export_vae)  # fmt: skip


def ray_model_values(args) -> dict:
    """RayOptions' model fields: one exported model (-m, checked here, not inside a replica), or a models folder
    (--models-dir, -m its default model, checked against the folder's listing)."""
    from sdrt.runtime.manifest import Manifest

    if args.models_dir is None:
        model = resolve_model(args.model)
        Manifest.load(Path(model))  # a bad folder fails here, not inside a replica
        return {"model": str(model)}
    from sdrt.server.models import ModelRegistry, ModelsFolder

    folder = ModelsFolder.from_args(args, resolve_model)  # the folder, --max-loaded-models, --models-memory
    if folder.default is not None:
        ModelRegistry(folder=folder.folder).find(folder.default, "--model")
    values = {"models_dir": str(folder.folder.resolve()), "max_loaded_models": folder.max_loaded}
    if args.model is not None:
        values["model"] = args.model
    if args.models_memory is not None:
        values["models_memory"] = args.models_memory
    return values


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
