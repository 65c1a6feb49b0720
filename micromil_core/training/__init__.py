"""Local training, evaluation, metrics, cross-validation and plots."""
