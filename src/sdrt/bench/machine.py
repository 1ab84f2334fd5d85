"""The machine a benchmark runs on, as its results record it: CPU model and SIMD flags, cores, RAM, package versions
and sdrt's own version (from `git describe` in a source checkout)."""

import os
import platform
import re
import subprocess
import time
from importlib import metadata
from pathlib import Path

from sdrt.bench.common import REPO


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_flags() -> list[str]:
    """The SIMD extensions that decide fp32 conv/matmul speed, as /proc/cpuinfo lists them."""
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_fp16")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in flags]
    except OSError:
        pass
    return []


def physical_cores() -> int:
    """The thread count sdrt's ONNX Runtime engine uses; PyTorch gets the same."""
    from sdrt.engines.cpu_host import physical_cores as sdrt_physical_cores

    return sdrt_physical_cores()


def machine_slug(model: str, cores: int) -> str:
    """'Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz', 2 -> 'cpu-intel-xeon-platinum-8375c-2c'."""
    name = model.lower()
    name = re.sub(r"\((r|tm)\)", " ", name)
    name = re.sub(r"@.*$", " ", name)
    name = re.sub(r"\b\d+-core\b|\bprocessor\b|\bcpu\b|\bwith\b.*$", " ", name)
    name = re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "unknown"
    return f"cpu-{name}-{cores}c"


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def sdrt_version() -> str:
    """sdrt's version, from `git describe` in a source checkout (commit, and "-dirty" with local changes); a copy
    without .git (a GPU machine's) names its commit in SDRT_COMMIT."""
    from sdrt.version import __version__

    if os.environ.get("SDRT_COMMIT"):
        return f"{__version__}+g{os.environ['SDRT_COMMIT']}"
    try:
        described = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty", "--tags"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+g{described}" if described else __version__


def describe_machine() -> dict:
    import psutil

    model = cpu_model()
    cores = physical_cores()
    return {
        "slug": machine_slug(model, cores),
        "cpu_model": model,
        "cpu_flags": cpu_flags(),
        "physical_cores": cores,
        "logical_cpus": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_bytes": psutil.virtual_memory().total,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            **{name: package_version(name) for name in ("numpy", "onnxruntime", "torch", "diffusers", "transformers",
                                                         "onnx")},  # fmt: skip
            "sdrt": sdrt_version(),
        },
    }


def report_head(name: str, argv: list[str]) -> dict:
    """The first keys of a benchmark module's JSON report: its name, the date, this machine (describe_machine), and
    the command that measures it again (`python -m sdrt.bench.NAME ARGV...`)."""
    return {"benchmark": name, "date": time.strftime("%Y-%m-%d"), "machine": describe_machine(),
            "command": " ".join([f"python -m sdrt.bench.{name}", *argv])}  # fmt: skip
