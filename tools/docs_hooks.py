"""MkDocs hook (mkdocs.yml: `hooks`): benchmark tables generated from benchmarks/results/*.json at build time.

A page writes, on a line of its own,

    <!-- results: cpu-intel-xeon-2c.json -->            the result's default table
    <!-- results: cpu-amd-epyc-2c-loaded.json runtimes -->  one part of it (sdrt.bench.tables.PARTS)

and the build replaces the line with the table `sdrt.bench.tables` renders from that file, the same table the
benchmark printed when it ran. A missing file, an unknown part or a result that does not render fails the build.
"""

import re
from pathlib import Path

from mkdocs.exceptions import PluginError

from sdrt.bench.tables import render_file

MARKER = re.compile(r"^<!-- results: (?P<file>[\w.-]+\.json)(?: (?P<part>[\w-]+))? -->$", re.MULTILINE)


def results_dir(config) -> Path:
    return Path(config["config_file_path"]).resolve().parent / "benchmarks" / "results"


def on_page_markdown(markdown: str, page, config, files) -> str:
    folder = results_dir(config)

    def table(match: re.Match) -> str:
        path = folder / match["file"]
        if not path.is_file():
            raise PluginError(f"{page.file.src_path}: {match[0]}: no such file {path}")
        try:
            return render_file(path, match["part"])
        except ValueError as e:
            raise PluginError(f"{page.file.src_path}: {e}") from e

    return MARKER.sub(table, markdown)
