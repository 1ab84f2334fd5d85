"""The CPU benchmark's OpenVINO peer: optimum-intel's OVStableDiffusionPipeline on the same diffusers weights,
converted by optimum-intel's own exporter (`optimum-cli export openvino --weight-format fp32`), static shapes.

optimum-intel pins other transformers/diffusers/huggingface_hub versions than sdrt's environment, so it runs from a
venv of its own: `benchmarks/make-ovpeer-venv.sh` (default /work/ovpeer-venv, or $SDRT_OVPEER_PYTHON's).
These workers run in that venv's Python with sdrt's source on PYTHONPATH; they import only the stdlib parts of
sdrt.bench.common.
"""

import os
import time
import warnings
from pathlib import Path

from sdrt.bench.common import (
    UNET_BATCH,
    log,
    measure,
    pipeline_txt2img,
    rss_now,
    unet_inputs,
)

DEFAULT_PEER_PYTHON = Path("/work/ovpeer-venv/bin/python")
PEER_SCRIPT = "benchmarks/make-ovpeer-venv.sh"


def peer_python() -> Path | None:
    """The optimum-intel venv's interpreter ($SDRT_OVPEER_PYTHON or DEFAULT_PEER_PYTHON), None if missing."""
    python = Path(os.environ.get("SDRT_OVPEER_PYTHON", DEFAULT_PEER_PYTHON))
    return python if python.is_file() else None


def worker_export(job: dict) -> dict:
    """The diffusers folder -> OpenVINO IR with optimum-intel's exporter, fp32 weights (its `--weight-format fp32`)."""
    from optimum.exporters.openvino import main_export
    from optimum.intel import OVConfig

    start = time.perf_counter()
    main_export(job["diffusers_dir"], job["ov_dir"], task="text-to-image", ov_config=OVConfig(dtype="fp32"))
    return {"export_call_s": time.perf_counter() - start}


def worker_run(job: dict) -> dict:
    """OVStableDiffusionPipeline: reshaped to the run's static shapes, compiled at the job's precision, Euler."""
    label = job["label"]
    start = time.perf_counter()
    import numpy as np
    import torch
    from diffusers import EulerDiscreteScheduler
    from optimum.intel import OVStableDiffusionPipeline

    import_s = time.perf_counter() - start
    warnings.filterwarnings("ignore")
    threads = job["threads"]
    torch.set_num_threads(threads)
    ov_config = {"INFERENCE_PRECISION_HINT": job["precision"], "PERFORMANCE_HINT": "LATENCY",
                 "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "CACHE_DIR": ""}  # fmt: skip
    log(f"{label}: loading {job['ov_dir']}")
    start = time.perf_counter()
    pipe = OVStableDiffusionPipeline.from_pretrained(job["ov_dir"], compile=False, ov_config=ov_config)
    pipe.reshape(batch_size=1, height=job["height"], width=job["width"], num_images_per_prompt=1)
    pipe.compile()
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - start
    log(f"{label}: loaded and compiled in {load_s:.1f} s")
    rss_after_load = rss_now()
    sample, timestep, context = unet_inputs(job)
    outputs = {}
    unet = pipe.unet.request  # the compiled UNet (static shapes: batch 2 under guidance)
    steps_shape = next(p.get_partial_shape().to_shape() for p in unet.inputs if p.get_any_name() == "timestep")
    feeds = {"sample": sample, "timestep": timestep[: steps_shape[0]] if len(steps_shape) else timestep[0],
             "encoder_hidden_states": context}  # its reshape gives the timestep shape (1,): one for the batch

    def unet_call():
        result = unet(feeds)
        outputs["unet"] = next(iter(result.values()))  # (B, C, h, w) float32

    log(f"{label}: UNet, batch {UNET_BATCH}, {job['width']}x{job['height']}")
    unet_stats = measure(f"{label} UNet", unet_call, job["runs"])
    np.save(Path(job["out_dir"]) / f"{label}_unet.npy", np.asarray(outputs["unet"]))
    images = []
    txt2img = pipeline_txt2img(pipe, job, images)
    log(f"{label}: txt2img {job['width']}x{job['height']}, {job['steps']} steps")
    e2e_stats = measure(f"{label} txt2img", txt2img, job["runs"])
    np.save(Path(job["out_dir"]) / f"{label}_image.npy", images[-1])
    return {
        "import_s": import_s,
        "load_s": load_s,
        "rss_after_load_bytes": rss_after_load,
        "threads": threads,
        "unet_step": unet_stats,
        "txt2img": e2e_stats,
        "images_repeatable": all(np.array_equal(im, images[0]) for im in images),
    }
