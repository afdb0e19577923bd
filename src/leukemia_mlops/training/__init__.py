"""Training: the Lightning module, metrics, callbacks and the run entry point."""
