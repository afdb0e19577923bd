"""``lmo-audit``: the DVC ``audit`` stage, a label audit of the training and validation cells.

Trains ``audit.folds`` models on subject folds of the prepare cache (the ``model`` config,
``audit.max_epochs`` epochs each), scores each fold's cells with the model that never saw
their subjects, and ranks suspect labels by confident learning (cleanlab) into
``reports/audit/label_issues.csv`` and ``reports/audit/gallery.png``, its summary in
``reports/audit.json``, logged as an MLflow run. The data is never changed. Off by default
(``audit.enabled: false``, about 3 minutes on 2 cores): ``dvc exp run -S audit.enabled=true``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from leukemia_mlops.cli.args import run_cli, stage_config
from leukemia_mlops.config import build_spec

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> None:
    def body() -> None:
        import time

        from leukemia_mlops.evaluation.label_audit import AuditSpec, log_audit, run_audit
        from leukemia_mlops.tracking.run_files import audit_files, store_uri
        from leukemia_mlops.tracking.store import ensure_experiment

        cfg = stage_config(__doc__, argv)
        spec = build_spec(AuditSpec, cfg.audit, "audit")
        files = audit_files(cfg)
        started = time.perf_counter()
        if not spec.enabled:
            log.info("%s", run_audit(cfg, spec, files)["meaning"])
            return
        # Resolved first: the fold models' training points MLflow's process-wide URI at their
        # scratch store.
        uri = store_uri(cfg)
        experiment = ensure_experiment(uri, cfg.logger.mlflow.experiment_name, cfg.paths.mlruns_dir)
        report = run_audit(cfg, spec, files)
        seconds = time.perf_counter() - started
        run_id = log_audit(uri, experiment, report, files, cfg.datamodule.prepared_dir, seconds)
        log.info(
            "audit: %d of %d cells flagged (out-of-fold AUROC %.3f) in %.0f s: %s, MLflow run %s",
            report["flagged"],
            report["cells"],
            report["out_of_fold_auroc"],
            seconds,
            files.issues,
            run_id,
        )

    run_cli(body)


if __name__ == "__main__":
    main()
