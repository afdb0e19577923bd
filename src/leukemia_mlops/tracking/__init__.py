"""MLflow tracking: where runs are stored, what each run records."""
