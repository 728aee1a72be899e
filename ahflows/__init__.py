"""Workflows that span both stages or write user-facing folders: checkpoint A, fine-tuning, predict, explain, ensemble, ablate, report, demo."""
