"""The package's shape, read from its source with `ast`: an import graph without cycles,
one door to the compiled core (fanpkt/engine.py) and one to the eBPF object
(fanpkt/kernelpath.py), a forwarder that reaches either only through the data path
interface (fanpkt/datapath.py), numpy loaded only by the batch API, and no reference to
material outside this repository."""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "fanpkt"
CORE = "fanpkt._fastpath"


def module_name(path: Path) -> str:
    return "fanpkt" if path.stem == "__init__" else f"fanpkt.{path.stem}"


SOURCES = {module_name(p): p for p in sorted(PKG.glob("*.py"))}
# what `from fanpkt import X` can name as a module: the sources and the compiled core
SUBMODULES = set(SOURCES) | {CORE}


@dataclass(frozen=True)
class Import:
    module: str             # importer
    target: str             # what it imports, relative imports resolved
    top_level: bool         # run at import time (module or class body), not in a function
    line: int


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(module: str, source: str) -> list[Import]:
    """Every import statement of a module that runs (`if TYPE_CHECKING:` blocks never do),
    and importlib.import_module / __import__ calls with a literal name."""
    package = "fanpkt"          # every module here sits directly in the package
    found: list[Import] = []

    def resolve(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        assert node.level == 1, f"{module}:{node.lineno}: import from above the package"
        return package + (f".{node.module}" if node.module else "")

    def visit(node: ast.AST, top: bool) -> None:
        if isinstance(node, ast.If) and is_type_checking(node.test):
            children = node.orelse          # the body is for type checkers only
        else:
            children = list(ast.iter_child_nodes(node))
        for child in children:
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                   ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend(Import(module, a.name, top, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = resolve(child)
                for a in child.names:
                    sub = f"{base}.{a.name}"
                    found.append(Import(module, sub if sub in SUBMODULES else base, top,
                                        child.lineno))
            elif isinstance(child, ast.Call):
                f = child.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                if name in ("import_module", "__import__") and child.args and \
                        isinstance(child.args[0], ast.Constant):
                    found.append(Import(module, str(child.args[0].value), top, child.lineno))
            visit(child, inner)

    visit(ast.parse(source, module), True)
    return found


IMPORTS = [i for m, p in SOURCES.items() for i in imports_of(m, p.read_text())]


def graph(imports) -> dict[str, set[str]]:
    g: dict[str, set[str]] = {m: set() for m in SOURCES}
    for i in imports:
        if i.target in SOURCES and i.target != i.module:
            g[i.module].add(i.target)
    return g


def find_cycle(g: dict[str, set[str]]):
    """A list of modules forming a cycle (first == last), or None."""
    state: dict[str, int] = {}          # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(n):
        state[n] = 1
        path.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state:
                found = dfs(m)
                if found:
                    return found
        path.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state:
            found = dfs(n)
            if found:
                return found
    return None


def test_the_parser_sees_the_imports_it_must():
    """Known imports of every kind, so that the checks below are not vacuous."""
    edges = {(i.module, i.target, i.top_level) for i in IMPORTS}
    assert ("fanpkt.forwarder", "fanpkt.engine", True) in edges           # from .x import y
    assert ("fanpkt.forwarder", "fanpkt.plumbing", True) in edges         # from . import x
    assert ("fanpkt.cli", "fanpkt.forwarder", False) in edges             # inside a function
    assert ("fanpkt.engine", CORE, True) in edges                          # inside try:
    assert ("fanpkt.fanmap", "numpy", False) in edges                      # lazy
    assert ("fanpkt.fanmap", "numpy", True) not in edges                   # TYPE_CHECKING only
    assert ("fanpkt.__main__", "fanpkt.cli", True) in edges
    src = ("import a.b\nfrom . import cli, _fastpath\nfrom .engine import X\n"
           "if TYPE_CHECKING:\n    import t\nelse:\n    import u\n"
           "class C:\n    import c\n    def f(self):\n        import d\n"
           "g = lambda: importlib.import_module('e')\n")
    assert [(i.target, i.top_level) for i in imports_of("fanpkt.x", src)] == [
        ("a.b", True), ("fanpkt.cli", True), (CORE, True), ("fanpkt.engine", True),
        ("u", True), ("c", True), ("d", False), ("e", False)]


def test_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_no_import_cycle():
    """Module-level and function-level imports alike: a cycle would make the import order
    matter, or hide one behind a function that happens to run late."""
    assert find_cycle(graph(IMPORTS)) is None


def test_only_engine_imports_the_core():
    importers = {i.module for i in IMPORTS if i.target == CORE or i.target.endswith("._fastpath")
                 or i.target == "_fastpath"}
    assert importers == {"fanpkt.engine"}


def test_only_kernelpath_loads_the_ebpf_object():
    """The kernel data path has one door too: fanpkt/kernelpath.py alone names the eBPF
    object and libbpf."""
    pkg = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fanpkt")
    doors = {name for name in os.listdir(pkg) if name.endswith(".py")
             and re.search(r"bpf\.o|libbpf|CDLL\(.*bpf", open(os.path.join(pkg, name)).read())}
    assert doors == {"kernelpath.py"}


# Each data path has its door: the engine's compiled core behind fanpkt/engine.py, the
# eBPF object and libbpf (through ctypes) behind fanpkt/kernelpath.py. The forwarder and
# the interface between them (fanpkt/datapath.py) go through the doors, never around.
BEHIND_THE_DOORS = {CORE, "ctypes", "ctypes.util", "fanpkt.tun"}
ABOVE_THE_DOORS = ("fanpkt.forwarder", "fanpkt.datapath")


def test_the_forwarder_goes_through_the_data_paths_doors():
    """No import of the compiled core, of ctypes (libbpf's way in) or of a device module
    by the forwarder or the data path interface: a fan's path is reached through
    fanpkt/datapath.py's DataPath, implemented by fanpkt/userpath.py and kernelpath.py."""
    targets = {m: {i.target for i in IMPORTS if i.module == m} for m in ABOVE_THE_DOORS}
    assert {"fanpkt.userpath", "fanpkt.kernelpath", "fanpkt.datapath"} <= \
        targets["fanpkt.forwarder"]                                 # the checks see them
    assert {m: sorted(t & BEHIND_THE_DOORS) for m, t in targets.items()} == \
        {m: [] for m in ABOVE_THE_DOORS}
    forwarder = (PKG / "forwarder.py").read_text()
    assert not re.search(r"bpf\.o|libbpf|CDLL|_fastpath", forwarder)


# The methods of the forwarder that pick a fan's data path: the only ones that may tell
# the paths apart.
PICKERS = {"_install", "_load_paths"}
PATH_KINDS = {"kernel", "user"}


def kind_branches(source: str) -> list[str]:
    """Each function of `source` (by name) holding an isinstance() call or a comparison
    with a data path's name ("kernel", "user")."""
    found = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "isinstance":
                found.append(f"{fn.name}: isinstance")
            elif isinstance(node, ast.Compare) and any(
                    isinstance(c, ast.Constant) and c.value in PATH_KINDS
                    for c in [node.left, *node.comparators]):
                found.append(f"{fn.name}: == {ast.unparse(node)}")
    return found


def test_the_kind_branch_finder_finds_them():
    src = ("class F:\n    def a(self, t):\n        return isinstance(t, int)\n"
           "    def b(self, s):\n        return 'kernel' if s.datapath == 'kernel' else 1\n"
           "    def c(self, s):\n        return s.kind != 'vxlan'\n")
    assert kind_branches(src) == ["a: isinstance", "b: == s.datapath == 'kernel'"]


def test_the_forwarder_tells_data_paths_apart_in_one_place():
    """Everywhere but where it picks a fan's path, the forwarder asks the path (DataPath)
    rather than branching on its kind or its device's type."""
    src = (PKG / "forwarder.py").read_text()
    found = kind_branches(src)
    assert found and all(f.split(":")[0] in PICKERS for f in found), found


def test_numpy_is_never_imported_at_module_level():
    top = sorted(f"{i.module}:{i.line}" for i in IMPORTS
                 if i.top_level and i.target.split(".")[0] == "numpy")
    assert top == []


def test_forwarder_does_not_load_numpy():
    p = subprocess.run([sys.executable, "-c",
                        "import fanpkt.forwarder, sys; print('numpy' in sys.modules)"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (p.returncode, p.stdout, p.stderr) == (0, "False\n", "")


def test_forwarder_without_metrics_does_not_load_prometheus_client():
    p = subprocess.run([sys.executable, "-c", "import fanpkt.forwarder, fanpkt.cli, fanpkt.watch,"
                        " sys; print('prometheus_client' in sys.modules)"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (p.returncode, p.stdout, p.stderr) == (0, "False\n", "")


# Built from pieces, so that this file does not contain what it looks for.
OUTSIDE_REFERENCES = [".." + "/shared", "fan" + "-spec", "FIELD" + "-NOTES"]
PEER_TOOL = "ufan" + "-peer"


def test_no_reference_to_material_outside_the_repository():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True, timeout=60).stdout.decode().split("\0")
    files = [f for f in files if f and not f.startswith(".ci/")]
    assert "fanpkt/cli.py" in files and "README.md" in files
    hits = []
    for name in files:
        path = ROOT / name
        if not path.is_file():          # deleted in the work tree
            continue
        data = path.read_bytes()
        if name.startswith("tests/") and PEER_TOOL.encode() in data:
            continue
        hits += [f"{name}: {s}" for s in OUTSIDE_REFERENCES if s.encode() in data]
    assert hits == []


# -- the user's pages speak of the software, not of the project's history --------------
# History (what a run measured against a goal, what an earlier attempt did) belongs in
# CHANGELOG.md and commit bodies. These patterns catch the words such notes use.
HISTORY = re.compile("|".join([
    r"\bsessions?\b", r"\b(?:this|last|previous|earlier|next) (?:runs?|sessions?)\b",
    r"\bnot kept\b", r"\b(?:targets?|goals?)\b[^\n]{0,30}?\b(?:met|missed)\b",
    r"\b(?:met|missed)\b[^\n]{0,20}?\b(?:targets?|goals?)\b",
    r"\btest (?:VM|machine)\b",             # the project's own lab, not the user's host
]), re.IGNORECASE)
# What is shipped to users and read as documentation: the sdist's pages and the unit.
PAGES = ["README.md", "CONTRIBUTING.md", "LICENSE", "docs/*.md", "tools/*.service"]


def history_words(text: str) -> list[str]:
    """Each line of `text` that speaks of sessions, runs or goals met, with its number."""
    return [f"{n}: {line.strip()}" for n, line in enumerate(text.splitlines(), 1)
            if HISTORY.search(line)]


def test_history_words_are_caught():
    """Lines of the kind the README used to hold, and ones that must pass."""
    caught = ["Last session's run: 0.61× (0.51–0.74).",
              "(this session, code at 5cea88d, 2 queues, 600 reloads)",
              "target ≥ 2×: met.", "IPIP ≥ 1×: missed. target 0.8×: met in every round",
              "a CoDel on the transmit ring (built, measured, not kept: design §15)",
              "the previous session's run grew 3.2 MB", "This run: three rounds",
              "Goals met: all", "on the 2-vCPU test VM, nice -10 cut a ping"]
    for line in caught:
        assert history_words(line), line
    fine = ["Remove everything this forwarder created.", "ARP asks for the target's MAC.",
            "a missed wake-up costs 50 µs", "the run directory of this forwarder"]
    for line in fine:
        assert history_words(line) == [], line


def test_pages_do_not_speak_of_the_projects_history():
    """README, docs and shipped files describe the software as it is; CHANGELOG.md is
    where its history goes, and is exempt."""
    pages = sorted({p for pattern in PAGES for p in ROOT.glob(pattern)})
    assert ROOT / "README.md" in pages and ROOT / "docs" / "spec.md" in pages
    assert any(p.suffix == ".service" for p in pages)
    hits = [f"{p.relative_to(ROOT)}:{h}" for p in pages for h in history_words(p.read_text())]
    assert hits == []


def test_the_specs_counter_table_lists_every_counter_once_in_order():
    """docs/spec.md §5: one table row per counter, in the enum's order, so that a counter
    added to the engine is documented where operators look it up."""
    from fanpkt.engine import COUNTER_NAMES
    text = (ROOT / "docs" / "spec.md").read_text()
    start = text.index("| counter | rule |", text.index("## §5 Counters"))
    table = text[start:text.index("\n\n", start)]      # one table: no blank line inside
    rows = re.findall(r"^\| `([a-z0-9_]+)` \|", table, re.MULTILINE)
    assert rows == list(COUNTER_NAMES)
    # and the count the text gives
    assert re.findall(r"the counters \((\d+) of them\)", text) == [str(len(COUNTER_NAMES))]


# -- the engine's units: definitions flow one way -----------------------------------------
# fastpath.pyx is one compiled module whose .pxi units are pasted in where it includes
# them. Each unit may use what is defined before it (the .pxd files, the units included
# earlier) and nothing after it: not a later unit's cdef function, and, except for the
# units included after the loops (testing.pxi), none of fastpath.pyx's own.
FAST = ROOT / "_fast"
CDEF_FUNCTION = re.compile(r"^cdef +(?:inline +)?[\w ]*?[\w*]+[ *]+(\w+) *\(", re.MULTILINE)
CALL = re.compile(r"\b(\w+)\s*\(")


def code_of(text: str) -> str:
    """The code of a Cython source without its docstrings, strings and comments."""
    text = re.sub(r'"""[\s\S]*?"""', "", text)
    text = re.sub(r'"[^"\n]*"', '""', text)
    return re.sub(r"#[^\n]*", "", text)


def units_in_order(main: str, read: Callable[[str], str]) -> list[tuple[str, str]]:
    """(name, code) of each unit in the order the module is pasted together: the included
    files, with fastpath.pyx's own code placed after the last include that comes before
    its last cdef function (so a unit included above the loops sits above them)."""
    code = code_of(main)
    includes = [(m.start(), m.group(1)) for m in
                re.finditer(r'^include "([\w.]+)"', main, re.MULTILINE)]
    defs = [m.start() for m in CDEF_FUNCTION.finditer(main)]
    last = max(defs, default=-1)
    before = [name for at, name in includes if at < last]
    after = [name for at, name in includes if at > last]
    return [(n, code_of(read(n))) for n in before] + [("fastpath.pyx", code)] + \
        [(n, code_of(read(n))) for n in after]


def upward_uses(units: list[tuple[str, str]]) -> list[str]:
    """Each use, in a unit, of a cdef function defined only in a unit after it."""
    defined = [set(CDEF_FUNCTION.findall(code)) for _, code in units]
    found = []
    for i, (name, code) in enumerate(units):
        seen = set().union(*defined[:i + 1])
        later = set().union(*defined[i + 1:]) - seen
        found += [f"{name} uses {f}" for f in sorted(set(CALL.findall(code)) & later)]
    return found


def test_upward_use_finder_finds_them():
    main = 'include "a.pxi"\ncdef int loop(int x):\n    return low(x)\ninclude "t.pxi"\n'
    files = {"a.pxi": "cdef int low(int x) noexcept nogil:\n    return high(x)  # loop(\n"
                      "cdef uint8_t *high(int x):\n    return NULL\n",
             "t.pxi": "def f():\n    return loop(1)\n"}
    units = units_in_order(main, files.__getitem__)
    assert [n for n, _ in units] == ["a.pxi", "fastpath.pyx", "t.pxi"]
    assert upward_uses(units) == []
    files["a.pxi"] += "cdef int up(int x):\n    return loop(x)\n"
    assert upward_uses(units_in_order(main, files.__getitem__)) == ["a.pxi uses loop"]


def test_units_use_nothing_defined_after_them():
    """No .pxi calls back up into the one that includes it or into a unit included later:
    shared.pxi -> ipip.pxi, vxlan.pxi -> tx.pxi, rx.pxi -> the loops -> testing.pxi."""
    units = units_in_order((FAST / "fastpath.pyx").read_text(),
                           lambda name: (FAST / name).read_text())
    assert len(units) >= 3 and all((FAST / n).exists() for n, _ in units)
    assert upward_uses(units) == []
