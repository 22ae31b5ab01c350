"""Exactness in every dtype: lr 0 and a failed step leave the weights bitwise unchanged in fp32, bf16 and fp16;
half-precision updates are unbiased (stochastic rounding) and replay bitwise; models split across modules or
dispatched by accelerate train exactly as whole ones."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import build_small_lm
from zo_objectives.checkpoint import replay
from zo_objectives.estimators import MeZO
from zo_objectives.noise import round_stochastic

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VARIANTS = {"central": {}, "forward": {"difference": "forward"}, "n3": {"n_perturbations": 3},
            "momentum": {"momentum": 0.5, "momentum_window": 3}, "normalized": {"update": "normalized"}}
TABLE = 1 << 21  # the smallest noise table: cheap to build
IDS = torch.randint(0, 96, (4, 12), generator=torch.Generator().manual_seed(0))


def lm(dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    return build_small_lm(96, seed=seed).to(dtype)


def lm_loss(model: torch.nn.Module):
    return lambda: model(input_ids=IDS, labels=IDS).loss


def snapshot(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def bitwise(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_lr_zero_leaves_every_weight_bitwise(dtype, variant):
    model = lm(DTYPES[dtype])
    before = snapshot(model)
    opt = MeZO(model.parameters(), lr=0.0, eps=1e-3, table_size=TABLE, **VARIANTS[variant])
    for _ in range(12):
        opt.step(lm_loss(model))
    assert any(g for r in opt.trajectory for g in r["grads"])  # the losses did differ: there was signal
    assert bitwise(snapshot(model), before)


class Boom(Exception):
    pass


def failing(closure, on_call: int, failure: str):
    calls = []

    def wrapped():
        calls.append(1)
        if len(calls) == on_call:
            if failure == "nan":
                return float("nan")
            raise KeyboardInterrupt if failure == "interrupt" else Boom("bad batch")
        return closure()

    return wrapped


@pytest.mark.parametrize("failure,on_call", [("error", 1), ("error", 2), ("interrupt", 2), ("nan", 2)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_failed_step_restores_bitwise_and_replay_agrees(dtype, failure, on_call):
    model = lm(DTYPES[dtype])
    base = snapshot(model)
    opt = MeZO(model.parameters(), lr=1e-3, eps=1e-3, table_size=TABLE)
    opt.step(lm_loss(model))
    after_one = snapshot(model)
    expected = {"error": Boom, "interrupt": KeyboardInterrupt, "nan": FloatingPointError}[failure]
    with pytest.raises(expected):
        opt.step(failing(lm_loss(model), on_call, failure))
    assert bitwise(snapshot(model), after_one)
    for _ in range(2):
        opt.step(lm_loss(model))
    fresh = lm(DTYPES[dtype])
    assert bitwise(snapshot(fresh), base)
    replay(fresh.parameters(), json.loads(json.dumps(opt.state_dict())))
    assert bitwise(snapshot(fresh), snapshot(model))  # 0 elements differ from the replayed trajectory


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_updates_are_unbiased(dtype):
    """An update of about 0.1 ulp per weight: round-to-nearest keeps a fraction of it, stochastic rounding
    keeps all of it on average (its projection on the exact update within a few percent of 1)."""
    dt = DTYPES[dtype]
    w = torch.nn.Parameter((torch.randn(1 << 20, generator=torch.Generator().manual_seed(1)) * 0.02).to(dt))
    holder = torch.nn.Module()
    holder.w = w
    before = w.detach().double().clone()
    opt = MeZO([w], lr=1.0, eps=1e-3, table_size=TABLE, seed=3)
    losses = iter([1.0, 0.0])  # g = (1 - 0) / (2 eps) = 500 whatever the weights
    ulp = 2.0 ** (-6 - (7 if dtype == "bf16" else 10))  # ulp of a weight near 0.02 (in [2^-6, 2^-5))
    opt.param_groups[0]["lr"] = 0.1 * ulp / 500
    opt.step(lambda: (holder.w.sum(), next(losses))[1])
    g, seed = opt.trajectory[0]["grads"][0], opt.trajectory[0]["seeds"][0]
    z = torch.cat([c.double() for _, c in opt.noise.chunks(seed, 0, w.detach())])
    exact = -opt.param_groups[0]["lr"] * g * z
    moved = w.detach().double() - before
    along = float(moved @ exact / (exact @ exact))
    nearest = (before + exact).to(dt).double() - before
    along_nearest = float(nearest @ exact / (exact @ exact))
    assert along == pytest.approx(1.0, abs=0.03)
    assert along_nearest < 0.8  # what round-to-nearest keeps (0.33 measured in bf16): the test can tell
    assert (moved != 0).float().mean() < 0.5  # each weight moved by a whole ulp or not at all


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_update_reads_the_perturbations_noise_in_fp32(dtype):
    """On the CPU the update adds z in fp32 (a faster kernel than adding a half tensor to an fp32 one): the very
    values the perturbation used, widened, so that the step moves along the direction it measured."""
    opt = MeZO([torch.nn.Parameter(torch.zeros(3))], table_size=TABLE, chunk_size=1 << 16)
    flat = torch.zeros(300_000, dtype=DTYPES[dtype])  # several chunks
    narrow = [(where, z.clone()) for where, z in opt.noise.chunks(5, 2, flat)]
    wide = list(opt.noise.chunks(5, 2, flat, wide=True))
    assert [w for w, _ in narrow] == [w for w, _ in wide]
    for (_, a), (_, b) in zip(narrow, wide, strict=True):
        assert b.dtype == torch.float32 and torch.equal(a.float(), b)


def neighbours(value: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest ``dtype`` value <= each value and the smallest >= it (equal when representable)."""
    near = value.to(dtype)
    inf = torch.full_like(near, float("inf"))
    up = torch.where(near.float() < value, torch.nextafter(near, inf), near).float()
    down = torch.where(near.float() > value, torch.nextafter(near, -inf), near).float()
    return down, up


