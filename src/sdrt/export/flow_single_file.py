"""SD 3.5 and FLUX.1 single-file checkpoints, as people download them, read part by part.

SD 3.5: `sd3.5_medium.safetensors`-style files (transformer under `model.diffusion_model.joint_blocks.*`, VAE under
`first_stage_model.*`, with or without `text_encoders.clip_l/clip_g/t5xxl.transformer.*`). FLUX.1:
`flux1-dev.safetensors` / `flux1-schnell.safetensors` (`double_blocks.*`, `single_blocks.*`, possibly under
`model.diffusion_model.`) with CLIP-L, T5-XXL and the VAE (`ae.safetensors`) given as files of their own, as ComfyUI
users keep them (`--clip-l`, `--clip-g`, `--t5xxl`, `--vae`: stable-diffusion.cpp's names). Configs, tokenizers and
the scheduler come from `--config` (a diffusers folder or hub id; by default the family's hub id).

Key layouts go through diffusers' single-file converters (SD 3 transformer, LDM VAE, CLIP prefixes, T5 prefix) and
export/flux_keys.py (FLUX's, at any width), run on lazy_weights' placeholders: each model reads only its own tensors.
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdrt.errors import InvalidOption, ModelError
from sdrt.export import lazy_weights as lazy
from sdrt.export.flow_parts import (
    PIPELINE_FAMILIES,
    FolderParts,
    load_folder,
    single_file_family,
)

CONFIG_PATTERNS = ["*.json", "*.txt", "*.model"]  # a hub config: configs and tokenizers, no weights


@dataclass(frozen=True)
class Component:
    """A pipeline part other than the transformer: PART's name, the FLAG giving it as a file of its own, its PREFIX
    inside an all-in-one file, and what it is in words (the files people have)."""

    part: str
    flag: str
    prefix: str
    what: str


CLIP_L = Component("text_encoder", "--clip-l", "text_encoders.clip_l.transformer.", "CLIP-L (clip_l.safetensors)")
SD3_COMPONENTS = (
    CLIP_L,
    Component("text_encoder_2", "--clip-g", "text_encoders.clip_g.transformer.", "OpenCLIP bigG (clip_g.safetensors)"),
    Component("text_encoder_3", "--t5xxl", "text_encoders.t5xxl.transformer.", "T5-XXL (t5xxl_fp16.safetensors)"),
    Component("vae", "--vae", "first_stage_model.", "the VAE"),
)
FLUX_COMPONENTS = (
    CLIP_L,
    Component("text_encoder_2", "--t5xxl", "text_encoders.t5xxl.transformer.", "T5-XXL (t5xxl_fp16.safetensors)"),
    Component("vae", "--vae", "vae.", "the VAE (ae.safetensors)"),
)
OPTIONAL = {"text_encoder_3"}  # SD 3.5 runs without T5 (zeros in its place), as diffusers does


def _sd3_converter():
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    return convert_sd3_transformer_checkpoint_to_diffusers


def _flux_converter():
    from sdrt.export.flux_keys import flux_to_diffusers

    return flux_to_diffusers


@dataclass(frozen=True)
class FileFamily:
    """What a family's single files hold: TITLE in words, its COMPONENTS, the transformer's CONVERTER (a function
    giving diffusers' converter), and the config a file takes without --config: the first of VARIANTS ((key
    fragment, hub id)) whose fragment a key holds, else DEFAULT (diffusers' own choices, single_file_utils)."""

    title: str
    components: tuple
    converter: object
    variants: tuple
    default: str


FILE_FAMILIES = {
    "sd3": FileFamily("an SD 3.5", SD3_COMPONENTS, _sd3_converter,
                      (("joint_blocks.37.", "stabilityai/stable-diffusion-3.5-large"),),
                      "stabilityai/stable-diffusion-3.5-medium"),
    "flux": FileFamily("a FLUX.1", FLUX_COMPONENTS, _flux_converter,
                       (("guidance_in.", "black-forest-labs/FLUX.1-dev"),), "black-forest-labs/FLUX.1-schnell"),
}  # fmt: skip


@dataclass
class SingleFileParts(FolderParts):
    """FolderParts whose weights come from a single file (and component files); FOLDER is the config folder."""

    sources: dict = field(default_factory=dict)  # part -> WeightSource
    note: str = ""

    def has(self, name: str) -> bool:
        if name in self.sources:
            return True
        return "tokenizer" in name and super().has(name) and self.has(name.replace("tokenizer", "text_encoder"))

    def get(self, name: str):
        if name not in self.sources:
            return super().get(name)
        if name not in self.loaded:
            self.loaded[name] = build_module(self, name, self.sources[name])
        return self.loaded[name]

    def weights(self, name: str) -> "lazy.WeightSource":
        return self.sources[name]


def build_module(parts: FolderParts, name: str, source) -> torch.nn.Module:
    """The config folder's NAME model (its class from model_index.json) with SOURCE's weights: fp32, but T5 in the
    dtype the file stores (export/t5.py upcasts it part by part)."""
    import importlib

    library, cls_name = parts.index[name]
    cls = getattr(importlib.import_module(library), cls_name)
    with lazy.parameters_on_meta():
        if library == "transformers":
            model = cls(cls.config_class.from_pretrained(parts.folder / name))
        else:
            model = cls.from_config(cls.load_config(parts.folder / name))
    _adapt_keys(model, source)
    lazy.fill(model, source, dtype=None if "T5" in cls_name else torch.float32)
    return model.eval()


def _adapt_keys(model, source) -> None:
    """transformers' layouts as the model at hand names them: CLIPTextModel without its text_model level (recent
    transformers), CLIP-L's missing projection as the identity and T5's tied embedding (as diffusers does)."""
    keys = source.keys
    if not hasattr(model, "text_model") and any(k.startswith("text_model.") for k in keys):
        source.keys = keys = {k.removeprefix("text_model."): v for k, v in keys.items()}
    projection = getattr(model, "text_projection", None)
    if projection is not None and "text_projection.weight" not in keys:
        keys["text_projection.weight"] = torch.eye(projection.in_features)
    if "shared.weight" in keys and "encoder.embed_tokens.weight" not in keys:
        keys["encoder.embed_tokens.weight"] = keys["shared.weight"]


def load_single_file(path: Path, family: str, config, files: dict) -> SingleFileParts:
    """PATH (a single file of FAMILY) with its configs from CONFIG and the component FILES {flag: path}: every part's
    weights located (ModelError naming what is missing and the flags that supply it), none loaded yet."""
    from sdrt.export.sources import file_sha256

    if path.suffix.lower() != ".safetensors":
        raise ModelError(f"{str(path)!r}: SD 3.5 / FLUX.1 single files are read as .safetensors only")
    main = lazy.SafetensorsFiles([path])
    facts = FILE_FAMILIES[family]
    default = next((hub for mark, hub in facts.variants if any(mark in k for k in main.keys())), facts.default)
    parts = _config_folder(config or default, family, given=config is not None)
    sources, missing, notes = {}, [], []
    for component in facts.components:
        source = _component_source(component, main, files.get(component.flag), parts)
        if source is not None:
            sources[component.part] = source
        elif component.part in OPTIONAL:
            notes.append(f"{component.what} not in the file: {component.flag} FILE adds it")
        else:
            missing.append(component)
    if missing:
        names = ", ".join(f"{c.what}: {c.flag} FILE" for c in missing)
        raise ModelError(f"{str(path)!r} is {facts.title} transformer file without {names} (give them as files of "
                         "their own, as ComfyUI keeps them in models/clip and models/vae)")  # fmt: skip
    sources["transformer"] = _transformer_source(path, facts, main, parts)
    return SingleFileParts(parts.folder, "single_file", path.stem, file_sha256(path).hexdigest(), parts.index,
                           parts.scheduler_config, sources=sources, note="; ".join(notes))  # fmt: skip


def _config_folder(config: str, family: str, given: bool) -> FolderParts:
    """The diffusers folder (or hub id: its configs and tokenizers only) that gives the parts' configs."""
    from sdrt.export.sources import is_hub_id

    if is_hub_id(config) and not Path(config).exists():
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(config, allow_patterns=CONFIG_PATTERNS)
        except Exception as e:  # offline, gated, unknown: many types
            flag = "--config" if given else f"--config (default {config})"
            raise InvalidOption(flag, config, f"a diffusers folder or a reachable hub id with this model's configs "
                                f"and tokenizers ({type(e).__name__})") from None  # fmt: skip
        config = folder
    if not (Path(config) / "model_index.json").is_file():
        raise InvalidOption("--config", config, "a diffusers folder (with model_index.json) or a hub id")
    parts = load_folder(config)
    found = PIPELINE_FAMILIES.get(parts.index.get("_class_name"))
    if found != family:
        raise InvalidOption("--config", config, f"a diffusers folder of the file's family ({family}), not {found}")
    return parts


def _component_source(component: Component, main, given, parts: FolderParts):
    """A part's WeightSource: the file given by its flag, else the all-in-one file's keys under its prefix, else
    None."""
    if given is not None:
        files = lazy.SafetensorsFiles([given])
        keys = list(files.keys())
        prefix = component.prefix if any(k.startswith(component.prefix) for k in keys) else ""
        label = f"{component.flag} {given}"
    elif any(k.startswith(component.prefix) for k in main.keys()):
        files, prefix, label = main, component.prefix, f"{component.what} in {main.files[0]}"
    else:
        return None
    if component.part == "vae":
        return _vae_source(files, prefix, label, parts.config_of("vae"))
    return lazy.WeightSource.direct(files, label, prefix)


def _vae_source(files, prefix: str, label: str, config: dict):
    """The VAE in diffusers' layout as it is, or the original (LDM) layout through diffusers' converter."""
    if any(k.startswith(prefix + "decoder.up_blocks.") for k in files.keys()):
        return lazy.WeightSource.direct(files, label, prefix)
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    return lazy.WeightSource.converted(files, lambda ck: convert_ldm_vae_checkpoint(ck, config), label,
                                       keep=lambda k: k.startswith(prefix))  # fmt: skip


def _transformer_source(path: Path, facts: FileFamily, main, parts: FolderParts):
    """The transformer's keys of the file (all but the components' prefixes) in diffusers' layout."""
    others = tuple(c.prefix for c in facts.components)
    label = f"the transformer in {path}"
    source = lazy.WeightSource.converted(main, facts.converter(), label, keep=lambda k: not k.startswith(others))
    _check_transformer_keys(source, parts)
    return source


def _check_transformer_keys(source, parts: FolderParts) -> None:
    """The file's transformer and --config's agree (a FLUX dev file with a schnell config would drop guidance)."""
    import importlib

    library, cls_name = parts.index["transformer"]
    cls = getattr(importlib.import_module(library), cls_name)
    with torch.device("meta"):
        expected = set(cls.from_config(cls.load_config(parts.folder / "transformer")).state_dict())
    extra = sorted(set(source.keys) - expected)
    if extra:
        raise ModelError(f"{source.label}: weights such as {extra[0]!r} ({len(extra)} in all) are not in --config's "
                         f"transformer ({parts.folder}): a config of another variant or size?")  # fmt: skip


def check_component_files(files: dict) -> None:
    """--clip-l/--clip-g/--t5xxl: existing .safetensors files (InvalidOption naming the flag otherwise)."""
    for flag, value in files.items():
        if value is not None and not (Path(value).is_file() and value.lower().endswith(".safetensors")):
            raise InvalidOption(flag, value, "an existing .safetensors file")


def flow_parts(source: str, config, vae_option, original_config, files: dict | None) -> FolderParts:
    """The parts of SOURCE (diffusers folder, hub id or single file) for the SD 3.5 / FLUX.1 plans."""
    files = {flag: path for flag, path in (files or {}).items() if path is not None}
    path = Path(source)
    if original_config:
        raise InvalidOption("--original-config", original_config, "none for SD 3.5 / FLUX.1 (their YAML is --config)")
    if path.is_file():
        family = single_file_family(path)
        if vae_option:
            files["--vae"] = vae_option
        check_component_files(files)
        return load_single_file(path, family, config, files)
    given = [flag for flag in files] + (["--config"] if config else []) + (["--vae"] if vae_option else [])
    if given:
        raise InvalidOption(
            given[0],
            files.get(given[0]) or config or vae_option,
            "none for a diffusers folder or hub id (it has its own parts); for single files only",
        )
    return load_folder(source)
