"""Benchmark results (benchmarks/results/*.json) as Markdown: one renderer per kind of result, chosen by the report's
`benchmark` key (or, for files written before every benchmark stored it, by the report's shape). The tables are the
ones each benchmark prints when it runs; the docs site (tools/docs_hooks.py) renders them from the committed JSON, so
no figure is typed twice.

    python -m sdrt.bench.tables benchmarks/results/cpu-intel-xeon-2c.json [PART]
"""

import argparse
import json
import re
import sys
from pathlib import Path


def kind_of(report: dict) -> str:
    """The benchmark that wrote REPORT (a key of PARTS); "generic" for a result no renderer knows yet."""
    if report.get("benchmark") in PARTS:
        return report["benchmark"]
    if "switches" in report:  # lora_switch before it stored its name
        return "lora_switch"
    if "rows" in report and "clients" in report:  # ray_throughput before it stored its name
        return "ray_throughput"
    return "generic"


def leaves(value, prefix: str = ""):
    """(dotted key, scalar) pairs of a JSON value; lists of scalars joined, lists of objects indexed."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list) and any(isinstance(v, dict | list) for v in value):
        for i, item in enumerate(value):
            yield from leaves(item, f"{prefix}[{i}]")
    else:
        yield prefix, value


def cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(cell(v) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def generic(report: dict, part: str) -> str:
    """Any result without a renderer of its own: every figure it holds, one row each (machine details and stored
    tables left out). A benchmark earns a real table by a `benchmark` key and a renderer in PARTS."""
    rows = [(k, v) for k, v in leaves({k: v for k, v in report.items() if k not in ("machine", "table_markdown")})]
    lines = ["| field | value |", "|---|---|"] + [f"| {key} | {cell(value)} |" for key, value in rows[:MAX_ROWS]]
    if len(rows) > MAX_ROWS:
        lines.append(f"| ... | {len(rows) - MAX_ROWS} more fields in the JSON |")
    return "\n".join(lines)


def cpu_e2e(report: dict, part: str) -> str:
    from sdrt.bench.cpu import low_vram_rows, markdown_table
    from sdrt.bench.cpu_runtimes import runtimes_table

    if part == "runtimes":
        if "runtimes" not in report:
            raise ValueError("this cpu_e2e result has no per-runtime table (it predates `runtimes`)")
        return runtimes_table(report["runtimes"], report["runtimes_comparison"], report["runtimes_skipped"])
    return "\n".join([markdown_table(report), *low_vram_rows(report)])


def gpu_e2e(report: dict, part: str) -> str:
    from sdrt.bench.gpu import markdown_table

    return markdown_table(report)


def controlnet_cpu(report: dict, part: str) -> str:
    from sdrt.bench.controlnet_cpu import markdown_table

    return markdown_table(report)


def lora_switch(report: dict, part: str) -> str:
    from sdrt.bench.lora_switch import markdown_table

    return markdown_table(report)


def ray_throughput(report: dict, part: str) -> str:
    from sdrt.bench.ray_throughput import markdown_table

    return markdown_table(report)


MAX_ROWS = 80  # of the generic table

# kind -> (renderer, its parts; the first is the default)
def t5_parts(report: dict, part: str) -> str:
    from sdrt.bench.t5_parts import markdown_table

    return markdown_table(report)


def sd35_arch(report: dict, part: str) -> str:
    from sdrt.bench.sd35_arch import markdown_table

    return markdown_table(report)


def speed(report: dict, part: str) -> str:
    from sdrt.bench.speed import markdown

    return markdown(report, part)


def load_memory(report: dict, part: str) -> str:
    from sdrt.bench.load_memory import markdown

    return markdown(report, part)


PARTS = {
    "generic": (generic, ("all",)),
    "cpu_e2e": (cpu_e2e, ("sdrt-vs-diffusers", "runtimes")),
    "cpu_runtimes": (cpu_e2e, ("runtimes",)),  # a cpu_e2e run with the per-runtime table only (rebuilt from a log)
    "gpu_e2e": (gpu_e2e, ("all",)),
    "controlnet_cpu": (controlnet_cpu, ("all",)),
    "speed": (speed, ("generate", "decode", "previews")),
    "lora_switch": (lora_switch, ("all",)),
    "ray_throughput": (ray_throughput, ("all",)),
    "t5_parts": (t5_parts, ("all",)),
    "sd35_arch": (sd35_arch, ("all",)),
    "load_memory": (load_memory, ("all",)),
}


def caption(report: dict) -> str:
    """Where the figures come from: the machine and the date, as far as the report states them."""
    machine = report.get("machine") or {}
    cpu = machine.get("cpu_model") or report.get("cpu") or (report.get("device") or {}).get("name")
    cores = machine.get("physical_cores") or report.get("cores")
    bits = [f"{cpu}, {cores} cores" if cpu and cores else cpu, (report.get("date") or "")[:10] or None]
    return "; ".join(b for b in bits if b)


def render(report: dict, part: str | None = None) -> str:
    """REPORT as Markdown (PART: one of its kind's parts; default the first)."""
    kind = kind_of(report)
    renderer, parts = PARTS[kind]
    part = part or parts[0]
    if part not in parts:
        raise ValueError(f"part {part!r} of a {kind} result; allowed: {', '.join(parts)}")
    return renderer(report, part)


def render_file(path: Path, part: str | None = None) -> str:
    """The results file PATH rendered, with its source and caption in a line under the table."""
    path = Path(path)
    report = json.loads(path.read_text())
    try:
        table = render(report, part)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path.name}: cannot render{f' part {part!r}' if part else ''}: {e!r}") from e
    note = f"`benchmarks/results/{path.name}`" + (f" ({caption(report)})" if caption(report) else "")
    return f"{table.rstrip()}\n\n<small>From {note}.</small>\n"


MARKER = re.compile(r"^<!-- results: (?P<file>[\w.-]+\.json)(?: (?P<part>[\w-]+))? -->$")
FENCE = re.compile(r"^\s*(```|~~~)")


def expand_markers(markdown: str, results_dir: Path) -> str:
    """MARKDOWN with each `<!-- results: FILE.json [PART] -->` line (outside code blocks) replaced by the table of
    RESULTS_DIR/FILE; a missing file, or one that does not render, is a ValueError naming it."""
    out, fence = [], None
    for line in markdown.split("\n"):
        opened = FENCE.match(line)
        if opened and fence is None:
            fence = opened[1]
        elif opened and line.strip().startswith(fence):
            fence = None
        match = MARKER.match(line) if fence is None else None
        if match is None:
            out.append(line)
            continue
        path = Path(results_dir) / match["file"]
        if not path.is_file():
            raise ValueError(f"{line}: no such file {path}")
        out.append(render_file(path, match["part"]))
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdrt.bench.tables", description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a benchmarks/results/*.json file")
    parser.add_argument("part", nargs="?", help="one part of it (default: its kind's first)")
    args = parser.parse_args(argv)
    try:
        print(render_file(args.results, args.part))
    except (OSError, ValueError) as e:
        parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
