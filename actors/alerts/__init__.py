"""Drift and instability alerts per segment (actors/alerts/watch.py); a simulated segment
whose behaviour changes at a known event, to measure them (adapters/alert_population.py)."""

from actors.alerts.watch import (
    DRIFT,
    KINDS,
    SUBJECTS,
    UNSTABLE,
    Alert,
    AlertSettings,
    SegmentWatch,
    Watches,
    subject,
)

__all__ = [
    "DRIFT",
    "KINDS",
    "SUBJECTS",
    "UNSTABLE",
    "Alert",
    "AlertSettings",
    "SegmentWatch",
    "Watches",
    "subject",
]
