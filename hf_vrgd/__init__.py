"""VRGD (arXiv 2309.13681): GSNR-scaled variance-reduced optimizers for large-batch training with the HF Trainer.

Each gradient element is scaled by its gradient signal-to-noise ratio, measured across gradient groups
(ranks x gradient-accumulation micro-batches), normalized per tensor and clipped to ``[gamma, 1]``::

    from transformers import Trainer, TrainingArguments
    from hf_vrgd import GSNRLoggingCallback, VRAdamW

    args = TrainingArguments(..., gradient_accumulation_steps=8)
    optimizer = VRAdamW(model.parameters(), lr=1e-3)
    trainer = Trainer(model, args, optimizers=(optimizer, None), ...)
    GSNRLoggingCallback.install(trainer)  # GSNR statistics in the logs, ahead of report_to

Rooms: `hf_vrgd.config` (`VRGDConfig`), `hf_vrgd.naive` (the spec: the GSNR multiplier in plain PyTorch,
the tests' oracle), `hf_vrgd.gsnr` (the fast foreach path and the gradient-statistics hooks),
`hf_vrgd.optimizers` (the update rules, the VR optimizers declared over them, the one name table),
`hf_vrgd.trainer` (Trainer integration), `hf_vrgd.bench` (benchmarks and the large-batch experiment) and
a thin `hf_vrgd.cli`. There is no ``lm_eval.py``: VRGD changes training only, so it has no
evaluation-time integration (evaluate a VRGD-trained model as any other checkpoint).
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
