"""The export-memory benchmarks of the transformer families (bench/t5_parts.py, bench/sd35_arch.py): a T5 export
reports each part's blocks, time, peak RSS and error against torch; the reports share one head (bench/common.py).
The full-size runs are queue jobs; these run the same code on a T5 a few hundred kilobytes wide."""

import pytest

from sdrt.bench import t5_parts
from sdrt.bench.machine import report_head
from sdrt.bench.tables import render

TINY = {"d_model": 64, "d_ff": 128, "num_heads": 4, "d_kv": 16, "vocab_size": 100}


@pytest.fixture
def tiny_t5(monkeypatch):
    monkeypatch.setattr(t5_parts, "XXL", {**t5_parts.XXL, **TINY})
    return 4 * (4 * 64 * 64 + 3 * 64 * 128)  # one block's fp32 weight bytes


def test_t5_parts_reports_each_part(tiny_t5):
    run = t5_parts.run_one(3, tiny_t5 + 1)  # one block a part
    parts = run["per_part"]
    assert run["parts"] == len(parts) == 3
    assert [p["blocks"] for p in parts] == [[0, 1], [1, 2], [2, 3]]
    assert all(p["max_relative_error"] < 1e-5 and p["onnx_bytes"] > 0 and p["seconds"] >= 0 for p in parts)
    assert run["peak_rss_bytes"] == max([run["peak_rss_after_build_bytes"]] + [p["peak_rss_bytes"] for p in parts])
    assert run["max_relative_error"] == max(p["max_relative_error"] for p in parts)
    table = render({"benchmark": "t5_parts", "runs": {"one block a part": run}})  # the docs' table of it
    assert "| 2 | 2-2 |" in table and "| one block a part | 3 |" in table


def test_t5_parts_one_graph_when_the_bound_holds_all(tiny_t5):
    # the can-fail twin of the above: the same model under a large bound is one part of all blocks
    run = t5_parts.run_one(3, 1 << 40)
    assert run["parts"] == 1 and run["per_part"][0]["blocks"] == [0, 3]


def test_report_head_names_the_command_and_machine():
    head = report_head("t5_parts", ["--blocks 24", "--parts-only"])
    assert head["benchmark"] == "t5_parts" and head["machine"]["logical_cpus"] >= 1
    assert head["command"] == "python -m sdrt.bench.t5_parts --blocks 24 --parts-only"


def test_sd35_stage_commands_repeat_each_stage():
    from types import SimpleNamespace

    from sdrt.bench.sd35_arch import _command

    args = SimpleNamespace(root="/tmp/x", t5=False, tiny=True, size=256, steps=4, runs=1)
    assert _command("build", args) == "python -m sdrt.bench.sd35_arch build /tmp/x --tiny"
    assert _command("export", args) == "python -m sdrt.bench.sd35_arch export /tmp/x"
    assert _command("txt2img", args) == "python -m sdrt.bench.sd35_arch txt2img /tmp/x --size 256 --steps 4 --runs 1"


def test_sd35_table_has_a_row_per_stage_that_ran():
    run = {"rc": 0, "seconds": 70.0, "load_seconds": 20.0, "generate_seconds": 40.0, "peak_rss_gib": 12.0}
    report = {"benchmark": "sd35_arch", "build_seconds": 80.0,
              "export": {"rc": 0, "seconds": 300.0, "peak_rss_gib": 15.5, "onnx_bytes": 14e9},
              "txt2img": {"size": 256, "steps": 4, "runs": {"sdrt": [run], "diffusers": [run]}},
              "max_diff_255": 1, "mean_diff_255": 0.01, "speedup_generate": 1.0}  # fmt: skip
    table = render(report)
    assert "| `sdrt export` (fp32) | 300 s | 15.50 GiB | - | - | exit 0, 14.0 GB of ONNX |" in table
    assert table.count("| txt2img 256 px, 4 steps:") == 2 and "max 1/255" in table
    assert "txt2img" not in render({k: v for k, v in report.items() if k not in ("txt2img", "max_diff_255")})
