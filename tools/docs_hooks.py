"""MkDocs hook (mkdocs.yml: `hooks`): benchmark tables generated from benchmarks/results/*.json at build time.

A page writes, on a line of its own,

    <!-- results: cpu-intel-xeon-2c.json -->                the result's default table
    <!-- results: cpu-amd-epyc-2c-loaded.json runtimes -->  one part of it (sdrt.bench.tables.PARTS)

and the build replaces the line with the table `sdrt.bench.tables` renders from that file, the same table the
benchmark printed when it ran (markers inside code blocks are left as they are). A missing file, an unknown part or
a result that does not render fails the build.
"""

from pathlib import Path

from mkdocs.exceptions import PluginError

from sdrt.bench.tables import expand_markers


def on_page_markdown(markdown: str, page, config, files) -> str:
    results = Path(config["config_file_path"]).resolve().parent / "benchmarks" / "results"
    try:
        return expand_markers(markdown, results)
    except ValueError as e:
        raise PluginError(f"{page.file.src_path}: {e}") from e
