"""The demo of the three methods on one model: the only place where hf_adamas, hf_scylla and hf_vrgd meet.

``hf-demo`` (or ``python -m hf_demo``) loads the embedded SmolLM2-135M-Instruct (or ``--model``) once
and runs each method's demo part in turn (`hf_common.demo` describes a part):

- Scylla (`hf_scylla.demo`): a chat prompt answered greedily, then with the staged draft in
  ``model_cards/``, checked equal to greedy;
- Adamas (`hf_adamas.demo`): a pass key retrieved from a long context with dense and Adamas attention,
  with the decoding speed of each;
- VRGD (`hf_vrgd.demo`): a few steps of VR-AdamW against AdamW fine-tuning on GSM8K examples (weights
  restored after).

It is meant to finish in a few minutes on two CPU cores. ``hf-adamas demo``, ``hf-scylla demo`` and
``hf-vrgd demo`` run one part each.
"""

from hf_demo.cli import DEMO_PARTS, main

__all__ = ["DEMO_PARTS", "main"]
