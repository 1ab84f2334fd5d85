"""DeepCache (Ma et al., CVPR 2024) against an independent torch reference written here from the paper's algorithm.

The reference runs diffusers' own UNet forward and, with forward hooks, keeps the hidden state entering the up layer
that takes skip BRANCH at a full step (paper eq. 3) and puts it back at the cached steps (eq. 4; the deep layers'
results are then unused, which leaves the output as the paper's shallow network computes it), full steps every N
(the uniform 1:N strategy). Tolerance: images within 2/255 (as test_parity.py); can-fail twin: the reference at
interval 2 against sdrt at interval 3.
"""

import shutil

import numpy as np
import pytest
from diffusers_reference import LATENT_RTOL

PROMPT, NEGATIVE = "a photo of a grey squirrel", "blue sky"
PIXEL_TOL = 2  # /255
BRANCH = 1
KW = dict(negative_prompt=NEGATIVE, steps=10, cfg_scale=6.0, sampler="Euler", width=64, height=64, seed=1)


@pytest.fixture(scope="module")
def deepcache_model(tiny_sd, tmp_path_factory):
    """A copy of the tiny model's folder with DeepCache's graphs added (`sdrt export SOURCE -o DIR --deepcache 1`)."""
    from sdrt.cli import main

    folder = tmp_path_factory.mktemp("deepcache") / "model"
    shutil.copytree(tiny_sd[1], folder)
    assert main(["export", str(tiny_sd[1].parent / "diffusers"), "-o", str(folder), "--deepcache", str(BRANCH)]) == 0
    return folder


@pytest.fixture(scope="module")
def deepcache_pipeline(deepcache_model):
    from sdrt import Pipeline

    return Pipeline.load(deepcache_model)


def producer_of_branch(unet, branch: int):
    """The module whose output is the hidden state entering the up layer that takes skip BRANCH (skips counted from
    conv_in's output, 0, in the order the down path makes them; the up path takes them in reverse)."""
    layers = []  # (module whose output leaves the layer, upsampler after it or None)
    for block in unet.up_blocks:
        attentions = getattr(block, "attentions", None)
        for j, resnet in enumerate(block.resnets):
            last = j == len(block.resnets) - 1
            sampler = block.upsamplers[0] if last and block.upsamplers else None
            layers.append((attentions[j] if attentions else resnet, sampler))
    target = len(layers) - 1 - branch
    if target == 0:
        return unet.mid_block
    module, sampler = layers[target - 1]
    return sampler if sampler is not None else module


