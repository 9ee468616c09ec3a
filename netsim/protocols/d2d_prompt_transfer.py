"""Device-to-device prompt transfer (DEFT technique 5), on one SimPy timeline.

Not reachable from a scenario yet: the section is validated, the experiment is being built.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Optional

from pydantic import Field, model_validator

from ..spec_base import Float, Int, NonNegFloat, PositiveFloat, Spec
from .prompt_service import TaskName

if TYPE_CHECKING:  # netsim.scenario imports D2DPromptTransferSpec: no import of it at run time
    from ..scenario import Scenario

VARIANTS = ("scratch", "edge_library", "random_neighbour", "best_link", "similarity", "oracle")


class D2DPromptTransferSpec(Spec):
    """Experiment ``d2d_prompt_transfer``: who holds which prompt, who gets a new task, how a
    source is chosen and fetched, and when tuning stops."""

    variants: list[Literal["scratch", "edge_library", "random_neighbour", "best_link", "similarity", "oracle"]] = Field(
        default_factory=lambda: list(VARIANTS), min_length=1, description="where a target's tuning starts")
    tasks: list[TaskName] = Field(
        default_factory=lambda: ["tweets_sentiment/airlines", "tweets_sentiment/apple", "tweets_sentiment/coachella",
                                 "tweets_sentiment/nfl"], min_length=1, max_length=100,
        description="the tasks of the zones: the area around the edge server is cut into len(tasks) equal angular "
        "sectors, sector z has task z")
    locality: Float = Field(0.8, ge=0, le=1, description="probability rho that a source device holds its zone's task "
                            "(otherwise a task drawn uniformly from tasks): task relatedness of neighbours")
    targets: Int = Field(4, ge=1, le=100_000, description="devices that get a new task (drawn uniformly); the others "
                         "are sources that hold a tuned prompt")
    target_tasks: Optional[list[TaskName]] = Field(
        None, min_length=1, max_length=100, description="the new tasks, one drawn uniformly per target (null: the "
        "target's zone task)")
    source_steps: Int = Field(100, ge=1, le=100_000, description="tuning steps of a source's prompt (before the run)")
    source_examples: Int = Field(800, ge=1, le=10_000_000, description="labelled examples a source tuned on")
    examples_per_device: Int = Field(64, ge=1, le=1_000_000, description="labelled examples a target holds")
    warmup_steps: Int = Field(10, ge=1, le=100_000, description="similarity, edge_library: steps a target tunes its "
                              "own prompt from scratch before it takes its task embedding")
    max_steps: Int = Field(40, ge=0, le=1_000_000, description="most tuning steps after the start (or the fetch)")
    eval_every_steps: Int = Field(10, ge=1, le=1_000_000)
    target_accuracy: Float = Field(0.45, gt=0, le=1, description="the target_metric a target wants")
    target_metric: Literal["accuracy", "balanced_accuracy"] = "balanced_accuracy"
    test_examples: Int = Field(100, ge=1, le=100_000, description="held-out test examples per task")
    max_hops: Int = Field(1, ge=1, le=64, description="sources within this many D2D hops are candidates")
    route_metric: Literal["expected_time", "hops"] = Field(
        "expected_time", description="multi-hop route: least expected store-and-forward time, or fewest hops")
    cost_weight_per_s: NonNegFloat = Field(1.0, le=1e9, description="similarity: score = cos(e_target, e_source) - "
                                           "c x expected fetch time; c [1/s]")
    embedding_bytes_per_value: Int = Field(4, ge=1, le=8, description="bytes of one value of a task embedding")
    query_bytes: Int = Field(64, ge=1, le=10**9, description="size of a target's discovery query [bytes]")
    downlink_bandwidth_hz: Optional[PositiveFloat] = Field(
        None, ge=1, le=1e12, description="edge_library: downlink band of one fetch [Hz] (null: "
        "channel.downlink_bandwidth_hz)")
    uplink_bandwidth_hz: Optional[PositiveFloat] = Field(
        None, ge=1, le=1e12, description="edge_library: uplink band of the embedding upload [Hz] (null: "
        "channel.uplink_bandwidth_hz)")

    @model_validator(mode="after")
    def _consistent(self) -> "D2DPromptTransferSpec":
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"d2d_prompt_transfer.variants={self.variants} repeats a variant; allowed: each of "
                             f"{list(VARIANTS)} at most once")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"d2d_prompt_transfer.tasks={self.tasks} repeats a task; allowed: distinct tasks")
        return self

    def all_tasks(self) -> list[str]:
        """The zones' tasks, then the targets' new tasks (each once)."""
        return list(dict.fromkeys([*self.tasks, *(self.target_tasks or [])]))
