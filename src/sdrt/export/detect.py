"""What a checkpoint is (family, prediction type, UNet variant, native size), and where each fact came from.

Sources, strongest first: the original LDM YAML (`--original-config`), a diffusers config the user gave (a
diffusers folder, or `--config` for a single file), the single file's weights, and stated assumptions.
"""

from dataclasses import dataclass
from pathlib import Path

from sdrt.errors import InvalidOption, ModelError

# LDM's `model.params.parameterization` -> diffusers' prediction_type; LDM's default is "eps".
PARAMETERIZATIONS = {"eps": "epsilon", "v": "v_prediction"}
LDM_DEFAULT_PARAMETERIZATION = "eps"
# The text encoder class an LDM YAML names (cond_stage_config.target ends with it) -> family.
TEXT_ENCODER_FAMILIES = {"FrozenCLIPEmbedder": "sd1", "FrozenOpenCLIPEmbedder": "sd2"}
# UNet cross-attention width -> family: CLIP ViT-L/14 (SD 1.x) is 768 wide, OpenCLIP ViT-H/14 (SD 2.x) 1024.
CONTEXT_DIM_FAMILIES = {768: "sd1", 1024: "sd2"}
# 4 noisy-latent channels, plus 1 mask and 4 masked-image latent channels for inpainting UNets.
TXT2IMG_IN_CHANNELS, INPAINT_IN_CHANNELS = 4, 9
VARIANTS = {TXT2IMG_IN_CHANNELS: "txt2img", INPAINT_IN_CHANNELS: "inpainting"}
# Training resolutions: SD 1.x, SD 2 base and the SD 2 inpainting model at 512 px, SD 2 v-models at 768 px.
NATIVE_SIZE, NATIVE_SIZE_SD2_V = 512, 768
# The training step of stabilityai's 512-base-ema.ckpt (epsilon); diffusers uses the same rule.
SD2_BASE_GLOBAL_STEP = 875000

# Keys of the original (LDM) single-file layout.
LDM_UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"  # (C, in_channels, 3, 3)
LDM_CROSS_ATTN_K = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"  # (C, ctx)
LDM_CLIP_PREFIX = "cond_stage_model.transformer."  # OpenAI CLIP in transformers' layout: SD 1.x
LDM_OPEN_CLIP_PREFIX = "cond_stage_model.model."  # OpenCLIP's own layout: SD 2.x
LDM_SDXL_PREFIX = "conditioner.embedders."


@dataclass(frozen=True)
class Fact:
    value: object
    source: str  # where the value came from, in words


@dataclass(frozen=True)
class Detection:
    family: Fact  # "sd1" | "sd2"
    prediction_type: Fact  # "epsilon" | "v_prediction"
    variant: Fact  # "txt2img" | "inpainting"
    unet_in_channels: Fact
    native_size: Fact  # pixels

    def to_json(self) -> dict:
        return {name: {"value": fact.value, "from": fact.source} for name, fact in self.__dict__.items()}

    def describe(self) -> str:
        """Lines for the export log: each fact, then where it came from."""
        return "\n".join(
            f"detected {name.replace('_', ' ')}: {fact.value} ({fact.source})" for name, fact in self.__dict__.items()
        )


@dataclass(frozen=True)
class CheckpointInfo:
    """What a single file's weights show without building any model: tensor shapes, and the training step."""

    shapes: dict  # key -> shape tuple
    global_step: int | None = None


def read_original_config(path) -> dict:
    """The LDM YAML as a dict; InvalidOption if it is not one."""
    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        reason = " ".join(str(e).split())[:200]  # YAML errors span lines; the CLI prints one
        raise InvalidOption("--original-config", str(path), f"a readable LDM YAML file ({reason})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model", {}).get("params"), dict):
        raise InvalidOption("--original-config", str(path), "an LDM YAML file with model.params")
    return config


