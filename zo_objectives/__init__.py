"""zo-objectives: fine-tune language models on objectives without a gradient, with MeZO.

>>> from zo_objectives import MeZO, load_model, make_objective, predictor_for
"""

from zo_objectives.models import apply_peft, load_model, select_trainable
from zo_objectives.objectives import (
    CrossEntropy,
    MetricObjective,
    Objective,
    RewardError,
    RewardObjective,
    WeightedSum,
    make_objective,
)
from zo_objectives.optimizer import MeZO, make_scheduler, replay
from zo_objectives.scoring import Generation, LabelWords, MultipleChoice, predictor_for
from zo_objectives.train import evaluate_model, train

__all__ = [
    "CrossEntropy",
    "Generation",
    "LabelWords",
    "MeZO",
    "MetricObjective",
    "MultipleChoice",
    "Objective",
    "RewardError",
    "RewardObjective",
    "WeightedSum",
    "apply_peft",
    "evaluate_model",
    "load_model",
    "make_objective",
    "make_scheduler",
    "predictor_for",
    "replay",
    "select_trainable",
    "train",
]
