"""The optimizer contract, run over one table: base equivalence at gamma=1, convergence (fp32, bf16),
state_dict round trips, and the refusals (bad hyperparameters, foreign state, non-finite gradients)."""

from __future__ import annotations

import copy
import inspect
import io
from collections.abc import Callable

import pytest
import torch
from torch.optim import Optimizer

from hf_vrgd import LAMB, LARS, VRGD, VRLAMB, VRLARS, VRSGD, VRAdam, VRAdamW, VRGDConfig, load_optimizer
from hf_vrgd.optimizers import BASE_OPTIMIZERS
from hf_vrgd.optimizers.base import StrictStateOptimizer

Factory = Callable[..., Optimizer]

# (id, VR optimizer at gamma=1, the base it must equal)
EQUIVALENCES: list[tuple[str, Factory, Factory]] = [
    ("sgd", lambda p: VRSGD(p, lr=0.1, gamma=1.0), lambda p: torch.optim.SGD(p, lr=0.1)),
    (
        "momentum-nesterov-wd",
        lambda p: VRSGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, gamma=1.0),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    ),
    (
        "momentum-dampening",
        lambda p: VRSGD(p, lr=0.1, momentum=0.8, dampening=0.3, gamma=1.0),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.8, dampening=0.3),
    ),
    (
        "adam-l2",
        lambda p: VRAdam(p, lr=0.01, weight_decay=0.1, gamma=1.0),
        lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1),
    ),
    ("adamw", lambda p: VRAdamW(p, lr=0.01, gamma=1.0), lambda p: torch.optim.AdamW(p, lr=0.01)),
    ("lamb", lambda p: VRLAMB(p, lr=0.01, gamma=1.0), lambda p: LAMB(p, lr=0.01)),
    (
        "lars",
        lambda p: VRLARS(p, lr=0.5, weight_decay=0.01, gamma=1.0),
        lambda p: LARS(p, lr=0.5, weight_decay=0.01),
    ),
    (
        "wrapper-adamw",
        lambda p: VRGD(torch.optim.AdamW(p, lr=0.01), gamma=1.0),
        lambda p: torch.optim.AdamW(p, lr=0.01),
    ),
]

# (id, factory, learning problem steps) for convergence and round trips
OPTIMIZERS: list[tuple[str, Factory]] = [
    ("vrsgd", lambda p: VRSGD(p, lr=0.05)),
    ("vrmomentum", lambda p: VRSGD(p, lr=0.02, momentum=0.9)),
    ("vradam", lambda p: VRAdam(p, lr=0.03)),
    ("vradamw", lambda p: VRAdamW(p, lr=0.03)),
    ("vrlamb", lambda p: VRLAMB(p, lr=0.03)),
    ("vrlars", lambda p: VRLARS(p, lr=2.0, trust_coefficient=0.02)),
    ("lamb", lambda p: LAMB(p, lr=0.03)),
    ("lars", lambda p: LARS(p, lr=2.0, trust_coefficient=0.02)),
    ("vrgd-adamw", lambda p: VRGD(torch.optim.AdamW(p, lr=0.03), beta3=0.9)),
    ("vrgd-sgd", lambda p: VRGD(torch.optim.SGD(p, lr=0.05))),
]
LOW_PRECISION = {"vrlamb", "vrlars", "lamb", "lars"}
ACCUMULATION = 3


