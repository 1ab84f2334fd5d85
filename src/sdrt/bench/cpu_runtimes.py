"""The runtimes `sdrt bench --device cpu` measures, which of them this machine can run, and their comparison.

sdrt: ONNX Runtime fp32 ("sdrt"), OpenVINO f32 and bf16 (bf16 only where the CPU has AVX512_BF16 or AMX);
peers: diffusers fp32 and optimum-intel's OVStableDiffusionPipeline at f32 and bf16 (from its own venv).
The OpenVINO runtimes compile cold (no model cache on disk), so their load times and peak RSS compare with
optimum-intel's; `sdrt_auto_cached` imports from OpenVINO's disk cache as a user's later runs do (fill it first).
"""

import json
from pathlib import Path

from sdrt.bench.common import gib, log, ratio, run_child

# name -> (worker stage, job fields, precision shown in the table)
CPU_RUNTIMES = {
    "sdrt": ("sdrt", {}, "fp32"),
    "sdrt_auto": ("sdrt", {"backend": "auto", "env": {"SDRT_NO_OV_CACHE": "1"}}, "auto"),  # what auto picks here
    # auto as a user's later runs: compiled models imported from OpenVINO's disk cache (filled by an earlier process)
    "sdrt_auto_cached": ("sdrt", {"backend": "auto"}, "auto"),
    "sdrt_openvino_f32": ("sdrt", {"backend": "openvino-f32", "env": {"SDRT_NO_OV_CACHE": "1"}}, "f32"),
    "sdrt_openvino_bf16": ("sdrt", {"backend": "openvino-bf16", "env": {"SDRT_NO_OV_CACHE": "1"}}, "bf16"),
    "diffusers": ("diffusers", {}, "fp32"),
    "optimum_intel_f32": ("optimum_intel", {"precision": "f32"}, "f32"),
    "optimum_intel_bf16": ("optimum_intel", {"precision": "bf16"}, "bf16"),
}
LABELS = {
    "sdrt": "sdrt, ONNX Runtime",
    "sdrt_auto": "sdrt, backend auto",
    "sdrt_auto_cached": "sdrt, backend auto, OpenVINO's cache warm",
    "sdrt_low_vram": "sdrt, ONNX Runtime, --low-vram",
    "sdrt_openvino_f32": "sdrt, OpenVINO",
    "sdrt_openvino_bf16": "sdrt, OpenVINO",
    "diffusers": "diffusers (PyTorch)",
    "optimum_intel_f32": "optimum-intel OVStableDiffusionPipeline",
    "optimum_intel_bf16": "optimum-intel OVStableDiffusionPipeline",
}


def why_not(name: str) -> str | None:
    """Why runtime NAME cannot run on this machine (None: it can)."""
    from sdrt.bench.optimum_peer import PEER_SCRIPT, peer_python
    from sdrt.engines.openvino import NO_BF16_REASON, cpu_has_bf16, openvino_available

    if "openvino" in name and not openvino_available():
        return "OpenVINO is not installed (pip install 'sdrt[openvino]')"
    if name.endswith("bf16") and not cpu_has_bf16():
        return NO_BF16_REASON
    if name.startswith("optimum_intel") and peer_python() is None:
        return f"no optimum-intel venv (make it with {PEER_SCRIPT}, or set SDRT_OVPEER_PYTHON)"
    return None


def prepare_optimum(model_dir: Path, job: dict, job_dir: Path) -> dict:
    """optimum-intel's own export of the diffusers folder (once; reused): its folder and the export's figures."""
    from sdrt.bench.optimum_peer import peer_python

    ov_dir, record = model_dir / "optimum-openvino", model_dir / "optimum-export.json"
    if (ov_dir / "model_index.json").is_file() and record.is_file():
        log(f"reusing optimum-intel's export {ov_dir}")
        return {"ov_dir": str(ov_dir), **json.loads(record.read_text()), "measured_in_this_run": False}
    log(f"exporting with optimum-intel to {ov_dir}")
    result, wall, peak = run_child("optimum_export", {**job, "ov_dir": str(ov_dir)}, job_dir, python=peer_python())
    exported = {"wall_s": wall, "peak_rss_bytes": peak, **result}
    record.write_text(json.dumps(exported, indent=2))
    log(f"optimum-intel export: {wall:.1f} s, peak RSS {gib(peak)}")
    return {"ov_dir": str(ov_dir), **exported, "measured_in_this_run": True}


