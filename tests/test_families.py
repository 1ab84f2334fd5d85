"""The family seam: a model's family is asked, never named. A family registered from outside (one module, one
registry entry) runs through every stage; manifests of unknown families, or missing a graph their family needs,
are one clear ModelError."""

import json
import shutil
import sys
import types

import numpy as np
import pytest

from sdrt import Pipeline
from sdrt.errors import InvalidOption, ModelError
from sdrt.runtime import families
from sdrt.runtime.families.sd import SD1

SMALL = {"width": 64, "height": 64, "steps": 3, "seed": 7, "output_type": "latent"}


def copy_with_manifest(source, target, **changes):
    shutil.copytree(source, target)
    manifest = json.loads((target / "model.json").read_text())
    manifest.update(changes)
    (target / "model.json").write_text(json.dumps(manifest))
    return target


@pytest.fixture
def registered(monkeypatch):
    """A family module made outside sdrt, registered by its one line in FAMILY_MODULES: an SD 1.x variant whose
    latents start scaled by HALF (a family's own schedule), to show the runtime asks the family for it."""

    class HalfNoise(SD1):
        name, title = "sd1-half", "SD 1.x (half noise)"

        def schedule(self, manifest, opts):
            from dataclasses import replace

            schedule = super().schedule(manifest, opts)
            return replace(schedule, initial_noise_scale=schedule.initial_noise_scale / 2)

    module = types.ModuleType("outside_family")
    module.FAMILIES = (HalfNoise(),)
    monkeypatch.setitem(sys.modules, "outside_family", module)
    monkeypatch.setattr(families, "FAMILY_MODULES", (*families.FAMILY_MODULES, "outside_family"))
    monkeypatch.setattr(families, "_REGISTRY", {})
    yield HalfNoise
    families._REGISTRY.clear()


def test_a_family_registered_from_outside_runs_every_stage(tiny_sd, tmp_path, registered):
    folder = copy_with_manifest(tiny_sd[1], tmp_path / "half", family="sd1-half")
    pipe = Pipeline.load(folder)
    assert isinstance(pipe.family, registered)
    base = Pipeline.load(tiny_sd[1])
    start = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    ours = pipe.generate("a cat", latents=start, **SMALL)
    want = base.generate("a cat", latents=start / 2, **SMALL)  # the same run, the start halved by hand
    np.testing.assert_allclose(ours, want, atol=1e-5)
    assert np.abs(ours - base.generate("a cat", latents=start, **SMALL)).max() > 1e-2  # the family's schedule counts


def test_unknown_family_is_one_clear_error(tiny_sd, tmp_path):
    folder = copy_with_manifest(tiny_sd[1], tmp_path / "odd", family="sd9")
    with pytest.raises(ModelError, match=r"family is 'sd9'; expected one of sd1, sd2, sdxl"):
        Pipeline.load(folder)


def test_a_graph_the_family_needs_is_checked(tiny_sd, tmp_path):
    manifest = json.loads((tiny_sd[1] / "model.json").read_text())
    models = {k: v for k, v in manifest["models"].items() if k != "unet"}
    folder = copy_with_manifest(tiny_sd[1], tmp_path / "no_unet", models=models)
    with pytest.raises(ModelError, match=r"lists no 'unet' model"):
        Pipeline.load(folder)


def test_options_of_another_family_are_refused_naming_it(tiny_pipeline):
    with pytest.raises(InvalidOption, match=r"^prompt_2: .*None: prompt_2 is an SDXL option, and this model is sd1"):
        tiny_pipeline.generate("a cat", prompt_2="a dog", **SMALL)


def test_every_family_option_belongs_to_one_options_group():
    from sdrt.runtime.options import OPTION_FIELDS, spec

    owners = families.family_option_names()
    for name, family in owners.items():
        assert spec(name).group == family.option_group, name
    grouped = {name for name in OPTION_FIELDS if spec(name).group in {f.option_group for f in owners.values()}}
    assert grouped == set(owners)
