"""HF Trainer integration: `VRGDTrainer` (gradient groups on one device, unsupported setups refused)
and `GSNRLoggingCallback` (multiplier statistics in the Trainer's logs).

Any VR optimizer also works with a plain ``Trainer`` (``optimizers=(opt, sched)`` or
``optimizer_cls_and_kwargs=(VRAdamW, {...})``) given ``gradient_accumulation_steps >= 2`` or several
DDP ranks. Notes on the Trainer loop:

* The Trainer clips ``p.grad`` (``max_grad_norm``) before ``optimizer.step()``. The statistics come
  from the hooks, before clipping, and clipping is one global scalar, so it never changes ``r``.
* The Trainer never calls ``optimizer.zero_grad()``; the optimizers reset their statistics in ``step()``.
* FSDP and DeepSpeed ZeRO shard or flatten parameters, so per-tensor GSNR statistics do not exist there.
* Reentrant activation checkpointing (``use_reentrant=True``) runs nested backward passes that the
  hooks would count as extra gradient groups; transformers' default (``use_reentrant=False``) is fine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

__all__ = ["GSNRLoggingCallback", "VRGDTrainer"]


class VRGDTrainer(Trainer):
    """A ``transformers.Trainer`` for VRGD optimizers.

    Args:
        gradient_groups (`int`, *optional*):
            Split each micro-batch into this many groups (rows of the batch, as even as possible) and run
            one backward pass per group, so a single device without gradient accumulation still gives
            the optimizer ``K >= 2`` gradient groups. A last batch with fewer rows gives fewer groups
            (one per row). Each group's loss is weighted so that the
            accumulated gradient equals the one of a single full-batch backward: by the group's share of
            rows for mean losses, unweighted when the loss is already normalized by
            ``num_items_in_batch`` (token-count normalized LM losses, exact). With mean losses over
            padded tokens the row weighting matches the full batch only when every row has the same
            number of label tokens. Costs ``gradient_groups`` smaller forward/backward passes.

    Every micro-batch (and every group) tells the optimizer's statistics its size, so that its gradient
    counts as a per-group mean: micro-batches with different numbers of label tokens (variable-length
    batches under ``num_items_in_batch`` normalization) do not pose as gradient noise. A plain ``Trainer``
    does not, so prefer `VRGDTrainer` with variable-length batches.
        *args, **kwargs: passed to ``transformers.Trainer``.

    Raises ``ValueError`` under FSDP or DeepSpeed, and with reentrant activation checkpointing. Moves any
    `GSNRLoggingCallback` passed in ``callbacks`` ahead of the ``report_to`` integrations.
    """

    def __init__(self, *args: Any, gradient_groups: int | None = None, **kwargs: Any) -> None:
        if gradient_groups is not None and (not isinstance(gradient_groups, int) or gradient_groups < 2):
            raise ValueError(f"gradient_groups must be an integer >= 2 or None, got {gradient_groups!r}")
        self.gradient_groups = gradient_groups
        self._group_loss_weight = 1.0
        super().__init__(*args, **kwargs)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise ValueError(
                "VRGD needs per-tensor gradient statistics across ranks, which are not available under FSDP or "
                "DeepSpeed ZeRO (parameters are sharded or flattened); use DDP (torchrun / accelerate launch)"
            )
        callbacks = self.callback_handler.callbacks
        for callback in [c for c in callbacks if isinstance(c, GSNRLoggingCallback)]:
            callbacks.remove(callback)
            callbacks.insert(0, callback)
        checkpointing_kwargs = self.args.activation_checkpointing_kwargs or {}
        if self.args.activation_checkpointing and checkpointing_kwargs.get("use_reentrant", False):
            raise ValueError(
                "reentrant activation checkpointing runs nested backward passes that corrupt the GSNR "
                "statistics; pass TrainingArguments(activation_checkpointing_kwargs={'use_reentrant': False}) "
                "(its deprecated alias is gradient_checkpointing_kwargs), the transformers default"
            )

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        normalized = self._loss_is_normalized(num_items_in_batch)
        if self.gradient_groups is None:
            groups = [(inputs, None)]
        else:
            groups = split_batch(inputs, self.gradient_groups)
        rows = sum(group_rows or 0 for _, group_rows in groups)
        total_loss = None
        for index, (group, group_rows) in enumerate(groups):
            self._group_loss_weight = 1.0 if normalized or group_rows is None else group_rows / rows
            self._set_group_size(group, normalized)
            # Under DDP only the last group's backward may all-reduce; the others only accumulate.
            sync = contextlib.nullcontext() if index == len(groups) - 1 else self.accelerator.no_sync(model)
            try:
                with sync:
                    loss = super().training_step(model, group, num_items_in_batch)
            finally:
                self._group_loss_weight = 1.0
            total_loss = loss if total_loss is None else total_loss + loss
        return total_loss

    def _set_group_size(self, group: Mapping[str, Any], normalized: bool) -> None:
        """Tells the GSNR statistics how to turn the next backward's gradient into a per-group mean.

        A loss normalized by ``num_items_in_batch`` (a sum over the window) gives a group gradient in
        proportion to the group's label tokens, counted as the Trainer counts them; a mean loss weighted
        by the group's share of rows gives one in proportion to that share.
        """
        gsnr_optimizer = find_gsnr_optimizer(self.optimizer)
        if gsnr_optimizer is None:
            return
        items = self._group_loss_weight
        labels = group.get("shift_labels", group.get("labels"))
        if normalized and torch.is_tensor(labels):
            if "shift_labels" not in group and self._loss_shifts_labels:
                labels = labels[..., 1:]
            items = max(int(labels.ne(-100).sum()), 1)  # a group without label tokens has no gradient
        gsnr_optimizer.gsnr_scaler.statistics.set_group_size(items)

    def _loss_is_normalized(self, num_items_in_batch: torch.Tensor | int | None) -> bool:
        """Whether the loss is a sum over the window divided by ``num_items_in_batch`` (Trainer's rule)."""
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool(
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None)
            or self.compute_loss_func is not None
        )

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self._group_loss_weight == 1.0:
            return result
        if return_outputs:
            loss, outputs = result
            return loss * self._group_loss_weight, outputs
        return result * self._group_loss_weight


