"""Why a rule held a copy back or changed it: the one shape every copy rule answers in."""

from __future__ import annotations

from dataclasses import dataclass, field

from schemas.decisions import DecisionRule


@dataclass(slots=True, frozen=True)
class RuleNote:
    """Which rule spoke, what it said, and the numbers it saw (they become the follower's
    ``CopyDecision``)."""

    rule: DecisionRule
    message: str
    numbers: dict[str, float | str | None] = field(default_factory=dict)
