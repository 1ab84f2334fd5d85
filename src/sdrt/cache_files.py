"""Cache entries that several sdrt processes share: made once under a per-entry OS lock, published whole.

An entry is a folder (an exported model, an optimised graph) or a file (a TensorRT plan, an OpenVINO blob):
- it is made in a private temporary beside it (`.NAME.tmp-*`) and appears by one atomic rename, so no process
  ever reads half of it;
- a folder is complete only when its marker (`.sdrt-complete.json`, written last: each file and its size) is
  there and every file it lists has that size (a truncated or missing file makes it incomplete);
- makers hold the entry's lock (`.NAME.lock`, an OS lock: released by the kernel when a process dies, SIGKILL
  included); a second process waits, saying so once, then uses what the first made;
- whoever holds the lock removes the temporaries a killed maker left and discards an incomplete entry first.
"""

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

MARKER = ".sdrt-complete.json"


def lock_path(entry: Path) -> Path:
    return entry.parent / f".{entry.name}.lock"


@contextlib.contextmanager
def entry_lock(entry: Path, doing: str):
    """Hold ENTRY's lock for the block; if another process holds it, print "waiting for another sdrt process
    DOING" once and wait for it."""
    from filelock import FileLock, Timeout

    entry.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path(entry)))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"sdrt: waiting for another sdrt process {doing} (lock {lock_path(entry)})", file=sys.stderr)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def is_complete(entry: Path, mutable: tuple[str, ...] = ()) -> bool:
    """ENTRY (a folder) holds its marker and every file the marker lists, at its size (MUTABLE: files that may be
    rewritten in place later, such as a manifest; their presence is checked, not their size)."""
    try:
        files = json.loads((entry / MARKER).read_text())["files"]
        return all((entry / name).stat().st_size == size or name in mutable for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _temporaries(entry: Path) -> list[Path]:
    return [p for p in entry.parent.glob(f".{entry.name}.tmp-*")] if entry.parent.is_dir() else []


def remove_leftovers(entry: Path) -> None:
    """Under ENTRY's lock: the temporaries of makers that died (every one, since only the lock's holder makes one)."""
    for path in _temporaries(entry):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()


def tidy(entry: Path) -> None:
    """Remove the temporaries dead makers left beside a complete ENTRY, if no process holds its lock now."""
    if not _temporaries(entry):
        return
    from filelock import FileLock, Timeout

    lock = FileLock(str(lock_path(entry)))
    try:
        lock.acquire(timeout=0)
    except (Timeout, OSError):
        return
    try:
        remove_leftovers(entry)
    finally:
        lock.release()


def discard(entry: Path) -> None:
    """Remove ENTRY (an incomplete or corrupt one): renamed aside first, so no reader sees it half deleted."""
    if not entry.exists() and not entry.is_symlink():
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
    entry.rename(aside / "old")
    shutil.rmtree(aside, ignore_errors=True)


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish(staging: Path, entry: Path) -> None:
    """Write STAGING's marker (its files and sizes) last, then rename it to ENTRY in one step."""
    files = {str(p.relative_to(staging)): p.stat().st_size for p in sorted(staging.rglob("*")) if p.is_file()}
    for path in files:
        _fsync(staging / path)
    write_atomic(staging / MARKER, json.dumps({"files": files}, indent=1).encode())
    staging.chmod(0o755)  # mkdtemp makes it private
    staging.rename(entry)
    _fsync(entry.parent)


@contextlib.contextmanager
def staging_for(entry: Path):
    """A private temporary folder beside ENTRY for the block (removed if the block fails)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def ensure(entry: Path, doing: str, make: Callable[[Path], None], mutable: tuple[str, ...] = ()) -> bool:
    """ENTRY complete, made by MAKE(staging folder) if it is not (once, whatever the number of processes asking);
    True when this process made it."""
    if is_complete(entry, mutable):
        tidy(entry)
        return False
    with entry_lock(entry, doing):
        if is_complete(entry, mutable):  # made while this process waited
            return False
        remove_leftovers(entry)
        discard(entry)
        with staging_for(entry) as staging:
            make(staging)
            publish(staging, entry)
    return True


def write_atomic(path: Path, data: bytes) -> None:
    """PATH holds DATA, or what it held before: written to a temporary beside it, then renamed over it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the files it replaces were readable by all
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
