"""The model cache under concurrency and crashes (export/cache.py over sdrt/cache_files.py): processes started
together export once; a process killed (SIGKILL) at any point of an export leaves nothing a later run takes for a
model; a damaged entry is found and made again."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image

from sdrt import cache_files
from sdrt.export import cache as model_cache

SRC = Path(__file__).resolve().parents[1] / "src"
TESTS = Path(__file__).resolve().parent


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SDRT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


@pytest.fixture
def source(tiny_sd, tmp_path):
    """A diffusers folder of its own (the cache key hashes the path), the tiny model's."""
    folder = tmp_path / "tiny-diffusers"
    shutil.copytree(tiny_sd[1].parent / "diffusers", folder)
    return folder


@pytest.fixture
def fake_export(tiny_sd, monkeypatch):
    """sdrt.export.export replaced by a copy of the tiny model's export: the cache's protocol without PyTorch's
    cost. Its calls are counted."""
    calls = []

    def export(source, out_dir, **_):
        calls.append(source)
        shutil.copytree(tiny_sd[1], out_dir)

    monkeypatch.setattr("sdrt.export.export", export)
    return calls


def entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if not p.name.endswith(".lock"))


def run_child(code: str, tmp_path: Path, cache: Path, wait: bool = True, args=()):
    """A python process running CODE (dedented) with ARGS, sdrt and the tests importable and SDRT_CACHE set."""
    env = {**os.environ, "SDRT_CACHE": str(cache.parent), "PYTHONPATH": f"{SRC}{os.pathsep}{TESTS}"}
    script = tmp_path / f"child-{time.monotonic_ns()}.py"
    script.write_text(textwrap.dedent(code))
    child = subprocess.Popen([sys.executable, str(script), *args], env=env, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)  # fmt: skip
    if wait:
        out, err = child.communicate(timeout=300)
        return child.returncode, out, err
    return child


def test_processes_started_together_export_once_and_all_use_it(source, cache, tmp_path):
    """The issue's report: three `sdrt generate -m SOURCE` at once on a checkpoint not exported yet."""
    go = tmp_path / "go"
    code = f"""
        import pathlib, sys, time
        import sdrt.export.sources, torch  # the slow imports before the start line
        from sdrt.cli import main
        while not pathlib.Path({str(go)!r}).exists():
            time.sleep(0.01)
        sys.exit(main(["generate", "a cat", "-m", {str(source)!r}, "--steps", "2", "--seed", "7",
                       "-o", sys.argv[1]]))
    """
    children = [run_child(code, tmp_path, cache, wait=False, args=[str(tmp_path / f"out{i}")]) for i in range(3)]
    time.sleep(1)
    go.touch()
    results = [(c.wait(timeout=300), *c.communicate()) for c in children]
    assert [code for code, _, _ in results] == [0, 0, 0], [err[-2000:] for _, _, err in results]
    exported = [err for _, _, err in results if "exporting" in err and "waiting" not in err]
    waited = [err for _, _, err in results if "waiting for another sdrt process exporting" in err]
    assert len(exported) == 1 and len(waited) == 2
    (entry,) = entries(cache)
    assert model_cache.is_current(entry)
    images = [Image.open(next((tmp_path / f"out{i}").glob("*.png"))) for i in range(3)]
    assert all(im.tobytes() == images[0].tobytes() for im in images)  # the same model, the same seed


# Where a child kills itself (SIGKILL) during an export into the cache, as patches applied in the child.
KILL_POINTS = {
    "lock_taken": "monkeypatch('sdrt.export.export', die)",
    "files_half_written": "monkeypatch('sdrt.export.export', copy_then(die, half=True))",
    "before_marker": "monkeypatch('sdrt.cache_files.write_atomic', die_at_marker(before=True))",
    "marker_written_before_rename": "monkeypatch('sdrt.cache_files.write_atomic', die_at_marker(before=False))",
    "after_publish": "monkeypatch('sdrt.cache_files._fsync', die_after_publish)",
}

CHILD_HELPERS = """
    import os, shutil, signal, importlib
    from pathlib import Path
    from sdrt import cache_files

    EXPORTED = Path({exported!r})

    def die(*_, **__):
        os.kill(os.getpid(), signal.SIGKILL)

    def monkeypatch(target, value):
        module, name = target.rsplit(".", 1)
        setattr(importlib.import_module(module), name, value)

    def copy_then(then, half=False):
        def export(source, out_dir, **_):
            shutil.copytree(EXPORTED, out_dir)
            if half:  # a graph cut in the middle, as a kill while writing it leaves it
                onnx = Path(out_dir) / "unet" / "model.onnx"
                onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 2])
            then()
        return export

    monkeypatch('sdrt.export.export', copy_then(lambda: None))
    original_write = cache_files.write_atomic

    def die_at_marker(before):
        def write(path, data):
            if before and path.name == cache_files.MARKER:
                die()
            original_write(path, data)
            if path.name == cache_files.MARKER:
                die()
        return write

    def die_after_publish(path):
        if Path(path).name == "models":
            die()
"""


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_run_killed_mid_export_leaves_nothing_taken_for_a_model(point, tiny_sd, source, cache, tmp_path,
                                                                   fake_export, capsys):  # fmt: skip
    code = CHILD_HELPERS.format(exported=str(tiny_sd[1])) + f"""
    {KILL_POINTS[point]}
    from sdrt.export.cache import resolve_model
    resolve_model({str(source)!r})
    print("not killed")
    """
    returncode, out, err = run_child(code, tmp_path, cache)
    assert returncode == -signal.SIGKILL, (out, err[-2000:])
    left = entries(cache)
    if point != "after_publish":
        assert not any(model_cache.is_current(p) for p in left)  # nothing a run would take for a model
    capsys.readouterr()
    entry = model_cache.resolve_model(str(source))  # the fresh run
    assert model_cache.is_current(entry)
    assert entries(cache) == [entry]  # the killed run's temporaries are gone
    assert ("exporting" in capsys.readouterr().err) == (point != "after_publish")
    assert len(fake_export) == (point != "after_publish")


