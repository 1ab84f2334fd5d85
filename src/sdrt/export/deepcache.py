"""DeepCache (Ma, Fang and Wang, "DeepCache: Accelerating Diffusion Models for Free", CVPR 2024) as two UNet graph
variants, so that every backend runs it (runtime/deepcache.py alternates them):

  unet_deepcache  the whole UNet, which also returns the deep feature: the hidden state entering the up path's
                  layer that takes skip connection BRANCH (paper eq. 3: the feature of the main branch, U_{m+1})
  unet_shallow    the same inputs plus that cached feature: only the shallow layers run (conv_in, the down layers
                  up to skip BRANCH, then the up layers from that skip on; paper eq. 4)

Skips are numbered as the UNet makes them: 0 is conv_in's output, then one per down layer (resnet, with its attention)
and one per downsampler. BRANCH is ComfyUI's DeepCache "cache_depth" (there, the LDM input block index), and branch 0
is the DeepCache helper's cache_branch_id 0: the shallowest, fastest choice.
"""

import gc
from dataclasses import replace

from sdrt.errors import InvalidOption
from sdrt.runtime.deepcache import DEEP_FEATURE, DEEPCACHE_FULL, DEEPCACHE_SHALLOW
from sdrt.runtime.modelspec import ModelSpec, TensorSpec


def down_layers(unet) -> list:
    """The down path as one entry per skip it adds after conv_in: ("res", resnet, attention or None) or ("down",
    downsampler)."""
    layers = []
    for block in unet.down_blocks:
        attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
        layers += [("res", resnet, attn) for resnet, attn in zip(block.resnets, attentions, strict=True)]
        layers += [("down", sampler) for sampler in block.downsamplers or []]
    return layers


def up_layers(unet) -> list:
    """The up path in order: ("res", resnet, attention or None), each taking one skip, or ("up", upsampler)."""
    layers = []
    for block in unet.up_blocks:
        attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
        layers += [("res", resnet, attn) for resnet, attn in zip(block.resnets, attentions, strict=True)]
        layers += [("up", sampler) for sampler in block.upsamplers or []]
    return layers


def skip_count(unet) -> int:
    return 1 + len(down_layers(unet))


def check_branch(unet, branch: int) -> int:
    """BRANCH as an int in 0..skips-1 (InvalidOption naming --deepcache-branch otherwise)."""
    count = skip_count(unet)
    if not isinstance(branch, int) or isinstance(branch, bool) or not 0 <= branch < count:
        raise InvalidOption("--deepcache-branch", branch, f"0 to {count - 1} (this UNet's skip connections)")
    return branch


def split_forward(unet, branch: int, mode: str, sample, timestep, encoder_hidden_states, added=None, deep=None):
    """The UNet's forward, layer by layer (diffusers' UNet2DConditionModel.forward without adapters): MODE "full"
    -> (out_sample, deep feature); "shallow" (DEEP given) -> out_sample. Shapes: sample (B, C, h, w), timestep (B,),
    encoder_hidden_states (B, L, D); ADDED: SDXL's {"text_embeds", "time_ids"}."""
    import torch

    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added or {})
    emb = emb if aug is None else emb + aug
    emb = emb if unet.time_embed_act is None else unet.time_embed_act(emb)
    text = encoder_hidden_states

    def run(layer, h, skip=None):
        if layer[0] == "down":
            return layer[1](h)
        if layer[0] == "up":
            return layer[1](h, skip.shape[2:])  # the size of the skip it meets next (diffusers' upsample_size)
        h = layer[1](h if skip is None else torch.cat([h, skip], dim=1), emb)
        return h if layer[2] is None else layer[2](h, encoder_hidden_states=text, return_dict=False)[0]

    h = unet.conv_in(sample)
    skips = [h]
    down = down_layers(unet)
    for layer in down if mode == "full" else down[:branch]:
        h = run(layer, h)
        skips.append(h)
    if mode == "full":
        mid = unet.mid_block
        h = mid(h, emb, encoder_hidden_states=text) if getattr(mid, "has_cross_attention", False) else mid(h, emb)
    up = up_layers(unet)
    res_steps = [i for i, layer in enumerate(up) if layer[0] == "res"]
    start = res_steps[len(res_steps) - 1 - branch]  # the up layer taking skip BRANCH
    feature = None
    for i, layer in enumerate(up):
        if i == start:
            feature, h = (h, h) if mode == "full" else (None, deep)
        if i < start and mode != "full":
            continue
        if layer[0] == "res":
            h = run(layer, h, skips.pop())
        else:
            h = run(layer, h, skips[-1])
    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    out = unet.conv_out(h)
    return (out, feature) if mode == "full" else out


