"""Property tests of the Python API's options: any value of any type for any option (GenerationOptions' fields,
img2img's and SDXL's included) gives images or one clear InvalidOption naming that option, never another exception.
Bounded: the tiny model at 64x64, one step, a fixed number of derandomised examples."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sdrt.errors import InvalidOption, SdrtError
from sdrt.runtime.options import OPTION_FIELDS, spec

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()  # NaN, +-Infinity, subnormals included
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.sampled_from([np.float32("nan"), np.int64(3), np.float64(-1e300), np.bool_(True), object(), 1j, ..., "Euler",
                       "a cat", "karras", "latent", "pil", np.zeros((1, 4, 8, 8), np.float32), np.zeros(3, np.uint8),
                       Image.new("RGB", (64, 64)), Image.new("L", (8, 8)), (64, 64), (0, 0), [1.5, 2]])  # fmt: skip
)
ANY_VALUE = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner) | st.dictionaries(st.text(max_size=4), inner,
                                                                                           max_size=3),  # fmt: skip
    max_leaves=5,
)
BASE = {"prompt": "a cat", "steps": 1, "width": 64, "height": 64, "seed": 1}
# Valid values that would make one example slow on two cores: bounded to what the tiny model does quickly.
COSTLY = {"steps": 8, "width": 256, "height": 256, "batch_size": 2, "batch_count": 2}


def affordable(name, value) -> bool:
    try:
        return name not in COSTLY or not (value > COSTLY[name])
    except Exception:  # not comparable: invalid, and cheap
        return True


def assert_outcome(call, name):
    """CALL() gives images (or latents) or raises InvalidOption (or another SdrtError: a model file problem) that
    names the option; anything else fails."""
    try:
        out = call()
    except InvalidOption as e:
        assert str(e) and e.allowed, e
        return "invalid"
    except SdrtError as e:  # e.g. a refiner path that is no model: clear, the user's input
        assert str(e).strip()
        return "refused"
    assert isinstance(out, list) and out
    assert all(isinstance(o, (Image.Image, np.ndarray)) for o in out)
    for o in out:
        if isinstance(o, np.ndarray):
            assert o.dtype == np.float32 and np.isfinite(o).all()
    return "image"


@pytest.mark.parametrize("group", ["generation", "editing", "other"])
def test_any_value_for_any_option_gives_images_or_invalid_option(tiny_pipeline, group):
    names = sorted(n for n in OPTION_FIELDS if (spec(n).group if spec(n).group in ("generation", "editing")
                                                 else "other") == group)  # fmt: skip
    outcomes = []

    @given(name=st.sampled_from(names), value=ANY_VALUE)
    @settings(max_examples=60, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    def run(name, value):
        if not affordable(name, value):
            return
        outcomes.append(assert_outcome(lambda: tiny_pipeline.generate(**{**BASE, name: value}, progress=False), name))

    run()
    assert "invalid" in outcomes  # the can-fail side: bad values were sent and refused


@given(value=st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([math.nan, math.inf, -math.inf]))
@settings(max_examples=40, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_non_finite_numbers_are_refused_by_every_number_option(tiny_pipeline, value):
    if math.isfinite(value):
        return
    for name in OPTION_FIELDS:
        if spec(name).kind != "float" or (value == math.inf and spec(name).high == math.inf):  # s_tmin, s_tmax
            continue
        with pytest.raises(InvalidOption) as e:
            tiny_pipeline.generate(**{**BASE, name: value}, progress=False)
        assert name in str(e.value)
