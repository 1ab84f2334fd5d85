"""`sdrt bench`'s SD 3.5 and FLUX.1 cases: the full-size configs are the published architectures, and the tiny cases
go through the benchmark's own stages (build with random weights, `sdrt export`, the sdrt and diffusers workers)
with the same image on both sides (within 2/255) and the transformer call measured on each."""

import numpy as np
import pytest

from sdrt.bench.cases import CASES


def test_full_size_cases_are_the_published_architectures():
    sd35m, flux = CASES["sd35m"], CASES["flux-dev"]
    assert (sd35m.pipeline, flux.pipeline) == ("sd3", "flux")
    assert sd35m.unet_config["num_layers"] == 24 and sd35m.unet_config["dual_attention_layers"] == list(range(13))
    assert sd35m.unet_config["num_attention_heads"] * sd35m.unet_config["attention_head_dim"] == 1536
    assert (flux.unet_config["num_layers"], flux.unet_config["num_single_layers"]) == (19, 38)
    assert flux.text_configs["text_encoder_2"]["d_model"] == sd35m.text_configs["text_encoder_3"]["d_model"] == 4096
    assert (sd35m.gpu, flux.gpu) == ({"size": 1024, "steps": 28}, {"size": 1024, "steps": 28})
    assert "text_configs" in sd35m.configs() and "text_configs" not in CASES["sd15"].configs()


@pytest.mark.parametrize("name", ["small-sd3", "small-flux"])
def test_tiny_case_through_the_bench_stages(name, tmp_path):
    from sdrt.bench.common import base_job
    from sdrt.bench.cpu import worker_diffusers, worker_sdrt
    from sdrt.bench.random_model import worker_build, worker_export

    case = CASES[name]
    configs = case.configs()
    model_dir, out = tmp_path / name, tmp_path / "out"
    out.mkdir()
    built = worker_build({"diffusers_dir": str(model_dir / "diffusers"), "weights_seed": 0, **configs})
    assert built["parameters"]["unet"] > 0
    worker_export({"diffusers_dir": str(model_dir / "diffusers"), "onnx_dir": str(model_dir / "onnx")})
    args = type("Args", (), {"size": 64, "steps": 2, "runs": 1, "seed": 3})()
    job = base_job(args, configs, model_dir, model_dir / "onnx", out)
    ours, theirs = worker_sdrt(dict(job, label="sdrt")), worker_diffusers(job)
    assert ours["unet_step"]["median_s"] > 0 and theirs["unet_step"]["median_s"] > 0 and ours["images_repeatable"]
    image = np.load(out / "sdrt_image.npy").astype(int)
    assert np.abs(image - np.load(out / "diffusers_image.npy").astype(int)).max() <= 2  # the same generation
    denoised = np.load(out / "sdrt_unet.npy")
    assert np.abs(denoised - np.load(out / "diffusers_unet.npy")).max() <= 1e-3 * np.abs(denoised).max()


def test_gpu_check_takes_the_model_case(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    out = tmp_path / "check"
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}
    args = [script, "--dry-run", "--cpu-smoke", "--model", "small-flux", "--out", str(out)]
    run = subprocess.run(args, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert "--model small-flux" in (out / "plan.txt").read_text() and json.loads((out / "env.json").read_text())
    bad = subprocess.run([script, "--model"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--model needs a case name" in bad.stderr
