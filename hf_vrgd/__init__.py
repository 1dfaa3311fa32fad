"""VRGD (arXiv 2309.13681): GSNR-scaled variance-reduced optimizers for large-batch training with the HF Trainer.

Each gradient element is scaled by its gradient signal-to-noise ratio, measured across gradient groups
(ranks x gradient-accumulation micro-batches), normalized per tensor and clipped to ``[gamma, 1]``::

    from transformers import Trainer, TrainingArguments
    from hf_vrgd import GSNRLoggingCallback, VRAdamW

    args = TrainingArguments(..., gradient_accumulation_steps=8)
    optimizer = VRAdamW(model.parameters(), lr=1e-3)
    trainer = Trainer(model, args, optimizers=(optimizer, None), ...)
    GSNRLoggingCallback.install(trainer)  # GSNR statistics in the logs, ahead of report_to
"""

from hf_common import __version__
from hf_vrgd.config import VRGDConfig
from hf_vrgd.naive import gsnr_multiplier
from hf_vrgd.optimizers import LAMB, LARS, VRGD, VRLAMB, VRLARS, VRSGD, VRAdam, VRAdamW, load_optimizer
from hf_vrgd.trainer import GSNRLoggingCallback, VRGDTrainer

__all__ = [
    "LAMB",
    "LARS",
    "VRGD",
    "VRLAMB",
    "VRLARS",
    "VRSGD",
    "GSNRLoggingCallback",
    "VRAdam",
    "VRAdamW",
    "VRGDConfig",
    "VRGDTrainer",
    "__version__",
    "gsnr_multiplier",
    "load_optimizer",
]