def reference_deepcache(pipe, latents, interval: int, branch: int = BRANCH):
    """Euler with CFG over the diffusers UNet, DeepCache by hooks: (final latents, uint8 (1, H, W, 3) image)."""
    import torch
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(KW["steps"])
    cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE)
    producer = producer_of_branch(pipe.unet, branch)
    cache = {}

    def keep(module, args, output):
        cache["h"] = output

    def reuse(module, args, output):
        return cache["h"]

    x = torch.from_numpy(latents) * sched.init_noise_sigma
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            handle = producer.register_forward_hook(keep if i % interval == 0 else reuse)
            model_in = torch.cat([sched.scale_model_input(x, t)] * 2)
            out = pipe.unet(model_in, t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            handle.remove()
            eps_uncond, eps_cond = out.chunk(2)
            x = sched.step(eps_uncond + KW["cfg_scale"] * (eps_cond - eps_uncond), t, x).prev_sample
        image = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
    pixels = (np.clip(image.numpy() / 2 + 0.5, 0, 1) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
    return x.numpy(), pixels


def max_diff(a, b) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


@pytest.fixture(scope="module")
def start_latents():
    return np.random.default_rng(3).standard_normal((1, 4, 8, 8)).astype(np.float32)


def generate(pipeline, latents, **kw):
    images = pipeline.generate(PROMPT, latents=latents, progress=False, **KW, **kw)
    return np.stack([np.asarray(im) for im in images]), images


def test_matches_the_papers_algorithm(tiny_sd, deepcache_pipeline, start_latents, latent_atol):
    pipe, _ = tiny_sd
    got, images = generate(deepcache_pipeline, start_latents, deepcache_interval=3)
    latents = deepcache_pipeline.generate(PROMPT, latents=start_latents, progress=False, output_type="latent", **KW,
                                          deepcache_interval=3)  # fmt: skip
    want_latents, want = reference_deepcache(pipe, start_latents, 3)
    assert max_diff(got, want) <= PIXEL_TOL
    tolerance = latent_atol + LATENT_RTOL * np.abs(want_latents).max()
    assert np.abs(latents - want_latents).max() <= tolerance
    # can-fail twins: the reference at interval 2, and sdrt without DeepCache, are both far off
    twin_latents, twin = reference_deepcache(pipe, start_latents, 2)
    assert max_diff(got, twin) > PIXEL_TOL and np.abs(latents - twin_latents).max() > 10 * tolerance
    plain, _ = generate(deepcache_pipeline, start_latents)
    assert max_diff(got, plain) > PIXEL_TOL
    assert "DeepCache interval: 3, DeepCache branch: 1" in images[0].info["parameters"]


def test_off_by_default_changes_nothing(deepcache_pipeline, tiny_pipeline, start_latents):
    with_graphs, images = generate(deepcache_pipeline, start_latents)
    assert max_diff(with_graphs, generate(tiny_pipeline, start_latents)[0]) == 0
    assert "DeepCache" not in images[0].info["parameters"]


class Counter:
    def __init__(self, engine):
        self.engine, self.calls = engine, 0

    def run(self, feeds):
        self.calls += 1
        return self.engine.run(feeds)

    def __getattr__(self, name):
        return getattr(self.engine, name)


@pytest.mark.parametrize(("interval", "start", "sampler", "full_calls", "shallow_calls"),
                         [(3, 0.0, "Euler", 4, 6), (5, 0.0, "Euler", 2, 8), (3, 0.4, "Euler", 6, 4),
                          (2, 0.0, "Heun", 10, 9)])  # fmt: skip
def test_unet_calls(deepcache_pipeline, interval, start, sampler, full_calls, shallow_calls):
    """Full calls: the first, then every INTERVAL-th (after the first START of them, all full); Heun counts two
    calls a step (19 for 10 steps: its last step is Euler's)."""
    engines = deepcache_pipeline.engines
    counters = {name: Counter(engines[name]) for name in ("unet", "unet_deepcache", "unet_shallow")}
    engines.update(counters)
    try:
        deepcache_pipeline.generate(PROMPT, **{**KW, "sampler": sampler}, deepcache_interval=interval,
                                    deepcache_start=start, output_type="latent", progress=False)  # fmt: skip
    finally:
        engines.update({name: c.engine for name, c in counters.items()})
    calls = {name: c.calls for name, c in counters.items()}
    assert calls == {"unet": 0, "unet_deepcache": full_calls, "unet_shallow": shallow_calls}


def test_with_negative_guidance_skip(deepcache_pipeline, start_latents):
    """NGMS halves the batch of some calls: the cached feature's conditional half serves them."""
    got, _ = generate(deepcache_pipeline, start_latents, deepcache_interval=3, s_min_uncond=20.0, s_min_uncond_all=True)
    assert got.shape == (1, 64, 64, 3)


def test_split_graph_pieces_are_the_unet(tiny_sd):
    """The layer-by-layer forward is diffusers' UNet forward (full), and the shallow part given the full call's deep
    feature gives the same output, for every branch."""
    import torch

    from sdrt.export.deepcache import skip_count, split_forward

    unet = tiny_sd[0].unet
    g = torch.Generator().manual_seed(0)
    sample, t, text = torch.randn(2, 4, 9, 7, generator=g), torch.tensor([500.0, 20.0]), torch.randn(2, 77, 32)
    with torch.no_grad():
        want = unet(sample, t, text).sample
        for branch in range(skip_count(unet)):
            out, feature = split_forward(unet, branch, "full", sample, t, text)
            torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
            shallow = split_forward(unet, branch, "shallow", sample, t, text, deep=feature)
            torch.testing.assert_close(shallow, want, atol=1e-5, rtol=1e-5)


def test_refusals(tiny_pipeline, deepcache_pipeline):
    from sdrt.errors import InvalidOption

    with pytest.raises(InvalidOption, match="deepcache_interval.*no DeepCache graphs"):
        tiny_pipeline.generate(PROMPT, steps=2, deepcache_interval=3, progress=False)
    with pytest.raises(InvalidOption, match="deepcache_branch: got 2"):
        deepcache_pipeline.generate(PROMPT, steps=2, deepcache_interval=3, deepcache_branch=2, progress=False)
    from PIL import Image

    from sdrt.runtime.controlnet import ControlNetUnit

    unit = ControlNetUnit("some-controlnet", Image.new("RGB", (64, 64)))
    with pytest.raises(InvalidOption, match="deepcache_interval.*ControlNet units: the cached deep feature"):
        deepcache_pipeline.generate(PROMPT, steps=2, deepcache_interval=3, controlnets=[unit], progress=False)


def test_a1111_settings_and_extension_names():
    from sdrt.server import a1111

    req = a1111.Txt2ImgRequest(prompt="x", override_settings={"deepcache_interval": 3, "deepcache_start": 0.2})
    kwargs = a1111.generate_kwargs(req, a1111.settings(req, a1111.DEFAULT_OPTIONS, ("m",)))
    assert (kwargs["deepcache_interval"], kwargs["deepcache_start"], kwargs["deepcache_branch"]) == (3, 0.2, None)
    ext = a1111.Txt2ImgRequest(prompt="x", override_settings={"deepcache_enable_pass": "both passes"})
    kwargs = a1111.generate_kwargs(ext, a1111.settings(ext, a1111.DEFAULT_OPTIONS, ("m",)))
    assert (kwargs["deepcache_interval"], kwargs["deepcache_start"]) == (5, 0.4)  # the extension's defaults
    plain = a1111.Txt2ImgRequest(prompt="x")
    assert a1111.generate_kwargs(plain, a1111.settings(plain, a1111.DEFAULT_OPTIONS, ("m",)))["deepcache_interval"] == 0


def test_split_graph_pieces_sdxl(tmp_path):
    """The same on a tiny SDXL UNet (added text and time embeddings; attention in deeper blocks only)."""
    import torch
    from tiny_sdxl import build_tiny_sdxl

    from sdrt.export.deepcache import skip_count, split_forward

    unet = build_tiny_sdxl(tmp_path / "sdxl").unet
    g = torch.Generator().manual_seed(0)
    cfg = unet.config
    pooled = unet.add_embedding.linear_1.in_features - 6 * cfg.addition_time_embed_dim
    sample, t = torch.randn(2, 4, 9, 7, generator=g), torch.tensor([500.0, 20.0])
    text = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    added = {"text_embeds": torch.randn(2, pooled, generator=g), "time_ids": torch.rand(2, 6, generator=g) * 512}
    with torch.no_grad():
        want = unet(sample, t, text, added_cond_kwargs=added).sample
        for branch in range(skip_count(unet)):
            out, feature = split_forward(unet, branch, "full", sample, t, text, added)
            torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
            shallow = split_forward(unet, branch, "shallow", sample, t, text, added, deep=feature)
            torch.testing.assert_close(shallow, want, atol=1e-5, rtol=1e-5)


def test_sdxl_export_and_generate(tiny_sdxl, tmp_path):
    """SDXL: the graphs added to an exported base (its added conditioning flows into both), DeepCache's calls."""
    from sdrt import Pipeline
    from sdrt.cli import main

    folder = tmp_path / "sdxl"
    shutil.copytree(tiny_sdxl["base"][1], folder)
    assert main(["export", str(tiny_sdxl["base"][1].parent / "base"), "-o", str(folder), "--deepcache", "2"]) == 0
    pipe = Pipeline.load(folder)
    counters = {name: Counter(pipe.engines[name]) for name in ("unet", "unet_deepcache", "unet_shallow")}
    pipe.engines.update(counters)
    kw = dict(steps=6, width=64, height=64, seed=2, cfg_scale=5.0, output_type="latent", progress=False)
    cached = pipe.generate(PROMPT, deepcache_interval=3, **kw)
    assert {n: c.calls for n, c in counters.items()} == {"unet": 0, "unet_deepcache": 2, "unet_shallow": 4}
    plain = pipe.generate(PROMPT, **kw)
    assert np.isfinite(cached).all() and np.abs(cached - plain).max() > 0


def test_cli(deepcache_model, tiny_sd, tmp_path, capsys):
    """`--deepcache N` on generate; on a folder without the graphs: exit 2 naming the option, no traceback."""
    from PIL import Image

    from sdrt.cli import main

    assert main(["generate", PROMPT, "-m", str(deepcache_model), "--steps", "3", "--deepcache", "2", "-o",
                 str(tmp_path / "a")]) == 0  # fmt: skip
    image = Image.open(next((tmp_path / "a").glob("*.png")))
    assert "DeepCache interval: 2" in image.info["parameters"]
    capsys.readouterr()
    assert main(["generate", PROMPT, "-m", str(tiny_sd[1]), "--steps", "3", "--deepcache", "2", "-o",
                 str(tmp_path / "b")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "deepcache_interval" in err and "Traceback" not in err


def test_tensorrt_profiles_cover_the_new_graphs(deepcache_model):
    """`sdrt build` plans a profile for every graph of a folder: DeepCache's (and TAESD's) axes are declared."""
    from sdrt.engines.plan import ShapeRanges, plan_profile
    from sdrt.runtime.manifest import Manifest

    manifest = Manifest.load(deepcache_model)
    for name in ("unet_deepcache", "unet_shallow"):
        profile = plan_profile(name, manifest.models[name]["inputs"], ShapeRanges(), manifest.latent_downsample)
        assert set(profile) >= {"sample", "timestep"}
    shallow = plan_profile("unet_shallow", manifest.models["unet_shallow"]["inputs"], ShapeRanges(), 8)
    assert shallow["deep_feature"][2][2] == shallow["sample"][2][2]  # branch 1 of the tiny UNet: latent size
    from sdrt.runtime.previews import taesd_decoder_spec

    assert plan_profile("taesd_decoder", taesd_decoder_spec(4).to_json()["inputs"], ShapeRanges(), 8)


def test_img2img_and_low_vram(deepcache_model, start_latents):
    """img2img (the schedule cut by strength) and the low-VRAM staging (one engine loaded at a time) run DeepCache."""
    from PIL import Image

    from sdrt import Pipeline

    staged = Pipeline.load(deepcache_model, low_vram=True)
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    out = staged.generate(PROMPT, init_image=init, strength=0.6, steps=10, deepcache_interval=2, progress=False)
    assert out[0].size == (64, 64) and "DeepCache interval: 2" in out[0].info["parameters"]
    # the shallow graph stays beside the staged full one: each engine loaded once a generation (text encoder, full
    # graph, VAE), not the UNet-sized full graph again at every full call (5 of the 10 here, each after a shallow one)
    stager = staged.engines["unet_deepcache"].stager
    before = stager.loads
    images, _ = generate(staged, start_latents, deepcache_interval=2)
    assert stager.loads - before == 3
    assert max_diff(images, generate(Pipeline.load(deepcache_model), start_latents, deepcache_interval=2)[0]) == 0


def test_full_graph_stands_in_for_the_unet(deepcache_model, start_latents):
    """The speed benchmark's --plain-through-deepcache: plain images through DeepCache's full graph are the plain
    UNet's (full-size SDXL then holds one UNet's weights, not two)."""
    from sdrt import Pipeline
    from sdrt.bench.speed import FullGraphAsUnet

    pipe = Pipeline.load(deepcache_model)
    plain, _ = generate(pipe, start_latents)
    pipe.engines["unet"] = FullGraphAsUnet(pipe.engines["unet_deepcache"])
    assert max_diff(generate(pipe, start_latents)[0], plain) <= 1


def loaded(engine) -> bool:
    return engine.session is not None  # ONNX Runtime CPU engines


@pytest.mark.parametrize("room", [False, True])
def test_plain_unet_and_deepcache_graphs_do_not_stay_together_without_room(deepcache_model, start_latents,
                                                                           monkeypatch, room):  # fmt: skip
    """deepcache_memory.py: switching between plain and DeepCache runs unloads the other kind's graphs when the new
    ones do not fit beside them (full-size SDXL on 24 GB was killed holding both); with room both stay loaded. The
    images are the same either way (a switch back loads the graphs again)."""
    from sdrt import Pipeline
    from sdrt.runtime import deepcache_memory

    pipe = Pipeline.load(deepcache_model)
    unet, full, shallow = (pipe.engines[n] for n in ("unet", "unet_deepcache", "unet_shallow"))
    plain, _ = generate(pipe, start_latents)
    monkeypatch.setattr(deepcache_memory, "available_host_memory", lambda: 1 << 50 if room else 1 << 20)
    cached, _ = generate(pipe, start_latents, deepcache_interval=3)
    assert loaded(full) and loaded(shallow) and loaded(unet) == room
    again, _ = generate(pipe, start_latents)
    assert loaded(unet) and loaded(full) == room and loaded(shallow) == room
    assert max_diff(again, plain) == 0 and max_diff(generate(pipe, start_latents, deepcache_interval=3)[0], cached) == 0
    reference = Pipeline.load(deepcache_model)  # never switched
    assert max_diff(cached, generate(reference, start_latents, deepcache_interval=3)[0]) == 0


def test_room_for_deepcache_graphs(deepcache_model, monkeypatch):
    """Room: the graphs' bytes on disk x LOAD_HEADROOM plus a guided run's activations at the native size (ONNX
    Runtime's 240 KB per latent cell per image); never on a GPU (its memory is not measured)."""
    from types import SimpleNamespace

    from sdrt.runtime import deepcache_memory
    from sdrt.runtime.manifest import Manifest

    assert deepcache_memory.available_host_memory() > 0  # this machine's, before the stand-ins below
    manifest = Manifest.load(deepcache_model)
    names = ("unet_deepcache", "unet_shallow")
    files = [manifest.model_path(n) for n in names]
    on_disk = sum(f.stat().st_size for p in files for f in (p, p.with_name(p.name + ".data")) if f.is_file())
    need = int(on_disk * 1.25 + 240_000 * (manifest.native_size // 8) ** 2 * 2)
    assert deepcache_memory.need_bytes(manifest, names) == need

    def model(device_memory):
        engine = SimpleNamespace(capabilities=SimpleNamespace(device_memory=device_memory))
        return SimpleNamespace(manifest=manifest, engines=dict.fromkeys(names, engine))

    for available, device, fits in ((need, False, True), (need - 1, False, False), (1 << 50, True, False),
                                    (None, False, False)):  # fmt: skip
        monkeypatch.setattr(deepcache_memory, "available_host_memory", lambda a=available: a)
        assert deepcache_memory.room_for(model(device), names) == fits


def test_load_memory_bench(deepcache_model, tmp_path):
    """`python -m sdrt.bench.load_memory`, which found what killed full-size SDXL with DeepCache: one row per load,
    its graph's bytes on disk, RSS that grows while engines are held, and a table for the docs."""
    import json

    from sdrt.bench.load_memory import main, markdown

    out = tmp_path / "loads.json"
    assert main([str(deepcache_model), "unet", "unet_deepcache", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    loads = report["loads"]
    assert [r["graph"] for r in loads] == ["unet", "unet_deepcache"] and report["benchmark"] == "load_memory"
    data = deepcache_model / "unet_deepcache" / "model.onnx"
    assert loads[1]["bytes_on_disk"] == sum(f.stat().st_size for f in (data, data.with_name("model.onnx.data"))
                                            if f.is_file())  # fmt: skip
    assert loads[1]["rss_before"] == pytest.approx(loads[0]["vmrss"], rel=0.2)
    assert loads[1]["vmhwm"] >= loads[1]["vmrss"] >= loads[0]["rss_before"]
    assert len(markdown(report).splitlines()) == 4
