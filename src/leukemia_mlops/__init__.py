"""Leukemia MLOps: C-NMC 2019 ALL-vs-HEM classification pipeline."""
