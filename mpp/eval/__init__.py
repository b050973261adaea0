"""Judging an encoder: the evaluation session, kNN, linear probe, fine-tuning, ``evaluate`` and data efficiency."""
