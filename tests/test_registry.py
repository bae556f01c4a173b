"""A method is one module and one YAML: a method defined in the test's own folder trains, sweeps over its
own knob and is reported, and nothing of dynbert changes; every option of every config group builds
what it configures."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

import dynbert
from dynbert.config import compose_config, conf_dir
from dynbert.declarations import CONFIG_PATH_ENV, method_knob
from dynbert.encoders import random_model
from dynbert.loop import make_accelerator
from dynbert.methods import registered
from dynbert.modeling import build_model, make_gated_model
from dynbert.report import render_table
from dynbert.sweep import plan_sweep
from dynbert.tasks import get_task

from conftest import SHARED_DATA
from helpers import FAST, SYNTHETIC, invoke, read_json, run_dynbert

METHOD_MODULE = '''"""Keep the first tokens of each input, a share of its real length: a method kept outside dynbert."""

import torch

from dynbert.checks import is_number
from dynbert.core import TokenPruner
from dynbert.errors import DynbertError
from dynbert.methods import register


@register
class KeepFirst(TokenPruner):
    name = "keep_first"

    @classmethod
    def check(cls, cfg):
        share = cfg.method.share
        if not is_number(share) or not 0 < share <= 1:
            raise DynbertError(f"method.share={share} is not valid: pass a fraction in (0, 1]")

    @classmethod
    def from_config(cls, method_cfg, layers, max_length, encoder):
        return cls(layers, max_length, method_cfg.share)

    def __init__(self, layers, max_length, share):
        super().__init__(layers, max_length)
        self.share = share

    def keep_weights(self, state, row, tokens, hard):
        keep = torch.ceil(self.share * tokens.num_tokens.to(tokens.score.dtype))
        return (tokens.positions < keep[:, None]).to(tokens.score.dtype)
'''
METHOD_YAML = """# The first tokens of each input, a share of its length (tests/test_registry.py).
name: keep_first
class: keep_first_method.KeepFirst
knob: {key: method.share, off_at: 1.0, label: share}
grid: [0.5, 1.0]
layers: null
mask_attention: true
share: 0.5
"""


def dynbert_files() -> dict[str, str]:
    """The sha256 of every file of dynbert's package and conf/."""
    roots = [Path(dynbert.__file__).parent, conf_dir()]
    return {str(path): hashlib.sha256(path.read_bytes()).hexdigest()
            for root in roots for path in sorted(root.rglob("*")) if path.is_file() and "__pycache__" not in path.parts}


@pytest.fixture
def outside_method(tmp_path, monkeypatch) -> Path:
    """keep_first, a module and a YAML in a folder of their own, on the paths a user would set."""
    (tmp_path / "keep_first_method.py").write_text(METHOD_MODULE)
    (tmp_path / "conf" / "method").mkdir(parents=True)
    (tmp_path / "conf" / "method" / "keep_first.yaml").write_text(METHOD_YAML)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv(CONFIG_PATH_ENV, str(tmp_path / "conf"))
    return tmp_path


@pytest.mark.slow
def test_a_method_outside_dynbert_trains_sweeps_and_reports_with_its_own_knob(outside_method):
    before = dynbert_files()
    cfg = compose_config(["method=keep_first"])
    assert cfg.run_name == "keep_first-share0.5-seed0" and method_knob(cfg.method).label == "share"
    refused = invoke("train", "method=keep_first", "method.share=2")
    assert refused.exit_code == 2 and "method.share=2 is not valid" in refused.stderr
    refused = invoke("train", "method=keep_first", "lambda=0.3")
    assert refused.exit_code == 2 and "its knob is method.share" in " ".join(refused.stderr.split())

    run = outside_method / "run"
    result = invoke("train", *FAST, *SYNTHETIC, "method=keep_first", f"output_dir={run}")
    assert result.exit_code == 0, result.output
    assert "keep_first share=0.5" in result.stderr
    metrics = read_json(run / "metrics.json")
    assert (metrics["method"], metrics["knob"], metrics["knob_value"], metrics["baseline"]) == (
        "keep_first", "method.share", 0.5, False)
    assert metrics["flops_ratio"] < 0.9
    [record] = dynbert.load(run, "cpu").predict(["a good film , not an awful one"])
    assert record["kept_per_layer"][-1] == -(-record["num_tokens"] // 2)  # ⌈n/2⌉: the first half kept

    sweep = outside_method / "sweep"
    result = run_dynbert("sweep", *FAST, *SYNTHETIC, "method=keep_first", f"output_dir={sweep}")
    assert result.returncode == 0, result.stderr
    assert {path.parent.name for path in sweep.glob("synthetic/*/metrics.json")} == {
        "keep_first-share0.5-seed0", "keep_first-share1.0-seed0", "none-lambda0-seed0"}
    table = render_table(sweep, "runs")
    half = next(line for line in table.splitlines() if line.startswith("| keep_first | share | 0.5 |"))
    assert half.split(" | ")[5] != "—"  # Δ vs knob off: measured from its declared off value, share = 1
    assert dynbert_files() == before


GROUPS = sorted(path.name for path in conf_dir().iterdir() if path.is_dir() and not path.name.startswith("_"))
OPTIONS = [(group, path.stem) for group in GROUPS for path in sorted((conf_dir() / group).glob("*.yaml"))]


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_of_every_config_group_builds_what_it_configures(group, option, tmp_path):
    """Composing is not enough: a method's YAML may name a class that does not build, a task one that
    dynbert does not know. Hub checkpoints build where a copy lies in ../shared/data/models."""
    cfg = compose_config([f"{group}={option}", f"output_dir={tmp_path / 'run'}"])
    if group == "method":
        model = random_model("bert", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                             vocab_size=100, max_positions=cfg.task.max_length, num_labels=2)
        gated = make_gated_model(model, cfg.method, cfg.task.max_length).eval()
        assert type(gated.method) is registered(cfg.method.name)
        with torch.no_grad():
            out = gated(torch.randint(5, 100, (2, 12)), torch.ones(2, 12, dtype=torch.long), hard=True)
        assert out.logits.shape == (2, 2)
    elif group == "task":
        assert get_task(cfg.task.name).name == cfg.task.name
    elif group == "model":
        name_or_path = cfg.model.name_or_path
        if name_or_path is not None:
            local = SHARED_DATA / "models" / Path(name_or_path).name
            if not local.is_dir():
                pytest.skip(f"model={option} is a hub checkpoint; no copy at {local}")
            cfg.model.name_or_path = str(local)
        spec = get_task("sst2")
        model, tokenizer = build_model(cfg.model, spec, 32, ["a good film", "an awful one"])
        assert model.config.num_labels == spec.num_labels and len(tokenizer("a good film")["input_ids"]) > 2
    elif group == "train":
        assert make_accelerator(cfg.train).device.type in ("cpu", "cuda", "mps")
    else:  # debug, experiment, sweep: settings of the other groups, and every run a sweep of them plans
        _, runs, _ = plan_sweep([f"{group}={option}", f"output_dir={tmp_path / 'sweep'}"])
        assert runs
