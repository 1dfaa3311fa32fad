"""Scylla benchmarks and sweeps: speed vs greedy (`speed`), the scaling sweep (`sweep`, fits in `scaling`)
and the batch-size sweep (`batch_sweep`). Each is run by an ``hf-scylla`` command and writes JSON,
Markdown and plots."""
