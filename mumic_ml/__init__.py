"""MuMIC: multi-label image classification by fine-tuning CLIP with a tempered-sigmoid BCE loss.

A plain library outside `mumic_ml.pipeline`: those modules never import Dagster, MLflow, DVC or Great Expectations
at module level, so `pip install mumic` trains, evaluates and predicts from model directories in Python. The
MLflow tracking and registry and the Great Expectations suites live in `mumic_ml.pipeline` and need
`pip install 'mumic[pipeline]'`, as do the `mumic` commands that use them; those say so instead of failing.
"""

__version__ = "0.1.0"
