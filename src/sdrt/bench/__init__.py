"""`sdrt bench`: sdrt against diffusers, side by side, in one run, on identical random full-size weights.

    sdrt bench                               # CPU: SD 1.5, 256x256, 10 steps, median of 3
    sdrt bench --low-vram                    # CPU: also sdrt with engines staged one at a time (peak RSS)
    sdrt bench --runtimes sdrt,sdrt_openvino_f32,diffusers  # CPU: a subset (default: ORT, OpenVINO f32/bf16,
                                             # diffusers, optimum-intel f32/bf16: those this machine can run)
    sdrt bench --device gpu                  # GPU: ORT CUDA (fp16, fused, static + CUDA graphs), diffusers, 512x512
    sdrt bench --cpu-smoke --model small     # the GPU driver's stages on the CPU (benchmarks/gpu_check.sh --cpu-smoke)
    sdrt bench --model small --workdir /tmp/b  # tiny random models: a smoke test of the benchmark itself

Needs a source checkout with the `export` and `test` extras (torch, diffusers, transformers, onnx, psutil); the
GPU mode also `gpu` and `tensorrt`. Model cases live in cases.py (add SDXL there).
"""

import argparse
import json
import sys
from pathlib import Path

from sdrt.bench.cases import CASES

LATENT_DOWNSAMPLE = 8


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sdrt bench", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"), help="cpu (default) or gpu")
    p.add_argument("--model", default="sd15", help=f"model case: {', '.join(CASES)}")
    p.add_argument("--small", action="store_true", help="same as --model small")
    p.add_argument("--size", type=int, help="image width = height (default: the case's, per device)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the case's, per device)")
    p.add_argument("--runs", type=int, default=3, help="timed runs after one warm-up; the median is reported")
    p.add_argument("--seed", type=int, default=1234, help="generation seed, the same for every runtime")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/sdrt-bench"), help="model folders (reused)")
    p.add_argument("--rebuild", action="store_true", help="build and export the model again")
    p.add_argument("--output", type=Path, help="JSON path (default benchmarks/results/<machine>.json)")
    p.add_argument("--low-vram", action="store_true", help="CPU: also measure sdrt with staged engines")
    p.add_argument("--batches", default="1,4,8", help="GPU: batch sizes for images/s (default 1,4,8)")
    p.add_argument("--runtimes", help="GPU: subset of sdrt_cuda,sdrt_cuda_fused,sdrt_cuda_static,diffusers,"
                   "diffusers_fp32,diffusers_compile,sdrt_tensorrt,sdrt_tensorrt_low_vram (default: all but TensorRT); "
                   "CPU: of sdrt,sdrt_auto,sdrt_openvino_f32,sdrt_openvino_bf16,diffusers,optimum_intel_f32,"
                   "optimum_intel_bf16 (default: all this machine can run), sdrt_auto_cached (OpenVINO's disk cache "
                   "filled first)")  # fmt: skip
    p.add_argument("--vram-budget", default="2GB", help="GPU: sdrt_tensorrt_low_vram's budget (default 2GB)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="GPU driver on the CPU (CPU provider, PyTorch on the CPU): a test of the stages, no figures")
    p.add_argument("--stage-timeout", type=float, default=300, help="GPU: seconds each stage may take (default 300)")
    p.add_argument("--no-peak-batch1", dest="peak_batch1", action="store_false",
                   help="GPU: skip the batch-1 peak VRAM processes")
    p.add_argument("--no-graph-parity", dest="graph_parity", action="store_false",
                   help="GPU: skip the per-graph comparison with PyTorch fp32")
    p.add_argument("--worker", nargs=2, metavar=("STAGE", "JOB"), help=argparse.SUPPRESS)
    return p


def check_args(parser, args) -> None:
    """Bad input: one line naming the option, the value and what is allowed (exit 2, argparse's convention)."""
    if args.small:
        args.model = "small"
    if args.model not in CASES:
        parser.error(f"--model: got {args.model!r}; allowed: {', '.join(CASES)}")
    case = CASES[args.model]
    if args.cpu_smoke:
        args.device = "gpu"  # the GPU driver, run on the CPU
    if args.stage_timeout <= 0:
        parser.error(f"--stage-timeout: got {args.stage_timeout}; allowed: a positive number of seconds")
    defaults = case.gpu if args.device == "gpu" else case.cpu
    args.size = defaults["size"] if args.size is None else args.size
    args.steps = defaults["steps"] if args.steps is None else args.steps
    if args.size <= 0 or args.size % LATENT_DOWNSAMPLE:
        parser.error(f"--size: got {args.size}; allowed: a positive multiple of {LATENT_DOWNSAMPLE}")
    for name in ("steps", "runs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: got {getattr(args, name)}; allowed: at least 1")
    if not all(b.strip().isdigit() and int(b) > 0 for b in args.batches.split(",")):
        parser.error(f"--batches: got {args.batches!r}; allowed: comma-separated positive integers")
    if args.runtimes:
        if args.device == "gpu":
            from sdrt.bench.gpu import RUNTIMES
        else:
            from sdrt.bench.cpu_runtimes import CPU_RUNTIMES as RUNTIMES

        bad = [r for r in args.runtimes.split(",") if r not in RUNTIMES]
        if bad:
            parser.error(f"--runtimes: got {bad[0]!r}; allowed: {', '.join(RUNTIMES)}")


def run_worker(stage: str, job_file: str) -> None:
    """One measurement stage in this (sub)process: reads the job, writes the result file."""
    from sdrt.bench import cpu, random_model

    workers = {"build": random_model.worker_build, "export": random_model.worker_export, "sdrt": cpu.sdrt_worker,
               "diffusers": cpu.diffusers_worker}  # fmt: skip
    if stage.startswith("optimum"):  # runs in the optimum-intel venv (optimum_peer.py)
        from sdrt.bench import optimum_peer

        workers.update(optimum_export=optimum_peer.worker_export, optimum_intel=optimum_peer.worker_run)
    if stage.endswith("_gpu"):
        from sdrt.bench import gpu_workers

        workers.update(sdrt_gpu=gpu_workers.worker_sdrt_gpu, diffusers_gpu=gpu_workers.worker_diffusers_gpu,
                       graph_parity_gpu=gpu_workers.worker_graph_parity)  # fmt: skip
    if stage == "optimize":
        from sdrt.bench import gpu_workers

        workers["optimize"] = gpu_workers.worker_optimize
    job = json.loads(Path(job_file).read_text())
    result = workers[stage](job)
    Path(job["result_file"]).write_text(json.dumps(result, indent=2))


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(*args.worker)
        return 0
    check_args(parser, args)
    case = CASES[args.model]
    if args.device == "gpu" or args.cpu_smoke:
        from sdrt.bench.gpu import run_gpu

        return run_gpu(args, case)
    from sdrt.bench.cpu import run_cpu

    return run_cpu(args, case)


if __name__ == "__main__":
    sys.exit(main())
