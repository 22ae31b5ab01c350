"""Shared test fixtures. Tests use one thread: tiny models gain nothing from more, and the suite then
runs beside other work on a 2-core machine without oversubscription."""

import torch

torch.set_num_threads(1)
