"""The Optuna sweeper's parts: search-space syntax, key checks, trial outcomes and pruning."""

import math

import optuna
import pytest
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from leukemia_mlops.config import compose
from leukemia_mlops.tuning.pruning import live_trials, open_trial
from leukemia_mlops.tuning.runs import (
    PARENT_TAG,
    TRIAL_TAG,
    best_trials,
    finished_trials,
    trial_tags,
)
from leukemia_mlops.tuning.search_space import (
    SearchSpace,
    check_keys,
    parse_overrides,
)
from leukemia_mlops.tuning.study import BASELINE_ATTR, enqueue_baseline, trial_outcome

# Hydra's plugin scan re-executes the plugin's modules, which makes new error classes: catch
# them by their stable bases, ValueError (the contract) and CompactHydraException (one line).


def space_of(*lines: str) -> SearchSpace:
    return SearchSpace.from_overrides(parse_overrides(lines))


@pytest.mark.parametrize(
    ("line", "distribution"),
    [
        ("lr=interval(1e-4, 1e-2)", FloatDistribution(1e-4, 1e-2)),
        ("lr=tag(log, interval(1e-4, 1e-2))", FloatDistribution(1e-4, 1e-2, log=True)),
        ("epochs=int(interval(0, 2))", IntDistribution(0, 2)),
        ("units=tag(log, int(interval(8, 64)))", IntDistribution(8, 64, log=True)),
        ("batch=choice(16, 32, 64)", CategoricalDistribution([16, 32, 64])),
        ("batch=16,32", CategoricalDistribution([16, 32])),
        ("model=choice(resnet18, vgg16)", CategoricalDistribution(["resnet18", "vgg16"])),
        ("flips=choice(true, false)", CategoricalDistribution([True, False])),
        ("layers=range(1, 10, 2)", IntDistribution(1, 9, step=2)),
        ("layers=range(10, 0, -3)", IntDistribution(1, 10, step=3)),
        ("width=tag(log, range(1, 8))", IntDistribution(1, 7, log=True)),
        ("dropout=range(0.0, 0.5, 0.25)", FloatDistribution(0.0, 0.25, step=0.25)),
    ],
)
def test_each_sweep_form_becomes_its_distribution(line, distribution):
    space = space_of(line)
    assert dict(space.distributions) == {line.split("=")[0]: distribution}
    assert space.fixed == ()


def test_plain_overrides_are_fixed_and_the_command_line_wins():
    space = space_of(
        "model.optimizer.lr=interval(0.1, 0.2)", "seed=3", "+extra=1", "model.optimizer.lr=0.5"
    )
    assert space.distributions == {}
    assert space.fixed == ("seed=3", "+extra=1", "model.optimizer.lr=0.5")


def test_sampled_params_render_back_to_the_same_values():
    space = space_of(
        "name=choice('a b', plain)",
        "sizes=choice([1, 2], [3])",
        "lr=tag(log, interval(1e-4, 1e-2))",
        "batch=choice(16, 32)",
    )
    params = {"name": "a b", "sizes": "[3]", "lr": 0.00123, "batch": 32}
    assert [p.value() for p in parse_overrides(space.overrides(params))] == [
        "a b",
        [3],
        0.00123,
        32,
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("model.optimizer.lr=choice()", "empty choice"),
        ("model.optimizer.lr=interval(0.2, 0.1)", "low <= high"),
        ("model.optimizer.lr=foo(1, 2)", "Unknown function 'foo'"),
        ("model.optimizer.lr=tag(lag, interval(0.1, 0.2))", "unknown tag 'lag'"),
        ("model.optimizer.lr=tag(log, interval(0, 1))", "low > 0"),
        ("model.optimizer.lr=range(5, 1)", "range is empty"),
        ("model.optimizer.lr=tag(log, choice(1, 2))", "not to choices"),
    ],
)
def test_bad_search_spaces_are_one_line_errors_naming_the_key(line, message):
    with pytest.raises(ValueError, match=message) as error:
        space_of(line)
    assert isinstance(error.value, CompactHydraException)
    assert "model.optimizer.lr" in str(error.value) and "\n" not in str(error.value)


def groups(name: str) -> list[str]:
    return {"model": ["resnet18", "vgg16"], "hparams_search": ["cnn_optuna"]}.get(name, [])


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("model.optimizer.lrr=interval(0.1, 0.2)", "model.optimizer.lrr is not in the config"),
        ("model=choice(resnet18, resnet99)", "config group model has no option 'resnet99'"),
        ("nothing.here=1", "nothing.here is not in the config"),
    ],
)
def test_keys_are_checked_against_the_config(line, message):
    with pytest.raises(ValueError, match=message) as error:
        check_keys(parse_overrides([line]), compose(), groups)
    assert isinstance(error.value, CompactHydraException) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("line", "misspelt"),
    [
        ("model=choice(resnet18, vgg16)", "model=choice(resnet18, vgg61)"),
        ("hparams_search=cnn_optuna", "hparams_search=cnn_optuma"),
        ("model.optimizer.lr=tag(log, interval(1e-4, 1e-2))", "model.optimiser.lr=0.1"),
        ("logger.mlflow.tracking_uri=null", "logger.mlflow.tracking_url=null"),  # null is a value
        ("+brand.new=interval(0, 1)", "brand.new=interval(0, 1)"),  # + adds a key
        ("~callbacks.checkpoint", "~callbacks.checkpoints"),
    ],
)
def test_known_keys_new_keys_and_group_options_pass_and_misspelt_ones_fail(line, misspelt):
    config = compose()
    check_keys(parse_overrides([line]), config, groups)  # raises if the line were rejected
    with pytest.raises(ValueError, match=r"is not in the config|has no option"):
        check_keys(parse_overrides([misspelt]), config, groups)


