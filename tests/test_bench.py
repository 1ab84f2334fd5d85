"""`sdrt bench` on tiny configs only: argument checks, the sdrt measurement worker, tables, chart, GPU arithmetic."""

import json
from pathlib import Path

import numpy as np
import pytest

from sdrt.bench import build_parser, check_args
from sdrt.bench.cases import CASES
from sdrt.bench.chart import bar_chart
from sdrt.bench.cpu import low_vram_rows, markdown_table, worker_sdrt
from sdrt.bench.gpu import fp16_peak_tflops, gpu_slug, unet_utilisation
from sdrt.bench.gpu import markdown_table as gpu_table

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def parse(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def test_cases_registry_and_device_defaults():
    assert {"sd15", "small"} <= set(CASES)
    assert CASES["sd15"].unet_config["block_out_channels"] == [320, 640, 1280, 1280]
    assert (parse([]).size, parse([]).steps) == (256, 10)
    gpu = parse(["--device", "gpu"])
    assert (gpu.size, gpu.steps, gpu.batches) == (512, 50, "1,4,8")
    assert parse(["--small"]).model == "small"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "sd3"], "--model: got 'sd3'; allowed: sdxl, sd15, sd35m, flux-dev, small-sd3, small-flux, small"),
        (["--size", "100"], "--size: got 100; allowed: a positive multiple of 8"),
        (["--runs", "0"], "--runs: got 0; allowed: at least 1"),
        (["--batches", "1,x"], "--batches: got '1,x'"),
        (["--runtimes", "pytorch"], "--runtimes: got 'pytorch'"),
    ],
)
def test_bad_arguments_exit_2_naming_the_option(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_cli_bench_passes_its_arguments_on(capsys):
    from sdrt.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "--model", "nope"])
    assert e.value.code == 2 and "--model: got 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("low_vram", [False, True])
def test_sdrt_worker_measures_the_tiny_model(tiny_sd, tmp_path, low_vram):
    job = {
        "onnx_dir": str(tiny_sd[1]),
        "out_dir": str(tmp_path),
        "width": 64,
        "height": 64,
        "steps": 2,
        "runs": 1,
        "seed": 3,
        "latent_channels": 4,
        "context_dim": 32,
        "text_max_length": 77,
        "low_vram": low_vram,
        "label": "sdrt_low_vram" if low_vram else "sdrt",
    }
    result = worker_sdrt(job)
    assert result["unet_step"]["median_s"] > 0 and result["txt2img"]["median_s"] > 0
    assert result["images_repeatable"]
    image = np.load(tmp_path / f"{job['label']}_image.npy")
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8


