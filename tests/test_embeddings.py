"""Textual inversion: A1111, diffusers, kohya and SDXL files read without torch or pickle code; parity with
diffusers' load_textual_inversion on the tiny model (final latents within 2e-3)."""

import copy
import pickle
import zipfile

import numpy as np
import pytest
import torch

from sdrt.runtime.embeddings import EmbeddingDB, load_embedding
from sdrt.runtime.errors import InvalidOption

WIDTH = 32  # the tiny text encoder's


def vectors(n: int, seed: int = 0, width: int = WIDTH) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.5


def write_a1111(path, tensor):
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": torch.nn.Parameter(tensor.clone())},
            "name": "ignored",
            "step": 500,
            "sd_checkpoint": "abc",
            "sd_checkpoint_name": "model",
        },
        path,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_formats_read_the_same_vectors(tmp_path, dtype):
    from safetensors.torch import save_file

    want = vectors(3).to(dtype)
    write_a1111(tmp_path / "a1111.pt", want)
    torch.save({"<mine>": want[0]}, tmp_path / "diffusers.bin")
    save_file({"emb_params": want.contiguous()}, tmp_path / "kohya.safetensors")
    save_file({"clip_l": want.contiguous(), "clip_g": vectors(3, 1, 48).to(dtype)}, tmp_path / "sdxl.safetensors")
    expected = want.float().numpy()
    np.testing.assert_array_equal(load_embedding(tmp_path / "a1111.pt").vectors[WIDTH], expected)
    np.testing.assert_array_equal(load_embedding(tmp_path / "diffusers.bin").vectors[WIDTH], expected[:1])
    np.testing.assert_array_equal(load_embedding(tmp_path / "kohya.safetensors").vectors[WIDTH], expected)
    sdxl = load_embedding(tmp_path / "sdxl.safetensors")
    assert sdxl.name == "sdxl" and sdxl.length == 3 and set(sdxl.vectors) == {WIDTH, 48}
    assert len(load_embedding(tmp_path / "a1111.pt").shorthash) == 12


class Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/sdrt-pwned",))


def test_pickled_code_is_refused_without_running(tmp_path):
    import os

    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"string_to_param": {"*": Exploit()}}))
    with pytest.raises(InvalidOption, match="refusing to load posix.system|refusing to load os.system"):
        load_embedding(path)
    assert not os.path.exists("/tmp/sdrt-pwned")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not a zip at all", "textual inversion file"),
        (b"\x80\x02}q\x00.", "textual inversion file"),  # a legacy (pre-zip) torch pickle
    ],
)
def test_bad_files_are_one_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(InvalidOption, match=message):
        load_embedding(path)
    with pytest.raises(InvalidOption, match="embedding"):
        load_embedding(tmp_path / "x.txt")
    with pytest.raises(InvalidOption, match="embeddings"):
        EmbeddingDB().load_dir(tmp_path / "missing")


@pytest.fixture(scope="module")
def ti_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("embeddings")
    write_a1111(folder / "mycat.pt", vectors(3, seed=5))
    torch.save({"<sparkle>": vectors(1, seed=6)[0]}, folder / "sparkle.bin")
    return folder


@pytest.fixture(scope="module")
def ti_pipeline(tiny_sd, ti_files):
    from sdrt import Pipeline

    return Pipeline.load(tiny_sd[1], embeddings=ti_files)


def diffusers_with_embeddings(pipe, folder):
    from diffusers import EulerDiscreteScheduler

    components = {**pipe.components, "text_encoder": copy.deepcopy(pipe.text_encoder)}
    components["tokenizer"] = copy.deepcopy(pipe.tokenizer)
    components["scheduler"] = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    ref = pipe.__class__(**components)
    ref.set_progress_bar_config(disable=True)
    ref.load_textual_inversion(str(folder / "mycat.pt"), token="mycat")
    ref.load_textual_inversion(str(folder / "sparkle.bin"), token="sparkle")
    return ref


def test_embedding_parity_with_diffusers(tiny_sd, ti_files, ti_pipeline):
    pipe, _ = tiny_sd
    ref = diffusers_with_embeddings(pipe, ti_files)
    prompt = "a photo of mycat, sparkle"
    kwargs = dict(height=64, width=64, guidance_scale=7.0, num_inference_steps=5, output_type="latent")
    want = ref(prompt, generator=torch.Generator().manual_seed(2), **kwargs).images.numpy()
    ours = dict(width=64, height=64, cfg_scale=7.0, steps=5, seed=2, output_type="latent", progress=False)
    got = ti_pipeline.generate(prompt, **ours)
    assert np.abs(got - want).max() <= 2e-3
    plain = ti_pipeline.__class__.load(tiny_sd[1]).generate(prompt, **ours)  # no embeddings: the words as text
    assert np.abs(plain - want).max() > 0.02
    assert (
        np.abs(
            ti_pipeline.generate("embedding:mycat.pt, sparkle", **ours) - ti_pipeline.generate("mycat, sparkle", **ours)
        ).max()
        == 0
    )


def test_embedding_vectors_reach_the_encoder(ti_pipeline):
    encoder = ti_pipeline.conditioner.encoders[0]
    from sdrt.runtime.conditioning import chunk_prompt

    chunk = chunk_prompt("a mycat", encoder.tokenizer, ti_pipeline.embeddings)[0][0]
    n_a = len(encoder.tokenizer.encode("a"))
    assert chunk.ids[1 + n_a : 4 + n_a] == [0, 0, 0] and chunk.fixes[0][0] == n_a
    embeds, _ = encoder.embed([chunk])
    np.testing.assert_array_equal(embeds[0, 1 + n_a : 4 + n_a], vectors(3, seed=5).numpy())


def test_infotext_records_ti_hashes(ti_pipeline):
    image = ti_pipeline.generate("mycat", width=64, height=64, steps=1, seed=1, progress=False)[0]
    shorthash = ti_pipeline.embeddings.by_name["mycat"].shorthash
    assert f'TI hashes: "mycat: {shorthash}"' in image.info["parameters"]


def test_unknown_explicit_embedding_is_a_clear_error(ti_pipeline):
    with pytest.raises(InvalidOption, match="embedding:nothere.*mycat, sparkle"):
        ti_pipeline.generate("a embedding:nothere cat", width=64, height=64, steps=1, progress=False)
