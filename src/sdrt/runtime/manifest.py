"""model.json: everything export wrote and the runtime needs, read and validated once."""

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from sdrt.errors import ModelError

MANIFEST_NAME = "model.json"
MANIFEST_FORMAT = "sdrt-model"
MANIFEST_VERSION = 2  # 2: text encoders take token embeddings and return every layer
PREDICTION_TYPES = ("epsilon", "v_prediction")
PRECISIONS = ("fp32", "fp16")
MODEL_NAMES = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2")  # SDXL's refiner has only the second
# A model's optional "weight_map" entry: a JSON beside its model.onnx from diffusers module names to the ONNX
# initializers holding their weights (export/weight_map.py). Models exported before it have none: no LoRA.
WEIGHT_MAP_FILE = "weights.json"
WEIGHT_MAP_FORMAT = "sdrt-weight-map"


@dataclass(frozen=True)
class SchedulerConfig:
    """The keys a model's scheduler_config.json gives; absent ones keep diffusers' defaults.

    None means "the default of whichever diffusers scheduler runs": diffusers drops keys a config did not
    set when switching scheduler class (`_use_default_values`), so SD 1.5's config, which sets no
    timestep_spacing, gets "linspace" under Euler and DPM++ but "leading" under DDIM.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"  # "linear" | "scaled_linear" | "squaredcos_cap_v2"
    trained_betas: list[float] | None = None
    timestep_spacing: str | None = None  # "leading" | "linspace" | "trailing"
    steps_offset: int = 0
    set_alpha_to_one: bool | None = None
    clip_sample: bool | None = None
    clip_sample_range: float = 1.0
    rescale_betas_zero_snr: bool = False
    # LCMScheduler (Luo et al. 2023): the distillation's step count and the boundary condition's time scale.
    original_inference_steps: int = 50
    timestep_scaling: float = 10.0

    @classmethod
    def from_dict(cls, d: dict) -> "SchedulerConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class Manifest:
    family: str
    prediction_type: str
    scheduler: SchedulerConfig
    vae_scaling_factor: float
    latent_channels: int
    unet_in_channels: int  # 4, or 9 for inpainting UNets
    latent_downsample: int  # pixels per latent cell (8)
    native_size: int  # the resolution the model was trained at (512, 768, 1024)
    text_max_length: int  # tokens per CLIP window, BOS and EOS included (77)
    text_hidden_size: int
    precision: str
    models: dict  # name -> {"file": relative path, "inputs": [...], "outputs": [...]}
    source: dict  # {"kind", "name", "sha256"}
    sdrt_version: str
    vae_shift_factor: float | None = None
    min_size: int = 64
    max_size: int = 2048
    detected: dict = field(default_factory=dict)  # export's detection: {fact: {"value": ..., "from": "..."}}
    # SDXL (diffusers' pipeline config): an empty negative prompt gives zero embeddings (base), and the UNet's
    # micro-conditioning ends with an aesthetic score instead of the target size (refiner).
    force_zeros_for_empty_prompt: bool = False
    requires_aesthetics_score: bool = False
    # Fused graph variants (sdrt.export.optimize): {target ("cuda", "cpu"): {model: {"file", "precision",
    # "fused_ops": {op: count}, "max_error", "verified_on"}}}. Absent in older manifests: the plain graphs run.
    optimized: dict = field(default_factory=dict)
    folder: Path = field(default=Path("."), compare=False)

    @property
    def model_hash(self) -> str:
        """A1111's short model hash: the first 10 hex digits of the checkpoint's sha256."""
        return self.source.get("sha256", "")[:10]

    @property
    def model_name(self) -> str:
        return self.source.get("name", self.folder.name)

    def model_path(self, name: str) -> Path:
        return self.folder / self.models[name]["file"]

    def graph_path(self, name: str, target: str | None = None) -> Path:
        """Model NAME's graph for TARGET ("cuda", "cpu"): its fused variant when one was written, else model.onnx."""
        variant = self.optimized.get(target, {}).get(name) if target else None
        return self.folder / variant["file"] if variant else self.model_path(name)

    def weight_map(self, name: str) -> dict | None:
        """{diffusers module name: {"initializer", "layout", "shape"}} of model NAME, or None if export wrote none."""
        entry = self.models.get(name, {}).get("weight_map")
        if entry is None:
            return None
        path = self.folder / entry
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelError(f"weight map {str(path)!r} is unreadable ({e}): re-export the model") from None
        if not isinstance(data, dict) or data.get("format") != WEIGHT_MAP_FORMAT or not isinstance(
            data.get("weights"), dict
        ):
            raise ModelError(f"{str(path)!r} is not an sdrt weight map: re-export the model")
        return data["weights"]

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("folder")
        return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, **d}

    def save(self, folder: Path) -> None:
        (Path(folder) / MANIFEST_NAME).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, folder) -> "Manifest":
        """Read and validate FOLDER/model.json; every problem is one ModelError naming the file."""
        folder = Path(folder)
        path = folder / MANIFEST_NAME
        if not folder.is_dir():
            raise ModelError(f"model folder {str(folder)!r} does not exist (run `sdrt export` to make one)")
        if not path.is_file():
            raise ModelError(f"{str(path)!r} is missing: {str(folder)!r} is not a model exported by `sdrt export`")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelError(f"{str(path)!r} is not valid JSON ({e})") from None
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise ModelError(f'{str(path)!r} is not an sdrt manifest (no "format": "{MANIFEST_FORMAT}")')
        version = data.get("version")
        if version != MANIFEST_VERSION:
            raise ModelError(
                f"{str(path)!r} has manifest version {version!r}; this sdrt reads version {MANIFEST_VERSION}: "
                "re-export the model with this sdrt"
            )
        try:
            kwargs = {f.name: data[f.name] for f in fields(cls) if f.name in data and f.name != "folder"}
            kwargs["scheduler"] = SchedulerConfig.from_dict(data["scheduler"])
            manifest = cls(**kwargs, folder=folder)
        except (KeyError, TypeError) as e:
            raise ModelError(f"{str(path)!r} is incomplete or malformed ({e})") from None
        manifest._validate(path)
        return manifest

    def _validate(self, path: Path) -> None:
        checks = [  # the family: families.family_of (the registry) refuses one this sdrt does not know
            ("prediction_type", self.prediction_type, PREDICTION_TYPES),
            ("precision", self.precision, PRECISIONS),
        ]
        for name, value, allowed in checks:
            if value not in allowed:
                raise ModelError(f"{str(path)!r}: {name} is {value!r}; expected one of {', '.join(allowed)}")
        if self.scheduler.rescale_betas_zero_snr and self.prediction_type != "v_prediction":
            # Lin et al. 2023, section 3.2: at zero SNR the noise is the input itself; only v can be predicted there.
            raise ModelError(
                f"{str(path)!r}: rescale_betas_zero_snr needs prediction_type 'v_prediction', "
                f"not {self.prediction_type!r} (Lin et al. 2023)"
            )
        for name in ("unet", "vae_decoder"):
            if name not in self.models:
                raise ModelError(f"{str(path)!r} lists no {name!r} model")
        if not set(TEXT_ENCODER_NAMES) & set(self.models):
            raise ModelError(f"{str(path)!r} lists no text encoder ({' or '.join(TEXT_ENCODER_NAMES)})")
        for name in self.models:
            if not self.model_path(name).is_file():
                raise ModelError(f"model file {str(self.model_path(name))!r} is missing")
        for target, variants in self.optimized.items():
            for name, variant in variants.items():
                if name not in self.models or not (self.folder / variant.get("file", "")).is_file():
                    raise ModelError(f"{str(path)!r}: the {target} variant of {name!r} is missing (sdrt optimize)")
