"""Carving methods: ToMoE, ATP and the baselines they are compared against."""
