"""Faults that lose no work: the CLI's output folder checked before a model loads, images rescued when their folder
cannot take them, and exports that run out of disk, permission or memory ending in one line that names the path and
the space needed (cli_outputs.py, export/faults.py)."""

import errno
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from sdrt.cli import main
from sdrt.export import faults


def run(capsys, *args):
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def no_model_load(monkeypatch):
    """Pipeline.load and the model cache fail the test if reached."""

    def reached(*_, **__):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr("sdrt.runtime.pipeline.Pipeline.load", reached)
    monkeypatch.setattr("sdrt.commands.resolve_model", reached)


@pytest.mark.parametrize("where", ["under_proc", "a_file", "under_a_file"])
def test_an_output_folder_that_cannot_be_made_fails_before_the_model_loads(where, tmp_path, capsys, no_model_load):
    (tmp_path / "file").write_text("x")
    output = {"under_proc": "/proc/sdrt-x", "a_file": tmp_path / "file", "under_a_file": tmp_path / "file" / "out"}
    for command in (("generate", "a cat"), ("outpaint", tmp_path / "img.png", "a cat")):
        code, out, err = run(capsys, *command, "-m", tmp_path / "model", "-o", output[where])
        assert code == 2 and out == ""
        assert err.count("\n") == 1 and f"--output {output[where]}: cannot make or write this folder" in err, err


def test_the_check_passes_a_writable_folder_and_leaves_nothing(tmp_path):
    from sdrt.cli_outputs import check_output_folder

    check_output_folder(tmp_path / "new" / "deep")
    assert not (tmp_path / "new").exists()  # made for the check, removed again
    (tmp_path / "there").mkdir()
    check_output_folder(tmp_path / "there")
    assert (tmp_path / "there").is_dir() and not any((tmp_path / "there").iterdir())


def full_disk_under(folder: Path, monkeypatch):
    """save_png fails with ENOSPC for files under FOLDER (other folders still work)."""
    from sdrt.runtime import image

    save_png = image.save_png

    def failing(img, path):
        if Path(path).resolve().is_relative_to(folder.resolve()):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return save_png(img, path)

    monkeypatch.setattr(image, "save_png", failing)


def test_images_that_cannot_be_written_are_rescued_elsewhere(tiny_sd, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    full_disk_under(tmp_path / "out", monkeypatch)
    code, out, err = run(capsys, "generate", "a cat", "-m", tiny_sd[1], "--steps", 2, "--seed", 3, "--batch-size", 2,
                         "-o", tmp_path / "out")  # fmt: skip
    assert code == 2 and err.count("\n") == 1, err
    assert f"could not write the images to {tmp_path / 'out'} (No space left on device" in err
    (rescued,) = (tmp_path / "tmp").glob("sdrt-rescued-*")
    assert f"they were saved to {rescued} instead" in err
    saved = sorted(rescued.glob("*.png"))
    assert len(saved) == 2 and [str(p) for p in saved] == out.split()  # the paths printed are where they are
    assert "Seed: 3" in Image.open(saved[0]).info["parameters"]


def test_when_no_folder_takes_the_images_the_error_says_so(tiny_sd, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setenv("SDRT_CACHE", str(tmp_path / "cache"))
    full_disk_under(tmp_path, monkeypatch)
    code, _, err = run(capsys, "generate", "a cat", "-m", tiny_sd[1], "--steps", 1, "-o", tmp_path / "out")
    assert code == 2 and err.count("\n") == 1 and "the images could not be saved" in err, err


@pytest.fixture
def source(tiny_sd):
    return tiny_sd[1].parent / "diffusers"


@pytest.mark.parametrize(
    "failure, expected",
    [
        (OSError(errno.ENOSPC, "No space left on device", "X/unet/model.onnx"), "disk full writing X/unet/model.onnx"),
        (RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos; errno 28"), "disk full writing"),
        (OSError(errno.EACCES, "Permission denied", "X/tokenizer"), "cannot write X/tokenizer: Permission denied"),
        (MemoryError(), "out of memory during the export to"),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB"), "out of memory"),
    ],
    ids=["enospc", "torch-enospc", "eacces", "memoryerror", "torch-oom"],
)
def test_export_failures_of_the_machine_are_one_line(failure, expected, source, tmp_path, capsys, monkeypatch):
    def fail(*_, **__):
        raise failure

    monkeypatch.setattr("sdrt.export.driver.write_tokenizer", fail)  # after the graphs: the staging is full of them
    out = tmp_path / "out"
    code, _, err = run(capsys, "export", source, "-o", out)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("sdrt export: error: ") and expected in last, err[-600:]
    if "disk full" in expected:
        assert f"needs about {faults.size_text(faults.needed_bytes(str(source), 'fp32'))} beside {out}" in last
    assert not out.exists() and list(tmp_path.iterdir()) == []  # the staged folder removed


def test_an_unexpected_error_is_not_dressed_as_a_machine_fault(source, tmp_path, monkeypatch):
    """can-fail twin: an error that is no disk, permission or memory failure passes through unchanged."""

    def fail(*_, **__):
        raise RuntimeError("a bug")

    monkeypatch.setattr("sdrt.export.driver.write_tokenizer", fail)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["export", str(source), "-o", str(tmp_path / "out")])


def test_export_refuses_early_when_the_disk_is_plainly_too_small(source, tmp_path, capsys, monkeypatch):
    import shutil

    def hopeless(*_, **__):
        raise AssertionError("the checkpoint was loaded")

    monkeypatch.setattr("sdrt.export.plan_for", hopeless)
    needed = faults.needed_bytes(str(source), "fp32")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(faults.shutil, "disk_usage", lambda _: usage._replace(free=needed // 3))
    code, _, err = run(capsys, "export", source, "-o", tmp_path / "out")
    assert code == 2 and err.count("\n") == 1, err
    assert f"not enough disk space for {tmp_path / 'out'}: the export needs about {faults.size_text(needed)}" in err


def test_the_estimate_is_the_size_of_the_export(tiny_sd, source):
    """The estimate from the source's parameter count against what the export of the tiny model wrote (the model's
    files: tokenizers and graphs), within 25%; fp16 halves it, the ControlNet UNet variant adds to it."""
    written = sum(p.stat().st_size for p in tiny_sd[1].rglob("*") if p.is_file() and ".ort-cache" not in p.parts)
    estimate = faults.needed_bytes(str(source), "fp32")
    assert 0.75 < estimate / written < 1.25, (estimate, written)
    assert faults.needed_bytes(str(source), "fp16") == pytest.approx(estimate / 2, rel=0.01)
    assert faults.needed_bytes(str(source), "fp32", unet_variant=True) > estimate
    assert faults.needed_bytes("owner/a-hub-id", "fp32") is None