FLOATS = st.floats(min_value=-60000, max_value=60000, width=32, allow_subnormal=True)


@settings(max_examples=100, deadline=None)
@given(st.lists(FLOATS, min_size=1, max_size=32), st.sampled_from(["bf16", "fp16"]), st.integers(0, 65535))
def test_round_stochastic_returns_a_neighbour(values, dtype, bit):
    value = torch.tensor(values, dtype=torch.float32)
    bits = torch.full_like(value, bit, dtype=torch.int32)
    out = round_stochastic(value.clone(), bits, out=torch.empty_like(value, dtype=DTYPES[dtype])).float()
    down, up = neighbours(value, DTYPES[dtype])
    assert ((out == down) | (out == up)).all()  # exact values (down == up) stay exact


@settings(max_examples=60, deadline=None)
@given(FLOATS, st.sampled_from(["bf16", "fp16"]))
def test_round_stochastic_is_unbiased_over_its_random_bits(v, dtype):
    value = torch.full((65536,), v, dtype=torch.float32)
    bits = torch.arange(65536, dtype=torch.int32)
    out = round_stochastic(value.clone(), bits, out=torch.empty_like(value, dtype=DTYPES[dtype])).double()
    down, up = neighbours(value[:1], DTYPES[dtype])
    # the mean over all 16-bit draws is v: exactly in bf16 (16 bits of dither), to 2^-13 of the spacing in fp16
    # (13 bits: exact wherever v has at most 13 bits below the spacing, all but the far subnormals)
    resolution = 2**-15 if dtype == "bf16" else 2**-13
    assert abs(float(out.mean()) - v) <= float(up - down) * resolution


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_training_replays_and_resumes_bitwise(dtype):
    model = lm(DTYPES[dtype])
    opt = MeZO(model.parameters(), lr=1e-3, eps=1e-3, table_size=TABLE, n_perturbations=2)
    for _ in range(6):
        opt.step(lm_loss(model))
    state = json.loads(json.dumps(opt.state_dict()))
    fresh = lm(DTYPES[dtype])
    replay(fresh.parameters(), state)
    assert bitwise(snapshot(fresh), snapshot(model))
    assert not bitwise(snapshot(fresh), snapshot(lm(DTYPES[dtype])))


