"""Scoring samples: FID/sFID/IS/precision/recall math, the Inception feature extractor, the digits judge of the quick start."""
