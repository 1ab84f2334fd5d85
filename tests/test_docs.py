"""The documentation: every committed benchmark result renders as the tables the site shows, the site builds with
`mkdocs build --strict` (a broken link fails it: shown by a twin), and the README's links lead to files that exist."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sdrt.bench.tables import PARTS, expand_markers, kind_of, render, render_file

REPO = Path(__file__).resolve().parents[1]
RESULTS = sorted((REPO / "benchmarks" / "results").glob("*.json"))


@pytest.mark.parametrize("path", RESULTS, ids=[p.name for p in RESULTS])
def test_every_results_file_renders_each_of_its_parts(path):
    report = json.loads(path.read_text())
    kind = kind_of(report)
    staged = {"runtimes", "generate", "decode", "previews"}  # parts a run has only when it ran that stage
    parts = [p for p in PARTS[kind][1] if p not in staged or p in report]
    for part in parts:
        table = render_file(path, part)
        rows = [line for line in table.splitlines() if line.startswith("|")]
        assert len(rows) >= 3 and set(rows[1]) <= set("|- "), (part, table)  # a header, its rule, a row at least
        assert f"`benchmarks/results/{path.name}`" in table


def test_tables_show_the_files_figures_not_typed_ones():
    report = json.loads((REPO / "benchmarks" / "results" / "cpu-intel-xeon-2c.json").read_text())
    assert "| 17.39 s | 24.60 s |" in render(report)  # txt2img medians, from the JSON
    report["sdrt"]["txt2img"]["median_s"] = 1.0
    assert "| 1.00 s | 24.60 s |" in render(report)


@pytest.mark.parametrize(
    "report,part,message",
    [
        ({"benchmark": "lora_switch"}, "runtimes", "part 'runtimes' of a lora_switch result; allowed: all"),
        ({"benchmark": "cpu_e2e"}, "nope", "part 'nope' of a cpu_e2e result; allowed: sdrt-vs-diffusers, runtimes"),
    ],
)
def test_a_part_that_does_not_exist_is_an_error_naming_it(report, part, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        render(report, part)


def test_a_result_without_a_renderer_still_shows_every_figure():
    """A new benchmark's JSON renders before it has a table of its own: one row per figure."""
    report = {"benchmark": "sd35_cpu", "date": "2026-12-05", "machine": {"cpu_model": "x"},
              "txt2img": {"median_s": 12.3456, "runs_s": [12.0, 12.7]}, "rows": [{"a": 1}, {"a": 2}]}  # fmt: skip
    assert kind_of(report) == "generic"
    table = render(report)
    assert "| txt2img.median_s | 12.35 |" in table and "| txt2img.runs_s | 12, 12.7 |" in table
    assert "| rows[1].a | 2 |" in table and "cpu_model" not in table


def test_markers_become_tables_outside_code_blocks_only():
    results = REPO / "benchmarks" / "results"
    page = "a\n<!-- results: cpu-intel-xeon-2c.json -->\n```\n<!-- results: cpu-intel-xeon-2c.json -->\n```\nb"
    out = expand_markers(page, results)
    assert out.count("| 17.39 s | 24.60 s |") == 1 and out.count("<!-- results: cpu-intel-xeon-2c.json -->") == 1
    with pytest.raises(ValueError, match="no such file"):
        expand_markers("<!-- results: gone.json -->", results)


def test_readme_links_lead_to_files():
    readme = (REPO / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", readme)
    assert len(targets) > 20 and all(t.startswith("docs/") for t in targets)
    assert [t for t in targets if not (REPO / t).exists()] == []
    assert readme.count("\n") <= 250


def site_tree(tmp_path: Path) -> Path:
    """A copy of what the build reads: mkdocs.yml, docs/, the hook, the results, the sources (API reference)."""
    root = tmp_path / "repo"
    for name in ("docs", "src", "benchmarks/results"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.png", ".ort-cache"))
    (root / "tools").mkdir()
    shutil.copy(REPO / "tools" / "docs_hooks.py", root / "tools")
    shutil.copy(REPO / "mkdocs.yml", root)
    shutil.copy(REPO / "docs" / "webui.png", root / "docs")
    return root


def mkdocs_build(root: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(root / "site")]
    return subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})  # fmt: skip


def test_site_builds_strict_with_generated_tables_and_fails_on_a_broken_link(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra is not installed (CI installs it)")
    pytest.importorskip("mkdocstrings", reason="the docs extra is not installed (CI installs it)")
    root = site_tree(tmp_path)
    built = mkdocs_build(root)
    assert built.returncode == 0, built.stderr[-3000:]
    page = (root / "site" / "benchmarks" / "cpu" / "index.html").read_text()
    assert "17.39 s" in page and "<!-- results:" not in page  # the marker became the JSON's table
    howto = (root / "site" / "benchmarks" / "index.html").read_text()
    assert "results: cpu-intel-xeon-2c.json" in howto and "17.39 s" not in howto  # a marker shown as code stays
    assert "class=\"doc doc-object" in (root / "site" / "reference" / "pipeline" / "index.html").read_text()
    # the twin: one broken link, and the strict build fails naming it
    roadmap = root / "docs" / "roadmap.md"
    roadmap.write_text(roadmap.read_text() + "\n[gone](guide/no-such-page.md)\n")
    broken = mkdocs_build(root)
    assert broken.returncode != 0 and "no-such-page.md" in broken.stderr
