"""Loaded at start-up by a sweep in tests (this folder on ``PYTHONPATH``): before the storage
creates each trial, it writes to ``$TRIAL_AUDIT_LOG`` whether the study already names its
parent run, so a test sees that no trial (the baseline included) comes before it."""

import os

_log = os.environ.get("TRIAL_AUDIT_LOG")

if _log:
    from optuna.storages import RDBStorage

    from leukemia_mlops.tuning.runs import PARENT_ATTR

    _create = RDBStorage._create_new_trial  # behind create_new_trial and Optuna's cache

    def _audited(self, study_id, template_trial=None):
        named = PARENT_ATTR in self.get_study_user_attrs(study_id)
        with open(_log, "a") as log:
            log.write(f"parent named: {named}\n")
        return _create(self, study_id, template_trial)

    RDBStorage._create_new_trial = _audited
