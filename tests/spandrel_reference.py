"""The spandrel reference worker: runs in the separate spandrel venv (benchmarks/make-spandrel-venv.sh,
$SDRT_SPANDREL_PYTHON), never in sdrt's own environment. `python spandrel_reference.py JOB.json` reads a job
{"make": [{"key", "architecture", "kwargs", "file"}], "models": [{"key", "file", "official", "inputs": [.npy, ...],
"outputs": [.npy, ...]}], "result": .json}. It first builds each tiny random net of "make" from spandrel's own module
(architectures sdrt has no module for: DAT, OmniSR, SPAN) and saves its state dict. Then, for each model file, it
has spandrel load it (its restricted unpickler and `ModelLoader().load_from_state_dict`), writes what
spandrel detected, runs spandrel's torch module on each input (float32 NCHW in [0, 1]) and saves the outputs.

The tiny test files hold placeholders (zeros of the right shapes) for the size-dependent buffers that official
SwinIR/Swin2SR/HAT files carry (attention masks, position indices, coordinate tables): sdrt rebuilds those and ignores
the file's, spandrel loads them as they are. So the worker first fills each placeholder with the value spandrel's own
module computes for it (the official code's formula: spandrel carries the official modules), and saves that completed
state dict as `official` (.safetensors): the file an official training run would have written, which sdrt exports.

Only torch, spandrel, numpy and safetensors are imported here: nothing of sdrt.
"""

import importlib
import json
import sys

import numpy as np
import spandrel
import torch
from safetensors.torch import save_file

# the size-dependent buffers of SwinIR/Swin2SR/HAT files (name endings)
BUFFERS = ("attn_mask", "relative_position_index", "relative_position_index_SA", "relative_position_index_OCA",
           "relative_coords_table")


def official_buffers(state: dict) -> dict:
    """STATE with its size-dependent buffers as an official file holds them: each placeholder (all zeros) or missing
    one is the value spandrel's freshly built module computes (a first, non-strict load only to build it)."""
    built = {}
    original = torch.nn.Module.load_state_dict

    def capture(module, sd, *args, **kwargs):  # spandrel builds the module, then loads the file into it
        built.update({k: v.clone() for k, v in module.state_dict().items() if k.endswith(BUFFERS)})
        return original(module, sd, strict=False)

    torch.nn.Module.load_state_dict = capture
    try:
        spandrel.ModelLoader().load_from_state_dict(dict(state))
    finally:
        torch.nn.Module.load_state_dict = original
    completed = {k: (built[k] if k in built and not v.any() else v) for k, v in state.items()}
    return completed | {k: v for k, v in built.items() if k not in state}


def run_model(job: dict) -> dict:
    """One model of the job: detection facts, outputs written next to the inputs."""
    state = spandrel.ModelLoader().load_state_dict_from_file(job["file"])  # restricted unpickler, params_ema
    state = official_buffers(state)
    save_file({k: v.contiguous() for k, v in state.items()}, job["official"])
    descriptor = spandrel.ModelLoader().load_from_state_dict(state)
    model = descriptor.model.eval()
    for source, target in zip(job["inputs"], job["outputs"], strict=True):
        x = torch.from_numpy(np.load(source))
        with torch.no_grad():
            np.save(target, model(x).float().numpy())
    return {
        "key": job["key"],
        "architecture_id": descriptor.architecture.id,
        "architecture_name": descriptor.architecture.name,
        "scale": descriptor.scale,
        "in_channels": descriptor.input_channels,
        "out_channels": descriptor.output_channels,
        "size_multiple": descriptor.size_requirements.multiple_of,
        "purpose": descriptor.purpose,
    }


def make_tiny(spec: dict) -> None:
    """Save the state dict of spandrel's ARCHITECTURE module built with KWARGS, random (seed 0; biases + 0.3 so that
    outputs span [0, 1] as in tiny_upscalers.py)."""
    module = importlib.import_module(f"spandrel.architectures.{spec['architecture']}")
    torch.manual_seed(0)
    model = getattr(module, spec["architecture"])(**spec["kwargs"]).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(0.3)
    torch.save(model.state_dict(), spec["file"])
    if spec.get("flipped"):  # the can-fail twin: the first convolution's kernels flipped left-right
        state = model.state_dict()
        first = next(k for k, v in state.items() if k.endswith("weight") and v.ndim == 4)
        torch.save(state | {first: state[first].flip(-1).contiguous()}, spec["flipped"])


def main(job_file: str) -> None:
    job = json.loads(open(job_file).read())
    for spec in job.get("make", []):
        make_tiny(spec)
    results = {"spandrel": spandrel.__version__, "torch": torch.__version__, "models": []}
    for model_job in job["models"]:
        try:
            results["models"].append(run_model(model_job))
        except Exception as e:  # noqa: BLE001 - reported per model, the test names it
            results["models"].append({"key": model_job["key"], "error": f"{type(e).__name__}: {e}"})
    with open(job["result"], "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
