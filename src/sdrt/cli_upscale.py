"""The command line's upscaler parts: `sdrt export-upscaler FILE -o DIR`, `sdrt upscale IMAGE -u MODEL [--scale N]`,
and the --upscaler-dir of generate and serve (hires fix's image upscalers)."""

from pathlib import Path

from sdrt.errors import InvalidOption


def add_parsers(sub) -> None:
    p = sub.add_parser("export-upscaler", help="export an upscaler model (.pth/.safetensors) to ONNX")
    p.add_argument("file", help="ESRGAN / Real-ESRGAN (x4plus, anime_6B, compact) / 4x-UltraSharp / SwinIR / Swin2SR / "
                   "HAT weights; other architectures through spandrel, if installed (sdrt[spandrel])")  # fmt: skip
    p.add_argument("-o", "--output", required=True, help="folder to create")
    p.add_argument("--name", help="the upscaler's name in lists and requests (default: the file's stem)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=cmd_export_upscaler)

    u = sub.add_parser("upscale", help="upscale images with an exported upscaler (or Lanczos / Nearest)")
    u.add_argument("images", nargs="+", help="image files")
    u.add_argument("-u", "--upscaler", required=True, help="an exported upscaler folder, or a name: Lanczos, "
                   "Nearest, or one in --upscaler-dir")  # fmt: skip
    u.add_argument("--scale", type=float, default=None, help="upscale by (default: the model's scale, or 2)")
    u.add_argument("--upscaler-dir", help="folder of exported upscalers to find --upscaler in")
    u.add_argument("--tile", type=int, default=None, help="tile size in pixels, 0: none (A1111's ESRGAN_tile: 192)")
    u.add_argument("--tile-overlap", type=int, default=None, help="tile overlap in pixels (ESRGAN_tile_overlap: 8)")
    u.add_argument("--backend", default="cpu", help="cpu (default), cuda, or openvino[-f32|-bf16]")
    u.add_argument("-o", "--output", default="outputs", help="folder for the PNGs (default: outputs)")
    u.set_defaults(func=cmd_upscale)


def add_generation_arguments(c) -> None:
    c.add_argument("--upscaler-dir", help="folder of exported upscalers, for --hires-upscaler NAME")


def cmd_export_upscaler(args) -> int:
    from sdrt.export.upscaler import export_upscaler

    manifest = export_upscaler(args.file, args.output, overwrite=args.overwrite, name=args.name)
    print(f"exported {manifest['architecture']} x{manifest['scale']} upscaler {manifest['name']!r} to {args.output}")
    return 0


def cmd_upscale(args) -> int:
    from sdrt.runtime.image import save_png
    from sdrt.runtime.masks import load_image
    from sdrt.runtime.upscale import (
        DEFAULT_TILE,
        DEFAULT_TILE_OVERLAP,
        UPSCALER_MANIFEST,
        UpscalerModel,
        UpscalerSet,
        check_scale,
        format_scale,
    )

    tile = DEFAULT_TILE if args.tile is None else args.tile
    overlap = DEFAULT_TILE_OVERLAP if args.tile_overlap is None else args.tile_overlap
    if tile < 0 or not 0 <= overlap < max(tile, 1):
        raise InvalidOption("--tile-overlap", overlap, "0 or more and less than --tile")
    upscalers = UpscalerSet(args.backend, tile, overlap)
    name = args.upscaler
    if (Path(name) / UPSCALER_MANIFEST).is_file():
        model = UpscalerModel(Path(name), args.backend)
        upscalers.add(model)
        name = model.name
    elif args.upscaler_dir is not None:
        upscalers.load_dir(args.upscaler_dir)
    upscalers.check("--upscaler", name)
    model = upscalers.models.get(name)
    scale = check_scale("--scale", args.scale if args.scale is not None else model.scale if model else 2.0)
    images = [(Path(path), load_image(path, "images")) for path in args.images]  # all read before any work
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm

    for path, image in images:
        with tqdm(desc=f"upscale {path.name}", unit="tile", leave=False) as bar:
            result = upscalers.upscale(image.convert("RGB"), name, scale, progress=bar.update)
        result.info["parameters"] = f"Postprocess upscale by: {format_scale(scale)}, Postprocess upscaler: {name}"
        print(save_png(result, out / f"{path.stem}-x{format_scale(scale)}.png"))
    return 0
