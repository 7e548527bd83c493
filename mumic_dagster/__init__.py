"""Dagster orchestration of the mumic_ml pipeline (built in the orchestration issue)."""