def make_problem(dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """A tiny MLP regressing a fixed random linear target, and its micro-batches."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).to(dtype)
    target = torch.randn(6, 2)
    inputs = [torch.randn(8, 6) for _ in range(24)]
    return model, [(x.to(dtype), (x @ target).to(dtype)) for x in inputs]


def run_steps(
    model: torch.nn.Module, optimizer: Optimizer, batches: list, steps: int, start: int = 0
) -> float:
    """``steps`` optimizer steps of ``ACCUMULATION`` micro-batches each; returns the last loss."""
    for step in range(start, start + steps):
        total = 0.0
        for micro in range(ACCUMULATION):
            x, y = batches[(step * ACCUMULATION + micro) % len(batches)]
            loss = torch.nn.functional.mse_loss(model(x), y) / ACCUMULATION
            loss.backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad()
    return total


def flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in model.parameters()])


@pytest.mark.parametrize(
    ("name", "vr_factory", "base_factory"), EQUIVALENCES, ids=[e[0] for e in EQUIVALENCES]
)
def test_gamma_one_equals_base(name: str, vr_factory: Factory, base_factory: Factory) -> None:
    model, batches = make_problem()
    run_steps(model, vr_factory(model.parameters()), batches, steps=4)
    base_model, _ = make_problem()
    run_steps(base_model, base_factory(base_model.parameters()), batches, steps=4)
    torch.testing.assert_close(flat_parameters(model), flat_parameters(base_model), rtol=1e-5, atol=1e-6)


def test_gamma_changes_the_step() -> None:
    """The equivalence above is not vacuous: gamma < 1 moves the parameters differently."""
    model, batches = make_problem()
    run_steps(model, VRSGD(model.parameters(), lr=0.1), batches, steps=2)
    base_model, _ = make_problem()
    run_steps(base_model, torch.optim.SGD(base_model.parameters(), lr=0.1), batches, steps=2)
    assert not torch.allclose(flat_parameters(model), flat_parameters(base_model))


def test_wrapper_with_beta3_matches_vradamw() -> None:
    model, batches = make_problem()
    run_steps(model, VRAdamW(model.parameters(), lr=0.01), batches, steps=4)
    wrapped_model, _ = make_problem()
    wrapper = VRGD(torch.optim.AdamW(wrapped_model.parameters(), lr=0.01), beta3=0.9)
    run_steps(wrapped_model, wrapper, batches, steps=4)
    torch.testing.assert_close(flat_parameters(model), flat_parameters(wrapped_model), rtol=1e-5, atol=1e-6)


CONVERGENCE_CASES = [(n, f, torch.float32) for n, f in OPTIMIZERS] + [
    (n, f, torch.bfloat16) for n, f in OPTIMIZERS if n in LOW_PRECISION
]


@pytest.mark.parametrize(
    ("name", "factory", "dtype"),
    CONVERGENCE_CASES,
    ids=[f"{n}-{str(d)[6:]}" for n, _, d in CONVERGENCE_CASES],
)
def test_converges(name: str, factory: Factory, dtype: torch.dtype) -> None:
    model, batches = make_problem(dtype)
    initial = run_steps(model, torch.optim.SGD(model.parameters(), lr=0.0), batches, steps=1)
    final = run_steps(model, factory(model.parameters()), batches, steps=40)
    assert all(p.dtype == dtype for p in model.parameters())
    assert initial > 1.5 * final, (initial, final)


@pytest.mark.parametrize(("name", "factory"), OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
def test_state_dict_round_trip_resumes_bit_identically(name: str, factory: Factory) -> None:
    model, batches = make_problem()
    optimizer = factory(model.parameters())
    run_steps(model, optimizer, batches, steps=2)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    run_steps(model, optimizer, batches, steps=2, start=2)

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed_model, _ = make_problem()
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = factory(resumed_model.parameters())
    resumed.load_state_dict(checkpoint["optimizer"])
    run_steps(resumed_model, resumed, batches, steps=2, start=2)
    assert torch.equal(flat_parameters(model), flat_parameters(resumed_model))


@pytest.mark.parametrize("cls", [LAMB, VRLAMB])
def test_low_precision_state_stays_float32_after_loading(cls: type[Optimizer]) -> None:
    model, batches = make_problem(torch.bfloat16)
    optimizer = cls(model.parameters(), lr=0.01)
    run_steps(model, optimizer, batches, steps=1)
    reloaded = cls(model.parameters(), lr=0.01)
    reloaded.load_state_dict(optimizer.state_dict())
    state = reloaded.state[next(model.parameters())]
    assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32


@pytest.mark.parametrize(
    "make",
    [
        lambda p: VRSGD(p, lr=0.1, gamma=0.0),
        lambda p: VRAdamW(p, gamma=1.5),
        lambda p: VRLAMB(p, beta3=1.0),
        lambda p: VRLARS(p, lr=0.1, gsnr_eps=0.0),
        lambda p: VRGD(torch.optim.SGD(p, lr=0.1), gamma=-0.1),
        lambda p: VRAdam(p, betas=(0.9, 1.0)),
        lambda p: LARS(p, lr=0.1, trust_coefficient=0.0),
        lambda p: VRSGD(p, lr=0.1, nesterov=True),
    ],
    ids=[
        "gamma-0",
        "gamma-1.5",
        "beta3-1",
        "eps-0",
        "wrapper-gamma",
        "beta2-1",
        "trust-0",
        "nesterov-no-momentum",
    ],
)
def test_bad_hyperparameters_raise(make: Factory) -> None:
    model, _ = make_problem()
    with pytest.raises(ValueError):
        make(model.parameters())


def test_config_validates_and_builds_kwargs() -> None:
    for bad in ({"gamma": 0.0}, {"gamma": 1.01}, {"beta3": 1.0}, {"eps": float("inf")}):
        with pytest.raises(ValueError):
            VRGDConfig(**bad)
    config = VRGDConfig(gamma=0.2, beta3=0.8, eps=1e-5)
    assert config.optimizer_kwargs(VRLAMB) == {"gamma": 0.2, "beta3": 0.8, "gsnr_eps": 1e-5}
    assert config.optimizer_kwargs(VRLARS) == {"gamma": 0.2, "gsnr_eps": 1e-5}
    model, _ = make_problem()
    optimizer = VRAdamW(model.parameters(), **config.optimizer_kwargs(VRAdamW))
    assert optimizer.param_groups[0]["beta3"] == 0.8
    with pytest.raises(ValueError, match="at construction"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})


def test_registry() -> None:
    assert load_optimizer("VR-AdamW") is VRAdamW
    assert load_optimizer("lamb") is LAMB
    assert load_optimizer("vr_momentum") is VRSGD
    assert load_optimizer("AdamW") is torch.optim.AdamW
    with pytest.raises(ValueError, match="unknown optimizer"):
        load_optimizer("vr-adafactor")


def saved_state(factory: Factory, model: torch.nn.Module | None = None) -> dict:
    model, batches = make_problem() if model is None else (model, make_problem()[1])
    optimizer = factory(model.parameters())
    run_steps(model, optimizer, batches, steps=1)
    return optimizer.state_dict()


@pytest.mark.parametrize(
    ("source", "target"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), lambda p: VRSGD(p, lr=0.1, momentum=0.9)),
        (lambda p: VRAdamW(p), lambda p: VRLAMB(p)),
        (lambda p: VRGD(torch.optim.AdamW(p)), lambda p: VRAdamW(p)),
        (lambda p: VRAdamW(p), lambda p: VRGD(torch.optim.AdamW(p))),
    ],
    ids=["torch-sgd-into-vrsgd", "vradamw-into-vrlamb", "wrapper-into-vradamw", "vradamw-into-wrapper"],
)
def test_state_dict_of_another_optimizer_raises(source: Factory, target: Factory) -> None:
    state_dict = saved_state(source)
    model, _ = make_problem()
    with pytest.raises(ValueError):
        target(model.parameters()).load_state_dict(state_dict)


def test_state_dict_of_another_layout_raises() -> None:
    state_dict = saved_state(lambda p: VRAdamW(p))
    model, _ = make_problem()
    with pytest.raises(ValueError, match="parameters"):
        VRAdamW(list(model.parameters())[:2]).load_state_dict(state_dict)
    transposed = torch.nn.Sequential(torch.nn.Linear(16, 6), torch.nn.Tanh(), torch.nn.Linear(2, 16))
    with pytest.raises(ValueError, match="shape"):
        VRAdamW(transposed.parameters()).load_state_dict(state_dict)


@pytest.mark.parametrize(("name", "factory"), OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
def test_parameter_without_gradient_is_skipped(name: str, factory: Factory) -> None:
    model, batches = make_problem()
    unused = torch.nn.Parameter(torch.randn(4))
    optimizer = factory([*model.parameters(), unused])
    before = unused.detach().clone()
    run_steps(model, optimizer, batches, steps=2)
    assert torch.equal(unused, before)
    state = optimizer.base_optimizer.state if isinstance(optimizer, VRGD) else optimizer.state
    assert len(state[unused]) == 0


def numeric_state(optimizer: Optimizer) -> object:
    """A copy of the per-parameter state (tensors and step counts) of a state dict."""
    state_dict = copy.deepcopy(optimizer.state_dict())
    if isinstance(optimizer, VRGD):
        return state_dict["base_optimizer"]["state"], state_dict["gsnr_state"]
    return state_dict["state"]


@pytest.mark.parametrize(("name", "factory"), OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
def test_non_finite_gradient_skips_the_step(name: str, factory: Factory) -> None:
    model, batches = make_problem()
    optimizer = factory(model.parameters())
    run_steps(model, optimizer, batches, steps=1)
    parameters, state = flat_parameters(model), numeric_state(optimizer)
    for x, y in batches[:ACCUMULATION]:
        torch.nn.functional.mse_loss(model(x), y).backward()
    next(model.parameters()).grad[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="non-finite"):
        optimizer.step()
    optimizer.zero_grad()
    assert torch.equal(flat_parameters(model), parameters)
    torch.testing.assert_close(numeric_state(optimizer), state, rtol=0, atol=0)
    run_steps(model, optimizer, batches, steps=1, start=1)  # the window restarted: a normal step follows
    assert not torch.equal(flat_parameters(model), parameters)


def test_wrapper_runs_step_hooks_and_leaves_base_state_alone() -> None:
    model, batches = make_problem()
    base = torch.optim.AdamW(model.parameters(), lr=0.01)
    wrapper = VRGD(base, beta3=0.9)
    calls = []
    wrapper.register_step_pre_hook(lambda optimizer, args, kwargs: calls.append("pre"))
    wrapper.register_step_post_hook(lambda optimizer, args, kwargs: calls.append("post"))
    run_steps(model, wrapper, batches, steps=2)
    assert calls == ["pre", "post"] * 2
    assert set(base.state[next(model.parameters())]) == {"step", "exp_avg", "exp_avg_sq"}
    assert wrapper.param_groups is base.param_groups


def test_gsnr_summary_reports_the_last_step() -> None:
    model, batches = make_problem()
    optimizer = VRAdamW(model.parameters(), lr=0.01)
    assert optimizer.gsnr_summary() == {}
    run_steps(model, optimizer, batches, steps=1)
    names = {p: n for n, p in model.named_parameters()}
    summary = optimizer.gsnr_summary(names)
    assert summary["gsnr/groups"] == ACCUMULATION
    assert 0.1 <= summary["gsnr/mean_multiplier"] <= 1.0
    assert 0.0 <= summary["gsnr/fraction_at_gamma"] <= 1.0
    assert set(names.values()) == {
        key.split("/")[1] for key in summary if key.endswith("/fraction_at_gamma")
    } - {"fraction_at_gamma"}


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), -0.1], ids=["nan", "inf", "negative"])
@pytest.mark.parametrize(
    "make",
    [
        lambda p, lr: VRSGD(p, lr=lr),
        lambda p, lr: VRAdamW(p, lr=lr),
        lambda p, lr: VRLAMB(p, lr=lr),
        lambda p, lr: VRLARS(p, lr=lr),
        lambda p, lr: LAMB(p, lr=lr),
        lambda p, lr: LARS(p, lr=lr),
        lambda p, lr: VRSGD([{"params": list(p), "lr": lr}], lr=0.1),
    ],
    ids=["vrsgd", "vradamw", "vrlamb", "vrlars", "lamb", "lars", "vrsgd-group"],
)
def test_non_finite_or_negative_learning_rate_is_refused(make: Callable, lr: float) -> None:
    model, _ = make_problem()
    with pytest.raises(ValueError, match="lr must be a finite number >= 0"):
        make(model.parameters(), lr)


@pytest.mark.parametrize("lr", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_wrapper_refuses_a_non_finite_base_learning_rate(lr: float) -> None:
    """torch.optim.SGD accepts lr=nan; the wrapper does not (negative lr torch refuses itself)."""
    model, _ = make_problem()
    with pytest.raises(ValueError, match="lr must be a finite number >= 0"):
        VRGD(torch.optim.SGD(model.parameters(), lr=lr))


@pytest.mark.parametrize("gamma", [5.0, 0.0, -1.0, float("nan")])
def test_per_group_gamma_is_validated(gamma: float) -> None:
    model, batches = make_problem()
    layers = list(model.parameters())
    with pytest.raises(ValueError, match="gamma"):
        VRSGD([{"params": layers[:2]}, {"params": layers[2:], "gamma": gamma}], lr=0.1)
    optimizer = VRAdamW(model.parameters())
    run_steps(model, optimizer, batches, steps=1)
    before = flat_parameters(model)
    optimizer.param_groups[0]["gamma"] = gamma  # changed after construction: refused at the step
    with pytest.raises(ValueError, match="gamma"):
        run_steps(model, optimizer, batches, steps=1)
    assert torch.equal(flat_parameters(model), before)


def test_wrapper_state_dict_for_another_layout_leaves_the_base_untouched() -> None:
    state_dict = saved_state(lambda p: VRGD(torch.optim.AdamW(p), beta3=0.9))
    state_dict["gsnr_state"][0]["gsnr_ema"] = torch.zeros(3, 3)
    model, batches = make_problem()
    wrapper = VRGD(torch.optim.AdamW(model.parameters()), beta3=0.9)
    run_steps(model, wrapper, batches, steps=1)
    before = copy.deepcopy(wrapper.base_optimizer.state_dict())
    with pytest.raises(ValueError, match="gsnr_state"):
        wrapper.load_state_dict(state_dict)
    torch.testing.assert_close(wrapper.base_optimizer.state_dict(), before, rtol=0, atol=0)


def test_one_name_table_pairs_every_vr_optimizer_with_its_base() -> None:
    from hf_vrgd.optimizers import optimizer_pair

    assert BASE_OPTIMIZERS[VRAdamW] is torch.optim.AdamW and BASE_OPTIMIZERS[VRLAMB] is LAMB
    base_factory, vr_factory = optimizer_pair("vr-adamw", lr=0.02)
    params = [torch.nn.Parameter(torch.zeros(2))]
    base, vr = base_factory(params), vr_factory(params)
    assert type(base) is torch.optim.AdamW and base.defaults["foreach"] is True
    assert type(vr) is VRAdamW and vr.defaults["lr"] == 0.02 == base.defaults["lr"]
    assert vr.defaults["weight_decay"] == base.defaults["weight_decay"] == 0.01


@pytest.mark.parametrize("vr_class", list(BASE_OPTIMIZERS), ids=lambda cls: cls.__name__)
def test_signature_is_the_base_rule_plus_the_gsnr_arguments(vr_class: type[Optimizer]) -> None:
    """Each VR optimizer is a declaration over its base: the base's arguments and defaults (torch's
    SGD/Adam/AdamW, or this package's LAMB/LARS), then the keyword-only GSNR arguments of `VRGDConfig`."""
    base_class = BASE_OPTIMIZERS[vr_class]
    parameters = dict(inspect.signature(vr_class).parameters)
    config = VRGDConfig()
    gsnr = {"gamma": config.gamma, "gsnr_eps": config.eps}
    if "beta3" in parameters:
        gsnr["beta3"] = config.beta3
    assert ("beta3" in parameters) == vr_class.gsnr_ema == ("gsnr_ema" in vr_class.fp32_state_keys)
    for name, default in gsnr.items():
        assert parameters.pop(name).kind is inspect.Parameter.KEYWORD_ONLY
        assert inspect.signature(vr_class).parameters[name].default == default
    base_parameters = inspect.signature(base_class).parameters
    for name, parameter in parameters.items():
        assert name in base_parameters, f"{vr_class.__name__}({name}=...) is not an argument of its base"
        if parameter.default is not inspect.Parameter.empty and name != "params":
            assert parameter.default == base_parameters[name].default, name
    if issubclass(base_class, StrictStateOptimizer):  # this package's bases: the very same declaration
        assert list(parameters) == list(base_parameters)
        assert vr_class.update_rule is base_class.update_rule and issubclass(vr_class, base_class)


@pytest.mark.parametrize("vr_class", list(BASE_OPTIMIZERS), ids=lambda cls: cls.__name__)
def test_constructor_errors_name_the_class(vr_class: type[Optimizer]) -> None:
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(TypeError, match=rf"^{vr_class.__name__}\(\): .*unexpected keyword argument 'gama'"):
        vr_class(params, lr=0.1, gama=0.5)
    with pytest.raises(ValueError, match="gamma"):
        vr_class(params, lr=0.1, gamma=0.0)
    optimizer = vr_class(params, lr=0.1)
    assert optimizer.defaults["gamma"] == VRGDConfig().gamma
    assert ("beta3" in optimizer.defaults) == vr_class.gsnr_ema