def job(status: JobStatus, value: object) -> JobReturn:
    return JobReturn(status=status, _return_value=value)


@pytest.mark.parametrize(
    ("result", "state", "value"),
    [
        (job(JobStatus.COMPLETED, 0.75), TrialState.COMPLETE, 0.75),
        (job(JobStatus.FAILED, optuna.TrialPruned("epoch 1")), TrialState.PRUNED, None),
        (job(JobStatus.FAILED, RuntimeError("out of memory")), TrialState.FAIL, None),
        (job(JobStatus.COMPLETED, math.nan), TrialState.FAIL, None),
        (job(JobStatus.COMPLETED, None), TrialState.FAIL, None),
    ],
)
def test_job_returns_become_trial_states(result, state, value, capsys):
    assert trial_outcome(result)[:2] == (state, value)
    failed = state == TrialState.FAIL and result.status == JobStatus.FAILED
    assert (
        "Error executing job" in capsys.readouterr().err
    ) == failed  # a pruned trial is no error


def test_trial_tags_nest_a_training_run_under_its_parent():
    link = {"number": 3, "parent_run_id": "abc", "study_name": "s", "storage": None}
    assert trial_tags(link) == {TRIAL_TAG: "3", PARENT_TAG: "abc"}
    assert trial_tags(None) == {}


def stored_trial(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    trial = study.ask()
    link = {"study_name": "s", "storage": storage, "number": trial.number, "pruner": None}
    return study, trial, link


# Pruning itself runs for real in tests/test_sweeps_e2e.py, in one process and under DDP.
def test_pruning_uses_the_sweepers_own_trial_in_its_process_and_else_the_storage(tmp_path):
    study, trial, link = stored_trial(tmp_path)
    with live_trials([trial]):
        assert open_trial(link) is trial
    reopened = open_trial(link)  # re-opened through the storage, as a launched rank does
    assert reopened is not trial and reopened._trial_id == trial._trial_id
    reopened.report(0.5, step=0)
    assert study.trials[0].intermediate_values == {0: 0.5}


@pytest.mark.parametrize(
    ("direction", "keep", "best"),
    [
        ("maximize", 2, [3, 1]),
        ("minimize", 2, [0, 2]),
        ("maximize", 0, []),
        ("minimize", 9, [0, 2, 1, 3]),
    ],
)
def test_the_trials_that_keep_their_checkpoints_are_the_best(direction, keep, best):
    study = optuna.create_study(direction=direction)
    for value in (0.1, 0.5, 0.3, 0.9):
        study.tell(study.ask(), value)
    study.tell(study.ask(), state=TrialState.PRUNED)
    study.ask()  # running: neither kept nor finished
    assert best_trials(study, keep) == best
    assert finished_trials(study) == [0, 1, 2, 3, 4]


def test_pruning_needs_a_storage_outside_the_sweepers_process():
    link = {"study_name": "s", "storage": None, "number": 0, "pruner": None}
    with pytest.raises(RuntimeError, match="no storage"):
        open_trial(link)


def test_a_new_studys_first_trial_runs_the_configured_values():
    config = compose(["model.optimizer.lr=0.002", "datamodule.batch_size=32"])
    space = space_of(
        "model=choice(resnet18, vgg16)",  # a config group: its value is no choice label
        "model.optimizer.lr=tag(log, interval(1e-4, 1e-2))",
        "model.warmup_epochs=int(interval(0, 2))",
        "datamodule.batch_size=choice(16, 32, 64)",
        "datamodule.augment_strength=interval(0.0, 0.5)",  # the config's 1.0 is outside
    )
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(0))
    queued = enqueue_baseline(study, space, config)
    assert queued == {
        "model.optimizer.lr": 0.002,
        "model.warmup_epochs": config.model.warmup_epochs,
        "datamodule.batch_size": 32,
    }
    first = study.ask(dict(space.distributions))
    assert {key: first.params[key] for key in queued} == queued
    assert first.user_attrs == {BASELINE_ATTR: True}
    assert 0.0 <= first.params["datamodule.augment_strength"] <= 0.5  # sampled instead
    assert first.params["model"] in ("resnet18", "vgg16")
    second = study.ask(dict(space.distributions))  # the queue held one trial
    assert BASELINE_ATTR not in second.user_attrs
