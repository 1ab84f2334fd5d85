"""`sdrt serve --vae-dir DIR`: A1111's VAE folder (models/VAE). GET /sdapi/v1/sd-vae lists its VAE files (.safetensors,
.pt, .ckpt, .bin, subfolders too) and diffusers VAE folders (config.json) as A1111's SDVaeItem {model_name, filename}
(the name in the folder: no server paths); refresh-vae rescans it. The setting sd_vae ("Automatic", "None" or a
listed name; from POST options or a request's override_settings) picks the VAE the next images decode and encode
with: exported on first use into the cache by the EXPORTER the CLI passes in (export/vae_files.py: the server may not
import sdrt.export), checked against the request's model (a VAE of another family is a 422), then handed to the
Pipeline as the option vae_file.
"""

import threading
from collections.abc import Callable
from pathlib import Path

from sdrt.errors import InvalidOption
from sdrt.runtime.vae_swap import VAE_SUFFIXES, read_vae_info

NO_VAE = ("Automatic", "None", "")  # A1111's sd_vae values meaning the model's own VAE ("": clients with none listed)


def scan_vaes(folder: Path | None) -> dict[str, Path]:
    """{name: path} of FOLDER's VAE files and diffusers VAE folders, by name (the path relative to FOLDER)."""
    if folder is None or not folder.is_dir():
        return {}
    found = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if any((folder / parent / "config.json").is_file() for parent in relative.parents if parent.parts):
            continue  # a file inside a diffusers VAE folder
        if path.is_file() and path.suffix.lower() in VAE_SUFFIXES:
            found[relative.as_posix()] = path
        elif path.is_dir() and (path / "config.json").is_file():
            found[relative.as_posix()] = path
    return found


class VaeFolder:
    """The VAEs of `--vae-dir` (none without one); EXPORTER(source, model_dir, field) -> an exported VAE folder."""

    def __init__(self, folder: Path | None = None, exporter: Callable | None = None):
        self.folder, self.exporter = folder, exporter
        self.lock = threading.Lock()  # exports: one at a time
        self.by_name: dict[str, Path] = {}
        self.refresh()

    def refresh(self) -> None:
        self.by_name = scan_vaes(self.folder)

    def listing(self) -> list[dict]:
        """A1111's SDVaeItem list."""
        return [{"model_name": name, "filename": name} for name in self.by_name]

    def check(self, value, field: str) -> str:
        """VALUE as an sd_vae setting: "Automatic", "None", "" or a listed name; else InvalidOption listing them."""
        if isinstance(value, str) and (value in NO_VAE or value in self.by_name):
            return value
        names = ", ".join(repr(n) for n in (*NO_VAE[:2], *self.by_name))
        where = "" if self.folder is not None else " (the server has no --vae-dir)"
        raise InvalidOption(field, value, f"one of {names}{where}")

    def exported(self, value, manifest, field: str) -> str | None:
        """The exported VAE folder for the sd_vae VALUE and MANIFEST's model (exported on first use, with a progress
        bar on the server's stderr), or None for the model's own VAE; InvalidOption naming FIELD if it does not fit."""
        if self.check(value, field) in NO_VAE:
            return None
        if self.exporter is None:
            raise InvalidOption(field, value, "Automatic (exporting a VAE needs `sdrt serve`: it passes an exporter)")
        with self.lock:
            return str(self.exporter(str(self.by_name[value]), manifest.folder, field))


def vae_of_options(server, opts: dict, req, manifest) -> str | None:
    """The exported VAE folder a request runs with: its override_settings' sd_vae, else the server's."""
    overridden = "sd_vae" in (req.override_settings or {})
    field = "override_settings.sd_vae" if overridden else "options.sd_vae"
    return server.extras.vaes.exported(opts.get("sd_vae", "Automatic"), manifest, field)


def info_names(vae_file: str | None) -> tuple[str | None, str | None]:
    """A1111's sd_vae_name and sd_vae_hash of the response's info for VAE_FILE (None, None: the model's own)."""
    if vae_file is None:
        return None, None
    info = read_vae_info(vae_file)
    return info.get("name"), (info.get("sha256") or "")[:10] or None
