"""The configuration: every shipped option composes and takes effect, typos fail, --help and --cfg."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dynbert import core
from dynbert.config import CHOICES, compose_config, conf_dir
from dynbert.errors import DynbertError
from dynbert.loop import PRECISIONS
from dynbert.methods import gates

from glue_data import GLUE_TASKS
from helpers import invoke

GROUPS = sorted(path.name for path in conf_dir().iterdir() if path.is_dir() and not path.name.startswith("_"))
OPTIONS = [(group, path.stem) for group in GROUPS for path in sorted((conf_dir() / group).glob("*.yaml"))]


def _leaves(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    leaves = {}
    for key, value in tree.items():
        leaves.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return leaves


def test_every_group_is_found():
    # The listing below must not silently shrink (e.g. conf/ moved and nothing found).
    assert {"debug", "experiment", "method", "model", "sweep", "task", "train"} <= set(GROUPS)
    assert ("experiment", "demo") in OPTIONS and ("debug", "fast") in OPTIONS


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_of_every_group_composes_and_takes_effect(group, option):
    cfg = compose_config([f"{group}={option}"])
    own = OmegaConf.to_container(OmegaConf.load(conf_dir() / group / f"{option}.yaml"))
    own.pop("defaults", None)
    own.pop("hydra", None)  # not part of the composed run config
    text = (conf_dir() / group / f"{option}.yaml").read_text()
    package = "" if "# @package _global_" in text else group
    # The option's own values are what the run gets (no later default overrides them).
    for key, value in _leaves(own, package).items():
        if isinstance(value, str) and "${" in value:
            continue  # an interpolation: resolved in the composed config
        assert OmegaConf.select(cfg, key) == value, f"{group}={option}: {key}"


def test_glue_tasks_select_bert_base_unless_a_model_is_given():
    assert compose_config([]).model.name == "tiny"
    for task in GLUE_TASKS:
        assert compose_config([f"task={task}"]).model.name_or_path == "bert-base-uncased", task
        for overrides in ([f"task={task}", "model=tiny"], ["model=tiny", f"task={task}"]):
            cfg = compose_config(overrides)
            assert cfg.model.name == "tiny" and cfg.model.name_or_path is None, overrides
            assert cfg.task.name == task


def test_unknown_key_fails_and_names_it():
    with pytest.raises(DynbertError, match="'lamda'.*no such key"):
        compose_config(["lamda=0.3"])
    with pytest.raises(DynbertError, match="'task.max_len'"):
        compose_config(["task.max_len=64"])


def test_unknown_option_lists_the_options():
    with pytest.raises(DynbertError, match="task/glue.*options: cola, mnli.*synthetic, wnli"):
        compose_config(["task=glue"])


def test_train_help_lists_the_config_groups():
    result = invoke("train", "--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    for group in GROUPS:
        options = ", ".join(sorted(path.stem for path in (conf_dir() / group).glob("*.yaml")))
        assert f"{group}: {options}" in text
    assert "task: cola, mnli, mrpc, qnli, qqp, rte, sst2, stsb, synthetic, wnli" in text
    assert "method: gates, ltp, none, power_bert, random, tome, topk" in text and "experiment: demo" in text


def test_cfg_prints_the_resolved_config_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("train", "--cfg", "lambda=0.3", "task=rte", "model=tiny", "seed=2")
    assert result.exit_code == 0, result.output
    assert "${" not in result.stdout  # interpolations resolved
    cfg = OmegaConf.create(result.stdout)
    assert cfg["lambda"] == 0.3 and cfg.seed == 2 and cfg.task.name == "rte" and cfg.model.name == "tiny"
    assert cfg.output_dir == "outputs/runs/rte/gates-lambda0.3-seed2"
    assert cfg.train.lr == cfg.model.lr
    assert list(tmp_path.iterdir()) == []
    # A bad override still fails with --cfg.
    assert invoke("train", "--cfg", "lambda=-1").exit_code == 2


def test_choices_checked_in_the_config_are_the_ones_core_accepts():
    """The method checks its own keys against the values its code accepts; the engine's, here."""
    accepted = {"method.score": core.SCORES, "method.parametrization": gates.PARAMETRIZATIONS,
                "method.layer_weighting": gates.LAYER_WEIGHTINGS, "method.sparsity": gates.SPARSITY_TARGETS,
                "method.ranks": gates.RANK_INDEXING, "method.bimodal_schedule": gates.BIMODAL_SCHEDULES}
    for key, choices in accepted.items():
        with pytest.raises(DynbertError, match=re.escape(f"{key}=foo is not valid: pass one of {', '.join(choices)}")):
            compose_config([f"{key}=foo"])
    assert CHOICES["train.precision"] == tuple(PRECISIONS)
    with pytest.raises(DynbertError, match="method.score=foo is not valid: pass one of attention_received, cls_attention"):
        compose_config(["method.score=foo"])


@pytest.mark.parametrize("override", ["train.max_steps=-1", "train.max_steps=abc", "train.lr=abc", "method.lr=nan",
                                      "train.epochs=0", "method.bimodal_schedule=sometimes", "method.monotone=3",
                                      "train.group_by_length=maybe"])
