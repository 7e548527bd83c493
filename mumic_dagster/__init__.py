"""Dagster orchestration of the mumic_ml pipeline: the asset graph, jobs, schedule, sensor and resources."""
