"""Prefect flows that chain the DVC stages on GPU workers (orchestration only, no algorithms).

Flows call stages through DVC, so `dvc repro` stays the single source of truth for caching and lineage.
"""
