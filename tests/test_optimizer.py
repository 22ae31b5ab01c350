"""Tests for the MeZO optimizer: the SPSA estimator, noise, training on a metric, determinism, resume and
replay, exception safety, RNG hygiene, memory bound, options and schedules."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from metrics import get_metric
from zo_objectives.checkpoint import replay
from zo_objectives.estimators import MeZO
from zo_objectives.noise import NOISE_KINDS, Noise, mix
from zo_objectives.objectives import MetricObjective
from zo_objectives.train import make_scheduler

SMALL_TABLE = 1 << 21  # the smallest table MeZO accepts (2 * its chunk size): cheap to build in tests
EPS = 1e-3

# make_scheduler(last_step=...) steps the scheduler before any optimizer step, by design
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")

_real_table = Noise.table
_real_gaussian = Noise.gaussian
_tables: dict = {}


@pytest.fixture(autouse=True)
def shared_noise_tables(monkeypatch):
    """Build each (table_size, table_seed, device) Gaussian table once for the whole module: the tables are pure
    functions of those, and building one per optimizer would dominate the module's run time."""

    def gaussian(self, device):
        key = (self.table_size, self.table_seed, device)
        if key not in _tables:
            _tables[key] = _real_gaussian(self, device)
        self._tables[(device, torch.float32)] = _tables[key]
        return _tables[key]

    monkeypatch.setattr(Noise, "gaussian", gaussian)


def make_opt(params, **kw):
    kw.setdefault("table_size", SMALL_TABLE)
    return MeZO(params, **kw)


def regen(opt: MeZO, seed: int, index: int, like: torch.Tensor) -> torch.Tensor:
    """The z the optimizer used for tensor ``index`` at ``seed``, regenerated (copied out of any buffer)."""
    flat = torch.empty_like(like).view(-1)
    z = torch.empty_like(flat)
    for where, chunk in opt.noise.chunks(seed, index, flat):
        z[where] = chunk
    return z.view_as(like)


class Tensors(torch.nn.Module):
    """Parameters returned by a forward: MeZO perturbs weights only inside module forwards, so a closure reads
    them through one (``read(x)()[0]``), as a model's loss does."""

    def __init__(self, *params: torch.nn.Parameter):
        super().__init__()
        for i, p in enumerate(params):
            self.register_parameter(f"p{i}", p)

    def forward(self) -> list[torch.Tensor]:
        return [getattr(self, f"p{i}").detach() for i in range(len(self._parameters))]


def read(*params: torch.nn.Parameter) -> Tensors:
    return Tensors(*params)


def quadratic(x: torch.Tensor, a: torch.Tensor):
    """f(x) = 0.5 * ||x - a||^2 of the parameter ``x`` as the closure sees it (perturbed)."""
    m = read(x)
    return lambda: 0.5 * float(((m()[0] - a) ** 2).sum())


def f_at(x0, a, v):
    return 0.5 * float(((x0 + v - a) ** 2).sum())


# --- the estimator -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("noise", NOISE_KINDS)
def test_projected_grad_is_spsa_formula(noise):
    g = torch.Generator().manual_seed(1)
    x = torch.nn.Parameter(torch.randn(7, 5, generator=g, dtype=torch.float64))
    a = torch.randn(7, 5, generator=g, dtype=torch.float64)
    x0 = x.detach().clone()
    opt = make_opt([x], lr=0.0, eps=EPS, noise=noise, seed=3)
    loss = opt.step(quadratic(x, a))
    rec = opt.trajectory[-1]
    seed, grad = rec["seeds"][0], rec["grads"][0]
    assert seed == mix(3, 0)
    z = regen(opt, seed, 0, x0)
    assert z.abs().sum() > 0
    plus, minus = f_at(x0, a, EPS * z), f_at(x0, a, -EPS * z)
    assert grad == pytest.approx((plus - minus) / (2 * EPS), rel=1e-6)
    # for a quadratic the central difference is the exact directional derivative z . (x - a)
    assert grad == pytest.approx(float((z * (x0 - a)).sum()), rel=1e-6)
    assert loss == pytest.approx((plus + minus) / 2, rel=1e-9)
    torch.testing.assert_close(x.detach(), x0, atol=1e-12, rtol=0)  # lr = 0: restored


@pytest.mark.parametrize("noise", NOISE_KINDS)
def test_update_is_minus_lr_g_z(noise):
    g = torch.Generator().manual_seed(2)
    x = torch.nn.Parameter(torch.randn(40, generator=g, dtype=torch.float64))
    a = torch.randn(40, generator=g, dtype=torch.float64)
    lr = 0.05
    opt = make_opt([x], lr=lr, eps=EPS, noise=noise, seed=5)
    for _ in range(3):
        x0 = x.detach().clone()
        opt.step(quadratic(x, a))
        rec = opt.trajectory[-1]
        z = regen(opt, rec["seeds"][0], 0, x0)
        expected = (f_at(x0, a, EPS * z) - f_at(x0, a, -EPS * z)) / (2 * EPS)
        assert rec["grads"][0] == pytest.approx(expected, rel=1e-6)
        torch.testing.assert_close(x.detach() - x0, -lr * rec["grads"][0] * z, atol=1e-10, rtol=1e-7)