def test_model_split_across_modules_and_dispatched_trains_like_a_whole_one():
    """z is keyed by (seed, tensor index), not by where a tensor lives: a model wrapped in two modules, or
    dispatched by accelerate (its hooks around every forward, as device_map="auto" installs them), moves
    bitwise like the plain one."""
    from accelerate import dispatch_model

    def run(model: torch.nn.Module, loss) -> list[torch.Tensor]:
        opt = MeZO(model.parameters(), lr=1e-3, eps=1e-3, table_size=TABLE)
        for _ in range(4):
            opt.step(loss)
        return snapshot(model)

    def loss(body: torch.nn.Module, head: torch.nn.Module):
        def closure() -> float:
            logits = head(body(input_ids=IDS).last_hidden_state)
            return float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 96), IDS[:, 1:].reshape(-1)))

        return closure

    plain = lm(torch.float32)
    expected = run(plain, loss(plain.model, plain.lm_head))
    whole = lm(torch.float32)
    split = torch.nn.ModuleDict({"body": whole.model, "head": whole.lm_head})
    assert bitwise(run(split, loss(split["body"], split["head"])), expected)

    dispatched = lm(torch.float32)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    dispatched = dispatch_model(dispatched, device_map=device_map, main_device="cpu", force_hooks=True)
    assert hasattr(dispatched.model.layers[0], "_hf_hook")
    assert bitwise(run(dispatched, loss(dispatched.model, dispatched.lm_head)), expected)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_lora_in_half_precision_is_exact_at_lr_zero(dtype):
    from zo_objectives.models import apply_peft

    model = apply_peft(lm(DTYPES[dtype]), "lora")
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = snapshot(model)
    opt = MeZO(trainable, lr=0.0, eps=1e-2, table_size=TABLE)
    for _ in range(3):
        opt.step(lm_loss(model))
    assert bitwise(snapshot(model), before)
    opt.param_groups[0]["lr"] = 1e-2
    opt.step(lm_loss(model))
    moved = [not torch.equal(a, b) for a, b in zip(before, snapshot(model))]
    assert any(moved) and sum(moved) <= len(trainable)  # only the LoRA tensors moved


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_weights_are_perturbed_through_their_output_without_a_copy(dtype):
    """An embedding's output gets z of its looked-up rows (bitwise what the perturbed copy gives); a linear
    layer on a few rows of input (an LM head under logits_to_keep) gets x @ z.T; on many rows it takes the copy."""
    from zo_objectives.estimators.hooks import Perturbed

    dt = DTYPES[dtype]
    torch.manual_seed(0)
    embedding, head = torch.nn.Embedding(3000, 48).to(dt), torch.nn.Linear(48, 3000, bias=False).to(dt)
    opt = MeZO([*embedding.parameters(), *head.parameters()], lr=1e-3, eps=1e-2, table_size=TABLE, chunk_size=1 << 16)
    ids = torch.randint(0, 3000, (5, 7))
    few, many = torch.randn(2, 1, 48).to(dt), torch.randn(4, 20, 48).to(dt)

    def perturbed(index: int, w: torch.Tensor) -> torch.Tensor:
        flat = w.detach().view(-1)
        z = torch.cat([c for _, c in opt.noise.chunks(7, index, flat)])
        return torch.add(flat, z, alpha=-1e-2).view_as(w)

    with torch.no_grad(), Perturbed(opt, 7, -1.0) as p:
        looked_up, small, large = embedding(ids), head(few), head(many)
        assert not p.swapped and p.seen == {0, 1}
    assert torch.equal(looked_up, torch.nn.functional.embedding(ids, perturbed(0, embedding.weight)))
    expected = torch.nn.functional.linear(few.double(), perturbed(1, head.weight).double())
    shift = (expected - torch.nn.functional.linear(few.double(), head.weight.double())).abs().max()
    tolerance = {"fp32": 1e-5, "bf16": 3e-2, "fp16": 5e-3}[dtype]  # rounding of the output, well below the shift
    assert shift > 0.1
    torch.testing.assert_close(small.double(), expected, atol=tolerance, rtol=0)
    assert torch.equal(large, torch.nn.functional.linear(many, perturbed(1, head.weight)))
    assert embedding.weight is opt.param_groups[0]["params"][0]  # nothing left swapped


