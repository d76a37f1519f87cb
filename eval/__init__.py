"""Evaluation (installed as ``vlprune.eval``): the lmms-eval plugin and the bench harness arrive with the eval issue."""
