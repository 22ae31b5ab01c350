"""Estimators: seeded zeroth-order optimizers as peers behind one interface, each registered by name.

``get_estimator("mezo")`` returns the class; ``list_estimators()`` the names; ``estimator_from_state(state)`` the
class a ``state_dict()`` was written by. A new estimator is one file: subclass :class:`Estimator`, implement
``step(closure)``, decorate with ``@register_estimator("name")`` (see :mod:`.mezo`, the smallest).
"""

from zo_objectives.estimators.base import (
    NONFINITE_POLICIES,
    SHAPINGS,
    UPDATES,
    Estimator,
    estimator_from_state,
    get_estimator,
    list_estimators,
    register_estimator,
)
from zo_objectives.estimators.fzoo import FZOO
from zo_objectives.estimators.grzo import GRZO
from zo_objectives.estimators.mezo import DIFFERENCES, MeZO
from zo_objectives.estimators.population import Population

__all__ = ["DIFFERENCES", "NONFINITE_POLICIES", "SHAPINGS", "UPDATES", "FZOO", "GRZO", "Estimator", "MeZO",
           "Population", "estimator_from_state", "get_estimator", "list_estimators", "register_estimator"]