def split_batch(inputs: Mapping[str, Any], groups: int) -> list[tuple[dict[str, Any], int]]:
    """Splits every tensor whose first dimension is the batch into ``groups`` parts; ``(part, rows)`` each.

    Other values (scalars, tensors of another leading size) are shared by all parts. A batch of fewer
    rows (the last, partial batch of an epoch) gives one part per row; a single row gives one group,
    and the optimizer then steps on the unscaled gradient (see `GSNRGradientScaler`) unless gradient
    accumulation adds groups. ``dataloader_drop_last=True`` avoids partial batches.
    """
    batch_size = next((v.shape[0] for v in inputs.values() if torch.is_tensor(v) and v.dim() > 0), None)
    if batch_size is None:
        raise ValueError(
            "gradient_groups needs a batch with a batch dimension (tensors of shape [rows, ...])"
        )
    groups = min(groups, batch_size)
    parts: list[dict[str, Any]] = [{} for _ in range(groups)]
    for key, value in inputs.items():
        if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch_size:
            for part, chunk in zip(parts, torch.tensor_split(value, groups), strict=True):
                part[key] = chunk
        else:
            for part in parts:
                part[key] = value
    sizes = [len(chunk) for chunk in torch.tensor_split(torch.arange(batch_size), groups)]
    return list(zip(parts, sizes, strict=True))


def find_gsnr_optimizer(optimizer: Any) -> Any | None:
    """The optimizer with ``gsnr_summary`` inside Accelerate's ``AcceleratedOptimizer`` wrapping, if any."""
    while optimizer is not None and not hasattr(optimizer, "gsnr_summary"):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


class GSNRLoggingCallback(TrainerCallback):
    """Adds the last optimizer step's GSNR statistics to every training log of the Trainer.

    Keys (see `GSNRScaledOptimizer.gsnr_summary`): ``gsnr/mean_multiplier``, ``gsnr/fraction_at_gamma``,
    ``gsnr/fraction_at_one``, ``gsnr/fraction_without_gradient``, ``gsnr/groups`` and, with
    ``per_layer``, ``gsnr/<parameter name>/mean_multiplier`` and ``.../fraction_at_gamma``. The values
    describe the step just before the log, not an average over ``logging_steps``; with
    ``logging_strategy="steps"`` the optimizer computes them only for the steps that are logged.

    The values go into the ``logs`` dict of ``Trainer.log`` and into ``state.log_history``. Callbacks
    run in list order, and ``Trainer`` puts ``report_to`` integrations first, so this callback must
    run before them: `VRGDTrainer` moves it to the front; with a plain ``Trainer`` call
    ``GSNRLoggingCallback.install(trainer)``.

    Args:
        per_layer (`bool`, *optional*, defaults to `True`): also log one summary per parameter tensor.
    """

    def __init__(self, per_layer: bool = True) -> None:
        self.per_layer = per_layer
        self._names: dict[torch.Tensor, str] = {}

    @classmethod
    def install(cls, trainer: Trainer, per_layer: bool = True) -> GSNRLoggingCallback:
        """Puts a new callback first in ``trainer``'s callbacks (ahead of ``report_to``) and returns it."""
        callback = cls(per_layer=per_layer)
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if model is not None:
            self._names = {param: name for name, param in model.named_parameters()}

    def on_step_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        """Collects the summary (a few more passes in ``step()``) only for steps the Trainer will log."""
        gsnr_optimizer = find_gsnr_optimizer(optimizer)
        if gsnr_optimizer is None:
            return
        step = state.global_step + 1
        logs_by_steps = args.logging_strategy == "steps" and state.logging_steps
        gsnr_optimizer.gsnr_scaler.collect_summary = (
            not logs_by_steps or step % state.logging_steps == 0 or (args.logging_first_step and step == 1)
        )

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        gsnr_optimizer = find_gsnr_optimizer(optimizer)
        if logs is None or "loss" not in logs or gsnr_optimizer is None:
            return
        summary = gsnr_optimizer.gsnr_summary(self._names, per_layer=self.per_layer)
        logs.update(summary)
        if state.log_history:
            state.log_history[-1].update(summary)
