#!/usr/bin/env python
"""CPU benchmark, sdrt against diffusers: a thin call to `sdrt bench --device cpu` (src/sdrt/bench), kept so the
commands in benchmarks/README.md keep working. Its options are `sdrt bench`'s (`--small` = `--model small`).

    .venv/bin/python benchmarks/cpu_e2e.py             # full size: SD 1.5, 256x256, 10 steps, median of 3
    .venv/bin/python benchmarks/cpu_e2e.py --small     # tiny random models: a smoke test of the benchmark
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sdrt.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--device", "cpu", *sys.argv[1:]]))