def test_a_kill_inside_the_real_export_then_a_fresh_generate(source, cache, tmp_path, capsys):
    """PyTorch's export killed after its second graph; `sdrt generate -m SOURCE` then exports again and draws."""
    code = f"""
        import os, signal
        from sdrt.export import driver
        run_step, done = driver.run_step, []
        def step_then_die(*args, **kwargs):
            result = run_step(*args, **kwargs)
            done.append(1)
            if len(done) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        driver.run_step = step_then_die
        from sdrt.export.cache import resolve_model
        resolve_model({str(source)!r})
    """
    returncode, _, err = run_child(code, tmp_path, cache)
    assert returncode == -signal.SIGKILL, err[-2000:]
    assert not any(model_cache.is_current(p) for p in entries(cache))
    assert any(".tmp-" in p.name for p in entries(cache))  # what the kill left: a temporary, not an entry
    from sdrt.cli import main

    capsys.readouterr()
    assert main(["generate", "a cat", "-m", str(source), "--steps", "2", "-o", str(tmp_path / "out")]) == 0
    assert "exporting" in capsys.readouterr().err
    assert len(list((tmp_path / "out").glob("*.png"))) == 1
    assert len(entries(cache)) == 1


def test_an_older_sdrts_killed_staging_is_removed(source, cache, fake_export):
    """Before the lock, export staged beside the entry (`.NAME.partial-*`): a killed run's folder goes with the next
    export."""
    entry = model_cache.entry_for(str(source))
    stale = entry.parent / f".{entry.name}.partial-abc123"
    (stale / "unet").mkdir(parents=True)
    (stale / "unet" / "model.onnx").write_bytes(b"half")
    assert model_cache.resolve_model(str(source)) == entry
    assert entries(cache) == [entry]


@pytest.mark.parametrize("damage", ["truncated_unet", "deleted_vae", "no_marker", "garbled_marker"])
def test_a_damaged_entry_is_found_and_made_again(damage, source, cache, fake_export, capsys):
    entry = model_cache.resolve_model(str(source))
    assert model_cache.resolve_model(str(source)) == entry and len(fake_export) == 1  # found: not made again
    if damage == "truncated_unet":
        unet = entry / "unet" / "model.onnx"
        os.truncate(unet, unet.stat().st_size - 1)
    elif damage == "deleted_vae":
        (entry / "vae_decoder" / "model.onnx").unlink()
    elif damage == "no_marker":  # an entry from an sdrt without markers, or a copy that lost it
        (entry / cache_files.MARKER).unlink()
    else:
        (entry / cache_files.MARKER).write_text("{not json")
    assert not model_cache.is_current(entry)
    capsys.readouterr()
    assert model_cache.resolve_model(str(source)) == entry
    assert "exporting" in capsys.readouterr().err and len(fake_export) == 2
    assert model_cache.is_current(entry) and entries(cache) == [entry]


def test_the_manifest_may_change_after_publishing(source, cache, fake_export):
    """`sdrt optimize` adds to model.json in place: the entry stays complete (the graphs are what is checked)."""
    entry = model_cache.resolve_model(str(source))
    (entry / "model.json").write_text((entry / "model.json").read_text().replace("}", " }", 1))
    assert model_cache.is_current(entry)


def test_the_completeness_check_can_fail(tmp_path):
    """can-fail twin: a folder published without its marker is not complete; with it, it is."""
    staging = tmp_path / "staging"
    (staging / "a").mkdir(parents=True)
    (staging / "a" / "x.bin").write_bytes(b"1234")
    assert not cache_files.is_complete(staging)
    cache_files.publish(staging, tmp_path / "entry")
    assert cache_files.is_complete(tmp_path / "entry") and not staging.exists()
    (tmp_path / "entry" / "a" / "x.bin").write_bytes(b"12345")
    assert not cache_files.is_complete(tmp_path / "entry")


def test_a_waiter_says_what_it_waits_for(tmp_path, capsys):
    """A second holder of an entry's lock (another process: the lock is the kernel's) waits with one line."""
    entry = tmp_path / "entry"
    code = f"""
        import sys, time
        from pathlib import Path
        from sdrt import cache_files
        with cache_files.entry_lock(Path({str(entry)!r}), "exporting X"):
            print("locked", flush=True)
            time.sleep(2)
    """
    holder = run_child(code, tmp_path, tmp_path / "unused" / "models", wait=False)
    assert holder.stdout.readline().strip() == "locked"
    start = time.monotonic()
    with cache_files.entry_lock(entry, "exporting X"):
        waited = time.monotonic() - start
    holder.wait(timeout=60)
    assert waited > 0.5
    assert "waiting for another sdrt process exporting X" in capsys.readouterr().err
