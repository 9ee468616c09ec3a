"""The package layout: one module per experiment and per protocol, registered by name, and no
import circle among the modules (counting imports inside functions too; imports under
``if TYPE_CHECKING:`` are for type checkers only and never run)."""
import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    tree = ast.parse(path.read_text())
    type_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            type_only.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            out.add(target)
            out.update(f"{target}.{alias.name}" for alias in node.names)  # `from . import fedavg`
    return out


def import_graph(package: str = "deftsim") -> nx.DiGraph:
    files = {_module_name(p): p for p in (ROOT / package).rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(files)
    for module, path in files.items():
        for target in _imports(path, module):
            if target in files and target != module:
                graph.add_edge(module, target)
    return graph


def test_no_import_circle_in_deftsim():
    graph = import_graph()
    assert list(nx.simple_cycles(graph)) == []
    assert graph.has_edge("deftsim.runner", "deftsim.experiments")
    assert not nx.has_path(graph, "deftsim.experiments.fedavg", "deftsim.runner")


def test_every_experiment_is_a_registered_module():
    from deftsim.experiments import EXPERIMENTS
    from netsim.scenario import Scenario

    allowed = set(Scenario.model_fields["experiment"].annotation.__args__)
    assert set(EXPERIMENTS) == allowed
    for name, function in EXPERIMENTS.items():
        assert function.__module__ == f"deftsim.experiments.{name}"


def test_one_module_per_protocol():
    import netsim.protocols as protocols

    folder = Path(protocols.__file__).parent
    assert sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__") == [
        "aircomp_fedavg", "async_fl", "fedavg", "lola", "neural_aircomp"]
    for name, cls in protocols.PROTOCOLS.items():   # registered under the name of its module
        assert cls.__module__ == f"netsim.protocols.{name}"
    graph = import_graph("netsim")
    assert list(nx.simple_cycles(graph)) == []
