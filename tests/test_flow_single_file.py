"""SD 3.5 / FLUX.1 single-file checkpoints (export/flow_single_file.py) and FLUX's transformer exported in parts
(export/flux_parts.py, runtime/flux_parts.py), on the tiny pipelines written in the original key layouts.

Each single-file export gives the images of the same model's diffusers-folder export (within 1/255); the can-fail
twins: the SD 3.5 file without T5 (> 8/255 away), FLUX's part chain with a part left out. FLUX's part chain equals the
one-graph transformer within 1e-4. Missing text encoders and mismatched configs are one error, exit 2, no folder.
"""

import numpy as np
import pytest
from flow_helpers import max_diff_255, sdrt_run
from single_files import round_trips, write_flux_files, write_sd3_file
from tiny_flux import build_tiny_flux
from tiny_sd3 import build_tiny_sd3

from sdrt.cli import main

PROMPT = "a red fox in the snow"


def _export(source, out, *flags) -> int:
    return main(["export", str(source), "-o", str(out), *map(str, flags)])


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """The tiny FLUX dev: its folder export (one-graph transformer), its ComfyUI-style files exported with the
    transformer one block a part; (pipe, folder Pipeline, file Pipeline, files, root)."""
    from sdrt import Pipeline

    root = tmp_path_factory.mktemp("flux_single")
    pipe = build_tiny_flux(root / "diffusers")
    files = write_flux_files(pipe, root / "files")
    assert _export(root / "diffusers", root / "onnx") == 0
    flags = ("--clip-l", files["clip_l"], "--t5xxl", files["t5xxl"], "--vae", files["vae"], "--part-size", "8KB")
    assert _export(files["transformer"], root / "file-onnx", "--config", root / "diffusers", *flags) == 0
    return pipe, Pipeline.load(root / "onnx"), Pipeline.load(root / "file-onnx"), files, root


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """The tiny SD 3.5 with T5: its folder export; one file holding the transformer, VAE and both CLIPs with T5
    given as a file of its own (--t5xxl); a bare file (transformer + VAE) with the CLIPs as files and no T5."""
    from safetensors.torch import save_file
    from single_files import t5_file_keys, text_model_keys

    from sdrt import Pipeline

    root = tmp_path_factory.mktemp("sd3_single")
    pipe = build_tiny_sd3(root / "diffusers")
    t5 = root / "t5xxl_fp16.safetensors"
    save_file({k: v.contiguous() for k, v in t5_file_keys(pipe.text_encoder_3.state_dict()).items()}, str(t5))
    clips = {}
    for flag, encoder in (("--clip-l", pipe.text_encoder), ("--clip-g", pipe.text_encoder_2)):
        clips[flag] = root / f"{flag[2:]}.safetensors"
        save_file({k: v.contiguous() for k, v in text_model_keys(encoder.state_dict()).items()}, str(clips[flag]))
    full = write_sd3_file(pipe, root / "sd3.5_tiny.safetensors", clips=True)
    bare = write_sd3_file(pipe, root / "sd3.5_tiny_bare.safetensors", clips=False)
    assert _export(root / "diffusers", root / "onnx") == 0
    assert _export(full, root / "file-onnx", "--config", root / "diffusers", "--t5xxl", t5) == 0
    assert (
        _export(bare, root / "bare-onnx", "--config", root / "diffusers", *[x for kv in clips.items() for x in kv]) == 0
    )
    return pipe, {name: Pipeline.load(root / name) for name in ("onnx", "file-onnx", "bare-onnx")}, root, bare


