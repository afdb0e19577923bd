"""Evaluation core: cell and subject metrics, subject-level bootstrap intervals, report plots."""