def yaml_facts(config: dict, name: str) -> dict[str, Fact]:
    """family, prediction_type and unet_in_channels (and context_dim, for checks) stated by an LDM YAML."""
    params = config["model"]["params"]
    if "network_config" in params or "conditioner_config" in params:
        raise ModelError(f"{name} describes an SDXL (SGM) model, but the checkpoint is SD 1.x/2.x: pass its LDM YAML")
    facts = {}
    parameterization = params.get("parameterization", LDM_DEFAULT_PARAMETERIZATION)
    if parameterization not in PARAMETERIZATIONS:
        raise ModelError(
            f"{name}: parameterization {parameterization!r} is not supported (only {', '.join(PARAMETERIZATIONS)})"
        )
    said = "parameterization absent: LDM's default eps" if "parameterization" not in params else None
    facts["prediction_type"] = Fact(
        PARAMETERIZATIONS[parameterization], f"{name}: {said or f'parameterization: {parameterization!r}'}"
    )
    target = str((params.get("cond_stage_config") or {}).get("target", "")).rsplit(".", 1)[-1]
    unet = (params.get("unet_config") or {}).get("params") or {}
    context_dim = unet.get("context_dim")
    if target in TEXT_ENCODER_FAMILIES:
        facts["family"] = Fact(TEXT_ENCODER_FAMILIES[target], f"{name}: cond_stage_config {target}")
    elif context_dim in CONTEXT_DIM_FAMILIES:
        facts["family"] = Fact(CONTEXT_DIM_FAMILIES[context_dim], f"{name}: context_dim {context_dim}")
    if "in_channels" in unet:
        facts["unet_in_channels"] = Fact(int(unet["in_channels"]), f"{name}: unet_config in_channels")
    if isinstance(context_dim, int):
        facts["context_dim"] = Fact(context_dim, f"{name}: unet_config context_dim")
    return facts


def weight_facts(info: CheckpointInfo) -> dict[str, Fact]:
    """family and unet_in_channels read off a single file's tensor names and shapes."""
    keys = info.shapes
    if any(k.startswith(LDM_SDXL_PREFIX) for k in keys):
        raise ModelError("the checkpoint is an SDXL model: export it as one (sdrt.export.sdxl), not as SD 1.x/2.x")
    facts = {}
    if any(k.startswith(LDM_OPEN_CLIP_PREFIX) for k in keys):
        facts["family"] = Fact("sd2", f"weights: OpenCLIP text encoder ({LDM_OPEN_CLIP_PREFIX}*)")
    elif any(k.startswith(LDM_CLIP_PREFIX) for k in keys):
        facts["family"] = Fact("sd1", f"weights: CLIP text encoder ({LDM_CLIP_PREFIX}*)")
    elif LDM_CROSS_ATTN_K in keys and keys[LDM_CROSS_ATTN_K][-1] in CONTEXT_DIM_FAMILIES:
        width = keys[LDM_CROSS_ATTN_K][-1]
        facts["family"] = Fact(CONTEXT_DIM_FAMILIES[width], f"weights: cross-attention width {width}")
    if LDM_UNET_IN in keys:
        facts["unet_in_channels"] = Fact(int(keys[LDM_UNET_IN][1]), "weights: UNet input convolution")
    return facts


def assumed_prediction_type(family: str, in_channels: int, global_step: int | None) -> Fact:
    """The prediction type of a single file with no YAML and no diffusers config: weights do not tell it."""
    hint = "the weights do not say; pass --original-config to be sure"
    if family == "sd1":
        return Fact("epsilon", f"assumed: SD 1.x models are epsilon-prediction; {hint}")
    if in_channels == INPAINT_IN_CHANNELS:
        return Fact("epsilon", f"assumed: the SD 2 inpainting model is epsilon-prediction; {hint}")
    if global_step == SD2_BASE_GLOBAL_STEP:
        return Fact("epsilon", f"assumed: global_step {global_step} is SD 2 512-base's (epsilon); {hint}")
    return Fact("v_prediction", f"assumed: SD 2 weights are taken for a 768-v model; {hint} (v2-inference.yaml: eps)")


