"""VRGD in the HF Trainer: both ways of passing the optimizer, gradient groups on one device, logging,
clipping, checkpoint resume, LoRA, and the refused setups. Tiny Llama, CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_tiny_config
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from hf_vrgd import VRGD, VRSGD, GSNRLoggingCallback, VRAdamW, VRGDTrainer
from hf_vrgd.naive import gsnr_multiplier, naive_gsnr_multiplier

SEQUENCE_LENGTH = 8


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = make_tiny_config("llama", head_dim=8, num_hidden_layers=1, intermediate_size=16)
    return AutoModelForCausalLM.from_config(config)


def token_dataset(rows: int = 32) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 128, (rows, SEQUENCE_LENGTH), generator=generator)
    return [{"input_ids": row, "labels": row} for row in tokens]


def training_args(output_dir: Path, **overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=3,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_optimizers_argument_trains_and_logs_gsnr(tmp_path: Path) -> None:
    model = tiny_model()
    before = flat_parameters(model).clone()
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path),
        train_dataset=token_dataset(),
        optimizers=(VRAdamW(model.parameters(), lr=1e-2), None),
    )
    GSNRLoggingCallback.install(trainer)
    trainer.train()
    assert not torch.equal(flat_parameters(model), before)
    step_logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(step_logs) == 3
    for log in step_logs:
        assert log["gsnr/groups"] == 2.0
        assert 0.1 <= log["gsnr/mean_multiplier"] <= 1.0
        assert 0.0 <= log["gsnr/fraction_at_gamma"] <= 1.0
        assert "gsnr/model.embed_tokens.weight/mean_multiplier" in log
    # embedding rows of tokens absent from the batch have no gradient at all
    assert step_logs[0]["gsnr/fraction_without_gradient"] > 0.0


def test_optimizer_cls_and_kwargs(tmp_path: Path) -> None:
    model = tiny_model()
    trainer = VRGDTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=2),
        train_dataset=token_dataset(),
        optimizer_cls_and_kwargs=(VRAdamW, {"lr": 1e-2, "gamma": 0.2}),
        callbacks=[GSNRLoggingCallback(per_layer=False)],
    )
    assert isinstance(trainer.callback_handler.callbacks[0], GSNRLoggingCallback)
    trainer.train()
    optimizer = trainer.optimizer.optimizer  # unwrap Accelerate's AcceleratedOptimizer
    assert isinstance(optimizer, VRAdamW)
    assert optimizer.param_groups[0]["gamma"] == 0.2
    last = [log for log in trainer.state.log_history if "loss" in log][-1]
    assert last["gsnr/mean_multiplier"] >= 0.2
    assert not any(key.endswith("/fraction_at_gamma") and key.count("/") > 1 for key in last)


def test_single_group_without_accumulation_raises(tmp_path: Path) -> None:
    model = tiny_model()
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, gradient_accumulation_steps=1),
        train_dataset=token_dataset(),
        optimizers=(VRAdamW(model.parameters()), None),
    )
    with pytest.raises(ValueError, match="gradient_groups"):
        trainer.train()


@pytest.mark.parametrize("normalized_by_items", [False, True], ids=["mean-loss", "num-items-loss"])
def test_gradient_groups_give_the_full_batch_gradient(tmp_path: Path, normalized_by_items: bool) -> None:
    rows = token_dataset(7)  # 7 rows in 3 groups: uneven (3, 2, 2)
    batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
    num_items = torch.tensor(7 * (SEQUENCE_LENGTH - 1)) if normalized_by_items else None
    gradients, losses = [], []
    for groups in (None, 3):
        model = tiny_model()
        trainer = VRGDTrainer(
            model=model,
            args=training_args(tmp_path, gradient_accumulation_steps=1),
            train_dataset=rows,
            gradient_groups=groups,
        )
        trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which is skipped here
        losses.append(trainer.training_step(model, dict(batch), num_items))
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(losses[1], losses[0])


def test_gradient_groups_train_without_accumulation(tmp_path: Path) -> None:
    model = tiny_model()
    trainer = VRGDTrainer(
        model=model,
        args=training_args(tmp_path, gradient_accumulation_steps=1, max_steps=2),
        train_dataset=token_dataset(),
        optimizers=(VRSGD(model.parameters(), lr=0.1, momentum=0.9), None),
        gradient_groups=4,
        callbacks=[GSNRLoggingCallback()],
    )
    trainer.train()
    assert [log["gsnr/groups"] for log in trainer.state.log_history if "loss" in log] == [4.0, 4.0]


def test_gradient_clipping_does_not_change_the_multiplier() -> None:
    """Clipping scales every gradient by one scalar after the hooks ran: the VR-SGD step scales alike."""
    steps, summaries = [], []
    for max_norm in (None, 1e-3):
        model = tiny_model()
        optimizer = VRSGD(model.parameters(), lr=1.0)
        batch = {key: torch.stack([row[key] for row in token_dataset(4)]) for key in ("input_ids", "labels")}
        for part in (slice(0, 2), slice(2, 4)):
            (model(input_ids=batch["input_ids"][part], labels=batch["labels"][part]).loss / 2).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or float("inf"))
        optimizer.step()  # leaves the GSNR-scaled gradient r * g in .grad
        steps.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        summaries.append(optimizer.gsnr_summary())
    clip_coefficient = 1e-3 / (norm + 1e-6)
    torch.testing.assert_close(steps[1], steps[0] * clip_coefficient, rtol=1e-5, atol=1e-12)
    assert summaries[0] == summaries[1]


@pytest.mark.parametrize(
    "make_optimizer",
    [lambda p: VRAdamW(p, lr=1e-2), lambda p: VRGD(torch.optim.AdamW(p, lr=1e-2), beta3=0.9)],
    ids=["vradamw", "vrgd-adamw"],
)
def test_checkpoint_resume_is_bit_identical(tmp_path: Path, make_optimizer) -> None:
    def run(output_dir: Path, max_steps: int, resume: bool = False) -> torch.Tensor:
        model = tiny_model()
        args = training_args(output_dir, max_steps=max_steps, save_strategy="steps", save_steps=2)
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=token_dataset(),
            optimizers=(make_optimizer(model.parameters()), None),
        )
        trainer.train(resume_from_checkpoint=str(output_dir / "checkpoint-2") if resume else None)
        return flat_parameters(model)

    uninterrupted = run(tmp_path / "straight", max_steps=4)
    run(tmp_path / "interrupted", max_steps=2)
    resumed = run(tmp_path / "interrupted", max_steps=4, resume=True)
    assert torch.equal(resumed, uninterrupted)


def test_lora_statistics_cover_only_trainable_parameters(tmp_path: Path) -> None:
    model = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    optimizer = VRAdamW(model.parameters(), lr=1e-2)
    assert len(optimizer.gsnr_scaler.statistics.params) == len(trainable)
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=1),
        train_dataset=token_dataset(),
        optimizers=(optimizer, None),
    )
    GSNRLoggingCallback.install(trainer)
    trainer.train()
    log = next(log for log in trainer.state.log_history if "loss" in log)
    logged = {key.split("/")[1] for key in log if key.endswith("/mean_multiplier") and key.count("/") == 2}
    assert logged == trainable


def test_reentrant_checkpointing_is_refused(tmp_path: Path) -> None:
    args = training_args(
        tmp_path, activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": True}
    )
    with pytest.raises(ValueError, match="reentrant"):
        VRGDTrainer(model=tiny_model(), args=args, train_dataset=token_dataset())


def test_sharded_setups_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FSDP/DeepSpeed need several processes; the Trainer's own flags are what VRGDTrainer reads."""
    create_accelerator = Trainer.create_accelerator_and_postprocess

    def create_fsdp_accelerator(trainer: Trainer) -> None:
        create_accelerator(trainer)
        trainer.is_fsdp_enabled = True

    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", create_fsdp_accelerator)
    with pytest.raises(ValueError, match="FSDP or DeepSpeed"):
        VRGDTrainer(model=tiny_model(), args=training_args(tmp_path), train_dataset=token_dataset())


