"""Requests batched into one UNet batch (runtime/batching.py) give, bit for bit, the images each gives alone."""

import numpy as np
import pytest

from sdrt.errors import Interrupted, InvalidOption
from sdrt.runtime import batching

SHARED = {"width": 64, "height": 64, "steps": 4, "cfg_scale": 6.0, "sampler": "Euler a", "rng": "gpu"}
LONG = " ".join(["a photo of a cat on a red chair"] * 12)  # two 75-token chunks: a longer conditioning
REQUESTS = [
    {"prompt": "a cat", "seed": 3, **SHARED},
    {"prompt": "a [dog:red chair:2] on grass", "negative_prompt": "blurry", "seed": 90, "batch_size": 2, **SHARED},
    {"prompt": "(a house:1.3) at night", "seed": 7, **SHARED},
    {"prompt": LONG, "seed": 11, **SHARED},
]


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def alone(pipe, request):
    return pipe.generate(**request, progress=False)


def test_batched_images_equal_each_request_alone(tiny_pipeline):
    """Different prompts (prompt editing, emphasis, a two-chunk prompt), negative prompts, seeds and batch sizes:
    each request's images and infotexts are those it gets alone, pixel for pixel (an ancestral sampler too)."""
    steps = []
    batched = batching.generate_batch(tiny_pipeline, REQUESTS, callback=lambda s, t, d: steps.append((s, t, len(d))))
    assert [len(images) for images in batched] == [1, 2, 1, 1]
    for request, images in zip(REQUESTS, batched, strict=True):
        reference = alone(tiny_pipeline, request)
        for got, want in zip(images, reference, strict=True):
            assert np.array_equal(pixels(got), pixels(want)), request["prompt"]
            assert got.info["parameters"] == want.info["parameters"]
    # one batch of the 4 one-chunk images, one of the long prompt's: 2 * 4 steps
    assert steps == [(s, 8, 4) for s in range(1, 5)] + [(s, 8, 1) for s in range(5, 9)]


def test_can_fail_twin_swapped_rows_differ(tiny_pipeline):
    """The bit identity can fail: conditioning stacked request by request (uncond and cond rows interleaved,
    not all uncond first) or seeds swapped between requests visibly change the images."""
    requests = REQUESTS[:3]
    reference = [alone(tiny_pipeline, r) for r in requests]
    options = [batching.options_of(tiny_pipeline, r) for r in requests]
    texts = [tiny_pipeline.encode_prompts(opts)[0].repeat(opts.batch_size) for opts in options]
    wrong = batching.PerImageConditioning(
        texts[0].ends[:1],
        ({"encoder_hidden_states": np.concatenate([t.at(0)["encoder_hidden_states"] for t in texts])},),
        True,
        batch=4,
    )
    original = batching.stack
    try:
        batching.stack = lambda texts, counts: wrong
        interleaved = batching.generate_batch(tiny_pipeline, requests)
    finally:
        batching.stack = original
    assert max(np.abs(pixels(a[0]) - pixels(b[0])).max() for a, b in zip(interleaved, reference, strict=True)) > 10
    swapped = [dict(requests[0], seed=7), requests[1], dict(requests[2], seed=3)]
    out = batching.generate_batch(tiny_pipeline, swapped)
    assert np.abs(pixels(out[0][0]) - pixels(reference[0][0])).max() > 10


def test_incompatible_requests_are_refused(tiny_pipeline):
    with pytest.raises(InvalidOption, match="requests of other options"):
        batching.generate_batch(tiny_pipeline, [REQUESTS[0], dict(REQUESTS[2], steps=5)])
    with pytest.raises(InvalidOption, match="a request that runs alone"):
        batching.generate_batch(tiny_pipeline, [dict(REQUESTS[0], batch_count=2)])
    with pytest.raises(InvalidOption, match="a request that runs alone"):
        batching.generate_batch(tiny_pipeline, [dict(REQUESTS[0], output_type="latent")])


def test_interrupt_keeps_finished_batches(tiny_pipeline):
    def stop_in_second_batch(step, total, denoised):
        if step == 6:
            raise Interrupted()

    out = batching.generate_batch(tiny_pipeline, REQUESTS, callback=stop_in_second_batch)
    assert [len(images) for images in out] == [1, 2, 1, 0]
