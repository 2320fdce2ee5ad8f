"""Evaluation: perplexity, multiple-choice tasks, parameter/FLOP accounting, speed."""
