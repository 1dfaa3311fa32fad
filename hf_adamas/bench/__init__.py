"""Benchmark runners and test sets of hf_adamas (accuracy on harder tests, speed)."""
