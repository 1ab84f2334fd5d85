"""Prompt conditioning as A1111 builds it: the exported text encoder, 75-token chunks, emphasis, CLIP skip, padding.

References are computed here with transformers' CLIPTextModel on the tiny model's weights; tolerance 1e-5
(float32, different kernels).
"""

import numpy as np
import pytest
import torch

from sdrt.runtime.conditioning import CHUNK_TOKENS, apply_emphasis, chunk_prompt
from sdrt.runtime.embeddings import EmbeddingDB
from sdrt.runtime.errors import InvalidOption

TOL = 1e-5


def hf_hidden(pipe, ids: np.ndarray):
    """transformers' outputs for a batch of (N, 77) ids: (hidden_states tuple, last_hidden_state, pooler_output)."""
    with torch.no_grad():
        out = pipe.text_encoder(torch.from_numpy(ids), output_hidden_states=True)
    return [h.numpy() for h in out.hidden_states], out.last_hidden_state.numpy(), out.pooler_output.numpy()


def test_exported_text_encoder_matches_transformers(tiny_sd, tiny_pipeline):
    pipe, _ = tiny_sd
    encoder = tiny_pipeline.conditioner.encoders[0]
    chunks = [chunk_prompt(t, encoder.tokenizer, EmbeddingDB())[0][0] for t in ("a red cat", "a dog, photo")]
    embeds, eos = encoder.embed(chunks)
    out = encoder.engine.run({"inputs_embeds": embeds, "eos_index": eos})
    hidden, last, pooled = hf_hidden(pipe, np.array([c.ids for c in chunks]))
    assert out["hidden_states"].shape == (len(hidden), 2, 77, 32)
    for got, want in zip(out["hidden_states"], hidden, strict=True):
        np.testing.assert_allclose(got, want, atol=TOL)
    np.testing.assert_allclose(out["normed_hidden_states"][-1], last, atol=TOL)
    np.testing.assert_allclose(out["pooled"], pooled, atol=TOL)
    assert np.abs(out["normed_hidden_states"][-2] - last).max() > 0.1  # the layers really differ


def test_short_prompt_is_one_padded_chunk(tiny_pipeline):
    tok = tiny_pipeline.tokenizer
    chunks, count = chunk_prompt("a cat", tok, EmbeddingDB())
    ids = tok.encode("a cat")
    assert len(chunks) == 1 and count == len(ids)
    assert chunks[0].ids == [tok.bos_id, *ids, *[tok.eos_id] * (CHUNK_TOKENS - len(ids)), tok.eos_id]
    assert chunks[0].ids == tok(["a cat"])[0].tolist()  # the same as the plain (diffusers) tokenization


def test_long_prompt_chunks_and_comma_backtracking(tiny_pipeline):
    tok = tiny_pipeline.tokenizer
    a, b, comma = tok.encode("a")[0], tok.encode("b")[0], tok.vocab[",</w>"]
    # 70 tokens, a comma, then 10 more: at 75 tokens the comma is 5 back, so the 4 words after it move on
    chunks, _ = chunk_prompt("a " * 70 + ", " + "b " * 10, tok, EmbeddingDB())
    assert len(chunks) == 2 and all(len(c.ids) == 77 for c in chunks)
    assert chunks[0].ids[1:72] == [a] * 70 + [comma] and chunks[0].ids[72:] == [tok.eos_id] * 5
    assert chunks[1].ids[1:11] == [b] * 10
    # a comma 25 tokens back is too far (A1111's 20): the cut is at 75 tokens exactly
    chunks, _ = chunk_prompt("a " * 50 + ", " + "b " * 30, tok, EmbeddingDB())
    assert chunks[0].ids[1:76] == [a] * 50 + [comma] + [b] * 24 and chunks[1].ids[1:7] == [b] * 6


