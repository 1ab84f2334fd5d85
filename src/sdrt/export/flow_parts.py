"""What the flow-matching transformer families (SD 3.5: export/sd3.py, FLUX.1: export/flux.py) share at export:
recognising them from a diffusers folder or hub id, loading a folder one part at a time in its stored dtype, the
transformer's export step, and the manifest facts of a flow-matching scheduler."""

import contextlib
import gc
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdrt.errors import ModelError
from sdrt.export.sources import SINGLE_FILE_SUFFIXES, is_hub_id

# model_index.json's _class_name -> family. Inpainting/img2img pipeline classes save the same parts.
PIPELINE_FAMILIES = {
    "StableDiffusion3Pipeline": "sd3",
    "StableDiffusion3Img2ImgPipeline": "sd3",
    "StableDiffusion3InpaintPipeline": "sd3",
    "FluxPipeline": "flux",
    "FluxImg2ImgPipeline": "flux",
    "FluxInpaintPipeline": "flux",
}
# A hub snapshot: configs, tokenizers (T5's SentencePiece model too) and full-precision weights, shards included.
HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*/diffusion_pytorch_model*.safetensors", "*/model*.safetensors"]
HUB_IGNORE = ["*.fp16.safetensors", "*fp16*.safetensors.index.json"]
# The scheduler config keys of FlowMatchEulerDiscreteScheduler the runtime reproduces.
FLOW_SCHEDULER_KEYS = ("num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift",
                       "base_image_seq_len", "max_image_seq_len")  # fmt: skip


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{str(path)!r} is not valid JSON ({e})") from None


TRANSFORMER_PREFIX = "model.diffusion_model."
# Keys that mark a single file of these families (with or without TRANSFORMER_PREFIX).
FAMILY_MARKS = {"joint_blocks.0.": "sd3", "double_blocks.0.": "flux"}


def single_file_family(path: Path) -> str | None:
    """ "sd3" or "flux" for a single file of these families (by its keys), else None."""
    keys = _keys(path)
    for mark, family in FAMILY_MARKS.items():
        if any(k.startswith(mark) or k.startswith(TRANSFORMER_PREFIX + mark) for k in keys):
            return family
    return None


def _keys(path: Path):
    from sdrt.export.sources import read_checkpoint_info

    return read_checkpoint_info(path).shapes


def flow_family(source: str) -> str | None:
    """ "sd3" or "flux" for a diffusers folder, hub id or single file of these families (export/flow_single_file.py);
    None for anything else (the UNet families' detection takes over)."""
    path = Path(source)
    if (path / "model_index.json").is_file():
        return PIPELINE_FAMILIES.get(_read_json(path / "model_index.json").get("_class_name"))
    if path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        return single_file_family(path)
    if is_hub_id(source):
        from huggingface_hub import hf_hub_download

        try:
            index = _read_json(Path(hf_hub_download(source, "model_index.json")))
        except Exception:  # offline, unknown id: the UNet families' loader reports it
            return None
        return PIPELINE_FAMILIES.get(index.get("_class_name"))
    return None


@dataclass
class FolderParts:
    """A diffusers folder's parts, each loaded when asked in the dtype its files store, released once exported."""

    folder: Path
    kind: str  # "diffusers" | "hub"
    name: str
    sha256: str
    index: dict  # model_index.json
    scheduler_config: dict
    loaded: dict = field(default_factory=dict)

    def has(self, name: str) -> bool:
        entry = self.index.get(name)
        return isinstance(entry, list) and entry[0] is not None

    def get(self, name: str):
        if name not in self.loaded:
            library, cls = self.index[name]
            # transformers' models in their stored dtype (export/t5.py upcasts T5 part by part); diffusers' in fp32
            kwargs = {"torch_dtype": "auto"} if library == "transformers" and "Tokenizer" not in cls else {}
            try:
                module = getattr(importlib.import_module(library), cls)
                self.loaded[name] = module.from_pretrained(self.folder, subfolder=name, **kwargs)
            except (OSError, ValueError, KeyError, AttributeError) as e:
                raise ModelError(f"could not load {name} from {str(self.folder)!r}: {e}") from None
        return self.loaded[name]

    def config_of(self, name: str) -> dict:
        return _read_json(self.folder / name / "config.json")

    def weights(self, name: str):
        """Part NAME's tensors, read when asked (lazy_weights.WeightSource): its safetensors files as they are."""
        from sdrt.export.lazy_weights import SafetensorsFiles, WeightSource, diffusers_files

        return WeightSource.direct(SafetensorsFiles(diffusers_files(self.folder / name)), f"{name} in {self.folder}")

    def release(self, name: str) -> None:
        self.loaded.pop(name, None)
        gc.collect()


