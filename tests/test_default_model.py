"""`sdrt generate PROMPT` without -m: the default model (A1111's first start), exported into the cache on first use;
offline, one clear error saying how to pass a local model."""

import pytest

from sdrt.cli import EXIT_BAD_INPUT, main


def test_offline_without_a_model_is_one_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("SDRT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine without network: the hub cannot be reached
    assert main(["generate", "a cat", "-o", str(tmp_path / "out")]) == EXIT_BAD_INPUT
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sdrt generate: error:")]
    assert len(errors) == 1, errors
    assert "default model stable-diffusion-v1-5/stable-diffusion-v1-5" in errors[0] and "with -m" in errors[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_the_default_model_is_exported_once_and_used(monkeypatch, tmp_path, tiny_sd, capsys):
    """DEFAULT_MODEL pointed at a local diffusers folder: the first run exports it into the cache, the second reuses
    the export (no second "exporting" line), and both write an image without -m."""
    import sdrt.export.cache as cache

    diffusers_folder = tiny_sd[1].parent / "diffusers"
    monkeypatch.setattr(cache, "DEFAULT_MODEL", str(diffusers_folder))
    monkeypatch.setenv("SDRT_CACHE", str(tmp_path / "cache"))
    args = ["generate", "a cat", "--steps", "2", "--width", "64", "--height", "64", "-o", str(tmp_path / "out")]
    assert main(args) == 0
    assert "exporting" in capsys.readouterr().err
    assert main(args) == 0
    assert "exporting" not in capsys.readouterr().err
    assert len(list((tmp_path / "out").glob("*.png"))) == 2
    assert len(list((tmp_path / "cache" / "models").iterdir())) == 1


@pytest.mark.parametrize("command", [["serve"], ["outpaint", "image.png", "a wall"]])
def test_model_is_optional_on_every_command_that_loads_one(command):
    from sdrt.cli import build_parser

    args = build_parser().parse_args(command)
    assert args.model is None
