"""Baselines the carving methods are compared against: static structured pruning."""