def test_values_that_would_fail_mid_run_or_train_nothing_fail_at_once(override):
    with pytest.raises(DynbertError, match=f"{re.escape(override)} is not valid"):
        compose_config([override])


@pytest.mark.parametrize("overrides, expected", [
    # Past any sane λ the loss overflowed, and the run blamed the learning rates.
    (["lambda=1e300"], "lambda=1e+300 is not valid: pass a number from 0 to 10000"),
    (["lambda=1e4", "method.bimodal_weight=1000"], "method.bimodal_weight=1000 with lambda=10000.0 is not valid"),
    # A number torch cannot hold as a float32 failed with its "value cannot be converted to type float".
    (["train.lr=1e300"], "train.lr=1e+300 is not valid: pass a number >= 0 that a float32 holds (at most 3.4e+38)"),
    (["method=ltp", "method.temperature=1e-300"], "method.temperature=1e-300 is not valid: pass a number > 0 that"),
    (["train.warmup_ratio=2"], "train.warmup_ratio=2 is not valid"),
    # The tiny model's sizes failed in torch or transformers, or trained a model of nothing.
    (["model.num_layers=0"], "model.num_layers=0 is not valid: pass an integer >= 1"),
    (["model.vocab_size=-5"], "model.vocab_size=-5 is not valid"),
    (["model.num_heads=3"], "model.num_heads=3 is not valid: model.hidden_size=128 must split evenly"),
    (["train.overwrite=maybe"], "train.overwrite=maybe is not valid: pass true or false"),
    (["sweep.baseline=2"], "sweep.baseline=2 is not valid: pass true or false"),
])
def test_values_outside_what_they_mean_fail_at_once_naming_the_key(overrides, expected):
    with pytest.raises(DynbertError, match=re.escape(expected)):
        compose_config(overrides)


def test_lambda_given_to_a_method_that_does_not_read_it_is_one_sentence():
    for method in ("topk", "random"):
        with pytest.raises(DynbertError, match=f"lambda=0.7 was given, but method={method} does not read it: its knob "
                                               "is method.keep, e.g. method.keep=0.5; drop lambda"):
            compose_config([f"method={method}", "lambda=0.7"])
        assert compose_config([f"method={method}", "method.keep=0.3"]).method.keep == 0.3  # conf's λ is no choice
    with pytest.raises(DynbertError, match="method=none prunes nothing and does not read it"):
        compose_config(["method=none", "lambda=0.7"])
    assert compose_config(["method=none", "lambda=0"])["lambda"] == 0  # what a sweep gives its baseline
    assert compose_config(["method=ltp", "lambda=0.7"])["lambda"] == 0.7


def test_cfg_job_as_hydra_apps_take_it_prints_the_config():
    result = invoke("train", "--cfg", "job", "lambda=0.3")
    assert result.exit_code == 0, result.output
    assert OmegaConf.create(result.stdout)["lambda"] == 0.3
    hydra = invoke("train", "--cfg", "hydra")
    assert hydra.exit_code == 2 and "pass --cfg (or --cfg job)" in hydra.stderr
    word = invoke("train", "--cfg", "jobs")
    assert word.exit_code == 2 and "an override is key=value or group=option" in " ".join(word.stderr.split())


def test_an_unquoted_non_ascii_value_says_to_quote_it(tmp_path):
    with pytest.raises(DynbertError, match=re.escape(f"quote a value that holds non-ASCII or special characters, "
                                                     f"e.g. output_dir='{tmp_path}/é'")):
        compose_config([f"output_dir={tmp_path}/é"])
    assert compose_config([f"output_dir='{tmp_path}/é'"]).output_dir == f"{tmp_path}/é"


def test_a_home_folder_in_a_value_is_expanded_as_a_shell_would():
    """`task.data_dir=~/glue/SST-2`, as the README writes it: Hydra alone rejects the `~`."""
    cfg = compose_config(["task=sst2", "task.data_dir=~/glue/SST-2", "output_dir=~/runs/x"])
    assert cfg.task.data_dir == str(Path.home() / "glue" / "SST-2")
    assert cfg.output_dir == str(Path.home() / "runs" / "x")


def test_a_method_key_the_baseline_does_not_have_keeps_its_finished_runs():
    # experiment=glue-minilm-sst2-8ep adds method.start: 0.3 to the 8-epoch layers-3-6 setting;
    # Hydra merges it into method=none too. The baseline computes the same run with or without it,
    # so its finished folders must be skipped, not refused; the gates' start is a different run.
    from dynbert.rundir import differing_keys

    before = ["experiment=glue-minilm-layers2to5", "train.epochs=8", "task=sst2"]
    after = ["experiment=glue-minilm-sst2-8ep", "task=sst2"]
    baseline_before, baseline_after = (compose_config([*o, "method=none", "lambda=0"]) for o in (before, after))
    assert OmegaConf.select(baseline_after, "method.start") == 0.3  # the key does land on the baseline
    assert differing_keys(baseline_before, baseline_after) == []
    assert differing_keys(compose_config(before), compose_config(after)) == ["method.start"]
    assert "method.name" in differing_keys(baseline_after, compose_config(after))
