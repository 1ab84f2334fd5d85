"""`sdrt COMMAND ...`: the command line's arguments, parsed and handed to the command (commands.py)."""

import argparse
import sys
import warnings

from sdrt import cli_controlnet, cli_upscale, commands
from sdrt.errors import SdrtError
from sdrt.export.cache import DEFAULT_MODEL

EXIT_BAD_INPUT = 2
MODEL_HELP = ("exported folder, checkpoint file, diffusers folder or hub id (default: "
              f"{DEFAULT_MODEL}, exported into the cache on first use)")  # fmt: skip
# The editing options `outpaint` takes (its canvas and mask are made for it).
OUTPAINT_EDITING = ("strength", "mask_blur", "inpainting_fill")


def build_parser() -> argparse.ArgumentParser:
    """The `sdrt` parser: one sub-parser per command, each made by its add_*_parser function."""
    from sdrt.version import __version__

    parser = argparse.ArgumentParser(prog="sdrt", description="Stable Diffusion on ONNX Runtime, without PyTorch.")
    parser.add_argument("--version", action="version", version=f"sdrt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_export_parser(sub)
    cli_controlnet.add_export_controlnet_parser(sub)
    cli_upscale.add_parsers(sub)
    add_optimize_parser(sub)
    add_generate_parser(sub)
    add_outpaint_parser(sub)
    add_serve_parser(sub)
    add_build_parser(sub)
    sub.add_parser("bench", help="sdrt vs diffusers on random full-size weights (`sdrt bench --help`)")
    add_info_parser(sub)
    return parser


def add_export_parser(sub) -> None:
    """`sdrt export SOURCE -o DIR`."""
    p = sub.add_parser("export", help="export a checkpoint to ONNX models + model.json")
    p.add_argument("source", help="diffusers folder, .safetensors/.ckpt file, or hub id")
    p.add_argument("-o", "--output", required=True, help="folder to create")
    p.add_argument("--precision", default="fp32", help="fp32 (default) or fp16")
    p.add_argument("--original-config", help="the checkpoint's YAML (e.g. v2-inference-v.yaml)")
    p.add_argument("--config", help="for a single file: a diffusers folder (or hub id) with the component configs")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--vae", help="another VAE (diffusers folder or hub id), e.g. one fixed for fp16 for SDXL; for an "
                   "SD 3.5 / FLUX.1 single file: its VAE file (ae.safetensors)")
    p.add_argument("--clip-l", metavar="FILE", help="SD 3.5 / FLUX.1 single file: its CLIP-L (clip_l.safetensors)")
    p.add_argument("--clip-g", metavar="FILE", help="SD 3.5 single file: its OpenCLIP bigG (clip_g.safetensors)")
    p.add_argument("--t5xxl", metavar="FILE", help="SD 3.5 / FLUX.1 single file: its T5-XXL (t5xxl_fp16.safetensors)")
    p.add_argument("--part-size", metavar="SIZE", help="fp32 weights per part of the graphs exported in parts (T5, "
                   "the FLUX transformer); default 4GB")
    p.add_argument("--target", default="onnx", choices=("onnx", "tensorrt"), help="tensorrt: also `sdrt build` it")
    p.add_argument("--optimize", default="none", choices=("none", "cuda", "cpu"),
                   help="also write fused graphs for ONNX Runtime's CUDA (fp16) or CPU provider (`sdrt optimize`)")
    p.add_argument("--controlnet", action="store_true", help="also the UNet graph that takes ControlNet residuals")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="merge a LoRA into the exported weights (several allowed; FILE:TE_WEIGHT:UNET_WEIGHT too)")
    p.add_argument("--deepcache", type=int, metavar="BRANCH", help="also DeepCache's full and shallow UNet graphs, "
                   "caching at skip branch BRANCH (0: shallowest, fastest); on an exported folder: add them")
    p.add_argument("--taesd", help="also TAESD's decoder (AutoencoderTiny folder, hub id, taesd_decoder.pth or "
                   ".safetensors) for live previews and --vae taesd; on an exported folder: add it")
    p.add_argument("--vae-approx", metavar="FILE", help="also A1111's Approx NN live preview network (its "
                   "VAE-approx/model.pt or vaeapprox-sdxl.pt); on an exported folder: add it")  # fmt: skip
    p.set_defaults(func=commands.cmd_export)


def add_optimize_parser(sub) -> None:
    """`sdrt optimize MODEL_DIR`."""
    z = sub.add_parser("optimize", help="fused graphs (attention, GroupNorm, NHWC conv; fp16 for CUDA) of an export")
    z.add_argument("model_dir")
    z.add_argument("--target", default="cuda", choices=("cuda", "cpu"), help="cuda (default, fp16) or cpu (fp32)")
    z.add_argument("--models", help="comma-separated subset: text_encoder,unet,vae_decoder,vae_encoder")
    z.add_argument("--no-verify", action="store_true", help="skip the check against the unfused graphs")
    z.set_defaults(func=commands.cmd_optimize)