def run_runtimes(names: list[str], job: dict, model_dir: Path, job_dir: Path) -> tuple[dict, dict, dict]:
    """Measure each runtime of NAMES in its own subprocess: ({name: result}, {name: why skipped}, peer export)."""
    from sdrt.bench.optimum_peer import peer_python
    from sdrt.engines.cpu_host import physical_cores

    measured, skipped, peer_export = {}, {}, None
    for name in names:
        reason = why_not(name)
        if reason:
            skipped[name] = reason
            log(f"{name}: skipped ({reason})")
            continue
        stage, extra, _ = CPU_RUNTIMES[name]
        python = None
        if stage == "optimum_intel":
            peer_export = peer_export or prepare_optimum(model_dir, job, job_dir)
            extra = {**extra, "ov_dir": peer_export["ov_dir"], "threads": physical_cores()}
            python = peer_python()
        log(f"{name}: starting its own subprocess")
        result, wall, peak = run_child(stage, {**job, **extra, "label": name}, job_dir, python=python)
        measured[name] = {**result, "process_wall_s": wall, "peak_rss_bytes": peak}
        log(f"{name}: done in {wall:.1f} s, peak RSS {gib(peak)}")
    return measured, skipped, peer_export


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio of two uint8 images in dB (inf when equal)."""
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def compare_runtimes(out_dir: Path, names: list[str]) -> dict:
    """Each runtime's image and UNet output against diffusers fp32's (and bf16 against the same engine's f32)."""
    import numpy as np

    def load(name, what):
        path = out_dir / f"{name}_{what}.npy"
        return np.load(path) if path.is_file() else None

    ref_image, ref_unet = load("diffusers", "image"), load("diffusers", "unet")
    compared = {}
    for name in names:
        image, unet = load(name, "image"), load(name, "unet")
        row = {}
        if image is not None and ref_image is not None and image.shape == ref_image.shape:
            diff = np.abs(image.astype(np.int16) - ref_image.astype(np.int16))
            row.update(image_max_abs_diff=int(diff.max()), image_psnr_db=psnr(image, ref_image))
        if unet is not None and ref_unet is not None and unet.shape == ref_unet.shape:
            row["unet_max_rel_error"] = float(np.abs(unet - ref_unet).max() / np.abs(ref_unet).max())
        f32 = name.replace("bf16", "f32")
        if name.endswith("bf16") and f32 in names and load(f32, "image") is not None and image is not None:
            row["image_psnr_vs_f32_db"] = psnr(image, load(f32, "image"))
            row["unet_max_rel_error_vs_f32"] = float(np.abs(unet - load(f32, "unet")).max() / np.abs(unet).max())
        compared[name] = row
    return compared


def runtimes_table(measured: dict, compared: dict, skipped: dict) -> str:
    """One row per runtime: precision, load, UNet call, txt2img, speed and peak RSS against diffusers fp32."""
    d = measured.get("diffusers")
    lines = [
        "| runtime | precision | load | UNet call (batch 2) | txt2img | speed vs diffusers fp32 | peak RSS "
        "| peak RSS vs diffusers | image vs diffusers fp32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in measured.items():
        precision = CPU_RUNTIMES.get(name, (None, None, "fp32"))[2]
        if precision == "auto":  # what auto picked: its backend and the UNet's precision
            unet = m.get("inference_precision", {})
            precision = f"{m['backend']}, {unet.get('unet', 'fp32') if isinstance(unet, dict) else unet}"
        speed = ratio(d["txt2img"]["median_s"], m["txt2img"]["median_s"]) if d else None
        rss = ratio(m["peak_rss_bytes"], d["peak_rss_bytes"]) if d else None
        c = compared.get(name, {})
        if name == "diffusers":
            quality = "reference"
        elif "image_max_abs_diff" in c:
            quality = f"max {c['image_max_abs_diff']}/255, PSNR {c['image_psnr_db']:.1f} dB"
            if "image_psnr_vs_f32_db" in c:
                quality += f" ({c['image_psnr_vs_f32_db']:.1f} dB vs its f32)"
        else:
            quality = "n/a"
        lines.append(
            f"| {LABELS.get(name, name)} | {precision} | {m['load_s']:.1f} s | {m['unet_step']['median_s']:.2f} s "
            f"| {m['txt2img']['median_s']:.2f} s | {'' if speed is None else f'{speed:.2f}x'} "
            f"| {gib(m['peak_rss_bytes'])} | {'' if rss is None else f'{rss:.2f}'} | {quality} |"
        )
    for name, reason in skipped.items():
        precision = CPU_RUNTIMES[name][2]
        lines.append(f"| {LABELS.get(name, name)} | {precision} | not run: {reason} | | | | | | |")
    return "\n".join(lines)