def pipeline_facts(pipe, where: str) -> dict[str, Fact]:
    """family, prediction_type and native_size stated by the diffusers configs the pipeline was built from."""
    facts = {}
    act = pipe.text_encoder.config.hidden_act
    if pipe.unet.config.cross_attention_dim in CONTEXT_DIM_FAMILIES:
        width = pipe.unet.config.cross_attention_dim
        facts["family"] = Fact(CONTEXT_DIM_FAMILIES[width], f"{where}: UNet cross_attention_dim {width}")
    elif act == "gelu":
        facts["family"] = Fact("sd2", f"{where}: text encoder hidden_act gelu (OpenCLIP)")
    else:
        facts["family"] = Fact("sd1", f"{where}: text encoder hidden_act {act} (OpenAI CLIP)")
    config = pipe.scheduler.config
    if "prediction_type" in config and "prediction_type" not in config.get("_use_default_values", []):
        facts["prediction_type"] = Fact(config["prediction_type"], f"{where}: scheduler prediction_type")
    else:
        facts["prediction_type"] = Fact("epsilon", f"{where}: the scheduler config sets none, diffusers' default")
    sample_size = int(pipe.unet.config.sample_size)
    facts["native_size"] = Fact(
        sample_size * int(pipe.vae_scale_factor), f"{where}: UNet sample_size {sample_size} latent cells"
    )
    return facts


def detect(pipe, checkpoint: CheckpointInfo | None, user_config: str | None, original_config: str | None) -> Detection:
    """Decide each fact from the strongest source that states it, and check the sources agree with the weights.

    CHECKPOINT is None for diffusers folders; USER_CONFIG names the diffusers config the user gave (the folder
    itself, or --config), None when diffusers inferred one.
    """
    from_yaml = {}
    if original_config:
        name = f"original config {Path(original_config).name}"
        from_yaml = yaml_facts(read_original_config(original_config), name)
    from_weights = weight_facts(checkpoint) if checkpoint else {}
    from_config = pipeline_facts(pipe, user_config) if user_config else {}

    in_channels = int(pipe.unet.config.in_channels)
    channel_source = "weights: UNet input convolution" if checkpoint else f"{user_config}: UNet in_channels"
    for facts in (from_yaml, from_weights):
        stated = facts.get("unet_in_channels")
        if stated and stated.value != in_channels:
            raise ModelError(f"{stated.source} is {stated.value}, but the loaded UNet takes {in_channels} channels")
    context = from_yaml.get("context_dim")
    if context and context.value != pipe.unet.config.cross_attention_dim:
        raise ModelError(
            f"{context.source} is {context.value}, but the loaded UNet's is {pipe.unet.config.cross_attention_dim}"
        )
    if in_channels not in VARIANTS:
        raise ModelError(f"a UNet with {in_channels} input channels is not supported (4: txt2img, 9: inpainting)")

    if "family" in from_yaml and "family" in from_weights and from_yaml["family"].value != from_weights["family"].value:
        raise ModelError(
            f"{from_yaml['family'].source} says {from_yaml['family'].value}, "
            f"but {from_weights['family'].source} is {from_weights['family'].value}"
        )
    family = (
        from_yaml.get("family")
        or from_weights.get("family")
        or from_config.get("family")
        or pipeline_facts(pipe, "diffusers config")["family"]
    )
    prediction = (
        from_yaml.get("prediction_type")
        or from_config.get("prediction_type")
        or assumed_prediction_type(family.value, in_channels, checkpoint.global_step if checkpoint else None)
    )
    if "native_size" in from_config:
        native = from_config["native_size"]
    elif family.value == "sd2" and prediction.value == "v_prediction" and in_channels == TXT2IMG_IN_CHANNELS:
        native = Fact(NATIVE_SIZE_SD2_V, "rule: SD 2 v-prediction models are trained at 768 px")
    else:
        native = Fact(NATIVE_SIZE, "rule: SD 1.x, SD 2 base and SD 2 inpainting are trained at 512 px")
    return Detection(
        family=family,
        prediction_type=prediction,
        variant=Fact(VARIANTS[in_channels], f"{in_channels}-channel UNet"),
        unet_in_channels=Fact(in_channels, channel_source),
        native_size=native,
    )