@pytest.mark.parametrize("noise", ["table", "gaussian"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_layers_weights_perturbed_at_once_are_one_add_per_weight(dtype, noise):
    """A decoder layer's weights are perturbed together at its entry (one multi-tensor add): the forward sees
    bitwise what it sees with every weight replaced by ``w + alpha * z`` made by one add per weight, chunk by chunk
    (a chunk smaller than some weights here), and the model's own weights are back afterwards."""
    from zo_objectives.estimators.hooks import Perturbed

    model = lm(DTYPES[dtype])
    opt = MeZO(model.parameters(), lr=1e-3, eps=1e-2, table_size=TABLE, chunk_size=1 << 11, noise=noise)
    before = snapshot(model)
    with torch.no_grad(), Perturbed(opt, 7, -1.0) as perturbed:
        got = model(input_ids=IDS).logits
    assert perturbed.seen == set(range(len(before))) and bitwise(snapshot(model), before)
    copy = lm(DTYPES[dtype])
    with torch.no_grad():
        for index, p in enumerate(copy.parameters()):
            flat = p.view(-1)
            for where, z in opt.noise.chunks(7, index, flat):
                flat[where] = torch.add(flat[where], z, alpha=-1e-2)
        expected = copy(input_ids=IDS).logits
    assert torch.equal(got, expected)


def test_the_module_layout_is_kept_across_steps_and_rebuilt_when_the_model_changes():
    """MeZO keeps the modules' layout from step to step (Llama's forward slicing its ModuleList does not count as a
    change), and builds it again when the trainable tensors change (frozen, unfrozen) or a parameter is registered
    on a module of it (a tied weight): every step moves the weights bitwise as with a layout built for it."""
    import gc

    from torch.nn.modules import module as nn_module

    def changes(model: torch.nn.Module, step: int) -> None:
        if step in (2, 4):  # freeze the first layer, then unfreeze it
            for p in model.model.layers[0].parameters():
                p.requires_grad_(step == 4)
        if step == 6:  # the head's weight tied to the embedding's: its own weight is no longer used
            model.lm_head.weight = model.model.embed_tokens.weight

    def run(fresh_layouts: bool) -> tuple[list[list[torch.Tensor]], list[int]]:
        model = lm(torch.float32)
        opt = MeZO(model.parameters(), lr=1e-2, eps=1e-2, table_size=TABLE)
        weights, layouts = [], []
        for step in range(8):
            changes(model, step)
            if fresh_layouts:
                opt._kept_layout = None
            with torch.no_grad():  # warns once the head's own weight is unused
                opt.step(lambda: float(model(input_ids=IDS, logits_to_keep=1).logits.float().logsumexp(-1).mean()))
            weights.append(snapshot(model))
            layouts.append(id(opt._kept_layout))
        return weights, layouts

    hooks = len(nn_module._global_parameter_registration_hooks)
    with pytest.warns(UserWarning, match="not used by any module's forward"):
        kept, layouts = run(fresh_layouts=False)
    with pytest.warns(UserWarning, match="not used by any module's forward"):
        fresh, _ = run(fresh_layouts=True)
    assert all(bitwise(a, b) for a, b in zip(kept, fresh, strict=True))
    assert not all(bitwise(a, b) for a, b in zip(kept, kept[1:]))  # the steps moved the weights
    new = [i for i in range(1, 8) if layouts[i] != layouts[i - 1]]
    assert new == [2, 4, 6]  # kept otherwise
    gc.collect()  # the layouts' hooks went with them (other tests' optimizers may go now too)
    assert len(nn_module._global_parameter_registration_hooks) <= hooks


@pytest.mark.parametrize("dtype", DTYPES)
def test_an_embedding_of_one_noise_chunk_gets_the_z_of_its_looked_up_rows(dtype):
    """An embedding of at most one noise chunk looks its z rows up as it looks up its weight's, and adds them to its
    output by blocks of rows: in fp32 bitwise the output of the perturbed weight (in half precision an add's last
    elements may round apart from the same add over the whole weight)."""
    from zo_objectives.estimators.hooks import Perturbed

    torch.manual_seed(0)
    embedding = torch.nn.Embedding(500, 40).to(DTYPES[dtype])
    opt = MeZO(embedding.parameters(), lr=1e-3, eps=1e-2, table_size=TABLE)
    ids = torch.randint(0, 500, (6, 9))
    Perturbed.GATHER, gather = 120, Perturbed.GATHER  # rows looked up in blocks of 3
    try:
        with torch.no_grad(), Perturbed(opt, 7, -1.0) as p:
            looked_up = embedding(ids)
    finally:
        Perturbed.GATHER = gather
    assert p.through_output == {} and p.seen == {0}
    flat = embedding.weight.detach().view(-1)
    z = torch.cat([c for _, c in opt.noise.chunks(7, 0, flat)])
    assert z.numel() == flat.numel() <= opt.noise.chunk_size
    expected = torch.nn.functional.embedding(ids, embedding.weight.detach()).view(-1, 40)
    for start in range(0, ids.numel(), 3):
        expected[start:start + 3].add_(z.view(500, 40)[ids.view(-1)[start:start + 3]], alpha=-1e-2)
    assert torch.equal(looked_up, expected.view(6, 9, 40))
    if dtype == "fp32":
        assert torch.equal(looked_up, torch.nn.functional.embedding(ids, torch.add(flat, z, alpha=-1e-2).view(500, 40)))