def test_flux_key_map_equals_diffusers_converter_at_flux_width():
    """export/flux_keys.py and diffusers' converter (fixed at FLUX.1's width 3072) take the same rows of the same
    original tensors for every key (meta tensors: nothing allocated); the test helper's inverse covers every key."""
    import torch
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
    from single_files import diffusers_to_flux

    from sdrt.export.flux_keys import flux_to_diffusers
    from sdrt.export.lazy_weights import Deferred, evaluate

    with torch.device("meta"):
        state = FluxTransformer2DModel(num_layers=2, num_single_layers=2, guidance_embeds=True).state_dict()
    original = diffusers_to_flux(state)
    leaves = {k: Deferred(v, ("leaf", k)) for k, v in original.items()}
    ours = flux_to_diffusers(dict(leaves))
    theirs = convert_flux_transformer_checkpoint_to_diffusers(
        {"model.diffusion_model." + k: v for k, v in leaves.items()}
    )
    assert set(ours) == set(theirs) == set(state)
    order = sorted(original)

    def rows(key):  # each original row numbered: which rows a converted tensor holds, in which order
        return torch.arange(original[key].shape[0], dtype=torch.float64) + 1e6 * order.index(key)

    for key in state:
        mine, reference = evaluate(ours[key], rows, {}), evaluate(theirs[key], rows, {})
        assert torch.equal(mine, reference) and mine.shape[0] == state[key].shape[0], key
    # can-fail: the final AdaLN's halves not swapped is another tensor
    shifted = evaluate(leaves["final_layer.adaLN_modulation.1.weight"], rows, {})
    assert not torch.equal(shifted, evaluate(theirs["norm_out.linear.weight"], rows, {}))


def test_written_files_are_what_diffusers_reads(flux, sd3):
    """The test files' layouts convert back through diffusers' own converters to the pipelines' exact weights."""
    assert round_trips(sd3[0]) == {"transformer": 0.0, "vae": 0.0}
    assert round_trips(flux[0]) == {"vae": 0.0}


def test_sd3_single_file_images_equal_folder_export(sd3):
    _, pipes, _, _ = sd3
    folder = sdrt_run(pipes["onnx"], PROMPT, seeds=(3, 4))
    assert max_diff_255(sdrt_run(pipes["file-onnx"], PROMPT, seeds=(3, 4)), folder) <= 1
    # can-fail twin: the bare file exported without T5 (CLIPs from their own files) conditions on zeros instead
    assert max_diff_255(sdrt_run(pipes["bare-onnx"], PROMPT, seeds=(3, 4)), folder) > 8
    assert pipes["bare-onnx"].manifest.family_config["t5"] is None
    assert pipes["file-onnx"].manifest.source["kind"] == "single_file"


def test_flux_single_file_in_parts_images_equal_folder_export(flux):
    _, folder, parts, _, _ = flux
    assert parts.manifest.models["transformer"]["parts"] == 3 and "transformer_part2" in parts.manifest.models
    reference = sdrt_run(folder, PROMPT, seeds=(1, 2), cfg_scale=3.0)
    assert max_diff_255(sdrt_run(parts, PROMPT, seeds=(1, 2), cfg_scale=3.0), reference) <= 1


