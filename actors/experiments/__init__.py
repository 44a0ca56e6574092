"""Experiments: definitions, assignment, attribution of outcomes, statistics."""
