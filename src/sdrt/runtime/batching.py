"""Several txt2img requests in one UNet batch, each image with its own prompt, negative prompt and seeds.

A request that runs alone draws image i's noise from its own generator (seed + i) and conditions it on its own
prompt; nothing about image i depends on the other images of its batch. So requests that share every other option
(model, size, steps, sampler, schedule, cfg, rng, ...) can share one UNet batch and give the same images as run
alone: the sampler works per image, the VAE decodes one image per call (Pipeline.decode).
"""

from dataclasses import dataclass, replace

import numpy as np

from sdrt.errors import InvalidOption
from sdrt.runtime.denoiser import TextConditioning
from sdrt.runtime.generation import Batch, prepare_run, run_batches
from sdrt.runtime.lora import parse_prompt
from sdrt.runtime.options import GenerationOptions, build_options, resolve
from sdrt.runtime.sampling import Progress

# Options that may differ between the requests of one batch; batch_key replaces them by these neutral values.
# batch_size varies too: each request brings its images.
PER_REQUEST = {"prompt": "", "negative_prompt": "", "seed": 0, "subseed": 0, "batch_size": 1}
CALL_ARGUMENTS = {"progress", "callback"}  # Pipeline.generate arguments that are not options (ignored here)


@dataclass(frozen=True)
class PerImageConditioning(TextConditioning):
    """A TextConditioning already laid out per image (uncond block first): repeat(B) checks B and returns it."""

    batch: int = 1

    def repeat(self, batch: int) -> TextConditioning:
        if batch != self.batch:
            raise ValueError(f"conditioning for {self.batch} images used for {batch}")
        return TextConditioning(self.ends, self.feeds, self.guided)


def batch_key(opts: GenerationOptions) -> GenerationOptions | None:
    """What requests must share to run in one UNet batch (hashable), or None for a request that runs alone
    (several batches, img2img / inpainting, given latents, latents out, an SDXL refiner)."""
    if opts.batch_count != 1 or opts.init_image is not None or opts.latents is not None or opts.hires:
        return None
    if opts.init_latents is not None:
        return None
    if opts.output_type != "pil" or opts.refiner is not None or opts.controlnets:
        return None
    if parse_prompt(opts.prompt)[1]:  # LoRAs change the weights for the whole UNet batch: such a request runs alone
        return None
    return replace(opts, **PER_REQUEST)


def options_of(pipe, kwargs: dict) -> GenerationOptions:
    """Pipeline.generate keyword arguments KWARGS (prompt included) as validated options, as generate makes them."""
    return resolve(build_options(**{k: v for k, v in kwargs.items() if k not in CALL_ARGUMENTS}), pipe.manifest)


def generate_batch(pipe, requests: list[dict], callback=None, progress: bool = False) -> list[list]:
    """REQUESTS (Pipeline.generate keyword arguments, prompt included) whose batch_key is the same, in UNet batches
    of all their images: returns each request's PIL images, the same as pipe.generate(**request) gives.

    Prompts whose conditioning lengths differ (more 75-token chunks) cannot share a batch: they go in one batch
    per length. `callback(step, total_steps, denoised)` as in Pipeline.generate, with denoised (B, C, h, w) for
    all the images of the batch running, requests in order; errors.Interrupted stops the run: the requests of the
    batches not finished get no images.
    """
    options = [options_of(pipe, kwargs) for kwargs in requests]
    keys = [batch_key(opts) for opts in options]
    if None in keys or any(key != keys[0] for key in keys):
        kinds = "a request that runs alone" if None in keys else "requests of other options"
        raise InvalidOption("batch", kinds, "txt2img requests that share batch_key")
    for opts in options:
        pipe.conditioner.check(opts.clip_skip, opts.emphasis)
    pipe.loras.apply([])  # none of these prompts has LoRAs: the base weights, whatever the last run merged
    encoded = [pipe.encode_prompts(opts) for opts in options]  # [(TextConditioning for one image, notes)]
    by_length: dict[int, list[int]] = {}
    for index, (text, _) in enumerate(encoded):
        by_length.setdefault(text.feeds[0]["encoder_hidden_states"].shape[1], []).append(index)
    batches = []
    for members in by_length.values():
        text = stack([encoded[i][0] for i in members], [options[i].batch_size for i in members])
        batches.append(Batch(
            [seed for i in members for seed in options[i].seeds],
            [subseed for i in members for subseed in options[i].subseeds],
            text,
            labels=[(options[i], encoded[i][1]) for i in members for _ in range(options[i].batch_size)],
        ))  # fmt: skip
    run = prepare_run(pipe.model, options[0])  # the options all requests share (batch_key)
    bar = Progress(len(batches) * options[0].steps_run, progress, callback)
    try:
        finished = run_batches(pipe.model, run, batches, bar)  # the batches of finished lengths keep their images
    finally:
        bar.close()
    results: list[list] = [[] for _ in requests]
    for members, images in zip(by_length.values(), finished, strict=False):  # interrupted: fewer finished
        for i in members:
            results[i], images = images[: options[i].batch_size], images[options[i].batch_size :]
    return results


def stack(texts: list[TextConditioning], counts: list[int]) -> PerImageConditioning:
    """Per-image conditionings (each for one image, uncond half first) -> one for sum(COUNTS) images, text i
    repeated counts[i] times: every array (2B or B, ...) holds all the uncond rows, then all the cond rows.

    Prompt editing switches at different calls per prompt: the result switches at every one of them, and gives
    each image at each call what its own conditioning gives it then."""
    guided = texts[0].guided
    ends = sorted({end for text in texts for end in text.ends})
    feeds = []
    for end in ends:
        per_text = [text.repeat(count).at(end) for text, count in zip(texts, counts, strict=True)]
        halves = [[np.split(f[name], 2) if guided else [f[name]] for f in per_text] for name in per_text[0]]
        feeds.append(
            {
                name: np.concatenate([part[h] for h in range(len(parts[0])) for part in parts])
                for name, parts in zip(per_text[0], halves, strict=True)
            }
        )
    return PerImageConditioning(tuple(ends), tuple(feeds), guided, batch=sum(counts))
