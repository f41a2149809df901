"""Evaluation front-ends (lm-evaluation-harness: `evaluation.lm_harness`)."""