def test_break_starts_a_new_chunk(tiny_pipeline):
    tok = tiny_pipeline.tokenizer
    chunks, _ = chunk_prompt("a cat BREAK a dog", tok, EmbeddingDB())
    assert len(chunks) == 2
    assert chunks[0].ids[1:4] == tok.encode("a cat") + [tok.eos_id]
    assert chunks[1].ids[1:4] == tok.encode("a dog") + [tok.eos_id]
    assert len(chunk_prompt("a catBREAKdog", tok, EmbeddingDB())[0]) == 1  # BREAK only as a word


def test_weights_follow_the_parser(tiny_pipeline):
    tok = tiny_pipeline.tokenizer
    chunk = chunk_prompt("a (cat:1.5) [dog]", tok, EmbeddingDB())[0][0]
    n_a, n_cat, n_dog = (len(tok.encode(w)) for w in ("a", "cat", "dog"))
    weights = chunk.weights[1 : 1 + n_a + n_cat + n_dog]
    np.testing.assert_allclose(weights, [1.0] * n_a + [1.5] * n_cat + [1 / 1.1] * n_dog)
    none = chunk_prompt("a (cat:1.5)", tok, EmbeddingDB(), emphasis="None")[0][0]
    assert set(none.weights) == {1.0} and none.ids[1:] != chunk.ids[1:]  # brackets read as text


@pytest.mark.parametrize("emphasis", ["Original", "No norm"])
def test_emphasis_against_transformers(tiny_sd, tiny_pipeline, emphasis):
    pipe, _ = tiny_sd
    prompt = "a (red cat:1.6) on [[a mat]], (photo)"
    got = tiny_pipeline.conditioner.encode([prompt], emphasis=emphasis).context
    chunk = chunk_prompt(prompt, tiny_pipeline.tokenizer, EmbeddingDB())[0][0]
    _, z, _ = hf_hidden(pipe, np.array([chunk.ids]))
    w = np.array(chunk.weights, dtype=np.float32)[None, :, None]
    want = z * w
    if emphasis == "Original":
        want = want * (z.mean() / want.mean())
    np.testing.assert_allclose(got, want, atol=TOL)
    unweighted = tiny_pipeline.conditioner.encode([prompt], emphasis="None").context
    assert np.abs(got - want).max() < TOL < np.abs(unweighted - want).max() / 100  # the weights matter


def test_emphasis_original_restores_the_mean():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 77, 8)).astype(np.float32) + 0.3
    w = rng.uniform(0.5, 1.5, (2, 77)).astype(np.float32)
    out = apply_emphasis(z, w, "Original")
    assert out.mean() == pytest.approx(z.mean(), rel=1e-5)
    np.testing.assert_allclose(out / (z * w[:, :, None]), out[0, 0, 0] / (z[0, 0, 0] * w[0, 0]), rtol=1e-4)


def test_emphasis_without_weights_or_mean_stays_finite():
    z = np.zeros((1, 77, 8), np.float32)
    z[0, :, 0], z[0, :, 1] = 1.0, -1.0  # mean exactly 0, as behind a bias-free layer norm
    assert apply_emphasis(z, np.ones((1, 77), np.float32), "Original") is z  # A1111 rescales by exactly 1
    w = np.full((1, 77), 1.2, np.float32)
    out = apply_emphasis(z, w, "Original")
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, z * 1.2, rtol=1e-6)


def test_long_prompt_concatenates_chunk_encodings(tiny_sd, tiny_pipeline):
    pipe, _ = tiny_sd
    prompt = "a photo of a cat, " * 30  # about 180 tokens: 3 chunks
    enc = tiny_pipeline.conditioner.encode([prompt])
    chunks, _ = chunk_prompt(prompt, tiny_pipeline.tokenizer, EmbeddingDB())
    assert len(chunks) == 3 and enc.context.shape == (1, 3 * 77, 32)
    _, z, _ = hf_hidden(pipe, np.array([c.ids for c in chunks]))
    np.testing.assert_allclose(enc.context[0], z.reshape(3 * 77, 32), atol=TOL)


