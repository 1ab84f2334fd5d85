"""SD 1.x/2.x export plan: a diffusers pipeline (any source), detected, as the driver's parts and facts."""

from sdrt.export import driver

FAMILIES = ("sd1", "sd2")  # the manifest families this plan writes


def denoiser_step(source, manifest, original_config=None, config=None):
    """(source sha256, the UNet's ModelStep) of SOURCE, the checkpoint MANIFEST's model was exported from
    (export/controlnet.py rebuilds the UNet with residual inputs from it)."""
    from sdrt.export.sources import load_source
    from sdrt.export.steps import model_steps

    loaded = load_source(source, original_config, config)
    return loaded.sha256, next(step for step in model_steps(loaded.pipe) if step.spec.name == "unet")


def claims(source: str, checkpoint) -> bool:
    """The export registry's question: SD 1.x/2.x is what any other checkpoint is taken for (detect.py tells which,
    and refuses what neither is): the registry's last entry."""
    return True


def sd_plan(source, precision: str, original_config, config, vae_option) -> driver.ExportPlan:
    """The plan of an SD 1.x/2.x model: text encoder, UNet, VAE decoder and encoder, then the tokenizer."""
    from sdrt.export.detect import detect
    from sdrt.export.sources import load_source
    from sdrt.export.steps import model_steps
    from sdrt.export.vae import check_vae, load_vae

    loaded = load_source(source, original_config, config)
    pipe = loaded.pipe
    if vae_option is not None:
        pipe.vae = load_vae(vae_option)
        check_vae(pipe.vae, pipe.unet.config.out_channels, vae_option)
    detected = detect(pipe, loaded.checkpoint, loaded.user_config, original_config)
    steps = model_steps(pipe)

    def facts() -> dict:
        return {
            "family": detected.family.value,
            "scheduler": driver.scheduler_config(pipe.scheduler.config),
            **driver.vae_facts(pipe.vae.config, pipe.vae_scale_factor),
            **driver.detected_facts(detected),
            "text_max_length": int(pipe.text_encoder.config.max_position_embeddings),
            "text_hidden_size": int(pipe.text_encoder.config.hidden_size),
            **driver.source_facts(loaded.kind, loaded.name, loaded.sha256, vae_option),
        }

    parts = [*steps, driver.Tokenizer("tokenizer", pipe.tokenizer)]
    return driver.ExportPlan(detected.describe(), parts, len(steps), facts)


plan = sd_plan  # the export registry's entry point
