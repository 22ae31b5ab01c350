"""Replay: tuned weights rebuilt from the base weights and an estimator's trajectory, bitwise.

A checkpoint holds no weights: an estimator's ``state_dict()`` holds its settings and one record per step (the
seeds, the projected gradients, the learning rates), and the noise is regenerated from the seeds. Replaying the
records with the same arithmetic as training (``replay_record``) gives the tuned weights bitwise, for MeZO and
populations alike, and an estimator positioned to continue training (resume).
"""

from __future__ import annotations

from collections.abc import Iterable

from zo_objectives.optimizer import MeZO, describe_params


def replay(params: Iterable, state: dict, steps: int | None = None) -> MeZO:
    """Rebuild tuned weights in place from the base weights and a ``MeZO`` or ``Population`` ``state_dict()``.

    ``params`` must be the same parameters (same order, same groups) the optimizer was built with, holding
    the base weights: their count, dtypes and shapes (and, when the state carries ``base_sha256``, the
    weights' checksum) are checked first, and a mismatch is a ValueError with the weights untouched. Returns
    an optimizer of the state's class positioned after the replayed steps (``steps``: the first ones only),
    ready to continue training.
    """
    if not (isinstance(state, dict) and "mezo" in state):
        raise TypeError("replay needs a MeZO.state_dict() (a dict with a 'mezo' entry: the settings and the "
                        f"trajectory), got {type(state).__name__}")
    mezo = state["mezo"]
    estimator = MeZO
    if "population" in mezo:  # imported only here: a MeZO replay (benchmarks/gpu_check.py) needs no objectives
        from zo_objectives.population import Population as estimator
    opt = estimator.from_config(params, mezo)
    given = [p for group in opt.param_groups for p in group["params"]]
    described = mezo.get("params") or []  # [dtype, shape] of each (a state_dict() of an older version: none)
    count = len(described) or sum(len(g["params"]) for g in state.get("param_groups", []))
    if count and count != len(given):
        raise ValueError(f"replay: the state is of {count} parameters, got {len(given)}")
    for i, (now, then) in enumerate(zip(describe_params(given), described)):
        if now != then:
            raise ValueError(f"replay: parameter {i} is {now[0]} {tuple(now[1])} but the state's is {then[0]} "
                             f"{tuple(then[1])}: not the parameters the optimizer was built with")
    if mezo.get("base_sha256"):
        from zo_objectives.train import weights_sha256  # (train imports this module)

        if weights_sha256(p for p in given if p.requires_grad) != mezo["base_sha256"]:
            raise ValueError("replay: the parameters do not hold the base weights the state was made from")
    if "param_groups" in state:
        for group, saved in zip(opt.param_groups, state["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
    for record in mezo["trajectory"][:steps]:
        opt.replay_record(record)
    return opt