@pytest.mark.parametrize("clip_skip", [2, 3])
def test_clip_skip_is_penultimate_layer_through_final_norm(tiny_sd, tiny_pipeline, clip_skip):
    pipe, _ = tiny_sd
    enc = tiny_pipeline.conditioner.encode(["a red cat"], clip_skip=clip_skip)
    ids = tiny_pipeline.tokenizer(["a red cat"])
    hidden, last, _ = hf_hidden(pipe, ids)
    with torch.no_grad():
        want = pipe.text_encoder.final_layer_norm(torch.from_numpy(hidden[-clip_skip])).numpy()
    np.testing.assert_allclose(enc.context, want, atol=TOL)
    assert np.abs(enc.context - last).max() > 0.1


def diffusers_clip_skip_embeds(pipe, prompt: str, clip_skip: int) -> torch.Tensor:
    """diffusers' encode_prompt with clip_skip: hidden_states[-(clip_skip + 1)] through the final layer norm.

    diffusers 0.42 reaches that norm as text_encoder.text_model.final_layer_norm, which transformers 5's
    CLIPTextModel no longer has, so its own clip_skip path fails here; this is the same formula.
    """
    ids = torch.from_numpy(pipe.tokenizer([prompt], padding="max_length", max_length=77, return_tensors="np").input_ids)
    with torch.no_grad():
        hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states
        return pipe.text_encoder.final_layer_norm(hidden[-(clip_skip + 1)])


def test_clip_skip_parity_with_diffusers(tiny_sd, tiny_pipeline):
    """A1111's Clip skip 2 is diffusers' clip_skip=1: the same latents at the same seed; Clip skip 1 is not."""
    pipe, _ = tiny_sd
    from diffusers import EulerDiscreteScheduler

    kwargs = dict(num_inference_steps=6, guidance_scale=7.5, height=64, width=64, output_type="latent")
    euler = pipe.__class__(
        **{**pipe.components, "scheduler": EulerDiscreteScheduler.from_config(pipe.scheduler.config)}
    )
    euler.set_progress_bar_config(disable=True)
    want = euler(
        prompt_embeds=diffusers_clip_skip_embeds(pipe, "a red cat", 1),
        negative_prompt_embeds=diffusers_clip_skip_embeds(pipe, "a dog", 1),
        generator=torch.Generator("cpu").manual_seed(3),
        **kwargs,
    ).images.numpy()
    ours = dict(negative_prompt="a dog", steps=6, cfg_scale=7.5, width=64, height=64, seed=3, progress=False)
    got = tiny_pipeline.generate("a red cat", clip_skip=2, output_type="latent", **ours)
    assert np.abs(got - want).max() <= 2e-3
    wrong = tiny_pipeline.generate("a red cat", clip_skip=1, output_type="latent", **ours)
    assert np.abs(wrong - want).max() > 0.05


def test_cond_and_uncond_padded_with_the_empty_prompt(tiny_pipeline):
    from sdrt.runtime.options import make_options

    opts = make_options(
        tiny_pipeline.manifest, **_raw(prompt="a photo of a cat, " * 20, negative_prompt="blurry", cfg_scale=7.0)
    )
    text, notes = tiny_pipeline.encode_prompts(opts)
    context = text.at(0)["encoder_hidden_states"]  # (2, 154, C), uncond first
    assert context.shape == (2, 2 * 77, 32) and notes["Pad conds"] is True
    empty = tiny_pipeline.conditioner.empty()
    np.testing.assert_array_equal(context[0, 77:], empty[0])
    np.testing.assert_array_equal(context[0, :77], tiny_pipeline.conditioner.encode(["blurry"]).context[0])


