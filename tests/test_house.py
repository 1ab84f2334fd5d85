"""The house's seams hold: no code outside the family modules tests a model family's name, and the runtime never
tests a backend's name (it asks engines.capabilities). Read from the source, with each check shown to catch a
planted violation."""

import ast
from pathlib import Path

from sdrt.runtime.families import family_names

SRC = Path(__file__).resolve().parents[1] / "src" / "sdrt"
# The family modules: the runtime's (one per family) and their export plans, plus export/detect.py, which tells
# the SD 1.x/2.x families apart from a checkpoint (its answers are family names).
FAMILY_MODULES = ("runtime/families/", "export/sd.py", "export/sdxl.py", "export/detect.py")
BACKEND_NAMES = {"cpu", "cuda", "tensorrt", "openvino"}


def _strings(node) -> set[str]:
    """The string constants NODE compares against (a constant, or a tuple/list/set of them)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return {s for element in node.elts for s in _strings(element)}
    return set()


def name_tests(source: str, names: set[str]) -> list[int]:
    """Lines of SOURCE that compare something with one of NAMES (==, !=, in, not in) or call .startswith(NAME)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            if any(_strings(operand) & names for operand in [node.left, *node.comparators]):
                lines.append(node.lineno)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "startswith":
            if any(any(s.startswith(name) for name in names for s in _strings(arg)) for arg in node.args):
                lines.append(node.lineno)
    return lines


def offenders(folder: Path, names: set[str], exempt=()) -> list[str]:
    found = []
    for path in sorted(folder.rglob("*.py")):
        relative = path.relative_to(SRC).as_posix()
        if any(relative.startswith(e) for e in exempt):
            continue
        found += [f"{relative}:{line}" for line in name_tests(path.read_text(), names)]
    return found


def test_no_family_name_is_tested_outside_the_family_modules():
    assert offenders(SRC, set(family_names()), exempt=FAMILY_MODULES) == []


def test_the_runtime_never_tests_a_backend_name():
    assert offenders(SRC / "runtime", BACKEND_NAMES) == []


def test_the_checks_catch_a_planted_test():
    planted = 'if manifest.family == "sdxl":\n    pass\nok = backend.startswith("openvino")\n'
    assert name_tests(planted, set(family_names())) == [1]
    assert name_tests(planted, BACKEND_NAMES) == [3]
    assert name_tests('x = kind in ("sd1", "sd2")', set(family_names())) == [1]


MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 80


def oversized(folder: Path) -> list[str]:
    """Modules over MAX_MODULE_LINES lines and functions over MAX_FUNCTION_LINES lines under FOLDER."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        source = path.read_text()
        relative = path.relative_to(folder).as_posix()
        if len(source.splitlines()) > MAX_MODULE_LINES:
            found.append(f"{relative}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{relative}:{node.name}: {length} lines")
    return found


def test_modules_and_functions_stay_small(tmp_path):
    assert oversized(SRC) == []
    (tmp_path / "big.py").write_text("def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES)
    assert oversized(tmp_path) == [f"big.py:f: {MAX_FUNCTION_LINES + 1} lines"]
