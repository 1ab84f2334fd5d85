"""The CLI's help and the HTTP API's OpenAPI document equal their snapshots (tests/golden/): refactors change
neither. A deliberate interface change rewrites them with `python tools/interface_snapshot.py --update`."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import interface_snapshot  # noqa: E402


def test_cli_help_is_unchanged():
    assert interface_snapshot.cli_help() == interface_snapshot.HELP_FILE.read_text()


def test_openapi_document_is_unchanged():
    assert interface_snapshot.openapi() == json.loads(interface_snapshot.OPENAPI_FILE.read_text())


def test_snapshots_can_fail(monkeypatch):
    """A changed flag help shows up in the CLI snapshot."""
    import sdrt.cli

    build = sdrt.cli.build_parser

    def changed():
        parser = build()
        parser.add_argument("--not-a-flag", help="added")
        return parser

    monkeypatch.setattr(sdrt.cli, "build_parser", changed)
    assert interface_snapshot.cli_help() != interface_snapshot.HELP_FILE.read_text()