def test_prompt_editing_switches_at_a1111_steps(tiny_pipeline):
    from sdrt.runtime.options import make_options

    opts = make_options(tiny_pipeline.manifest, **_raw(prompt="a [cat:dog:0.5] photo", steps=10, cfg_scale=1.0))
    text, _ = tiny_pipeline.encode_prompts(opts)
    cat = tiny_pipeline.conditioner.encode(["a cat photo"]).context
    dog = tiny_pipeline.conditioner.encode(["a dog photo"]).context
    assert text.ends == (5, 10)
    for call in range(12):
        want = cat if call <= 5 else dog
        np.testing.assert_allclose(text.at(call)["encoder_hidden_states"], want, atol=1e-6)


def test_prompt_editing_parity_with_diffusers_callback(tiny_sd, tiny_pipeline):
    """[a cat:a dog:5] over 10 Euler steps = diffusers switching prompt_embeds after its step index 5."""
    pipe, _ = tiny_sd
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    neg, cat = pipe.encode_prompt("a cat", "cpu", 1, True, "blurry")[1::-1]
    dog = pipe.encode_prompt("a dog", "cpu", 1, False)[0]

    def switch(p, i, t, tensors):
        return {"prompt_embeds": torch.cat([neg, dog])} if i == 5 else {}

    run = pipe.__class__(**{**pipe.components, "scheduler": scheduler})
    run.set_progress_bar_config(disable=True)
    out = run(
        prompt_embeds=cat,
        negative_prompt_embeds=neg,
        num_inference_steps=10,
        guidance_scale=7.0,
        height=64,
        width=64,
        generator=torch.Generator("cpu").manual_seed(11),
        callback_on_step_end=switch,
        callback_on_step_end_tensor_inputs=["prompt_embeds"],
        output_type="latent",
    )
    want = out.images.numpy()
    ours = dict(negative_prompt="blurry", steps=10, cfg_scale=7.0, width=64, height=64, seed=11, progress=False)
    got = tiny_pipeline.generate("[a cat:a dog:5]", output_type="latent", **ours)
    assert np.abs(got - want).max() <= 2e-3
    for when in (4, 6):  # switching one step early or late is detected (measured: 0.011 and 0.006)
        off_by_one = tiny_pipeline.generate(f"[a cat:a dog:{when}]", output_type="latent", **ours)
        assert np.abs(off_by_one - want).max() > 4e-3


def test_bad_prompt_options(tiny_pipeline):
    base = dict(steps=1, width=64, height=64, progress=False, seed=1)
    with pytest.raises(InvalidOption, match="clip_skip"):
        tiny_pipeline.generate("a cat", clip_skip=4, **base)  # the tiny encoder has 3 layers
    with pytest.raises(InvalidOption, match="clip_skip"):
        tiny_pipeline.generate("a cat", clip_skip=0, **base)
    with pytest.raises(InvalidOption, match="emphasis"):
        tiny_pipeline.generate("a cat", emphasis="loud", **base)
    with pytest.raises(InvalidOption, match="prompt.*at most"):
        tiny_pipeline.generate("a " * 15_000, **base)


def test_huge_malformed_and_control_character_prompts_run(tiny_pipeline):
    base = dict(steps=1, width=64, height=64, progress=False, seed=1, output_type="latent")
    long = "a photo of a (red:1.2) cat, " * 358  # 10,000 characters
    assert len(long) >= 10_000
    for prompt in (
        long,
        "((((a cat",
        "a [cat:dog",
        "a\x00\x07\x1b cat\r\n\t(x:)",
        "a (cat:1e999)",
        "]]]))[[((",
        "(" * 8000 + "x",
    ):
        assert tiny_pipeline.generate(prompt, **base).shape == (1, 4, 8, 8)


def _raw(**over) -> dict:
    raw = dict(
        prompt="a cat",
        negative_prompt="",
        width=64,
        height=64,
        steps=4,
        cfg_scale=7.0,
        sampler="Euler",
        scheduler="automatic",
        seed=1,
        batch_size=1,
        batch_count=1,
        rng="torch",
        output_type="pil",
    )
    return {**raw, **over}