def test_bad_gradient_groups(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="gradient_groups"):
        VRGDTrainer(model=tiny_model(), args=training_args(tmp_path), gradient_groups=1)


def padded_batch(lengths: list[int], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Rows of the given lengths, right-padded to SEQUENCE_LENGTH with labels -100."""
    input_ids = torch.randint(3, 128, (len(lengths), SEQUENCE_LENGTH), generator=generator)
    mask = torch.arange(SEQUENCE_LENGTH) < torch.tensor(lengths)[:, None]
    labels = torch.where(mask, input_ids, -100)
    return {"input_ids": input_ids, "attention_mask": mask.long(), "labels": labels}


def test_unequal_micro_batches_give_per_group_mean_gsnr(tmp_path: Path) -> None:
    """Variable-length micro-batches under num_items_in_batch: the hook statistics equal a brute-force GSNR
    over the per-micro-batch mean gradients (token-mean loss of each micro-batch)."""

    generator = torch.Generator().manual_seed(3)
    micro_batches = [padded_batch(lengths, generator) for lengths in ([8, 8], [2, 3], [8, 2], [4, 2])]
    items = sum(int(b["labels"][:, 1:].ne(-100).sum()) for b in micro_batches)

    model = tiny_model()
    per_group = []
    for batch in micro_batches:
        model.zero_grad()
        model(**batch).loss.backward()  # the mean over this micro-batch's label tokens
        per_group.append([p.grad.clone() for p in model.parameters()])
    model.zero_grad()
    expected = [naive_gsnr_multiplier(torch.stack(g), 0.1, eps=1e-6) for g in zip(*per_group, strict=True)]

    optimizer = VRSGD(model.parameters(), lr=0.1)
    trainer = VRGDTrainer(
        model=model,
        args=training_args(tmp_path, gradient_accumulation_steps=len(micro_batches)),
        train_dataset=token_dataset(),
        optimizers=(optimizer, None),
    )
    trainer.current_gradient_accumulation_steps = len(micro_batches)
    assert trainer._loss_is_normalized(torch.tensor(items))
    for batch in micro_batches:
        trainer.training_step(model, dict(batch), torch.tensor(items))
    statistics = optimizer.gsnr_scaler.statistics
    groups = statistics.all_reduce()
    assert groups == len(micro_batches)
    unweighted = []
    for param, reference in zip(model.parameters(), expected, strict=True):
        multiplier = gsnr_multiplier(*statistics.moments(param, groups), gamma=0.1, eps=1e-6)
        torch.testing.assert_close(multiplier.double(), reference, rtol=1e-3, atol=1e-4)
        unweighted.append(multiplier)
    # Not vacuous: weighting every group alike (a plain Trainer) gives another GSNR.
    size_weighted = [
        naive_gsnr_multiplier(torch.stack([g * n for g, n in zip(grads, sizes, strict=True)]), 0.1, eps=1e-6)
        for grads, sizes in zip(
            zip(*per_group, strict=True),
            [[int(b["labels"][:, 1:].ne(-100).sum()) for b in micro_batches]] * len(expected),
            strict=True,
        )
    ]
    assert not all(
        torch.allclose(a, b.float(), atol=1e-3) for a, b in zip(unweighted, size_weighted, strict=True)
    )


def test_partial_last_accumulation_window_is_handled(tmp_path: Path) -> None:
    """Issue 16 item 12: gradient_accumulation_steps=3 over 7 rows (windows 3, 3, 1): the last step is
    unscaled with a warning, training finishes."""
    model = tiny_model()
    trainer = Trainer(
        model=model,
        args=training_args(
            tmp_path,
            per_device_train_batch_size=1,
            gradient_accumulation_steps=3,
            max_steps=-1,
            num_train_epochs=1,
        ),
        train_dataset=token_dataset(7),
        optimizers=(VRSGD(model.parameters(), lr=0.1), None),
    )
    with pytest.warns(UserWarning, match="partial last gradient-accumulation window"):
        trainer.train()
    assert trainer.state.global_step == 3
    assert all(p.isfinite().all() for p in model.parameters())


def test_gradient_groups_with_a_one_row_last_batch(tmp_path: Path) -> None:
    """VRGDTrainer(gradient_groups=4) over 9 rows in batches of 4: a final 1-row batch trains (one group)."""
    model = tiny_model()
    trainer = VRGDTrainer(
        model=model,
        args=training_args(tmp_path, gradient_accumulation_steps=1, max_steps=-1, num_train_epochs=1),
        train_dataset=token_dataset(9),
        optimizers=(VRSGD(model.parameters(), lr=0.1), None),
        gradient_groups=4,
        callbacks=[GSNRLoggingCallback(per_layer=False)],
    )
    with pytest.warns(UserWarning, match="partial last gradient-accumulation window"):
        trainer.train()
    assert [log["gsnr/groups"] for log in trainer.state.log_history if "gsnr/groups" in log] == [4.0, 4.0]
    assert trainer.state.global_step == 3


@pytest.mark.parametrize("argument", ["activation_checkpointing", "gradient_checkpointing"])
def test_reentrant_refusal_names_the_argument(tmp_path: Path, argument: str) -> None:
    args = training_args(tmp_path, **{argument: True, f"{argument}_kwargs": {"use_reentrant": True}})
    with pytest.raises(ValueError, match=r"activation_checkpointing_kwargs=\{'use_reentrant': False\}"):
        VRGDTrainer(model=tiny_model(), args=args, train_dataset=token_dataset())