@pytest.mark.parametrize("noise", NOISE_KINDS)
def test_estimator_mean_approaches_gradient(noise):
    d, n = 10, 2000
    g = torch.Generator().manual_seed(4)
    x = torch.nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))
    a = torch.randn(d, generator=g, dtype=torch.float64)
    true_grad = (x.detach() - a).clone()
    opt = make_opt([x], lr=0.0, eps=EPS, noise=noise, seed=11)
    closure = quadratic(x, a)
    total = torch.zeros(d, dtype=torch.float64)
    for _ in range(n):
        opt.step(closure)
        rec = opt.trajectory[-1]
        total += rec["grads"][0] * regen(opt, rec["seeds"][0], 0, x.detach())
    mean = total / n
    cosine = float(mean @ true_grad / (mean.norm() * true_grad.norm()))
    assert cosine > 0.95
    # E||mean - grad||^2 = (d + 1) ||grad||^2 / n for Gaussian z (less for Rademacher); allow 3.5x that std
    bound = 3.5 * math.sqrt((d + 1) / n)
    assert float((mean - true_grad).norm() / true_grad.norm()) < bound


# --- the noise -----------------------------------------------------------------------------------------------
def test_table_noise_statistics_and_distinct_slices():
    noise = Noise("table", table_size=1 << 16, table_seed=0, chunk_size=1 << 12)
    table = _real_table(noise, torch.device("cpu"), torch.float32)
    assert table.numel() == 1 << 16
    assert abs(float(table.double().mean())) < 1e-6 and abs(float(table.double().std()) - 1) < 1e-5
    flat = torch.empty(3 * (1 << 12) + 100)
    chunks = [z.clone() for _, z in noise.chunks(seed=7, index=0, flat=flat)]
    assert [c.numel() for c in chunks] == [4096, 4096, 4096, 100]
    for c in chunks[:3]:
        assert abs(float(c.mean())) < 5 / math.sqrt(c.numel())
        assert abs(float(c.var()) - 1) < 0.15
    # different chunks of a tensor, different tensors, different seeds: different slices
    assert not torch.equal(chunks[0], chunks[1]) and not torch.equal(chunks[1], chunks[2])
    other_tensor = next(noise.chunks(seed=7, index=1, flat=flat))[1]
    other_seed = next(noise.chunks(seed=8, index=0, flat=flat))[1]
    assert not torch.equal(chunks[0], other_tensor) and not torch.equal(chunks[0], other_seed)
    # the same arguments give the same z
    again = [z.clone() for _, z in noise.chunks(seed=7, index=0, flat=flat)]
    assert all(torch.equal(u, v) for u, v in zip(chunks, again))
    # another table seed, another table
    other_table = Noise("table", table_size=1 << 16, table_seed=1, chunk_size=1 << 12)
    assert not torch.equal(next(other_table.chunks(7, 0, flat))[1], chunks[0])


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_exact_noise_chunks_statistics(kind):
    noise = Noise(kind, chunk_size=1000)
    flat = torch.empty(2500)
    z = torch.cat([c.clone() for _, c in noise.chunks(seed=1, index=0, flat=flat)])
    assert z.numel() == 2500
    assert abs(float(z.mean())) < 0.1 and abs(float(z.var()) - 1) < 0.1
    if kind == "rademacher":
        assert set(z.unique().tolist()) == {-1.0, 1.0}
    again = torch.cat([c.clone() for _, c in noise.chunks(seed=1, index=0, flat=flat)])
    assert torch.equal(z, again)
    other = torch.cat([c.clone() for _, c in noise.chunks(seed=1, index=1, flat=flat)])
    assert not torch.equal(z, other)


def test_noise_invalid_arguments():
    with pytest.raises(ValueError, match="table, gaussian, rademacher"):
        Noise("uniform")
    with pytest.raises(ValueError, match="table_size"):
        Noise("table", table_size=100, chunk_size=64)


def test_gaussian_noise_chunks_are_chunk_sized():
    big = torch.zeros((1 << 20) + 17)
    noise = Noise("gaussian", table_size=SMALL_TABLE)
    sizes = [z.numel() for _, z in noise.chunks(3, 0, big)]
    assert max(sizes) == noise.chunk_size < big.numel() and sum(sizes) == big.numel()
    assert not noise._tables


def test_closure_sees_perturbed_weights_and_stored_ones_are_never_written():
    x = torch.nn.Parameter(torch.randn(1000, generator=torch.Generator().manual_seed(0)))
    x0, version = x.detach().clone(), x._version
    m = read(x)
    opt = make_opt([x], lr=0.1, eps=EPS, seed=5)
    seen, versions = [], []
    opt.step(lambda: seen.append(m()[0].clone()) or versions.append(x._version) or 0.0)
    z = regen(opt, opt.trajectory[0]["seeds"][0], 0, x0)
    assert versions == [version, version]  # the closure's perturbed weights are copies; x is not touched
    torch.testing.assert_close(seen[0], x0 + EPS * z, atol=1e-7, rtol=0)
    torch.testing.assert_close(seen[1], x0 - EPS * z, atol=1e-7, rtol=0)
    assert torch.equal(x.detach(), x0)  # a tie (both losses 0): the update moves nothing, bitwise
    assert m.p0 is x  # the module holds its own parameter again