def add_generate_parser(sub) -> None:
    """`sdrt generate PROMPT`."""
    g = sub.add_parser("generate", help="txt2img, img2img (--init-image) and inpainting (--mask): write PNGs")
    g.add_argument("prompt", nargs="?", default=argparse.SUPPRESS, help="the prompt (optional with --from-png)")
    add_generation_arguments(g, editing=None)
    g.add_argument("--from-png", help="regenerate from the parameters an image carries; given options override them")
    g.set_defaults(func=commands.cmd_generate)


def add_outpaint_parser(sub) -> None:
    """`sdrt outpaint IMAGE PROMPT`."""
    o = sub.add_parser("outpaint", help="extend IMAGE by multiples of 8 pixels and paint the new area")
    o.add_argument("image")
    o.add_argument("prompt")
    for side in ("left", "right", "up", "down"):
        o.add_argument(f"--{side}", type=int, default=0, help=f"pixels to add ({side}), a multiple of 8")
    add_generation_arguments(o, editing=OUTPAINT_EDITING)
    o.set_defaults(func=commands.cmd_outpaint)


def add_serve_parser(sub) -> None:
    """`sdrt serve`."""
    s = sub.add_parser("serve", help="HTTP server: A1111-compatible API (/sdapi/v1) and a web page at /")
    s.add_argument("-m", "--model", help=MODEL_HELP)
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
    s.add_argument("--models-dir", help="folder of models (exported, checkpoints, diffusers) clients switch between; "
                   "-m then names the one served first")  # fmt: skip
    s.add_argument("--max-loaded-models", type=int, default=1, help="with --models-dir: models kept loaded (LRU)")
    s.add_argument("--models-memory", help="with --models-dir: at most this much weights loaded (e.g. 12GB; LRU)")
    s.add_argument("--embeddings-dir", help="folder of textual inversions, used by file name in prompts (A1111)")
    s.add_argument("--styles-file", help="A1111's styles.csv: /sdapi/v1/prompt-styles and the requests' `styles`")
    s.add_argument("--vae-dir", help="A1111's models/VAE: VAE files and diffusers VAE folders for sd_vae (sd-vae)")
    s.add_argument("--upscaler-dir", help="folder of exported upscalers (`sdrt export-upscaler`): hires fix, extras")
    add_ray_arguments(s)
    s.set_defaults(func=commands.cmd_serve)


def add_ray_arguments(s) -> None:
    """`sdrt serve --ray`: Ray Serve's options."""
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


def add_build_parser(sub) -> None:
    """`sdrt build MODEL_DIR`."""
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
    b.set_defaults(func=commands.cmd_build)


def add_info_parser(sub) -> None:
    """`sdrt info MODEL_DIR|IMAGE`."""
    i = sub.add_parser("info", help="print a model folder's manifest, or the generation parameters of an image")
    i.add_argument("model_dir", metavar="MODEL_DIR|IMAGE")
    i.set_defaults(func=commands.cmd_info)


GROUP_TITLES = {
    "generation": "generation options",
    "editing": "img2img and inpainting (A1111's names)",
    "sdxl": "SDXL (diffusers' names; refused on SD 1.x/2.x models)",
    "flux": "FLUX.1 (Forge's names; --cfg-scale > 1 runs true CFG with the negative prompt)",
    "sd3": "SD 3.5 skip-layer guidance (diffusers' names)",
    "hires": "hires fix (A1111's enable_hr, hr_*; --strength is its denoising strength)",
}


def add_generation_arguments(c, editing: tuple[str, ...] | None) -> None:
    """The model and load options, and one flag per GenerationOptions field (options.py), grouped as the schema
    groups them; EDITING: the editing options this command takes (None: all). Defaults stay the schema's."""
    from sdrt.runtime.options import OPTION_FIELDS, spec

    c.add_argument("-m", "--model", help=MODEL_HELP)
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
        elif s.kind == "ints":
            flag |= {"type": int, "nargs": "+", "metavar": "N"}
        elif s.kind == "pair":
            flag |= {"type": int, "nargs": 2, "metavar": ("TOP", "LEFT") if "crops" in name else ("H", "W")}
        else:
            flag["type"] = {"int": int, "float": float}.get(s.kind, str)
        groups[s.group].add_argument("--" + name.replace("_", "-"), **flag)
    c.add_argument("--embeddings", help="folder of textual inversion embeddings, used by file name in prompts")
    c.add_argument("--lora-dir", help="folder of LoRA files, used as <lora:NAME:WEIGHT> in prompts (A1111)")
    c.add_argument("--backend", default="cpu", help="cpu (default), cuda, tensorrt, openvino[-gpu|-npu][-f32|-bf16], "
                   "or auto (TensorRT > CUDA > OpenVINO where faster > CPU)")  # fmt: skip
    c.add_argument("--low-vram", action="store_true", help="one engine loaded at a time, tiled VAE")
    c.add_argument("--vram-budget", help="plan staging, UNet weight streaming and VAE tiling to fit, e.g. 2GB")
    c.add_argument("--ram-budget", help="CPU backends: plan staging and VAE tiling to fit in RAM, e.g. 6GB")
    c.add_argument("--deepcache", dest="deepcache_interval", type=int, default=argparse.SUPPRESS, metavar="N",
                   help="DeepCache: a full UNet call every N (the same as --deepcache-interval)")
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
