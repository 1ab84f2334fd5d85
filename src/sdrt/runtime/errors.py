"""The user-facing errors live at the package top (sdrt.errors); this name is kept for existing imports."""

from sdrt.errors import Interrupted, InvalidOption, ModelError, SdrtError

__all__ = ["Interrupted", "InvalidOption", "ModelError", "SdrtError"]
