"""Which of spandrel's architectures `sdrt export-upscaler` exports through spandrel (see the upscalers guide).

Runs in the spandrel venv (benchmarks/make-spandrel-venv.sh) with sdrt's src on PYTHONPATH:

    PYTHONPATH=src /work/spandrel-venv/bin/python -m sdrt.bench.spandrel_survey OUT.json [ARCH ...]

For each single-image upscaler/restorer architecture spandrel registers (all by default), its module at its default
hyper-parameters with random weights is saved as a .pth, and `export_upscaler` runs on it in a subprocess of its
own (a crash or a hang is that architecture's result, 120 s at most; OUT is rewritten after each): exported or not,
why not, the graph's error against spandrel's module, parameters and seconds. Random weights: this checks the
export path (detection, tracing, the dynamic-size graph), not any published model's numbers.
"""

import importlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NOT_UPSCALERS = {"GFPGAN", "RestoreFormer", "CodeFormer", "LaMa", "MAT"}  # face restoration, inpainting
TIMEOUT_S = 120


def build_and_export(arch_id: str, folder: Path) -> dict:
    """In this process: spandrel's ARCH_ID module, default size, random -> .pth -> export_upscaler."""
    import spandrel
    import torch

    from sdrt.export.upscaler import export_upscaler

    support = next(s for s in spandrel.MAIN_REGISTRY.architectures() if s.architecture.id == arch_id)
    module = importlib.import_module(type(support.architecture).__module__)
    cls = next(getattr(module, n) for n in module.__all__ if not n.endswith("Arch"))
    torch.manual_seed(0)
    model = cls(**_required_arguments(cls)).eval()
    torch.save(model.state_dict(), folder / f"{arch_id}.pth")
    start = time.perf_counter()
    manifest = export_upscaler(folder / f"{arch_id}.pth", folder / "out")
    return {"architecture": manifest["architecture"], "loader": manifest["source"]["loader"],
            "scale": manifest["scale"], "size_multiple": manifest["size_multiple"],
            "minimum_size": manifest["minimum_size"], "verified_max_error": manifest["verified_max_error"],
            "parameters": sum(p.numel() for p in model.parameters()),
            "export_s": round(time.perf_counter() - start, 1)}  # fmt: skip


def _required_arguments(cls) -> dict:
    """Values for the constructor arguments without a default: channels 3, scale 4 (the rest are defaults)."""
    import inspect

    needed = [p.name for p in inspect.signature(cls).parameters.values()
              if p.default is inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD and p.name != "self"]  # fmt: skip
    return {name: 4 if "scale" in name else 3 for name in needed}


def survey(arch_ids: list[str], out: Path) -> list[dict]:
    import spandrel

    rows = []
    for arch_id in arch_ids:
        with tempfile.TemporaryDirectory() as tmp:
            command = [sys.executable, "-m", "sdrt.bench.spandrel_survey", "--one", arch_id, tmp]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
                result = Path(tmp, "result.json")
                row = json.loads(result.read_text()) if result.is_file() else {
                    "error": f"exit {done.returncode}: " + (done.stderr.strip().splitlines() or ["?"])[-1][:300]}
            except subprocess.TimeoutExpired:
                row = {"error": f"not done in {TIMEOUT_S} s"}
        rows.append({"spandrel_id": arch_id, "exported": "error" not in row, **row})
        print(json.dumps(rows[-1]), flush=True)
        out.write_text(json.dumps({"benchmark": "upscaler_spandrel_survey", "date": time.strftime("%Y-%m-%d"),
                                   "spandrel": spandrel.__version__, "rows": rows}, indent=2) + "\n")  # fmt: skip
    return rows


def main() -> None:
    if sys.argv[1] == "--one":  # the subprocess of one architecture
        arch_id, folder = sys.argv[2], Path(sys.argv[3])
        try:
            row = build_and_export(arch_id, folder)
        except Exception as e:  # noqa: BLE001 - the survey records why
            row = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"}
        (folder / "result.json").write_text(json.dumps(row))
        return
    import spandrel

    out = Path(sys.argv[1])
    ids = sys.argv[2:] or [s.architecture.id for s in spandrel.MAIN_REGISTRY.architectures()
                           if s.architecture.id not in NOT_UPSCALERS]  # fmt: skip
    survey(ids, out)


if __name__ == "__main__":
    main()
