"""Imports run one way: interfaces (cli, server, bench) -> export -> runtime -> engines, with errors and the
version at the package top. Read from the source (every import, lazy ones included), so a new module that
breaks the order fails here, and the check itself is shown to catch a wrong import."""

import ast
import inspect
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "sdrt"
# package -> the sdrt packages it may import (itself always)
ALLOWED = {
    "errors": set(),
    "version": set(),
    "cache_files": set(),  # cache entries shared by processes: the model cache and the engines' caches
    "engines": {"errors", "version", "cache_files"},
    "runtime": {"engines", "errors", "version", "cache_files"},
    "export": {"runtime", "engines", "errors", "version", "cache_files"},
    "server": {"runtime", "engines", "errors", "version", "cache_files"},
    "bench": {"runtime", "engines", "export", "errors", "version", "cache_files"},
    "cli": {"runtime", "export", "bench", "errors", "version", "cli_controlnet", "cli_upscale", "commands"},
    "commands": {"runtime", "engines", "export", "server", "bench", "errors", "version", "cli_controlnet",
                 "cli_outputs", "cache_files"},
    "cli_outputs": {"errors", "version"},
    "cli_controlnet": {"runtime", "export", "errors", "version"},
    "cli_upscale": {"runtime", "export", "errors", "version"},
    "__init__": {"runtime", "version"},
    "__main__": {"cli"},
}


def package_of(path: Path) -> str:
    parts = path.relative_to(SRC).parts
    return parts[0] if len(parts) > 1 else path.stem


def sdrt_imports(source: str) -> set[str]:
    """The sdrt packages a module's source imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names if node.module == "sdrt"]
        for name in names:
            parts = name.split(".")
            if parts[0] == "sdrt" and len(parts) > 1:
                found.add(parts[1])
    return found


def violations(modules: dict[Path, str]) -> list[str]:
    out = []
    for path, source in modules.items():
        package = package_of(path)
        allowed = ALLOWED[package] | {package}
        for target in sorted(sdrt_imports(source) - allowed):
            out.append(f"{path.relative_to(SRC)} ({package}) imports sdrt.{target}")
    return out


def test_imports_run_one_way():
    modules = {path: path.read_text() for path in SRC.rglob("*.py")}
    assert violations(modules) == []


def test_the_check_catches_an_engine_importing_the_runtime():
    bad = {SRC / "engines" / "x.py": "def f():\n    from sdrt.runtime.options import resolve\n"}
    assert violations(bad) == ["engines/x.py (engines) imports sdrt.runtime"]
    assert violations({SRC / "runtime" / "y.py": "import sdrt.server.app\n"}) == [
        "runtime/y.py (runtime) imports sdrt.server"
    ]


def test_the_allowed_graph_has_no_cycle():
    def reaches(start: str, goal: str, seen=()) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in ALLOWED.get(start, ()))

    assert not [p for p in ALLOWED if reaches(p, p)]


def test_sampler_table_states_each_samplers_arguments():
    """samplers.SAMPLER_ARGUMENTS is each sampler's contract: exactly its keyword arguments past the common ones."""
    from sdrt.runtime import samplers

    common = {"denoise", "x", "sigmas", "noise", "callback"}
    for name, (function, _) in samplers.SAMPLERS.items():  # samplers.py's and samplers_extra.py's
        fn, arguments = samplers.sampler_function(name)
        taken = set(inspect.signature(fn).parameters) - common
        assert taken == set(arguments) == set(samplers.SAMPLER_ARGUMENTS[function]), function
    assert {f for f, _ in samplers.SAMPLERS.values()} == set(samplers.SAMPLER_ARGUMENTS)
