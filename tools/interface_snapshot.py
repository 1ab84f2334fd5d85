"""The user-facing interfaces as text: `sdrt --help` (every subcommand) and the HTTP API's OpenAPI document.

tests/test_interfaces.py compares them with the snapshots in tests/golden/, so a refactor that changes a flag, a
help line or a request/response schema fails there. A deliberate change of an interface rewrites the snapshots:

    python tools/interface_snapshot.py --update
"""

import argparse
import contextlib
import io
import json
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "golden"
HELP_FILE, OPENAPI_FILE = GOLDEN / "cli-help.txt", GOLDEN / "openapi.json"


def cli_help() -> str:
    """`sdrt --help` and `sdrt COMMAND --help` for every command, at a fixed width of 100 columns."""
    os.environ["COLUMNS"] = "100"
    from sdrt.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    parts = [parser.format_help()]
    for name, sub in commands.items():
        parts.append(f"=== sdrt {name} --help\n{sub.format_help()}")
    return re.sub(r"[ \t]+\n", "\n", "\n".join(parts))


def openapi() -> dict:
    """The OpenAPI document `sdrt serve` publishes (the app's routes and schemas; no model needed to build it)."""
    from sdrt.server.app import create_app
    from sdrt.version import __version__

    model = SimpleNamespace(model_name="model", model_hash="")  # the routes' schemas do not depend on the model
    with contextlib.redirect_stderr(io.StringIO()):
        doc = create_app(backend=SimpleNamespace(manifest=model)).openapi()
    return json.loads(json.dumps(doc).replace(json.dumps(__version__)[1:-1], "VERSION"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--update", action="store_true", help="rewrite the snapshots in tests/golden/")
    if not parser.parse_args().update:
        parser.print_help()
        return 0
    GOLDEN.mkdir(parents=True, exist_ok=True)
    HELP_FILE.write_text(cli_help())
    OPENAPI_FILE.write_text(json.dumps(openapi(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {HELP_FILE} and {OPENAPI_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
