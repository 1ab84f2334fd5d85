"""What the CPU is, as the engines need it: its cores (threads to use) and feature flags (cache keys)."""

import hashlib
import os
import platform


def cpu_signature() -> str:
    """Machine type and CPU feature flags: what an optimised ONNX Runtime CPU graph depends on."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return platform.machine() + ":" + hashlib.sha256(flags.encode()).hexdigest()[:12]


def physical_cores() -> int:
    """Cores to use for intra-op threads: hyperthreads slow convolutions down more than they help."""
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1
