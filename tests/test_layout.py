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
        "aircomp_fedavg", "async_fl", "d2d_prompt_transfer", "emulator_fl", "fedavg", "gossip_fl", "hierarchical_fl",
        "lola", "neural_aircomp", "prompt_service", "split_fl", "zeroth_order_fl"]
    for name, cls in protocols.PROTOCOLS.items():   # registered under the name of its module
        assert cls.__module__ == f"netsim.protocols.{name}"
    graph = import_graph("netsim")
    assert list(nx.simple_cycles(graph)) == []


SHARED_SECTIONS = {"Placement", "DeviceGroup", "EdgeServerSpec", "PathLossSpec", "ChannelSpec", "D2DSpec", "ModelSpec",
                   "PeftSpec", "DataSpec", "TrainingSpec", "ExecutionSpec", "StopSpec", "Scenario"}
"""The sections every run reads: the only classes netsim/scenario.py defines."""

OWNED_SECTIONS = {  # Scenario field: (owning module, section class)
    "fake": ("netsim.fake_trainer", "FakeTrainerSpec"),
    "dynamics": ("netsim.dynamics", "DynamicsSpec"),
    "strategies": ("netsim.strategies", "StrategiesSpec"),
    "async_fl": ("netsim.protocols.async_fl", "AsyncFLSpec"),
    "aircomp": ("netsim.protocols.aircomp_fedavg", "AirCompSpec"),
    "lola": ("netsim.protocols.lola", "LolaSpec"),
    "neural_aircomp": ("netsim.protocols.neural_aircomp", "NeuralAirCompSpec"),
    "federated_deft": ("netsim.federated_deft", "FederatedDeftSpec"),
    "emulator": ("netsim.protocols.emulator_fl", "EmulatorSpec"),
    "split": ("netsim.protocols.split_fl", "SplitSpec"),
    "zeroth_order": ("netsim.protocols.zeroth_order_fl", "ZerothOrderSpec"),
    "prompt_service": ("netsim.protocols.prompt_service", "PromptServiceSpec"),
    "hierarchical": ("netsim.protocols.hierarchical_fl", "HierarchicalSpec"),
    "gossip": ("netsim.protocols.gossip_fl", "GossipSpec"),
    "d2d_prompt_transfer": ("netsim.protocols.d2d_prompt_transfer", "D2DPromptTransferSpec"),
}


def test_scenario_defines_only_the_shared_sections():
    import netsim.scenario as scenario
    from netsim.spec_base import Spec

    source = ROOT / "netsim" / "scenario.py"
    defined = {node.name for node in ast.walk(ast.parse(source.read_text())) if isinstance(node, ast.ClassDef)}
    assert defined == SHARED_SECTIONS, f"protocol-specific sections defined in netsim/scenario.py: " \
                                       f"{sorted(defined - SHARED_SECTIONS)}"
    specs = {name for name, obj in vars(scenario).items()
             if isinstance(obj, type) and issubclass(obj, Spec) and obj.__module__ == "netsim.scenario"}
    assert specs == SHARED_SECTIONS


def _section_class(annotation):
    """The section class of a Scenario field's annotation (``Optional[X]`` -> X)."""
    import typing

    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if typing.get_origin(annotation) is typing.Union and len(args) == 1 else annotation


def test_each_owned_section_is_the_class_scenario_uses():
    import importlib

    from netsim.scenario import Scenario

    graph = import_graph("netsim")
    for field, (module_name, class_name) in OWNED_SECTIONS.items():
        module = importlib.import_module(module_name)
        cls = getattr(module, class_name)
        assert cls.__module__ == module_name
        assert _section_class(Scenario.model_fields[field].annotation) is cls, field
        assert not nx.has_path(graph, module_name, "netsim.scenario"), \
            f"{module_name} imports netsim.scenario at run time (netsim.scenario imports it)"
    shared = {Scenario.model_fields[f].annotation for f in Scenario.model_fields if f not in OWNED_SECTIONS}
    assert not shared & {getattr(importlib.import_module(m), c) for m, c in OWNED_SECTIONS.values()}


def test_moved_sections_are_re_exported_and_lola_algorithms_match_the_allocators():
    import typing

    import netsim.scenario as scenario
    from netsim.fake_trainer import FakeTrainerSpec
    from netsim.lola.allocation import ALGORITHMS
    from netsim.protocols.aircomp_fedavg import AirCompSpec
    from netsim.protocols.lola import LolaAlgorithm, LolaAnalyticModelSpec, LolaSpec
    from netsim.protocols.neural_aircomp import NeuralAirCompSpec

    for cls in (FakeTrainerSpec, AirCompSpec, LolaAnalyticModelSpec, LolaSpec, NeuralAirCompSpec):
        assert getattr(scenario, cls.__name__) is cls
    assert LolaSpec.model_fields["analytic"].annotation is LolaAnalyticModelSpec
    assert scenario.LolaAlgorithm is LolaAlgorithm
    assert typing.get_args(LolaAlgorithm) == ALGORITHMS
