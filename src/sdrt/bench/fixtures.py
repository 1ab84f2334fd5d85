"""Random-weight pipelines' shared parts, for the benchmark's full-size builds and the tests' tiny models: the
published SD 1.5 and SDXL scheduler configs, a tiny CLIP BPE vocabulary written offline, and the pipeline assembly.
Imports diffusers and transformers lazily (the export extra)."""

import json
from pathlib import Path

# Printable ASCII words the tiny vocabulary learns merges for, so prompts tokenize into several BPE pieces.
CORPUS_WORDS = ["a", "an", "the", "grey", "squirrel", "cat", "photo", "of", "in", "red", "blue", "sky", "dog"]

SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
# The same, as keyword arguments for any diffusers scheduler class (tests build schedulers from it).
SD15_SCHEDULER_KWARGS = {
    k: v for k, v in SD15_SCHEDULER.items() if k not in ("_class_name", "skip_prk_steps", "trained_betas")
}


def assemble_pipeline(unet, vae, text_encoder, tokenizer, scheduler_config: dict):
    """An SD 1.x/2.x StableDiffusionPipeline from its parts, PNDM-configured and without a safety checker."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler.from_config(scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def byte_chars() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: the 256 printable stand-ins for bytes, in CLIP's order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> int:
    """Write vocab.json/merges.txt with byte tokens plus merges for CORPUS_WORDS; returns the vocab size."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = byte_chars()
    vocab_list = chars + [c + "</w>" for c in chars]
    merges = []
    for word in CORPUS_WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            if (pieces[0], pieces[1]) not in merges:
                merges.append((pieces[0], pieces[1]))
                if merged not in vocab_list:
                    vocab_list.append(merged)
            pieces = [merged] + pieces[2:]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return len(vocab)


# stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0 scheduler/scheduler_config.json (as published).
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
