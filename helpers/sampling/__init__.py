"""Sampling a checkpoint: its model and settings, the samplers its objective calls for, per-index noise, guidance, sample files."""