def test_cpu_table_reads_the_committed_results_file():
    """The results format stays readable: the committed CPU result renders with the bench's table."""
    files = [p for p in RESULTS.glob("cpu-*.json") if not p.name.startswith("smoke-")]
    assert files
    for path in files:  # every committed CPU result (SD 1.5, SD 1.5 with --low-vram, SDXL)
        report = json.loads(path.read_text())
        table = markdown_table(report)
        assert table.splitlines()[0].startswith("| metric | sdrt") and "txt2img" in table
        assert bool(low_vram_rows(report)) == ("sdrt_low_vram" in report)
    report = json.loads(RESULTS.joinpath("cpu-intel-xeon-2c.json").read_text())
    low = dict(report, sdrt_low_vram={**report["sdrt"], "peak_rss_bytes": report["sdrt"]["peak_rss_bytes"] // 2})
    assert "0.50 of sdrt's" in low_vram_rows(low)[0]


def test_chart_is_a_png_sized_to_its_rows(tmp_path):
    image = bar_chart("t", [("a", 1.0, "s"), ("b", 2.5, "s"), ("c", None, "s")])
    assert image.size == (960, 60 + 34 * 3 + 20)
    image.save(tmp_path / "c.png")
    # the longest bar is the largest value's: count its coloured pixels on its row
    pixels = np.asarray(image)
    row_a, row_b = pixels[50 + 17], pixels[50 + 34 + 17]
    coloured = lambda row: int((np.abs(row.astype(int) - 255).sum(axis=1) > 60).sum())  # noqa: E731
    assert coloured(row_b) > 2 * coloured(row_a) * 0.9


def test_gpu_arithmetic():
    assert fp16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert fp16_peak_tflops("NVIDIA GeForce GTX 1080") is None
    assert gpu_slug("NVIDIA H100 80GB HBM3") == "gpu-nvidia-h100-80gb-hbm3"
    util = unet_utilisation(0.80, 512, 0.010, "NVIDIA A100-SXM4-80GB")  # 1.6 TFLOP in 10 ms
    assert util["tflops"] == pytest.approx(160.0) and util["fraction_of_fp16_peak"] == pytest.approx(160 / 312)
    assert unet_utilisation(0.80, 1024, 0.040, "x")["tflops"] == pytest.approx(160.0)  # 4x the area, 4x the time


def test_gpu_table_from_a_report():
    run = {
        "unet_step": {"it_per_s": 20.0, "median_s": 0.05},
        "unet_util": {"tflops": 32.0, "fraction_of_fp16_peak": 0.1},
        "txt2img": {"median_s": 1.5},
        "throughput": {"1": {"images_per_s": 0.6}},
        "peak_vram_bytes": 2**31,
        "engine_build_s": {"static batch 1": 100.0},
        "parity_max_abs_255": 3,
        "speedup_vs_diffusers": 2.0,
    }
    report = {"settings": {"width": 512, "height": 512, "steps": 50, "batches": [1]},
              "runtimes": {"sdrt_tensorrt": run, "diffusers": {**run, "engine_build_s": {}}}}  # fmt: skip
    table = gpu_table(report)
    assert table.splitlines()[0] == "| metric | diffusers | sdrt_tensorrt |"
    assert "| peak VRAM, whole run (NVML, above idle) | 2.00 GiB | 2.00 GiB |" in table
    assert "2.00x" in table and "static batch 1: 100 s" in table


def test_sdxl_case_feeds_the_unet_its_added_inputs():
    from sdrt.bench.cases import CASES
    from sdrt.bench.common import added_text_width, unet_added_inputs

    case = CASES["sdxl"]
    assert case.pipeline == "sdxl" and case.unet_config["addition_embed_type"] == "text_time"
    assert case.unet_config["projection_class_embeddings_input_dim"] == 6 * 256 + 1280
    width = added_text_width(case.unet_config)
    job = {"added_text_width": width, "seed": 1, "width": 512, "height": 384}
    added = unet_added_inputs(job)
    assert added["text_embeds"].shape == (2, 1280) and added["time_ids"][0].tolist() == [384, 512, 0, 0, 384, 512]
    assert added_text_width(CASES["sd15"].unet_config) is None
    assert unet_added_inputs({**job, "added_text_width": None}) == {}


def test_bench_modules_stay_small():
    """No module of sdrt.bench over 400 lines, no function over 80 (the project's limits), and no sys.path edits:
    benchmarks run as modules (`python -m sdrt.bench.NAME`)."""
    import ast

    package = Path(__file__).resolve().parents[1] / "src" / "sdrt" / "bench"
    too_long = []
    for path in sorted(package.glob("*.py")):
        source = path.read_text()
        if source.count("\n") > 400:
            too_long.append(f"{path.name}: {source.count(chr(10))} lines")
        assert "sys.path.insert" not in source and "sys.path.append" not in source, path.name
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 80:
                too_long.append(f"{path.name}: {node.name} {node.end_lineno - node.lineno + 1} lines")
    assert too_long == []
    assert not list((package.parents[2] / "benchmarks").glob("*.py"))  # one home for benchmark code


def test_runtime_comparison_uses_only_this_runs_images(tmp_path):
    """A bf16 runtime is compared with its f32 twin only when that twin ran in the same run: an earlier run's image
    (another size) left in the outputs folder is not a twin (it broke a 512 run after a 256 one)."""
    from sdrt.bench.cpu_runtimes import compare_runtimes

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    unet = rng.standard_normal((2, 4, 1, 1)).astype(np.float32)
    for name in ("diffusers", "optimum_intel_bf16"):
        np.save(tmp_path / f"{name}_image.npy", image)
        np.save(tmp_path / f"{name}_unet.npy", unet)
    np.save(tmp_path / "optimum_intel_f32_image.npy", image[:4, :4])  # stale: another size, not run now
    np.save(tmp_path / "optimum_intel_f32_unet.npy", unet[:1])
    alone = compare_runtimes(tmp_path, ["optimum_intel_bf16", "diffusers"])["optimum_intel_bf16"]
    assert alone["image_max_abs_diff"] == 0 and "image_psnr_vs_f32_db" not in alone
    np.save(tmp_path / "optimum_intel_f32_image.npy", image // 2)  # the twin of this run
    np.save(tmp_path / "optimum_intel_f32_unet.npy", unet * 2)
    both = compare_runtimes(tmp_path, ["optimum_intel_f32", "optimum_intel_bf16", "diffusers"])["optimum_intel_bf16"]
    assert both["image_psnr_vs_f32_db"] < 20 and both["unet_max_rel_error_vs_f32"] > 0.4
