"""Pages of memory-mapped weight files given back to the page cache: what keeps an engine's weights held once.

OpenVINO and ONNX Runtime map weight files (ONNX external data, OpenVINO IR .bin files, OpenVINO's compiled-model
cache blobs) into the process and read them while they compile; every page read counts in the process's RSS for as
long as the mapping lives, and the compiled model keeps the mapping alive (OpenVINO's CPU plugin keeps its source
model) although it runs on its own re-laid copy of the weights. madvise(MADV_DONTNEED) on those read-only file
mappings drops the pages from the process (not from the page cache): RSS then holds the compiled copy alone, and a
page the engine does read again is faulted back in from the page cache, unchanged (the mapping is read-only and
backed by the file, so nothing can be lost). Linux only; elsewhere nothing is released.
"""

import ctypes
import os
import sys
import threading
from pathlib import Path

MADV_DONTNEED = 4  # <sys/mman.h> on Linux (every architecture)
RELEASE_INTERVAL_S = 0.2  # while a compile reads a weight file: how often its pages are dropped


def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_MADVISE = _madvise()


def trim_heap() -> None:
    """Give the C heap's free memory back to the system (glibc's malloc_trim): memory freed in many allocations under
    glibc's mmap threshold (an IR conversion's bf16 weights: 4.4 GiB for SDXL's UNet) otherwise stays in the process's
    RSS. Nothing off glibc."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def read_only_mappings(files) -> list[tuple[int, int]]:
    """(start, length) of this process's read-only mappings of FILES (paths), from /proc/self/maps. Matched by device
    and inode, so a mapping made through another name of the same file (a hard link, since removed) counts too."""
    wanted = set()
    for f in files:
        try:
            st = os.stat(f)
        except OSError:
            continue
        wanted.add((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino))
    regions = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) < 6 or "w" in parts[1] or parts[4] == "0":
                    continue
                major, minor = (int(x, 16) for x in parts[3].split(":"))
                if (major, minor, int(parts[4])) in wanted:
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    regions.append((start, end - start))
    except (OSError, ValueError):
        return []
    return regions


def release_pages(files) -> int:
    """Drop this process's pages of the read-only mappings of FILES; the number of mappings released."""
    if _MADVISE is None:
        return 0
    released = 0
    for start, length in read_only_mappings(files):
        if _MADVISE(start, length, MADV_DONTNEED) == 0:
            released += 1
    return released


class ReleasingPages:
    """`with ReleasingPages(files_of):` drops the pages of the weight files FILES_OF() names every
    RELEASE_INTERVAL_S while the block runs (a compile reading them), and once more at its end: the peak RSS of a
    compile is then its output, not its output plus its input. FILES_OF is called each time (cache blobs appear
    during the block)."""

    def __init__(self, files_of, interval: float = RELEASE_INTERVAL_S):
        self.files_of, self.interval = files_of, interval
        self._stop = threading.Event()
        self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            release_pages(self.files_of())

    def __enter__(self):
        if _MADVISE is not None:
            self._thread = threading.Thread(target=self._loop, name="sdrt-release-pages", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        release_pages(self.files_of())


def existing(paths) -> list[Path]:
    return [Path(p) for p in paths if Path(p).is_file()]
