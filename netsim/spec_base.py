"""Base types of every scenario section (pydantic v2), shared by ``netsim.scenario`` and the
sections that protocols, dynamics and strategies define in their own modules.

Strict scalar types: a boolean or a string is never read as a number (YAML's ``yes`` is a
boolean), a float is never truncated to an integer, and (``allow_inf_nan=False`` on every
section) every float is finite unless its field says otherwise.
"""
from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, Strict

Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]
PositiveFloat = Annotated[float, Strict(), Field(gt=0)]
NonNegFloat = Annotated[float, Strict(), Field(ge=0)]


class Spec(BaseModel):
    """Base of every scenario section: unknown keys are errors, values are validated on
    assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
