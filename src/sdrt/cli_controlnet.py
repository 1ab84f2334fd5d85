"""The command line's ControlNet parts: `sdrt export-controlnet`, `sdrt export --controlnet`, and generate's
`--controlnet MODEL IMAGE [FIELD=VALUE ...]` units (runtime/controlnet.py has the meaning of every field)."""

from pathlib import Path

CONTROLNET_HELP = (
    "a ControlNet unit: an exported ControlNet folder, its control image, then FIELD=VALUE settings "
    "(module=canny weight=0.8 guidance_start=0 guidance_end=1 control_mode='ControlNet is more important' "
    "resize_mode='Crop and Resize' processor_res=512 threshold_a=100 threshold_b=200 pixel_perfect=true); repeat "
    "for several units"
)


def add_export_controlnet_parser(sub) -> None:
    p = sub.add_parser("export-controlnet", help="export a ControlNet (diffusers folder, single file or hub id)")
    p.add_argument("source", help="diffusers ControlNet folder, .safetensors/.pth file, or hub id")
    p.add_argument("-o", "--output", required=True, help="folder to create")
    p.add_argument("--precision", default="fp32", help="fp32 (default) or fp16")
    p.add_argument("--config", help="for a single file: a diffusers ControlNet folder (or hub id) with its config.json")
    p.add_argument("--original-config", help="for a single file: its cldm YAML (cldm_v15.yaml, cldm_v21.yaml)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--base", metavar="MODEL_DIR", help="also add the unet_controlnet graph to this exported model")
    p.add_argument("--base-source", help="the checkpoint MODEL_DIR was exported from (for --base)")
    p.set_defaults(func=cmd_export_controlnet)


def add_generation_arguments(c) -> None:
    c.add_argument(
        "--controlnet", nargs="+", action="append", metavar="MODEL IMAGE [FIELD=VALUE]", help=CONTROLNET_HELP
    )
    c.add_argument("--control-maps", action="store_true", help="also save each unit's control map as a PNG")


def cmd_export_controlnet(args) -> int:
    from sdrt.errors import InvalidOption
    from sdrt.export.controlnet import add_unet_controlnet, export_controlnet

    if (args.base is None) != (args.base_source is None):
        raise InvalidOption("--base", args.base, "--base MODEL_DIR together with --base-source CHECKPOINT")
    manifest = export_controlnet(
        args.source, args.output, args.precision, args.config, args.original_config, args.overwrite
    )
    print(f"exported {manifest['family']} ControlNet ({manifest['precision']}) to {args.output}")
    if args.base is not None:
        add_unet_controlnet(args.base_source, args.base)
        print(f"{args.base}: unet_controlnet graph added")
    return 0


def export_unet_controlnet(args) -> bool:
    """`sdrt export SOURCE -o DIR --controlnet` on a folder already exported from SOURCE: add the graph only."""
    from sdrt.export.controlnet import add_unet_controlnet

    if not (args.controlnet and not args.overwrite and (Path(args.output) / "model.json").is_file()):
        return False
    add_unet_controlnet(args.source, args.output, original_config=args.original_config, config=args.config)
    print(f"{args.output}: unet_controlnet graph added")
    return True


def controlnet_units(specs, png_units=None) -> list | None:
    """`--controlnet MODEL IMAGE [FIELD=VALUE ...]` occurrences -> ControlNetUnit list (None without any). Unit i
    starts from PNG_UNITS[i] (the settings an image's infotext records, with --from-png), then the given fields."""
    from sdrt.errors import InvalidOption
    from sdrt.runtime.controlnet import ControlNetUnit
    from sdrt.runtime.controlnet_infotext import unit_fields

    if not specs:
        return None
    units = []
    for i, spec in enumerate(specs):
        where = f"--controlnet[{i}]"
        if len(spec) < 2 or "=" in spec[0] or "=" in spec[1]:
            raise InvalidOption(where, " ".join(spec), "MODEL IMAGE [FIELD=VALUE ...]")
        pairs = {}
        for item in spec[2:]:
            key, sep, value = item.partition("=")
            if not sep:
                raise InvalidOption(where, item, "FIELD=VALUE, e.g. weight=0.8")
            pairs[key.strip()] = value
        base = dict(png_units[i]) if png_units and i < len(png_units) else {}
        base.pop("model", None)
        fields = {**base, **unit_fields(pairs, where)}
        fields.pop("model", None)
        units.append(ControlNetUnit(spec[0], spec[1], **fields))
    return units


def write_control_maps(maps, output, first_index: int) -> None:
    """Each control map as NNNNN-controlnet-I.png beside the images."""
    from sdrt.runtime.image import save_png

    for i, image in enumerate(maps):
        print(save_png(image, Path(output) / f"{first_index:05d}-controlnet-{i}.png"))


def controlnet_kwargs(args) -> dict:
    """The generation options `controlnets` and `control_maps` from --controlnet units (with --from-png, the
    image's recorded unit settings under them) and --control-maps; {} when none is given."""
    if not args.controlnet:
        return {"control_maps": True} if args.control_maps else {}
    recorded = png_units(args.from_png) if getattr(args, "from_png", None) is not None else None
    return {"controlnets": controlnet_units(args.controlnet, recorded), "control_maps": args.control_maps}


def png_units(path: str) -> list[dict]:
    """The ControlNet unit settings an image's infotext records (--from-png)."""
    from sdrt.runtime.controlnet_infotext import infotext_units
    from sdrt.runtime.infotext import parse_infotext, read_parameters
    from sdrt.runtime.masks import open_image

    text, _ = read_parameters(open_image(path, "--from-png"))
    return infotext_units(parse_infotext(text)) if text else []


def write_outputs(images, output, write_images, next_index) -> int:
    """WRITE_IMAGES(the generated images) and then the control maps generate appended (they carry no infotext),
    numbered from NEXT_INDEX(folder) as the images are."""
    generated = [im for im in images if "parameters" in im.info]
    maps = [im for im in images if "parameters" not in im.info]
    Path(output).mkdir(parents=True, exist_ok=True)
    first = next_index(Path(output))
    write_images(generated, output)
    write_control_maps(maps, output, first)
    return 0
