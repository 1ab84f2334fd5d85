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


class SkipImage(Interrupted):
    """Raised by a generate() callback to end the current batch's sampling after this step: it is decoded from the
    sampler's current x0 estimate and the run goes on with the next batch (A1111's Skip)."""


def is_int(value) -> bool:
    """An integer (Python or numpy), and not a bool (True is an int to Python, never a count to a user)."""
    import numpy as np

    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An int or float (Python or numpy), and not a bool."""
    import numpy as np

    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def check_int(field: str, value, low: int, high: int) -> int:
    """VALUE as an int if it is an integer in [LOW, HIGH]; else InvalidOption naming FIELD."""
    if not is_int(value) or not low <= value <= high:
        raise InvalidOption(field, value, f"an integer from {low} to {high}")
    return int(value)


def check_number(field: str, value, low: float, high: float, allow_inf: bool = False) -> float:
    """VALUE as a float if it is a number in [LOW, HIGH] (not NaN; infinite only with ALLOW_INF)."""
    import math

    if not is_number(value) or math.isnan(value) or (math.isinf(value) and not allow_inf) or not low <= value <= high:
        raise InvalidOption(field, value, f"a {'' if allow_inf else 'finite '}number from {low} to {high}")
    return float(value)
