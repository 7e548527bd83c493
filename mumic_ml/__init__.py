"""MuMIC: multi-label image classification by fine-tuning CLIP with a tempered-sigmoid BCE loss.

A plain library: nothing here imports Dagster, MLflow, DVC or Great Expectations.
"""

__version__ = "0.1.0"