def load_folder(source: str) -> FolderParts:
    """SOURCE (a diffusers folder or hub id) as FolderParts, nothing loaded yet."""
    from sdrt.export.sources import folder_sha256

    if is_hub_id(source) and not Path(source).exists():
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(source, allow_patterns=HUB_PATTERNS, ignore_patterns=HUB_IGNORE)
        except Exception as e:  # network and hub errors come in many types
            raise ModelError(f"could not download {source!r} from the hub: {e}") from None
        parts = load_folder(folder)
        parts.kind, parts.name = "hub", source
        return parts
    path = Path(source)
    index = _read_json(path / "model_index.json")
    scheduler = _read_json(path / "scheduler" / "scheduler_config.json")
    return FolderParts(path, "diffusers", path.resolve().name, folder_sha256(path), index, scheduler)


def flow_scheduler_facts(config: dict) -> dict:
    """The flow-matching schedule's facts for the manifest (FlowMatchEulerDiscreteScheduler's config keys; absent
    keys take that class's defaults, as diffusers does)."""
    if config.get("_class_name") not in (None, "FlowMatchEulerDiscreteScheduler"):
        raise ModelError(f"scheduler {config.get('_class_name')!r}: a flow-matching model needs FlowMatchEuler")
    for key in ("invert_sigmas", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
        if config.get(key):
            raise ModelError(f"the scheduler config sets {key}; sdrt reproduces only shifted flow sigmas")
    if config.get("time_shift_type", "exponential") != "exponential":
        raise ModelError(f"time_shift_type {config['time_shift_type']!r} is not supported (exponential)")
    return {key: config[key] for key in FLOW_SCHEDULER_KEYS if key in config}


class Held(torch.nn.Module):
    """Holds a diffusers transformer so export's attention swap (to_onnx.classic_attention, made for UNets) passes
    it by: joint attention keeps its own processors."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner


def _rms_norm(norm, x):
    """torch.nn.RMSNorm's arithmetic in ONNX opset 17's ops (no aten::rms_norm there)."""
    eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y * norm.weight if norm.weight is not None else y


def exportable_norms(module) -> None:
    """Make every torch.nn.RMSNorm in MODULE (FLUX's q/k norms) trace as elementary ops."""
    import types

    for sub in module.modules():
        if isinstance(sub, torch.nn.RMSNorm):
            sub.forward = types.MethodType(_rms_norm, sub)


def _rotary(x, freqs_cis, use_real: bool = True, use_real_unbind_dim: int = -1, sequence_dim: int = 2):
    """diffusers' apply_rotary_emb (real form, pairs interleaved) with the pair split as unflatten, which the ONNX
    tracer keeps dynamic (the original's reshape to *x.shape[:-1] bakes the traced sequence length)."""
    if not use_real or use_real_unbind_dim != -1:
        raise ModelError("only FLUX's interleaved real rotary embedding is exportable")
    cos, sin = freqs_cis  # (S, D) each
    index = (None, slice(None), None) if sequence_dim == 1 else (None, None, slice(None))
    cos, sin = cos[index], sin[index]
    x_real, x_imag = x.unflatten(-1, (-1, 2)).unbind(-1)  # (B, S, H, D/2) each
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


@contextlib.contextmanager
def traceable_rotary():
    """FLUX's attention with _rotary in place of diffusers' apply_rotary_emb, for the `with` block."""
    from diffusers.models.transformers import transformer_flux

    before = transformer_flux.apply_rotary_emb
    transformer_flux.apply_rotary_emb = _rotary
    try:
        yield
    finally:
        transformer_flux.apply_rotary_emb = before


def no_controlnet(family: str):
    """export/controlnet.py's denoiser_step for a family without ControlNet support yet: one clear error."""

    def denoiser_step(source, manifest, original_config=None, config=None):
        raise ModelError(f"ControlNet is not supported for {family} models yet (SD 1.x/2.x and SDXL only)")

    return denoiser_step
