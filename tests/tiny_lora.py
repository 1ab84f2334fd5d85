"""Random LoRA files for the tests, in each layout sdrt reads: kohya/A1111, diffusers/PEFT, LyCORIS LoHa and LoKr.

A layer's factors are drawn so the update moves a tiny model's image visibly (relative size SCALE of the weight),
and `reference_merge` applies the same update to diffusers' modules in torch, as A1111 and diffusers define it:
W += w * (alpha / rank) * up @ down (LoRA), (w1a @ w1b) * (w2a @ w2b) (LoHa), kron(w1, w2) (LoKr).
"""

import numpy as np
import torch

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def unet_layers(unet, convs: bool = False, attention: bool = True) -> dict:
    """{diffusers name: module} of the UNet's attention projections (and with CONVS its resnet/sampler convs)."""
    out = {}
    for name, module in unet.named_modules():
        if attention and isinstance(module, torch.nn.Linear) and name.endswith(ATTENTION) and ".attn" in name:
            out[name] = module
        if convs and isinstance(module, torch.nn.Conv2d) and (".resnets." in name or "samplers" in name):
            out[name] = module
    return out


def text_layers(text_encoder) -> dict:
    return {
        name.removeprefix("text_model."): module
        for name, module in text_encoder.named_modules()
        if isinstance(module, torch.nn.Linear) and name.endswith(TEXT_LAYERS)
    }


def _factors(weight: torch.Tensor, rank: int, scale: float, gen: torch.Generator):
    """(down (r, in[, kh, kw]), up (out, r[, 1, 1])) whose product is about SCALE of WEIGHT's size."""
    out_ch, in_ch = weight.shape[:2]
    kernel = tuple(weight.shape[2:])
    std = float(weight.float().std()) * scale / rank**0.5
    down = torch.randn(rank, in_ch, *kernel, generator=gen) * (std**0.5)
    up = torch.randn(out_ch, rank, *((1, 1) if kernel else ()), generator=gen) * (std**0.5) / (
        np.prod(kernel) ** 0.5 if kernel else 1
    )
    return down, up


def make_lora(parts: dict, kind: str = "kohya", rank: int = 4, alpha: float = 2.0, scale: float = 0.5, seed: int = 0,
              dtype=torch.float32) -> dict:
    """A state dict for PARTS {part: {diffusers name: module}} ("unet", "text_encoder", "text_encoder_2").

    KIND: "kohya" (lora_unet_/lora_te_ keys), "peft" (unet./text_encoder. with lora_A/lora_B), "loha", "lokr"."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    sdxl = "text_encoder_2" in parts
    for part, layers in parts.items():
        for name, module in layers.items():
            weight = module.weight.detach()
            if kind == "peft":
                key = f"{part}.{'text_model.' if part != 'unet' else ''}{name}"
                down, up = _factors(weight, rank, scale, gen)
                sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"] = down, up  # no alpha: scale 1
                continue
            prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sdxl else "lora_te_",
                      "text_encoder_2": "lora_te2_"}[part]  # fmt: skip
            key = prefix + (name if part == "unet" else f"text_model.{name}").replace(".", "_")
            sd[f"{key}.alpha"] = torch.tensor(alpha)
            out_ch, in_ch = weight.shape[:2]
            flat_in = int(np.prod(weight.shape[1:]))
            std = (float(weight.float().std()) * scale) ** 0.5
            if kind == "kohya":
                down, up = _factors(weight, rank, scale, gen)
                sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
            elif kind == "loha":
                s = std ** 0.5 / rank**0.25
                sd[f"{key}.hada_w1_a"] = torch.randn(out_ch, rank, generator=gen) * s
                sd[f"{key}.hada_w1_b"] = torch.randn(rank, flat_in, generator=gen) * s
                sd[f"{key}.hada_w2_a"] = torch.randn(out_ch, rank, generator=gen) * s
                sd[f"{key}.hada_w2_b"] = torch.randn(rank, flat_in, generator=gen) * s
            elif kind == "lokr":  # factor 2 on the first side: w1 full (2, 2), w2 decomposed
                s = std / rank**0.25
                sd[f"{key}.lokr_w1"] = torch.randn(2, 2, generator=gen) * std ** 0.5
                sd[f"{key}.lokr_w2_a"] = torch.randn(out_ch // 2, rank, generator=gen) * s ** 0.5
                sd[f"{key}.lokr_w2_b"] = torch.randn(rank, flat_in // 2, generator=gen) * s ** 0.5
            else:
                raise ValueError(kind)
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def reference_merge(modules: dict, sd: dict, weight: float) -> None:
    """Add WEIGHT * (the file's update) to each module of MODULES {key in the file: module}, in torch."""
    with torch.no_grad():
        for key, module in modules.items():
            t = {k[len(key) + 1 :]: v.float() for k, v in sd.items() if k.startswith(key + ".")}
            shape = module.weight.shape
            alpha = float(t["alpha"]) if "alpha" in t else None
            if "lora_down.weight" in t or "lora_A.weight" in t:
                down = t.get("lora_down.weight", t.get("lora_A.weight"))
                up = t.get("lora_up.weight", t.get("lora_B.weight"))
                rank = down.shape[0]
                update = (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)).reshape(shape)
                if down.ndim == 4 and down.shape[2:] != (1, 1):  # 3x3 LoCon: a conv of the two
                    update = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
            elif "hada_w1_a" in t:
                rank = t["hada_w1_b"].shape[0]
                update = ((t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])).reshape(shape)
            else:
                rank = t["lokr_w2_b"].shape[0]
                update = torch.kron(t["lokr_w1"], t["lokr_w2_a"] @ t["lokr_w2_b"]).reshape(shape)
            scale = 1.0 if alpha is None else alpha / rank
            module.weight += weight * scale * update.to(module.weight.dtype)


def file_keys(parts: dict, sdxl: bool = False) -> dict:
    """{kohya key: module} for PARTS, to pass to reference_merge."""
    out = {}
    for part, layers in parts.items():
        prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sdxl else "lora_te_",
                  "text_encoder_2": "lora_te2_"}[part]  # fmt: skip
        for name, module in layers.items():
            out[prefix + (name if part == "unet" else f"text_model.{name}").replace(".", "_")] = module
    return out


def one_layer_lora(model_dir, path) -> None:
    """A kohya LoRA file at PATH on the first UNet layer of MODEL_DIR's weight map (for refusals and routing)."""
    from safetensors.numpy import save_file

    from sdrt.runtime.manifest import Manifest

    name, layer = next(iter(Manifest.load(model_dir).weight_map("unet").items()))
    out_ch, in_ch = layer["shape"][0], int(np.prod(layer["shape"][1:]))
    key = "lora_unet_" + name.replace(".", "_")
    save_file({f"{key}.lora_down.weight": np.full((2, in_ch), 0.1, np.float32),
               f"{key}.lora_up.weight": np.full((out_ch, 2), 0.1, np.float32)}, str(path))  # fmt: skip
