"""Evaluation: metrics, statistics, plots."""