def _transformer_feeds(batch=2, h=4, w=6, tokens=9, seed=0):
    rng = np.random.default_rng(seed)
    from sdrt.runtime.flow_models import image_ids

    return {"hidden_states": rng.standard_normal((batch, h * w // 4, 64)).astype(np.float32),
            "timestep": np.array([0.7, 0.2], np.float32)[:batch],
            "encoder_hidden_states": rng.standard_normal((batch, tokens, 96)).astype(np.float32),
            "pooled_projections": rng.standard_normal((batch, 32)).astype(np.float32),
            "img_ids": image_ids(h, w), "txt_ids": np.zeros((tokens, 3), np.float32),
            "guidance": np.full(batch, 3.5, np.float32)}  # fmt: skip


def test_flux_part_chain_equals_one_graph(flux):
    from sdrt.runtime.flux_parts import TransformerChain, transformer_engine

    _, folder, parts, _, _ = flux
    chain = transformer_engine(parts.engines, parts.manifest)
    assert isinstance(chain, TransformerChain) and len(chain.engines) == 3
    feeds = _transformer_feeds()
    whole = folder.engines["transformer"].run(feeds)["out_sample"]
    assert np.abs(chain.run(feeds)["out_sample"] - whole).max() <= 1e-4 * max(1.0, np.abs(whole).max())
    # can-fail twin: a chain with its middle part left out
    chain.engines = [chain.engines[0], chain.engines[2]]
    assert np.abs(chain.run(feeds)["out_sample"] - whole).max() > 1e-2


def test_flux_file_without_text_encoders_names_them(flux, tmp_path, capsys):
    _, _, _, files, root = flux
    out = tmp_path / "out"
    assert _export(files["transformer"], out, "--config", root / "diffusers") == 2
    err = capsys.readouterr().err
    assert all(flag in err for flag in ("--clip-l FILE", "--t5xxl FILE", "--vae FILE")) and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    # only the VAE missing: only it is named
    assert _export(files["transformer"], out, "--config", root / "diffusers", "--clip-l", files["clip_l"],
                   "--t5xxl", files["t5xxl"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "--vae FILE" in err and "--clip-l FILE" not in err and not out.exists()


def test_single_file_flags_refused_where_they_do_not_apply(flux, sd3, tmp_path, capsys):
    _, _, _, files, root = flux
    # component files for a diffusers folder (it has its own parts)
    assert _export(root / "diffusers", tmp_path / "a", "--clip-l", files["clip_l"]) == 2
    assert "--clip-l" in capsys.readouterr().err
    # a config folder of the other family
    assert _export(files["transformer"], tmp_path / "b", "--config", sd3[2] / "diffusers", "--clip-l",
                   files["clip_l"], "--t5xxl", files["t5xxl"], "--vae", files["vae"]) == 2  # fmt: skip
    assert "--config" in capsys.readouterr().err
    # a component file that is not there
    assert (
        _export(files["transformer"], tmp_path / "c", "--config", root / "diffusers", "--t5xxl", "nope.safetensors")
        == 2
    )
    assert "--t5xxl" in capsys.readouterr().err
    # a transformer file of another variant than --config's (a dev file, a schnell config: guidance weights left over)
    schnell = root / "schnell"
    build_tiny_flux(schnell, variant="schnell")
    assert _export(files["transformer"], tmp_path / "d", "--config", schnell, "--clip-l", files["clip_l"],
                   "--t5xxl", files["t5xxl"], "--vae", files["vae"]) == 2  # fmt: skip
    assert "guidance_embedder" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_flux_parts_staged_one_at_a_time(flux):
    """low_vram: each part is a staged engine, loaded in turn; the images stay those of the resident chain."""
    from sdrt import Pipeline

    _, _, parts, _, root = flux
    staged = Pipeline.load(root / "file-onnx", low_vram=True)
    images = sdrt_run(staged, PROMPT, seeds=(1,), cfg_scale=3.0)
    assert max_diff_255(images, sdrt_run(parts, PROMPT, seeds=(1,), cfg_scale=3.0)) == 0
    stager = staged.engines["transformer"].stager
    assert stager.loads >= 4 * 3  # every step loads the three parts again (one engine resident at a time)
    assert sum(engine.inner.session is not None for engine in staged.engines.values()) <= 1


def test_sd3_wrong_t5_file_named(sd3, tmp_path, capsys):
    """An SD 3.5 file asked for T5 (--t5xxl) with a file that is not a T5 encoder: one error naming --t5xxl."""
    _, _, root, bare = sd3
    clips = ("--clip-l", root / "clip-l.safetensors", "--clip-g", root / "clip-g.safetensors")
    assert _export(bare, tmp_path / "out", "--config", root / "diffusers", *clips, "--t5xxl", clips[1]) == 2
    err = capsys.readouterr().err
    assert "--t5xxl" in err and "missing" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_sd3_file_with_everything_inside_gives_each_part_its_weights(sd3, tmp_path):
    """A file holding T5 too: every part read from it equals the pipeline's own weights (fp32; T5 as stored)."""
    import torch

    from sdrt.export.flow_single_file import load_single_file

    pipe, _, root, _ = sd3
    path = write_sd3_file(pipe, tmp_path / "sd3.5_all.safetensors", clips=True, t5=True)
    parts = load_single_file(path, "sd3", str(root / "diffusers"), {})
    assert parts.has("text_encoder_3") and parts.has("tokenizer_3") and not parts.note
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        ours, theirs = parts.get(name).state_dict(), getattr(pipe, name).state_dict()
        assert set(ours) >= {k for k in theirs if "position_ids" not in k}, name
        assert all(torch.equal(ours[k].float(), theirs[k].float()) for k in theirs if k in ours), name
    bare = load_single_file(
        sd3[3],
        "sd3",
        str(root / "diffusers"),
        {"--clip-l": root / "clip-l.safetensors", "--clip-g": root / "clip-g.safetensors"},
    )
    assert not bare.has("text_encoder_3") and not bare.has("tokenizer_3") and "--t5xxl FILE" in bare.note