def deepcache_steps(unet_step, branch: int) -> list:
    """The two ModelSteps of DeepCache from the model's own UNet step (same module, inputs and checks)."""
    from sdrt.export.steps import ModelStep

    unet = unet_step.module
    check_branch(unet, branch)
    n_added = len(unet_step.spec.inputs) - 3  # SDXL: text_embeds, time_ids

    def added(rest):
        return {"text_embeds": rest[0], "time_ids": rest[1]} if n_added else None

    def full(module, sample, timestep, text, *rest):
        return split_forward(module, branch, "full", sample, timestep.float(), text, added(rest))

    uses_text = shallow_uses_text(unet, branch)  # else the graph has no encoder_hidden_states input

    def shallow(module, sample, timestep, *rest):
        text, rest = (rest[0], rest[1:]) if uses_text else (None, rest)
        return split_forward(module, branch, "shallow", sample, timestep.float(), text, added(rest[:n_added]),
                             deep=rest[n_added])  # fmt: skip

    channels = feature_channels(unet, branch)
    sample = unet_step.check_inputs[0]  # sides multiples of the UNet's downscale: the feature's divides exactly
    with_added = added(unet_step.check_inputs[3:])
    _, probe = split_forward(unet, branch, "full", sample, unet_step.check_inputs[1].float(), unet_step.check_inputs[2],
                             with_added)  # fmt: skip
    scale = sample.shape[2] // probe.shape[2]  # 1, 2, 4 or 8: the feature's axes are the latent's / scale
    axes = ("latent_height", "latent_width") if scale == 1 else (f"height_{scale}", f"width_{scale}")

    def with_feature(inputs):
        import torch

        _, feature = split_forward(unet, branch, "full", inputs[0], inputs[1].float(), inputs[2], added(inputs[3:]))
        kept = inputs if uses_text else (*inputs[:2], *inputs[3:])
        return (*kept, torch.randn(feature.shape, generator=torch.Generator().manual_seed(5)))

    entry = {"deepcache_branch": branch}
    feature_spec = TensorSpec(DEEP_FEATURE, "float32", ("batch", channels, *axes))
    spec = unet_step.spec
    full_spec = ModelSpec(DEEPCACHE_FULL, spec.inputs, (*spec.outputs, feature_spec))
    inputs = [t for t in spec.inputs if uses_text or t.name != "encoder_hidden_states"]
    shallow_spec = ModelSpec(DEEPCACHE_SHALLOW, (*inputs, feature_spec), spec.outputs)
    return [
        ModelStep(full_spec, unet, full, unet_step.trace_inputs, unet_step.check_inputs, manifest_entry=entry),
        ModelStep(shallow_spec, unet, shallow, with_feature(unet_step.trace_inputs),
                  with_feature(unet_step.check_inputs), manifest_entry=dict(entry)),
    ]  # fmt: skip


def shallow_uses_text(unet, branch: int) -> bool:
    """Whether the shallow part has a cross-attention layer (SD 1.x/2.x's first blocks have none at low branches)."""
    up = up_layers(unet)
    res_steps = [i for i, layer in enumerate(up) if layer[0] == "res"]
    start = res_steps[len(res_steps) - 1 - branch]
    layers = down_layers(unet)[:branch] + up[start:]
    return any(layer[0] == "res" and layer[2] is not None for layer in layers)


def feature_channels(unet, branch: int) -> int:
    """Channels of the deep feature: the hidden state entering the up layer that takes skip BRANCH."""
    up = up_layers(unet)
    res = [layer for layer in up if layer[0] == "res"]
    layer = res[len(res) - 1 - branch]
    skip_channels = layer[1].in_channels - _skip_width(unet, branch)
    return int(skip_channels)


def _skip_width(unet, branch: int) -> int:
    """Channels of skip BRANCH (conv_in's output, or a down layer's)."""
    if branch == 0:
        return int(unet.conv_in.out_channels)
    layer = down_layers(unet)[branch - 1]
    return int(layer[1].out_channels)


def with_deepcache(plan, branch: int):
    """PLAN (the driver's ExportPlan) with DeepCache's two graphs, made just before the model's own UNet step."""
    from sdrt.export.steps import ModelStep

    def parts():
        for part in plan.parts:
            if isinstance(part, ModelStep) and part.spec.name == "unet":
                yield from deepcache_steps(part, branch)
            yield part

    return replace(plan, parts=parts(), steps=plan.steps + 2)


def add_deepcache(source: str, model_dir, branch: int, progress: bool = True, original_config=None, config=None):
    """Add DeepCache's two graphs at BRANCH to MODEL_DIR, exported from SOURCE (the same weights); the manifest."""
    from tqdm import tqdm

    from sdrt.export.driver import add_to_folder, source_denoiser_step
    from sdrt.runtime.manifest import Manifest

    manifest = Manifest.load(model_dir)
    bar = tqdm(total=2, desc="deepcache", unit="step", disable=not progress)
    steps = deepcache_steps(source_denoiser_step(source, manifest, original_config, config), branch)[::-1]
    for step in steps:  # the shallow graph first; each step drops the UNet once exported, so the full graph's check
        step.release = gc.collect  # loads into ONNX Runtime without the torch UNet beside it (SDXL: 10 GB less)
    updated = add_to_folder(manifest, steps, bar)
    bar.close()
    return updated
