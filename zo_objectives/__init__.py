"""zo-objectives: fine-tune language models on objectives without a gradient, with seeded zeroth-order
estimators (MeZO and its peers).

>>> from zo_objectives import MeZO, load_model, make_objective, predictor_for

The model loaders (``load_model``, ``apply_peft``, ``select_trainable``) are imported on first use, and
scikit-learn only by the macro-F1 metric: ``import zo_objectives`` then costs torch and little else
(transformers' model code pulls in accelerate; scikit-learn pulls in scipy and pandas).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path


def _check_top_level_packages() -> None:
    """``metrics`` and ``tasks`` are top-level packages installed beside this one. A ``metrics.py`` or
    ``tasks.py`` earlier on ``sys.path`` (the working directory, a script's folder) would be imported in their
    place and fail later in confusing ways; refuse it now, naming the file."""
    root = Path(__file__).resolve().parent.parent
    for name in ("metrics", "tasks"):
        expected = root / name / "__init__.py"
        module = sys.modules.get(name)
        spec = None if module else importlib.util.find_spec(name)
        origin = getattr(module, "__file__", None) if module else getattr(spec, "origin", None)
        if origin is None or Path(origin).resolve() != expected:
            found = origin or (list(spec.submodule_search_locations) if spec else "nothing")
            raise ImportError(f"{found} shadows zo-objectives' {name!r} package ({expected.parent}); rename it, or run "
                              f"from a folder without a {name}.py")


_check_top_level_packages()

from zo_objectives.checkpoint import replay  # noqa: E402
from zo_objectives.estimators import (  # noqa: E402
    FZOO,
    GRZO,
    Estimator,
    MeZO,
    Population,
    get_estimator,
    list_estimators,
    register_estimator,
)
from zo_objectives.objectives import (  # noqa: E402 (after the check, which names a shadowing file)
    DEFAULT_SMOOTHING,
    CrossEntropy,
    MetricObjective,
    Objective,
    PerExampleObjective,  # noqa: E402
    PopulationObjective,  # noqa: E402
    RewardError,
    RewardObjective,
    WeightedSum,
    make_objective,
)
from zo_objectives.scoring import (  # noqa: E402
    ChoicePredictor,
    GenerationPredictor,
    LabelWordPredictor,
    predictor_for,
)
from zo_objectives.train import make_scheduler, train  # noqa: E402 (eager: the function's name is the module's)

_LAZY = {  # name -> module, imported on first access (PEP 562)
    "apply_peft": "zo_objectives.models",
    "load_model": "zo_objectives.models",
    "select_trainable": "zo_objectives.models",
    "evaluate_model": "zo_objectives.evaluate",
    "ZOConfig": "zo_objectives.trainer",  # a Trainer-style entry for TRL users (imports transformers' tokenizers)
    "ZOTrainer": "zo_objectives.trainer",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'zo_objectives' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "DEFAULT_SMOOTHING",
    "ChoicePredictor",
    "CrossEntropy",
    "Estimator",
    "FZOO",
    "GRZO",
    "GenerationPredictor",
    "LabelWordPredictor",
    "MeZO",
    "MetricObjective",
    "Objective",
    "Population",
    "PerExampleObjective",
    "PopulationObjective",
    "RewardError",
    "RewardObjective",
    "WeightedSum",
    "ZOConfig",
    "ZOTrainer",
    "apply_peft",
    "evaluate_model",
    "get_estimator",
    "list_estimators",
    "load_model",
    "make_objective",
    "make_scheduler",
    "predictor_for",
    "register_estimator",
    "replay",
    "select_trainable",
    "train",
]
