"""Export's failures of the machine as one-line errors, and the disk space an export needs, known before it starts.

A full disk, a folder without write permission and an exhausted memory surface from torch, protobuf and the OS in
many forms (OSError with an errno, RuntimeError quoting one, MemoryError); `machine_faults` turns each into one
SdrtError naming the path and what was needed. `needed_bytes` estimates the export's size from the source's
parameter count (safetensors headers, without loading a weight), so `check_free_space` refuses plainly hopeless
exports before a minute of loading is spent.
"""

import contextlib
import errno
import json
import math
import shutil
import struct
from pathlib import Path

from sdrt.errors import SdrtError

EXPORT_BYTES = {"fp32": 4, "fp16": 2}  # bytes per parameter in the exported graphs
SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                     "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip
SKIPPED_PREFIXES = ("model_ema.",)  # EMA copies a checkpoint may carry: not exported
GRAPH_OVERHEAD = 1.1  # graphs, tokenizers and the manifest over the weights themselves
UNET_SHARE = 0.8  # of an SD checkpoint's parameters (SD 1.5: 860M of 1.07G; SDXL: 2.6G of 3.5G): the ControlNet variant
COMPONENTS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "controlnet")
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NO_PERMISSION = (errno.EACCES, errno.EPERM, errno.EROFS)
DISK_FULL_TEXT = ("no space left on device", "errno 28", "disk quota exceeded", "file too large")
NO_MEMORY_TEXT = ("can't allocate memory", "out of memory", "cannot allocate memory", "bad_alloc")


def size_text(n: float) -> str:
    """N bytes in GB (or MB below one GB)."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def safetensors_parameters(path: Path) -> int | None:
    """Parameters in a .safetensors file (EMA copies left out), from its header only; None if unreadable."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 << 20:
                return None
            header = json.loads(f.read(length))
        return sum(math.prod(t["shape"]) for k, t in header.items()
                   if k != "__metadata__" and not k.startswith(SKIPPED_PREFIXES))  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None


def file_parameters(path: Path) -> int:
    """Parameters of one weight file: counted for .safetensors; a lower bound (4 bytes each) for pickles."""
    counted = safetensors_parameters(path) if path.suffix == ".safetensors" else None
    return counted if counted is not None else path.stat().st_size // 4


def source_parameters(source: str) -> int | None:
    """Parameters of SOURCE (a single file, or a diffusers folder's components); None for a hub id."""
    path = Path(source)
    if path.is_file():
        return file_parameters(path)
    if not path.is_dir():
        return None
    total = 0
    for folder in [path / c for c in COMPONENTS if (path / c).is_dir()] or [path]:
        files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
        plain = [f for f in files if ".fp16." not in f.name]  # a variant beside the plain weights: counted once
        total += sum(file_parameters(f) for f in plain or files)
    return total or None


def needed_bytes(source: str, precision: str, unet_variant: bool = False) -> int | None:
    """Bytes the export of SOURCE writes at PRECISION (UNET_VARIANT: a second UNet graph, for ControlNet)."""
    params = source_parameters(source)
    if params is None:
        return None
    share = 1 + (UNET_SHARE if unet_variant else 0)
    return int(params * EXPORT_BYTES.get(precision, 4) * share * GRAPH_OVERHEAD)


def free_bytes(folder: Path) -> int | None:
    """Free space on the disk FOLDER is (or would be) on."""
    for existing in (folder, *folder.parents):
        if existing.exists():
            try:
                return shutil.disk_usage(existing).free
            except OSError:
                return None
    return None


def check_free_space(out_dir: Path, needed: int | None) -> None:
    """Refuse an export whose weights alone would not fit in the free space beside OUT_DIR (the estimate's margin
    aside: a borderline case is tried, and machine_faults reports it if it runs out)."""
    free = free_bytes(Path(out_dir).resolve().parent)
    if needed is None or free is None or free >= needed / GRAPH_OVERHEAD:
        return
    raise SdrtError(f"not enough disk space for {out_dir}: the export needs about {size_text(needed)} there, "
                    f"{size_text(free)} is free")  # fmt: skip


def _fault_kind(e: BaseException) -> str | None:
    if isinstance(e, MemoryError):
        return "memory"
    if isinstance(e, OSError) and e.errno in DISK_FULL:
        return "disk"
    if isinstance(e, OSError) and e.errno in NO_PERMISSION:
        return "permission"
    text = str(e).lower()
    if isinstance(e, (RuntimeError, OSError)) and any(t in text for t in DISK_FULL_TEXT):
        return "disk"
    if isinstance(e, RuntimeError) and any(t in text for t in NO_MEMORY_TEXT):
        return "memory"
    return None


@contextlib.contextmanager
def machine_faults(out_dir: Path, needed: int | None, what: str = "the export"):
    """Inside the block: a full disk, a permission refused or memory exhausted becomes one SdrtError naming the path
    and what WHAT needed (NEEDED bytes on disk, if known)."""
    try:
        yield
    except (OSError, RuntimeError, MemoryError) as e:
        kind = _fault_kind(e)
        if kind is None:
            raise
        path = getattr(e, "filename", None) or out_dir
        size = f"about {size_text(needed)}" if needed else "more space"
        free = free_bytes(Path(out_dir).resolve().parent)
        if kind == "disk":
            message = (f"disk full writing {path}: {what} needs {size} beside {out_dir}"
                       + (f", {size_text(free)} is free now" if free is not None else ""))  # fmt: skip
        elif kind == "permission":
            message = f"cannot write {path}: {getattr(e, 'strerror', None) or e} (choose a folder you can write)"
        else:
            weights = f" (its weights are about {size_text(needed / GRAPH_OVERHEAD)} in the export's precision)"
            message = (f"out of memory during {what} to {out_dir}{weights if needed else ''}: close other programs "
                       "or add memory or swap")  # fmt: skip
        raise SdrtError(message) from None
