"""DVC stages: each reads its params section, calls the library, writes its outs and metrics.

Run one with `python -m stages.<name> [--params params.yaml]`; `dvc repro` runs them all.
"""
