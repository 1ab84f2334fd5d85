"""The CLI's output folder: checked before a model loads (a folder that cannot be made or written costs nothing),
and images that cannot be written there after generation (a full disk) saved elsewhere rather than lost."""

import os
import tempfile
from pathlib import Path

from sdrt.errors import SdrtError


def check_output_folder(output, flag: str = "--output") -> None:
    """OUTPUT exists or can be made, and a file can be written in it; else one SdrtError naming it. Folders made for
    the check are removed again (the images make them when they are written)."""
    folder = Path(output)
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".sdrt-write-check-"):
            pass
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise SdrtError(f"{flag} {output}: cannot make or write this folder ({why}); nothing was generated") from None
    finally:
        for made in missing:  # deepest first
            try:
                made.rmdir()
            except OSError:
                break


def rescue_folders() -> list[Path]:
    """Where images go when their folder cannot take them: the temp folder, then sdrt's cache folder."""
    cache = Path(os.environ.get("SDRT_CACHE", Path.home() / ".cache" / "sdrt"))
    return [Path(tempfile.gettempdir()), cache / "rescued"]


def write_or_rescue(write, output) -> int:
    """WRITE(OUTPUT); if that fails (a full disk, a folder gone), WRITE(a new folder elsewhere) and one SdrtError
    saying where the images are (or that none could be saved)."""
    try:
        return write(output)
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        failure = f"could not write the images to {output} ({e.strerror or e}{where})"
    tried = []
    for parent in rescue_folders():
        try:
            parent.mkdir(parents=True, exist_ok=True)
            folder = Path(tempfile.mkdtemp(prefix="sdrt-rescued-", dir=parent))
            write(folder)
        except OSError as e:
            tried.append(f"{parent} ({e.strerror or e})")
            continue
        raise SdrtError(f"{failure}; they were saved to {folder} instead")
    raise SdrtError(f"{failure}, nor to {', '.join(tried)}: the images could not be saved")
