"""Errors the planner raises for bad input and for fleets that cannot serve the model.

Every message names the field it is about (a dotted JSON path such as
``fleet.nodes[3].gpu_type``) and says what is allowed, so a user can fix the
file without reading the code.
"""

from __future__ import annotations


class PlanInputError(ValueError):
    """A field of the cluster description is missing, malformed or out of range."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class InfeasibleFleetError(PlanInputError):
    """No group that can be formed from the fleet holds one replica of the model.

    ``shortfall_gib`` is how much memory the best group that could be formed lacks.
    """

    def __init__(self, message: str, shortfall_gib: float, field: str = "fleet") -> None:
        self.shortfall_gib = shortfall_gib
        super().__init__(field, message)


class UnreachableSLOError(InfeasibleFleetError):
    """No group of the fleet meets an SLO even with no queue; ``field`` names the SLO."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message, shortfall_gib=0.0, field=field)
