"""Shared machinery of the optimizers: strict state dicts, fp32 math, and the GSNR gradient scaling.

The update rules themselves are plain functions in the optimizer files (``sgd_update``, ``adam_update``,
...). A base optimizer (`LAMB`, `LARS`) applies its rule to ``p.grad``; its VR version first multiplies
``p.grad`` in place by the GSNR multiplier (`GSNRGradientScaler`), then applies the same rule. So after
``step()`` a VR optimizer leaves the scaled gradient in ``.grad``.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch.optim import Optimizer

from hf_vrgd.config import VRGDConfig
from hf_vrgd.gsnr import GradientStatistics, gsnr_multipliers

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]
OPTIMIZER_CLASS_KEY = "optimizer_class"
FEW_GROUPS = 4
"""Below this many gradient groups the GSNR estimate is mostly noise: on Gaussian group gradients 94%
(K=2) and 60% (K=3) of the elements clip to gamma, against 37% at K=4, 28% at K=8 and 25% in the
large-K limit (``hf-vrgd small-k``, results/vrgd/small_k.md). Steps with fewer groups warn once."""
"""Top-level key of our state dicts naming the optimizer class that saved them."""


class StrictStateOptimizer(Optimizer):
    """Base of this package's optimizers.

    * State listed in ``fp32_state_keys`` stays float32 for bf16/fp16 parameters, also after
      ``load_state_dict`` (torch would cast it to the parameter's dtype).
    * ``step()`` applies the class's ``update_rule`` to each group, and skips the step with a warning when
      a gradient is NaN or infinite (parameters and state untouched; ``.grad`` is left for the caller).
    * ``load_state_dict`` raises ``ValueError`` on a state dict saved by another optimizer class or for
      another parameter layout (group count, group sizes, tensor shapes), which torch accepts silently.

    A subclass is a declaration: ``hyperparameters`` (its arguments after ``params``, with their
    defaults, validated into the ``defaults`` dict; its signature becomes the class's), ``update_rule``
    and ``fp32_state_keys``.
    """

    fp32_state_keys: ClassVar[tuple[str, ...]] = ()
    hyperparameters: ClassVar[Callable[..., dict[str, Any]]]
    """``hyperparameters(lr, ...)``: the validated ``defaults`` (``ValueError`` outside their ranges)."""
    update_rule: ClassVar[Callable[[dict[str, Any], list[torch.Tensor], list[dict]], None]]
    """``rule(group, params, states)``: the update of the parameters with a gradient in one group."""

    def __init__(self, params: ParamsT, *args: Any, **kwargs: Any) -> None:
        try:  # the error names the class, not the hyperparameters function
            inspect.signature(type(self)).bind(params, *args, **kwargs)
        except TypeError as error:
            raise TypeError(f"{type(self).__name__}(): {error}") from None
        super().__init__(params, self.build_defaults(*args, **kwargs))

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if hasattr(cls, "hyperparameters"):
            cls.__signature__ = inspect.Signature(cls.signature_parameters())

    @classmethod
    def signature_parameters(cls) -> list[inspect.Parameter]:
        """``params`` followed by the parameters of ``hyperparameters``: the constructor's signature."""
        params = inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation="ParamsT")
        return [params, *inspect.signature(cls.hyperparameters).parameters.values()]

    def build_defaults(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The ``defaults`` dict from the constructor's arguments after ``params``."""
        return self.hyperparameters(*args, **kwargs)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update; skipped with a warning (parameters and state untouched) if a gradient is not finite."""
        loss = evaluate_closure(closure)
        if self._prepare_gradients():
            for group, params, states in self._groups_with_gradients():
                self.update_rule(group, params, states)
        return loss

    def _prepare_gradients(self) -> bool:
        """Whether the step may proceed: every gradient is finite (warns otherwise)."""
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        return all_finite_or_warn(grads)

    def state_dict(self) -> dict[str, Any]:
        state_dict = super().state_dict()
        state_dict[OPTIMIZER_CLASS_KEY] = type(self).__name__
        return state_dict

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        check_state_dict_layout(self, state_dict)
        super().load_state_dict(dict(state_dict))
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, param in zip(saved_ids, params, strict=True):
            saved = state_dict["state"].get(saved_id, {})
            for key in self.fp32_state_keys:
                if key in saved:
                    self.state[param][key] = saved[key].to(device=param.device, dtype=torch.float32)

    def _groups_with_gradients(self) -> Iterator[tuple[dict[str, Any], list[torch.Tensor], list[dict]]]:
        """``(group, params, states)`` per group and device, over the parameters that have a gradient."""
        for group, params in params_with_gradients(self.param_groups):
            yield group, params, [self.state[p] for p in params]


def params_with_gradients(
    param_groups: list[dict[str, Any]],
) -> Iterator[tuple[dict[str, Any], list[torch.Tensor]]]:
    """``(group, params)`` for each group and device (models split over devices), params with a gradient.

    The per-tensor norms of the rules and of the GSNR are stacked, which needs one device per list.
    """
    for group in param_groups:
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for param in group["params"]:
            if param.grad is not None:
                by_device.setdefault(param.device, []).append(param)
        for params in by_device.values():
            yield group, params


def check_state_dict_layout(optimizer: Optimizer, state_dict: Mapping[str, Any]) -> None:
    """Raises ``ValueError`` unless ``state_dict`` was saved by ``optimizer``'s class for the same layout."""
    name = type(optimizer).__name__
    saved_class = state_dict.get(OPTIMIZER_CLASS_KEY)
    if saved_class is not None and saved_class != name:
        raise ValueError(f"this state dict was saved by {saved_class}, it cannot be loaded into {name}")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(
            f"the state dict has {len(saved_groups)} parameter groups, {name} has {len(optimizer.param_groups)}"
        )
    for group_index, (saved, group) in enumerate(zip(saved_groups, optimizer.param_groups, strict=True)):
        # torch's Optimizer.__setstate__ (deepcopy, pickling) adds "differentiable" to the defaults only.
        missing = sorted(set(optimizer.defaults) - set(saved) - {"differentiable"})
        if missing:
            raise ValueError(
                f"parameter group {group_index} of the state dict lacks {missing}: it was saved by "
                f"another optimizer than {name}"
            )
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"parameter group {group_index} has {len(saved['params'])} parameters in the state dict "
                f"and {len(group['params'])} in {name}"
            )
        for saved_id, param in zip(saved["params"], group["params"], strict=True):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if torch.is_tensor(value) and value.dim() > 0 and value.shape != param.shape:
                    raise ValueError(
                        f"state {key!r} of parameter {saved_id} has shape {tuple(value.shape)}, "
                        f"the parameter has {tuple(param.shape)}: another model or parameter order"
                    )


def evaluate_closure(closure: Callable[[], float] | None) -> float | None:
    """Runs the optional closure with gradients enabled, as torch optimizers do."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def fp32_copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Float32 versions: the tensors themselves when already float32, new copies otherwise."""
    return [t.float() for t in tensors]


def write_back(params: list[torch.Tensor], params32: list[torch.Tensor]) -> None:
    """Copies updated float32 copies back into low-precision parameters."""
    for param, param32 in zip(params, params32, strict=True):
        if param32 is not param:
            param.copy_(param32)


def apply_momentum(
    states: list[dict], updates: list[torch.Tensor], momentum: float, dampening: float = 0.0
) -> list[torch.Tensor]:
    """Heavy-ball momentum as in ``torch.optim.SGD``: ``buf = momentum * buf + (1 - dampening) * update``.

    A new buffer starts as a copy of the update (no dampening on the first step). Returns the buffers.
    """
    buffers, continuing, continuing_updates = [], [], []
    for state, update in zip(states, updates, strict=True):
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = update.clone()
        else:
            continuing.append(state["momentum_buffer"])
            continuing_updates.append(update)
        buffers.append(state["momentum_buffer"])
    if continuing:
        torch._foreach_mul_(continuing, momentum)
        torch._foreach_add_(continuing, continuing_updates, alpha=1.0 - dampening)
    return buffers


class GSNRGradientScaler:
    """Turns one window's `GradientStatistics` into GSNR multipliers and applies them to ``p.grad``.

    Per step: all-reduce the statistics, compute ``r = gsnr_multiplier(E[g], E[g²], gamma, eps)`` per
    tensor (foreach, in place in the statistics buffers: `gsnr_multipliers`), check that every gradient
    and every multiplier is finite (one host sync), then multiply ``p.grad`` by ``r`` or, with ``beta3``,
    by its bias-corrected EMA (state keys ``gsnr_ema`` and ``gsnr_step``). ``gamma``, ``beta3`` and ``lr``
    are read, and validated, from each parameter group. The statistics restart at every step.

    Cases that are not a normal step:

    * no gradient at all: nothing happens (as torch optimizers), ``False``;
    * a non-finite gradient or multiplier: warning, nothing touched, ``False``;
    * one gradient group (``K = 1``) before any step with ``K >= 2``: ``ValueError`` with the fix;
    * ``2 <= K < FEW_GROUPS``: a normal step, with a warning the first time (the estimate is noisy);
    * ``K = 1`` after steps with ``K >= 2`` (the partial last accumulation window of an epoch): no
      variance exists, so this step uses the unscaled gradient (the base optimizer's step; the ``beta3``
      EMA is not updated), with a warning the first time.

    ``collect_summary`` (default True) also computes the counts behind `summary` (a few more passes);
    `GSNRLoggingCallback` turns it on only for the steps the Trainer logs.
    """

    def __init__(self, params: Iterable[torch.Tensor], eps: float) -> None:
        self.statistics = GradientStatistics(params)
        self.eps = eps
        self.collect_summary = True
        self.last_groups = 0
        self.largest_groups = 0
        self._warned_single_group = False
        self._warned_few_groups = False
        self._last_tables: list[tuple[list[torch.Tensor], torch.Tensor]] = []

    def scale_gradients(self, param_groups: list[dict[str, Any]], state: Mapping[torch.Tensor, dict]) -> bool:
        """Scales every ``p.grad`` by its multiplier; whether the base update should run (see the class)."""
        for group in param_groups:
            validate_group(group)
        grads = [p.grad for group in param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            self.statistics.reset()
            return False
        groups = self.statistics.all_reduce()
        if groups < 2:
            self.statistics.reset()
            return self._single_group(groups)
        if groups < FEW_GROUPS and not self._warned_few_groups:
            warnings.warn(
                f"GSNR from {groups} gradient groups is mostly noise ({'94' if groups == 2 else '60'}% of the "
                f"elements clip to gamma on Gaussian gradients, against 25% with many groups); use at least "
                f"{FEW_GROUPS} groups (gradient_accumulation_steps x ranks, or VRGDTrainer(gradient_groups=k))",
                stacklevel=4,
            )
            self._warned_few_groups = True
        computed = []
        for group, params in params_with_gradients(param_groups):
            buffers = [self.statistics.sums(p) for p in params]
            if any(b is None for b in buffers):
                self.statistics.reset()
                raise ValueError(
                    "a parameter has a gradient that the GSNR hooks never saw (was .grad assigned directly?)"
                )
            sums, squares = (list(column) for column in zip(*buffers, strict=True))
            multipliers, totals, table = gsnr_multipliers(
                sums, squares, groups, gamma=group["gamma"], eps=self.eps, with_table=self.collect_summary
            )
            computed.append((group, params, multipliers, totals, table))
        self.statistics.reset()  # the multipliers stay in the buffers until the next backward
        totals = torch.cat([c[3].to(grads[0].device) for c in computed])
        finite_grads, finite_multipliers = torch.stack([_all_finite(grads), totals.isfinite().all()]).tolist()
        if not finite_grads:
            _warn_skipped("non-finite gradients")
            return False
        if not finite_multipliers:
            _warn_skipped("non-finite GSNR statistics (a squared gradient overflowed float32?)")
            return False
        for group, params, multipliers, _, _ in computed:
            grads = [p.grad for p in params]
            if group.get("beta3") is None:
                torch._foreach_mul_(grads, multipliers)
            else:
                _scale_by_bias_corrected_emas([state[p] for p in params], multipliers, grads, group["beta3"])
        self.last_groups, self.largest_groups = groups, max(groups, self.largest_groups)
        self._last_tables = [(c[1], c[4]) for c in computed if c[4] is not None]
        return True

    def _single_group(self, groups: int) -> bool:
        """``K < 2``: an error before any real step, the unscaled gradient (warned once) afterwards."""
        if self.largest_groups < 2:
            raise ValueError(
                f"GSNR needs at least 2 gradient groups per optimizer step, got {groups}. A group is one "
                "backward pass on one rank: use gradient accumulation (gradient_accumulation_steps >= 2), "
                "several DDP processes, or VRGDTrainer(gradient_groups=k) to split each batch."
            )
        if not self._warned_single_group:
            warnings.warn(
                f"this optimizer step has {groups} gradient group (earlier steps had up to "
                f"{self.largest_groups}), e.g. the partial last gradient-accumulation window of an epoch: "
                "without a variance it uses the unscaled gradient. To avoid short windows make the number "
                "of batches per epoch a multiple of gradient_accumulation_steps (and use "
                "dataloader_drop_last=True).",
                stacklevel=4,
            )
            self._warned_single_group = True
        self.last_groups, self._last_tables = groups, []
        return True

    def summary(
        self, names: Mapping[torch.Tensor, str] | None = None, per_layer: bool = True
    ) -> dict[str, float]:
        """The last step's multiplier statistics (see `GSNRScaledOptimizer.gsnr_summary`)."""
        if not self._last_tables:
            return {}
        params = [p for group_params, _ in self._last_tables for p in group_params]
        table = torch.cat([t.double().cpu() for _, t in self._last_tables])
        numel, informative, total, at_gamma, at_one = table.sum(0).tolist()
        denominator = max(informative, 1.0)
        summary = {
            "gsnr/groups": float(self.last_groups),
            "gsnr/mean_multiplier": total / denominator,
            "gsnr/fraction_at_gamma": at_gamma / denominator,
            "gsnr/fraction_at_one": at_one / denominator,
            "gsnr/fraction_without_gradient": 1.0 - informative / numel,
        }
        if per_layer:
            for index, (param, row) in enumerate(zip(params, table.tolist(), strict=True)):
                name = names.get(param, f"param_{index}") if names else f"param_{index}"
                summary[f"gsnr/{name}/mean_multiplier"] = row[2] / max(row[1], 1.0)
                summary[f"gsnr/{name}/fraction_at_gamma"] = row[3] / max(row[1], 1.0)
        return summary


def _all_finite(grads: list[torch.Tensor]) -> torch.Tensor:
    """A 0-dim bool tensor: every element of every gradient is finite (no host sync)."""
    # The largest magnitude is inf/NaN exactly when an element is, and cannot overflow (unlike a 2-norm).
    return (
        torch.stack([n.to(grads[0].device) for n in torch._foreach_norm(grads, float("inf"))])
        .isfinite()
        .all()
    )


def _warn_skipped(reason: str) -> None:
    warnings.warn(f"{reason}: this optimizer step is skipped (parameters and state untouched)", stacklevel=5)


def all_finite_or_warn(grads: list[torch.Tensor]) -> bool:
    """Whether every gradient element is finite (one host sync); warns that the step is skipped if not."""
    if not grads or bool(_all_finite(grads)):
        return True
    _warn_skipped("non-finite gradients")
    return False


def _scale_by_bias_corrected_emas(
    states: list[dict], multipliers: list[torch.Tensor], grads: list[torch.Tensor], beta3: float
) -> None:
    """``p_t = beta3 p_{t-1} + (1 - beta3) r_t``, then ``grad *= p_t / (1 - beta3^t)``.

    Reconstructed VR-Adam (see `VRAdam`).
    """
    for state, multiplier in zip(states, multipliers, strict=True):
        if "gsnr_ema" not in state:
            state["gsnr_ema"] = torch.zeros_like(multiplier)
            state["gsnr_step"] = 0
        state["gsnr_step"] += 1
    emas = [state["gsnr_ema"] for state in states]
    torch._foreach_lerp_(emas, multipliers, 1.0 - beta3)
    torch._foreach_mul_(grads, emas)
    torch._foreach_div_(grads, [1.0 - beta3 ** state["gsnr_step"] for state in states])


def require_finite_non_negative(**values: float) -> None:
    """Raises ``ValueError`` naming every value that is not a finite number >= 0 (NaN and inf included)."""
    bad = {}
    for name, value in values.items():
        number = float(value) if torch.is_tensor(value) and value.numel() == 1 else value
        if not (isinstance(number, (int, float)) and math.isfinite(number) and number >= 0):
            bad[name] = value
    if bad:
        raise ValueError(
            ", ".join(f"{name} must be a finite number >= 0, got {value!r}" for name, value in bad.items())
        )


def validate_group(group: Mapping[str, Any]) -> None:
    """Validates the learning rate and GSNR settings of one parameter group (``ValueError``)."""
    require_finite_non_negative(lr=group["lr"])
    if "gamma" in group:
        VRGDConfig(gamma=group["gamma"], beta3=group.get("beta3"))


class GSNRScaledOptimizer(StrictStateOptimizer):
    """Base of the VR optimizers: ``step()`` scales ``p.grad`` by the GSNR multiplier, then runs ``update_rule``.

    A VR optimizer is its base rule's declaration plus this class: ``class VRLAMB(GSNRScaledOptimizer,
    LAMB)`` inherits LAMB's ``hyperparameters``, ``update_rule`` and ``fp32_state_keys``; ``gsnr_ema``
    says whether it takes ``beta3`` (the multiplier EMA, state ``gsnr_ema``). The GSNR arguments are
    keyword-only and declared here once: ``gamma``, ``beta3`` (only with ``gsnr_ema``) and ``gsnr_eps``,
    with `VRGDConfig`'s defaults; everything else goes to ``hyperparameters``.

    Adds ``gamma`` (and ``beta3``) to the defaults, so both can be set per parameter group.
    Statistics memory: two float32 buffers (S1, S2) per trainable parameter, outside the state dict
    (they are reset at every step, so checkpoints never need them). ``step()`` computes the multiplier
    in place in them, with one temporary float32 tensor per parameter of the group being scaled.
    """

    gsnr_ema: ClassVar[bool] = False

    def __init__(self, params: ParamsT, *args: Any, **kwargs: Any) -> None:
        gsnr = {name: kwargs.pop(name, default) for name, default in self.gsnr_arguments().items()}
        VRGDConfig(gamma=gsnr["gamma"], beta3=gsnr.get("beta3"), eps=gsnr["gsnr_eps"])
        self._gsnr_defaults = {name: gsnr[name] for name in ("gamma", "beta3") if gsnr.get(name) is not None}
        super().__init__(params, *args, **kwargs)
        self.gsnr_scaler = GSNRGradientScaler(
            [p for group in self.param_groups for p in group["params"]], eps=gsnr["gsnr_eps"]
        )

    def __init_subclass__(cls, **kwargs: Any) -> None:
        if cls.gsnr_ema and "gsnr_ema" not in cls.fp32_state_keys:
            cls.fp32_state_keys = (*cls.fp32_state_keys, "gsnr_ema")
        super().__init_subclass__(**kwargs)

    @classmethod
    def gsnr_arguments(cls) -> dict[str, float]:
        """The keyword-only GSNR arguments and their defaults (`VRGDConfig`'s): ``beta3`` only with an EMA."""
        config = VRGDConfig()
        arguments = {"gamma": config.gamma, "beta3": config.beta3, "gsnr_eps": config.eps}
        if not cls.gsnr_ema:
            del arguments["beta3"]
        return arguments

    @classmethod
    def signature_parameters(cls) -> list[inspect.Parameter]:
        gsnr = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation="float")
            for name, default in cls.gsnr_arguments().items()
        ]
        return [*super().signature_parameters(), *gsnr]

    def build_defaults(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {**super().build_defaults(*args, **kwargs), **self._gsnr_defaults}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # The statistics hooks are registered once, over the parameters given at construction.
        if hasattr(self, "gsnr_scaler"):
            raise ValueError(
                f"{type(self).__name__} takes all its parameter groups at construction (the GSNR hooks are "
                "registered then); build a new optimizer, e.g. with frozen parameters in a group of lr=0"
            )
        super().add_param_group(param_group)
        validate_group(self.param_groups[-1])

    def _prepare_gradients(self) -> bool:
        return self.gsnr_scaler.scale_gradients(self.param_groups, self.state)

    def gsnr_summary(
        self, names: Mapping[torch.Tensor, str] | None = None, per_layer: bool = True
    ) -> dict[str, float]:
        """Multiplier statistics of the last step, for logging (empty before the first step).

        Keys: ``gsnr/groups`` (K), ``gsnr/mean_multiplier``, ``gsnr/fraction_at_gamma``,
        ``gsnr/fraction_at_one``, ``gsnr/fraction_without_gradient`` and, with ``per_layer``,
        ``gsnr/<name>/mean_multiplier`` and ``gsnr/<name>/fraction_at_gamma`` per tensor (``names`` maps
        parameters to names; ``param_<i>`` otherwise). The multiplier is the clipped ``r`` of that
        step, before any ``beta3`` EMA.
        """
        return self.gsnr_scaler.summary(names, per_layer)
