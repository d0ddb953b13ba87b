"""Structural rules from DESIGN.md: imports flow one way; model code knows nothing of distribution.

Every import counts, wherever it stands: at the top, inside a function, or under ``TYPE_CHECKING`` (an import
deferred into a function is still a dependency, and a cycle hidden that way is still a cycle).
"""

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "clipforge"
LIBRARY = (
    "models",
    "losses",
    "data",
    "evaluation",
    "export",
    "distributed",
    "checkpoints",
    "config",
    "curation",
    "model_loading",
    "eval_results",
)
APPLICATION = ("clipforge.train", "clipforge.cli", "clipforge.launch")


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def library_files():
    for name in LIBRARY:
        target = PACKAGE / name
        yield from (target.rglob("*.py") if target.is_dir() else [target.with_suffix(".py")])


def test_library_never_imports_the_application():
    checked = 0
    for path in library_files():
        if not path.exists():
            continue
        checked += 1
        bad = {n for n in imports(path) if n.startswith(APPLICATION)}
        assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}"
    assert checked >= 10


def import_graph(root: Path, package: str = "clipforge") -> dict[tuple[str, str], list[str]]:
    """Edges between the package's top-level parts (a subpackage or a module: ``models``, ``config``, ...), each
    with the places (file:line) that make it."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(root.rglob("*.py")):
        source = path.relative_to(root).parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == package and len(parts) > 1 and parts[1] != source:
                    edges[(source, parts[1])].append(f"{path.relative_to(root)}:{node.lineno}")
    return edges


def import_cycles(edges: dict[tuple[str, str], list[str]]) -> list[list[str]]:
    """The strongly connected parts of more than one node (Tarjan), each sorted."""
    graph: dict[str, set[str]] = defaultdict(set)
    for source, target in edges:
        graph[source].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            part = []
            while True:
                member = stack.pop()
                part.append(member)
                if member == node:
                    break
            if len(part) > 1:
                found.append(sorted(part))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def describe(cycle: list[str], edges) -> str:
    return "; ".join(f"{a} -> {b} ({', '.join(edges[(a, b)][:3])})" for a in cycle for b in cycle if (a, b) in edges)


def test_no_import_cycle_between_the_packages_parts():
    edges = import_graph(PACKAGE)
    assert edges, "no imports found"
    cycles = import_cycles(edges)
    assert not cycles, "import cycles: " + " | ".join(describe(cycle, edges) for cycle in cycles)


def test_a_cycle_hidden_in_a_function_is_found(tmp_path):
    root = tmp_path / "clipforge"
    (root / "models").mkdir(parents=True)
    (root / "models" / "__init__.py").write_text("")
    (root / "models" / "builder.py").write_text("def load():\n    from clipforge.export import convert\n")
    (root / "export.py").write_text("from clipforge.models import builder\n")
    (root / "evaluation.py").write_text("import clipforge.models\n")
    edges = import_graph(root)
    assert import_cycles(edges) == [["export", "models"]]
    assert edges[("models", "export")] == ["models/builder.py:2"]


def test_models_import_no_other_part_of_the_package():
    """models is the bottom: loading weights from a path (which needs export's converters) is model_loading's."""
    for (source, target), places in import_graph(PACKAGE).items():
        assert source != "models", f"models imports {target}: {places}"


def test_models_know_nothing_of_distribution():
    for path in (PACKAGE / "models").rglob("*.py"):
        bad = {n for n in imports(path) if n.startswith(("torch.distributed", "torch.nn.parallel", "clipforge.losses"))}
        assert not bad, f"{path.name} imports {bad}"


def test_only_distributed_reads_launch_environment():
    for path in PACKAGE.rglob("*.py"):
        if path.name == "distributed.py":
            continue
        text = path.read_text()
        for variable in ("SLURM_PROCID", '"RANK"', "LOCAL_RANK", '"WORLD_SIZE"'):
            assert variable not in text, f"{path.relative_to(PACKAGE)} reads {variable}"


def test_losses_never_sync_with_the_host():
    """No .item()/.cpu()/.tolist() in the loss: the distributed path adds only its collectives."""
    for path in (PACKAGE / "losses").glob("*.py"):
        text = path.read_text()
        for call in (".item()", ".cpu()", ".tolist()", ".numpy()"):
            assert call not in text, f"{path.name}: {call}"


def test_ruff_check_and_format_are_clean():
    import shutil
    import subprocess
    import sys

    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    folders = ["src", "tests", "bench", "data_prep", "eval", "slurm", "examples"]
    for command in (["check"], ["format", "--check"]):
        done = subprocess.run([ruff, *command, *folders], cwd=PACKAGE.parents[1], capture_output=True, text=True)
        assert done.returncode == 0, f"ruff {' '.join(command)}: " + done.stdout[-3000:]
