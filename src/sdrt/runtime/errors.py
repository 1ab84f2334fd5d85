"""Errors a user can act on: each names what was wrong, the value given and what is allowed."""


class SdrtError(Exception):
    """Base class for errors caused by the user's input or files (CLI exit code 2, HTTP 4xx)."""


class InvalidOption(SdrtError, ValueError):
    """A generation or export option outside what is allowed."""

    def __init__(self, field: str, value, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field}: got {value!r}; allowed: {allowed}")


class ModelError(SdrtError):
    """A model folder, manifest or model file that is missing, corrupt or of another version."""


class Interrupted(Exception):
    """Raised by a generate() callback to stop the run after the current sampler step (A1111's Interrupt)."""