def test_weights_read_outside_a_forward_warn_once():
    x = torch.nn.Parameter(torch.randn(10))
    y = torch.nn.Parameter(torch.randn(10))
    m = read(x)
    opt = make_opt([x, y], lr=0.1, eps=EPS)
    with pytest.warns(UserWarning, match="1 of 2 trainable tensors were not used by any module's forward"):
        opt.step(lambda: float(m()[0].sum() + y.sum()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(lambda: float(m()[0].sum() + y.sum()))


# --- training on a non-differentiable objective -------------------------------------------------------------
class LinearPredictor:
    """Scores of a linear classifier on the example's feature vector: a stand-in for LabelWordPredictor."""

    def scores(self, model, batch):
        with torch.no_grad():
            return model(torch.stack([ex["x"] for ex in batch]))

    def predict(self, model, batch):
        return self.scores(model, batch).argmax(-1).tolist()


def separable(n: int, d: int = 8, seed: int = 0, offset: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g)
    x = torch.randn(offset + n, d, generator=g)[offset:]
    y = (x @ w > 0).long()
    return [{"prompt": f"example {offset + i}", "x": x[i], "label": int(y[i])} for i in range(n)]


def zero_classifier(d: int = 8) -> torch.nn.Linear:
    model = torch.nn.Linear(d, 2)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    return model


@pytest.mark.parametrize("noise", NOISE_KINDS)
@pytest.mark.parametrize("samples,eps,steps", [(16, 0.05, 250), (0, 0.1, 250)], ids=["smoothed", "hard"])
def test_accuracy_objective_trains_linear_classifier(noise, samples, eps, steps):
    train, test = separable(64), separable(200, offset=64)
    model = zero_classifier()
    predictor = LinearPredictor()
    accuracy = get_metric("accuracy")
    hard = MetricObjective(accuracy, predictor, smoothing=0)
    objective = MetricObjective(accuracy, predictor, smoothing=1.0) if samples else hard
    before = -hard(model, train)
    assert 0.3 <= before <= 0.7  # chance: every score ties
    opt = make_opt(model.parameters(), lr=0.5, eps=eps, noise=noise, seed=0)
    for _ in range(steps):
        opt.step(lambda: objective(model, train))
    assert -hard(model, train) > 0.9
    assert -hard(model, test) > 0.85
    if samples:
        assert objective.form == "log"  # the default: mean log of each example's expected accuracy
        assert -objective(model, train) > math.log(0.85)  # their geometric mean went up from 0.5


@pytest.mark.parametrize("noise", NOISE_KINDS)
def test_table_noise_converges_like_gaussian_on_quadratic(noise):
    d = 100
    g = torch.Generator().manual_seed(0)
    a = torch.randn(d, generator=g)
    x = torch.nn.Parameter(torch.zeros(d))
    closure = quadratic(x, a)
    start = closure()
    opt = make_opt([x], lr=0.01, eps=EPS, noise=noise, seed=1)
    for _ in range(600):
        opt.step(closure)
    # expected contraction per step 1 - 2 lr + lr^2 (d + 2) ~ 0.99: 600 steps -> ~0.0025
    assert closure() < 0.02 * start


# --- determinism, resume, replay -----------------------------------------------------------------------------
def small_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


DATA_X = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
DATA_Y = torch.randint(0, 2, (32,), generator=torch.Generator().manual_seed(1))


def net_loss(model):
    return lambda: float(torch.nn.functional.cross_entropy(model(DATA_X), DATA_Y))


def groups(model, lr=0.02):
    weights = [p for p in model.parameters() if p.ndim >= 2]
    biases = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": weights, "weight_decay": 0.1}, {"params": biases, "lr": lr / 2}]


SETTINGS = dict(lr=0.02, eps=EPS, seed=123)


def run_steps(model, opt, steps, scheduler=None):
    for _ in range(steps):
        opt.step(net_loss(model))
        if scheduler is not None:
            scheduler.step()


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_bitwise(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@pytest.mark.parametrize("noise", NOISE_KINDS)
def test_same_seed_same_weights_bitwise(noise):
    results = []
    for _ in range(2):
        model = small_net()
        run_steps(model, make_opt(groups(model), noise=noise, **SETTINGS), 30)
        results.append(weights(model))
    assert_bitwise(*results)
    model = small_net()
    run_steps(model, make_opt(groups(model), noise=noise, **{**SETTINGS, "seed": 124}), 30)
    assert not torch.equal(weights(model)[0], results[0][0])


VARIANTS = {
    "central": {},
    "forward": {"difference": "forward"},
    "n3": {"n_perturbations": 3},
    "momentum": {"momentum": 0.8, "momentum_window": 3, "n_perturbations": 2},
    "rank-forward": {"fitness_shaping": "rank", "difference": "forward", "n_perturbations": 3},
    "sign": {"update": "sign", "lr": 1e-3},
    "normalized": {"update": "normalized", "lr": 1e-3, "n_perturbations": 2},
}
# every variant with the default table noise, the plain one (and momentum) with the exact noises
COMBINATIONS = [("table", v) for v in VARIANTS] + [(n, "central") for n in ("gaussian", "rademacher")] + [
    ("gaussian", "momentum")]


@pytest.mark.parametrize("noise,variant", COMBINATIONS)
def test_resume_from_json_state_is_bitwise(noise, variant):
    settings = {**SETTINGS, **VARIANTS[variant]}
    model = small_net()
    opt = make_opt(groups(model), noise=noise, **settings)
    run_steps(model, opt, 100, make_scheduler(opt, "linear", 100))
    straight = weights(model)

    model = small_net()
    opt = make_opt(groups(model), noise=noise, **settings)
    run_steps(model, opt, 50, make_scheduler(opt, "linear", 100))
    state = json.loads(json.dumps(opt.state_dict()))
    del opt
    resumed = make_opt(groups(model), noise=noise, **settings)
    resumed.load_state_dict(state)
    assert resumed.num_perturbations_done == 50 * settings.get("n_perturbations", 1)
    assert len(resumed.trajectory) == 50
    run_steps(model, resumed, 50, make_scheduler(resumed, "linear", 100, last_step=50))
    assert_bitwise(weights(model), straight)
    assert len(resumed.trajectory) == 100


@pytest.mark.parametrize("noise,variant", COMBINATIONS)
def test_replay_rebuilds_trained_weights_bitwise(noise, variant):
    model = small_net()
    base = weights(model)
    opt = make_opt(groups(model), noise=noise, **{**SETTINGS, **VARIANTS[variant]})
    run_steps(model, opt, 40, make_scheduler(opt, "cosine", 80))
    trained = weights(model)
    state = json.loads(json.dumps(opt.state_dict()))

    fresh = small_net()
    assert_bitwise(weights(fresh), base)
    replayed = replay(groups(fresh), state)
    assert_bitwise(weights(fresh), trained)
    assert replayed.num_perturbations_done == opt.num_perturbations_done
    # the replayed optimizer continues exactly like the original (given the schedule, as the CLI does)
    make_scheduler(replayed, "cosine", 80, last_step=40)
    opt.step(net_loss(model))
    replayed.step(net_loss(fresh))
    assert_bitwise(weights(fresh), weights(model))

    partial = small_net()
    replay(groups(partial), state, steps=10)
    assert not torch.equal(weights(partial)[0], trained[0])
    assert not torch.equal(weights(partial)[0], base[0])


def test_load_state_dict_with_different_settings_raises():
    model = small_net()
    opt = make_opt(groups(model), **SETTINGS)
    run_steps(model, opt, 2)
    state = opt.state_dict()
    for change in ({"eps": 2 * EPS}, {"seed": 7}, {"noise": "gaussian"}, {"difference": "forward"},
                   {"update": "sign"}, {"n_perturbations": 2}, {"fitness_shaping": "rank"},
                   {"momentum": 0.5, "momentum_window": 2}):
        other = make_opt(groups(model), **{**SETTINGS, **change})
        with pytest.raises(ValueError, match="differ"):
            other.load_state_dict(state)


# --- exception safety ----------------------------------------------------------------------------------------
class Boom(Exception):
    pass


def raising_closure(x, on_call: int, exc: BaseException):
    calls = []
    m = read(x)

    def closure():
        calls.append(m()[0].clone())
        if len(calls) == on_call:
            raise exc
        return float((m()[0] ** 2).sum())

    return closure, calls


@pytest.mark.parametrize("noise", NOISE_KINDS)
def test_empty_trainable_tensor_is_perturbed_and_updated_as_nothing(noise):
    x, empty = torch.nn.Parameter(torch.ones(5)), torch.nn.Parameter(torch.zeros(0, 4))
    m, a = read(x, empty), torch.zeros(5)
    opt = make_opt([x, empty], lr=0.1, eps=EPS, noise=noise)
    for _ in range(3):
        loss = opt.step(lambda: 0.5 * float(((m()[0] - a) ** 2).sum()) + float(m()[1].sum()))
    assert loss > 0 and empty.shape == (0, 4) and not torch.equal(x.detach(), torch.ones(5))


@pytest.mark.parametrize("difference", ["central", "forward"])
@pytest.mark.parametrize("on_call", [1, 2])
@pytest.mark.parametrize("exc", [ValueError("bad batch"), KeyboardInterrupt()], ids=["ValueError", "Interrupt"])
@pytest.mark.parametrize("noise", NOISE_KINDS)
def test_raising_closure_restores_weights(difference, on_call, exc, noise):
    x = torch.nn.Parameter(torch.randn(50, generator=torch.Generator().manual_seed(0)))
    x0 = x.detach().clone()
    opt = make_opt([x], lr=0.1, eps=EPS, noise=noise, difference=difference)
    closure, calls = raising_closure(x, on_call, exc)
    with pytest.raises(type(exc)):
        opt.step(closure)
    assert len(calls) == on_call
    assert not torch.equal(calls[-1], x0) or (difference == "forward" and on_call == 1)
    assert torch.equal(x.detach(), x0)  # bitwise: the stored weights were never written
    assert opt.trajectory == [] and opt.num_perturbations_done == 0  # the seed is not used up
    # the optimizer is still usable afterwards, and starts with the seed the failed step drew
    opt.step(quadratic(x, torch.zeros_like(x0)))
    assert len(opt.trajectory) == 1 and opt.trajectory[0]["seeds"] == [mix(0, 0)]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("on_call", [1, 2])
def test_nonfinite_loss_raises_with_weights_restored(bad, on_call):
    x = torch.nn.Parameter(torch.randn(20, generator=torch.Generator().manual_seed(0)))
    x0 = x.detach().clone()
    opt = make_opt([x], lr=0.1, eps=EPS)
    calls = []

    def closure():
        calls.append(1)
        return bad if len(calls) == on_call else float((m()[0] ** 2).sum())

    m = read(x)
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step(closure)
    assert torch.equal(x.detach(), x0)
    assert opt.trajectory == []


def test_nonfinite_skip_warns_restores_and_records():
    x = torch.nn.Parameter(torch.randn(20, generator=torch.Generator().manual_seed(0)))
    x0 = x.detach().clone()
    opt = make_opt([x], lr=0.1, eps=EPS, on_nonfinite="skip")
    with pytest.warns(UserWarning, match="non-finite"):
        opt.step(lambda: float("nan"))
    assert torch.equal(x.detach(), x0)
    assert len(opt.trajectory) == 1 and opt.trajectory[0]["grads"] == [None]
    # later steps train, and the whole trajectory (skipped step included) replays bitwise
    for _ in range(3):
        opt.step(quadratic(x, torch.zeros_like(x0)))
    assert float((x.detach() ** 2).sum()) != float((x0 ** 2).sum())
    y = torch.nn.Parameter(x0.clone())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        replay([y], json.loads(json.dumps(opt.state_dict())))
    assert torch.equal(y.detach(), x.detach())


# --- the global RNG ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("noise", NOISE_KINDS)
def test_step_leaves_global_rng_untouched(noise):
    model = zero_classifier()
    train = separable(16)
    objective = MetricObjective(get_metric("f1"), LinearPredictor(), smoothing=1.0, samples=8)  # drawn
    opt = make_opt(model.parameters(), lr=0.5, eps=0.05, noise=noise, n_perturbations=2)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    for _ in range(3):
        opt.step(lambda: objective(model, train))
    assert torch.equal(torch.get_rng_state(), before)


def test_generation_sampling_step_leaves_global_rng_untouched(tokenizer, small_lm):
    from zo_objectives.scoring import GenerationPredictor

    model = small_lm
    gen = GenerationPredictor(tokenizer, max_new_tokens=3, temperature=1.0)
    objective = MetricObjective(get_metric("squad_f1"), gen, smoothing=0)
    batch = [{"prompt": "Q: colour of the sky? A:", "answers": ["blue"]},
             {"prompt": "Q: 2 + 2? A:", "answers": ["4", "four"]}]
    opt = make_opt([p for p in model.parameters()], lr=1e-3, eps=EPS)
    torch.manual_seed(99)
    before = torch.get_rng_state()
    opt.step(lambda: objective(model, batch))
    assert torch.equal(torch.get_rng_state(), before)


# --- options -------------------------------------------------------------------------------------------------
def test_n_perturbations_average():
    g = torch.Generator().manual_seed(3)
    x = torch.nn.Parameter(torch.randn(30, generator=g, dtype=torch.float64))
    a = torch.randn(30, generator=g, dtype=torch.float64)
    lr, k = 0.03, 4
    opt = make_opt([x], lr=lr, eps=EPS, n_perturbations=k, noise="gaussian", seed=2)
    closure = quadratic(x, a)
    seen = []
    x0 = x.detach().clone()
    loss = opt.step(lambda: seen.append(closure()) or seen[-1])
    rec = opt.trajectory[-1]
    assert len(rec["seeds"]) == k == len(set(rec["seeds"])) and len(rec["grads"]) == k
    assert rec["seeds"] == [mix(2, i) for i in range(k)]
    assert len(seen) == 2 * k and loss == pytest.approx(sum(seen) / len(seen))
    # every estimate is made at x; the update is their average: -lr/k * sum g_i z_i
    expected_delta = torch.zeros_like(x0)
    for seed, grad in zip(rec["seeds"], rec["grads"]):
        z = regen(opt, seed, 0, x0)
        assert grad == pytest.approx((f_at(x0, a, EPS * z) - f_at(x0, a, -EPS * z)) / (2 * EPS), rel=1e-6)
        expected_delta += -lr / k * grad * z
    torch.testing.assert_close(x.detach() - x0, expected_delta, atol=1e-10, rtol=1e-7)
    assert opt.num_perturbations_done == k
    opt.step(closure)
    assert opt.trajectory[-1]["seeds"] == [mix(2, i) for i in range(k, 2 * k)]


def test_n_perturbations_reduce_estimator_variance():
    d, steps = 20, 300
    g = torch.Generator().manual_seed(8)
    a = torch.randn(d, generator=g, dtype=torch.float64)
    errors = {}
    for k in (1, 8):
        x = torch.nn.Parameter(torch.zeros(d, dtype=torch.float64))
        opt = make_opt([x], lr=1.0, eps=EPS, n_perturbations=k, noise="gaussian", seed=k)
        total = 0.0
        for _ in range(steps):
            x0 = x.detach().clone()
            opt.step(quadratic(x, a))
            estimate = -(x.detach() - x0)  # lr = 1: the averaged estimate itself
            with torch.no_grad():
                x.copy_(x0)
            total += float((estimate - (x0 - a)).norm() ** 2)
        errors[k] = total / steps
    # E||estimate - grad||^2 = (d + 1) ||grad||^2 / k: averaging 8 estimates cuts it ~8x
    assert errors[8] < errors[1] / 4


def test_forward_difference():
    g = torch.Generator().manual_seed(5)
    x = torch.nn.Parameter(torch.randn(25, generator=g, dtype=torch.float64))
    a = torch.randn(25, generator=g, dtype=torch.float64)
    lr = 0.02
    x0 = x.detach().clone()
    opt = make_opt([x], lr=lr, eps=EPS, difference="forward", seed=8)
    points = []
    closure, m = quadratic(x, a), read(x)
    opt.step(lambda: points.append(m()[0].clone()) or closure())
    assert len(points) == 2
    assert torch.equal(points[0], x0)  # the first loss is at x itself
    rec = opt.trajectory[-1]
    z = regen(opt, rec["seeds"][0], 0, x0)
    torch.testing.assert_close(points[1], x0 + EPS * z, atol=1e-12, rtol=0)
    assert rec["grads"][0] == pytest.approx((f_at(x0, a, EPS * z) - f_at(x0, a, 0 * z)) / EPS, rel=1e-6)
    torch.testing.assert_close(x.detach() - x0, -lr * rec["grads"][0] * z, atol=1e-10, rtol=1e-7)


def test_sign_update():
    g = torch.Generator().manual_seed(6)
    x = torch.nn.Parameter(torch.randn(25, generator=g, dtype=torch.float64))
    a = torch.randn(25, generator=g, dtype=torch.float64)
    lr = 0.02
    opt = make_opt([x], lr=lr, eps=EPS, update="sign", seed=9)
    signs = set()
    for _ in range(10):
        x0 = x.detach().clone()
        opt.step(quadratic(x, a))
        rec = opt.trajectory[-1]
        z = regen(opt, rec["seeds"][0], 0, x0)
        true = (f_at(x0, a, EPS * z) - f_at(x0, a, -EPS * z)) / (2 * EPS)
        assert rec["grads"][0] == math.copysign(1.0, true)
        signs.add(rec["grads"][0])
        torch.testing.assert_close(x.detach() - x0, -lr * rec["grads"][0] * z, atol=1e-10, rtol=1e-7)
    assert signs == {1.0, -1.0}


def test_sign_update_of_a_tie_is_zero():
    x = torch.nn.Parameter(torch.randn(5))
    x0 = x.detach().clone()
    opt = make_opt([x], lr=0.1, update="sign")
    opt.step(lambda: 1.0)
    assert opt.trajectory[-1]["grads"] == [0.0]
    assert torch.equal(x.detach(), x0)


def test_normalized_update_divides_by_the_running_rms():
    g = torch.Generator().manual_seed(7)
    x = torch.nn.Parameter(torch.randn(25, generator=g, dtype=torch.float64))
    a = torch.randn(25, generator=g, dtype=torch.float64)
    lr, beta = 0.02, 0.99
    opt = make_opt([x], lr=lr, eps=EPS, update="normalized", seed=3)
    raw = []
    for step in range(6):
        x0 = x.detach().clone()
        scale = 1000.0 if step == 3 else 1.0  # a loss on a 1000x larger scale moves no further
        closure = quadratic(x, a)
        opt.step(lambda c=closure, s=scale: s * c())
        rec = opt.trajectory[-1]
        z = regen(opt, rec["seeds"][0], 0, x0)
        raw.append(scale * (f_at(x0, a, EPS * z) - f_at(x0, a, -EPS * z)) / (2 * EPS))
        mean_square = sum((1 - beta) * beta ** (len(raw) - 1 - k) * r * r for k, r in enumerate(raw))
        expected = raw[-1] / math.sqrt(mean_square / (1 - beta ** len(raw)))
        assert rec["grads"][0] == pytest.approx(expected, rel=1e-6)
        assert rec["second_moment"] == [pytest.approx(mean_square, rel=1e-9), len(raw)]
        torch.testing.assert_close(x.detach() - x0, -lr * rec["grads"][0] * z, atol=1e-10, rtol=1e-7)
    assert abs(opt.trajectory[0]["grads"][0]) == pytest.approx(1.0)  # the first estimate is its own RMS
    # an estimate 1000x larger than the ones before moves at most sqrt((1 - beta^t) / (1 - beta)) ~ 2 times as far
    assert abs(opt.trajectory[3]["grads"][0]) <= math.sqrt((1 - beta**4) / (1 - beta))


def test_momentum_adds_decayed_past_estimates():
    g = torch.Generator().manual_seed(12)
    x = torch.nn.Parameter(torch.randn(30, generator=g, dtype=torch.float64))
    a = torch.randn(30, generator=g, dtype=torch.float64)
    lr, beta = 0.02, 0.7
    opt = make_opt([x], lr=lr, eps=EPS, momentum=beta, momentum_window=3, seed=1)
    zs, gs = [], []
    for step in range(4):
        x0 = x.detach().clone()
        opt.step(quadratic(x, a))
        rec = opt.trajectory[-1]
        zs.append(regen(opt, rec["seeds"][0], 0, x0))
        gs.append(rec["grads"][0])
        assert gs[-1] == pytest.approx((f_at(x0, a, EPS * zs[-1]) - f_at(x0, a, -EPS * zs[-1])) / (2 * EPS),
                                       rel=1e-6)
        # window 3: this step's estimate plus beta * the previous one plus beta^2 * the one before
        expected = sum(beta ** lag * gs[-1 - lag] * zs[-1 - lag] for lag in range(min(3, step + 1)))
        torch.testing.assert_close(x.detach() - x0, -lr * expected, atol=1e-10, rtol=1e-7)


def test_rank_fitness_shaping_uses_centered_ranks():
    g = torch.Generator().manual_seed(13)
    x = torch.nn.Parameter(torch.randn(30, generator=g, dtype=torch.float64))
    a = torch.randn(30, generator=g, dtype=torch.float64)
    eps, k = EPS, 3
    opt = make_opt([x], lr=0.01, eps=eps, n_perturbations=k, fitness_shaping="rank", seed=2)
    seen = []
    closure = quadratic(x, a)
    opt.step(lambda: seen.append(closure()) or seen[-1])
    ranked = sorted(seen)
    assert len(set(seen)) == len(seen)
    utility = {v: ranked.index(v) / (len(seen) - 1) - 0.5 for v in seen}
    expected = [utility[seen[2 * i]] - utility[seen[2 * i + 1]] for i in range(k)]  # scale-free: not over 2 eps
    assert opt.trajectory[-1]["grads"] == pytest.approx(expected)
    # one perturbation: the estimate is +-1 whatever eps (it was +-1 / (2 eps) = +-500 at eps 1e-3)
    single = make_opt([x], lr=0.01, eps=1e-3, fitness_shaping="rank", seed=2)
    single.step(closure)
    assert [abs(g) for g in single.trajectory[-1]["grads"]] == [1.0]


def test_rank_fitness_shaping_is_invariant_to_monotone_transforms():
    results = []
    for transform in (lambda v: v, lambda v: math.exp(3 * v) + 10):
        model = small_net()
        opt = make_opt(model.parameters(), lr=0.01, eps=EPS, n_perturbations=2, fitness_shaping="rank")
        closure = net_loss(model)
        for _ in range(10):
            opt.step(lambda f=transform, c=closure: f(c()))
        results.append(weights(model))
    assert_bitwise(*results)


def two_tensors(dtype=torch.float64):
    g = torch.Generator().manual_seed(7)
    w = torch.nn.Parameter(torch.randn(6, 4, generator=g, dtype=dtype))
    b = torch.nn.Parameter(torch.randn(6, generator=g, dtype=dtype))
    return w, b


def loss_wb(w, b):
    m = read(w, b)

    def loss() -> float:
        w, b = m()
        return float((w.sum(1) * b).sum() + (w ** 2).sum())

    return loss


@pytest.mark.parametrize("decay_1d", [False, True])
def test_weight_decay_only_on_matrices_unless_decay_1d(decay_1d):
    lr, wd = 0.05, 0.3
    results = {}
    for decay in (0.0, wd):
        w, b = two_tensors()
        w0, b0 = w.detach().clone(), b.detach().clone()
        opt = make_opt([{"params": [w, b], "weight_decay": decay, "decay_1d": decay_1d}], lr=lr, eps=EPS)
        opt.step(loss_wb(w, b))
        rec = opt.trajectory[-1]
        results[decay] = (w.detach().clone(), b.detach().clone(), rec["grads"][0])
    (w_plain, b_plain, g_plain), (w_decay, b_decay, g_decay) = results[0.0], results[wd]
    assert g_plain == g_decay  # the losses are evaluated before the update
    # decoupled decay of the weights at x: the decayed result is the plain one minus lr * wd * x
    torch.testing.assert_close(w_decay - w_plain, -lr * wd * w0, atol=1e-12, rtol=1e-6)
    if decay_1d:
        torch.testing.assert_close(b_decay - b_plain, -lr * wd * b0, atol=1e-12, rtol=1e-6)
    else:
        assert torch.equal(b_decay, b_plain)


def test_weight_decay_from_constructor_applies_to_groups():
    w, b = two_tensors()
    opt = make_opt([w, b], lr=0.1, weight_decay=0.5)
    assert opt.param_groups[0]["weight_decay"] == 0.5 and opt.param_groups[0]["decay_1d"] is False
    x = torch.nn.Parameter(torch.ones(3, 3))
    opt = make_opt([x], lr=0.1, weight_decay=0.5)
    opt.step(lambda: 0.0)  # no signal: only the decay moves x
    assert torch.equal(x.detach(), torch.full((3, 3), 0.95))


def test_param_groups_with_different_lr():
    w, b = two_tensors()
    w0, b0 = w.detach().clone(), b.detach().clone()
    opt = make_opt([{"params": [w], "lr": 0.1}, {"params": [b], "lr": 0.01}], lr=0.5, eps=EPS, seed=4)
    opt.step(loss_wb(w, b))
    rec = opt.trajectory[-1]
    assert rec["lrs"] == [0.1, 0.01]
    seed, grad = rec["seeds"][0], rec["grads"][0]
    zw, zb = regen(opt, seed, 0, w0), regen(opt, seed, 1, b0)
    assert not torch.equal(zw.view(-1)[:6], zb)  # each tensor has its own noise
    torch.testing.assert_close(w.detach() - w0, -0.1 * grad * zw, atol=1e-10, rtol=1e-7)
    torch.testing.assert_close(b.detach() - b0, -0.01 * grad * zb, atol=1e-10, rtol=1e-7)


def test_frozen_parameters_do_not_move_and_keep_indices():
    w, b = two_tensors()
    w.requires_grad_(False)
    w0, b0 = w.detach().clone(), b.detach().clone()
    opt = make_opt([w, b], lr=0.1, eps=EPS, seed=4)
    opt.step(loss_wb(w, b))
    assert torch.equal(w.detach(), w0)
    rec = opt.trajectory[-1]
    zb = regen(opt, rec["seeds"][0], 1, b0)
    torch.testing.assert_close(b.detach() - b0, -0.1 * rec["grads"][0] * zb, atol=1e-10, rtol=1e-7)


@pytest.mark.parametrize("kwargs,match", [
    ({"lr": -1.0}, "lr"),
    ({"lr": float("nan")}, "lr must be a finite number"),
    ({"lr": float("inf")}, "lr must be a finite number"),
    ({"eps": float("inf")}, "eps must be a finite number"),
    ({"eps": 0.0}, "eps"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"n_perturbations": 0}, "n_perturbations"),
    ({"n_perturbations": 1.5}, "n_perturbations"),
    ({"noise": "uniform"}, "accepted: table, gaussian, rademacher"),
    ({"difference": "backward"}, "accepted: central, forward"),
    ({"update": "adam"}, "accepted: sgd, sign"),
    ({"on_nonfinite": "ignore"}, "accepted: raise, skip"),
    ({"fitness_shaping": "centered"}, "accepted: none, rank"),
    ({"momentum": 0.9}, "momentum"),
    ({"momentum": 1.0, "momentum_window": 3}, "momentum"),
    ({"momentum": 0.0, "momentum_window": 3}, "momentum"),
])
def test_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_opt([torch.nn.Parameter(torch.zeros(3))], **kwargs)


def test_step_without_closure_and_non_contiguous_param_raise():
    opt = make_opt([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="closure"):
        opt.step(None)
    p = torch.nn.Parameter(torch.zeros(4, 3).t())
    with pytest.raises(ValueError, match="contiguous"):
        make_opt([p])


# --- schedules -----------------------------------------------------------------------------------------------
def lrs(kind, total=10, steps=12, last_step=0, base=0.4):
    opt = make_opt([torch.nn.Parameter(torch.zeros(2))], lr=base)
    scheduler = make_scheduler(opt, kind, total, last_step=last_step)
    out = [opt.param_groups[0]["lr"]]
    for _ in range(steps):
        scheduler.step()
        out.append(opt.param_groups[0]["lr"])
    return out


def test_schedules_shapes():
    base, total = 0.4, 10
    assert lrs("constant") == pytest.approx([base] * 13)
    linear = lrs("linear")
    assert linear == pytest.approx([base * (1 - min(t, total) / total) for t in range(13)])
    assert linear[5] == pytest.approx(0.2) and linear[10] == pytest.approx(0.0) and linear[12] == pytest.approx(0.0)
    cosine = lrs("cosine")
    assert cosine == pytest.approx([base * 0.5 * (1 + math.cos(math.pi * min(t, total) / total)) for t in range(13)])
    assert cosine[5] == pytest.approx(0.2) and cosine[10] == pytest.approx(0.0, abs=1e-12)
    assert all(u >= v for u, v in zip(cosine, cosine[1:]))


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_schedule_last_step_resumes_the_shape(kind):
    assert lrs(kind, last_step=4, steps=6) == lrs(kind, steps=10)[4:]


def test_unknown_schedule_raises():
    with pytest.raises(ValueError, match="accepted: constant, linear, cosine"):
        lrs("exponential")


def test_hyperparameters_are_keyword_only_and_replay_names_what_it_takes():
    x = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(TypeError, match="positional"):
        MeZO([x], 1e-5, 1e-3)
    assert MeZO([x]).param_groups[0]["lr"] == 1e-5  # the README's and the CLI's default
    opt = make_opt([x])
    opt.step(quadratic(x, torch.ones(3)))
    with pytest.raises(TypeError, match=r"MeZO.state_dict\(\).*got list"):
        replay([x], opt.state_dict()["mezo"]["trajectory"])


def test_param_groups_added_later_must_be_contiguous():
    opt = make_opt([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="contiguous"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(4, 3).t())]})
