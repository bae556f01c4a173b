"""Faults and bad input: one clear sentence and exit code 2, nothing overwritten; kill, resume, restart."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import (AlbertConfig, AlbertModel, BertConfig, BertForSequenceClassification, GPT2Config,
                          GPT2Model)

from dynbert import stop
from dynbert.config import compose_config
from dynbert.modeling import train_wordpiece

from glue_data import CASES, HEADERS, write_glue_run_folder, write_glue_tsv
from helpers import (FAST, SYNTHETIC, comparable, dynbert_command, invoke, read_json, run_dynbert, snapshot,
                     train_stopping_at)

TRAIN = ["train", *FAST, *SYNTHETIC]
RTE = ["train", *FAST, "task=rte", "model=tiny"]


def make_inputs(root):
    """Every bad input a case below points at, built once per test under root."""
    write_glue_run_folder(root / "rte", "rte")
    (root / "empty").mkdir()
    wrong_columns = write_glue_run_folder(root / "wrong_columns", "rte")
    (wrong_columns / "train.tsv").write_text("index\tpremise\thypothesis\tlabel\n0\tBob ran.\tBob moved.\tentailment\n")
    no_header = write_glue_run_folder(root / "no_header", "rte")
    (no_header / "train.tsv").write_text("0\tBob ran.\tBob moved.\tentailment\n1\tBob ran.\tBob flew.\tnot_entailment\n")
    unknown_label = write_glue_run_folder(root / "unknown_label", "rte")
    write_glue_tsv(unknown_label, "rte", [("Bob ran.", "Bob moved.", "entailment"), ("Bob ran.", "Bob flew.", "maybe")])
    empty_split = write_glue_run_folder(root / "empty_split", "rte")
    (empty_split / "dev.tsv").write_text(HEADERS["rte"] + "\n")
    # A local checkpoint with 64 positions, as save_pretrained writes it.
    tokenizer = train_wordpiece(["good bad fine awful"], vocab_size=100)
    BertForSequenceClassification(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64,
                                             max_position_embeddings=64)).save_pretrained(root / "bert64")
    tokenizer.save_pretrained(root / "bert64")
    (root / "corrupt_run").mkdir()
    (root / "corrupt_run" / "metrics.json").write_text('{"task": "sst2", "score": 0.9')
    (root / "a_file").write_text("a user's file\n")
    # A user's own folder that looks like a run folder, and one locked by a live process.
    user = root / "user_folder"
    for name in ("model", "tokenizer"):
        (user / name).mkdir(parents=True)
        (user / name / "weights.bin").write_bytes(b"precious")
    (user / "config.yaml").write_text("mine: true\n")
    (user / "notes.txt").write_text("keep me\n")
    (root / "locked").mkdir()
    (root / "locked" / ".dynbert-lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                               "since": time.time()}))
    # Checkpoints dynbert must refuse: no tokenizer, other families, truncated weights.
    no_tokenizer = root / "no_tokenizer"
    BertForSequenceClassification.from_pretrained(root / "bert64").save_pretrained(no_tokenizer)
    GPT2Model(GPT2Config(n_layer=1, n_embd=32, n_head=2)).save_pretrained(root / "gpt2")
    AlbertModel(AlbertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                             embedding_size=16)).save_pretrained(root / "albert")
    shutil.copytree(root / "bert64", root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    # A 1 MB one-line train.tsv and a file of NUL bytes: messages quote a capped excerpt.
    write_glue_run_folder(root / "wide", "rte")
    (root / "wide" / "train.tsv").write_text("x" * 1_000_000)
    write_glue_run_folder(root / "nul", "rte")
    (root / "nul" / "train.tsv").write_bytes(b"\x00" * 20_000)
    # STS-B whose dev scores are all the same: no correlation to report.
    constant = write_glue_run_folder(root / "stsb_constant", "stsb")
    write_glue_tsv(constant, "stsb", [("A man plays.", "A man is playing.", "5.000")] * 3, "dev.tsv")
    # A run folder whose training never finished: its config, no weights.
    unfinished = root / "unfinished_run"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text(OmegaConf.to_yaml(compose_config([*FAST, *SYNTHETIC])))
    # Empty texts: every train sentence of SST-2; every second sentence of RTE's pairs.
    rows, _ = CASES["sst2"]
    write_glue_tsv(root / "sst2_empty", "sst2", [("", None, label) for _, _, label in rows] * 3)
    write_glue_tsv(root / "sst2_empty", "sst2", rows * 3, "dev.tsv")
    rte_rows, _ = CASES["rte"]
    write_glue_run_folder(root / "rte_empty_b", "rte")
    write_glue_tsv(root / "rte_empty_b", "rte", [(a, "", label) for a, _, label in rte_rows] * 3)
    # A checkpoint whose config.json says a larger vocabulary than its weights hold.
    shutil.copytree(root / "bert64", root / "vocab_mismatch")
    config = json.loads((root / "vocab_mismatch" / "config.json").read_text())
    (root / "vocab_mismatch" / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 8}))


# (id, command after `dynbert`, a text the message must hold: the offending value). {root}: the inputs.
BAD_INPUTS = [
    ("unknown task", [*TRAIN, "task=glue"], "task/glue"),
    ("unknown group option", [*TRAIN, "method=foo"], "method/foo"),
    ("misspelled key", [*TRAIN, "lamda=0.3"], "'lamda'"),
    ("negative lambda", [*TRAIN, "lambda=-1"], "lambda=-1"),
    ("text lambda", [*TRAIN, "lambda=abc"], "lambda=abc"),
    ("nan lambda", [*TRAIN, "lambda=nan"], "lambda=nan"),
    ("data_dir missing", [*RTE, "task.data_dir={root}/nowhere"], "nowhere' does not exist"),
    ("empty folder", [*RTE, "task.data_dir={root}/empty"], "train.tsv is missing from '{root}/empty'"),
    ("wrong columns", [*RTE, "task.data_dir={root}/wrong_columns"], "missing ['sentence1', 'sentence2']"),
    ("header missing", [*RTE, "task.data_dir={root}/no_header"], "columns ['0', 'Bob ran.'"),
    ("unknown label", [*RTE, "task.data_dir={root}/unknown_label"], "train.tsv line 3 has label 'maybe'"),
    ("empty split", [*RTE, "task.data_dir={root}/empty_split"], "empty_split/dev.tsv has a header but no examples"),
    ("model folder missing", [*TRAIN, "model.name_or_path={root}/no_model"], "model.name_or_path={root}/no_model"),
    ("hub name offline", [*TRAIN, "model.name_or_path=bert-base-uncased"], "'bert-base-uncased'"),
    ("max_length 0", [*TRAIN, "task.max_length=0"], "task.max_length=0"),
    ("max_length past positions", [*TRAIN, "model.name_or_path={root}/bert64", "task.max_length=128"],
     "task.max_length=128 exceeds the model's 64 positions"),
    ("pruned layer out of range", [*TRAIN, "method.layers=[7]"], "method.layers=[7]"),
    ("report on empty folder", ["report", "{root}/empty"], "{root}/empty"),
    ("report on corrupt metrics", ["report", "{root}/corrupt_run"], "corrupt_run/metrics.json"),
    ("bench a run without weights", ["bench", "--run", "{root}/unfinished_run", "--out", "{root}/bench"],
     "{root}/unfinished_run is not a finished run"),
    # Where the run goes (an unset shell variable makes output_dir empty: not the current folder).
    ("output_dir empty", [*TRAIN, "output_dir="], "output_dir is empty ('')"),
    ("output_dir null", [*TRAIN, "output_dir=null"], "output_dir is empty (null)"),
    ("output_dir is a file", [*TRAIN, "output_dir={root}/a_file"], "output_dir={root}/a_file is a file"),
    ("output_dir under a file", [*TRAIN, "output_dir={root}/a_file/run"], "{root}/a_file is a file"),
    ("output_dir holds a user's files", [*TRAIN, "output_dir={root}/user_folder"],
     "did not write (config.yaml, model, notes.txt, tokenizer)"),
    ("output_dir locked by a live process", [*TRAIN, "output_dir={root}/locked"], "is in use by process"),
    # Models that would silently train on garbage.
    ("model without tokenizer", [*TRAIN, "model.name_or_path={root}/no_tokenizer"], "has no tokenizer"),
    ("albert checkpoint", [*TRAIN, "model.name_or_path={root}/albert"], "is a 'albert' model"),
    ("gpt2 checkpoint", [*TRAIN, "model.name_or_path={root}/gpt2"], "is a 'gpt2' model"),
    ("truncated weights", [*TRAIN, "model.name_or_path={root}/truncated"], "cannot load the model in {root}/truncated"),
    # Settings that would train nothing, or fail after the work.
    ("empty method layers", [*TRAIN, "method.layers=[]"], "method.layers=[] is not valid"),
    ("gates that never start", [*TRAIN, "method.start=1.5"], "method.start=1.5 is not valid"),
    ("negative threads", [*TRAIN, "train.num_threads=-1"], "train.num_threads=-1 is not valid"),
    ("seed past 2^63", [*TRAIN, "seed=9223372036854775809"], "seed=9223372036854775809 is not valid"),
    ("one eval example", [*RTE, "task=stsb", "task.data_dir={root}/rte", "train.max_eval_samples=1"],
     "train.max_eval_samples=1 is not valid"),
    ("constant STS-B scores", [*RTE, "task=stsb", "task.data_dir={root}/stsb_constant"],
     "every validation score of stsb is 5.0: a correlation with them is undefined"),
    ("fp16 on a CPU", [*TRAIN, "train.precision=fp16"], "train.precision=fp16 needs a CUDA GPU"),
    ("cuda without a GPU", [*TRAIN, "train.device=cuda"], "train.device=cuda but no CUDA GPU"),
    ("report --out a file", ["report", "{root}/corrupt_run", "--out", "{root}/a_file"], "--out {root}/a_file is a file"),
    ("bench --out a file", ["bench", "--quick", "--out", "{root}/a_file"], "--out {root}/a_file is a file"),
    ("1 MB header line", [*RTE, "task.data_dir={root}/wide"], "wide/train.tsv has columns ['xxx"),
    ("NUL bytes", [*RTE, "task.data_dir={root}/nul"], "nul/train.tsv has columns ['\\x00\\x00"),
    # Empty texts trained a model on nothing (a 5-token vocabulary) and exited 0; empty second
    # sentences were silently encoded as single sentences.
    ("all sentences empty", ["train", *FAST, "task=sst2", "model=tiny", "task.data_dir={root}/sst2_empty"],
     "6 of the 6 train examples of sst2 ({root}/sst2_empty/train.tsv) have an empty 'sentence'"),
    ("second sentences empty", [*RTE, "task.data_dir={root}/rte_empty_b"],
     "6 of the 6 train examples of rte ({root}/rte_empty_b/train.tsv) have an empty 'sentence2'"),
    # Messages that pointed the wrong way: "look at the above report!" with no report; a loss that
    # overflowed at λ = 1e300, blamed on the learning rates.
    ("vocabulary size mismatch", [*TRAIN, "model.name_or_path={root}/vocab_mismatch", "task.max_length=32"],
     "bert.embeddings.word_embeddings.weight (33, 32) where config.json makes (41, 32)"),
    ("lambda 1e300", [*TRAIN, "lambda=1e300"], "lambda=1e+300 is not valid: pass a number from 0 to 10000"),
    # Values accepted without a word.
    ("lambda to top-k", [*TRAIN, "method=topk", "lambda=0.7"],
     "lambda=0.7 was given, but method=topk does not read it: its knob is method.keep"),
    ("warmup past training", [*TRAIN, "train.warmup_ratio=2"], "train.warmup_ratio=2 is not valid"),
    ("learning rate 1e300", [*TRAIN, "train.lr=1e300"], "train.lr=1e+300 is not valid"),
    ("heads that do not split the width", [*TRAIN, "model.num_heads=3"], "model.num_heads=3 is not valid"),
    ("report format empty", ["report", "{root}/corrupt_run", "--format", ""], "No report format given"),
    ("report --out a file name", ["report", "{root}/corrupt_run", "--out", "{root}/new.md"],
     "--out {root}/new.md names a file (.md)"),
]


@pytest.mark.parametrize("args, expected", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_one_clear_error_and_changes_nothing(tmp_path, args, expected):
    root = tmp_path / "inputs"
    make_inputs(root)
    args = [arg.format(root=root) for arg in args]
    if args[0] == "train" and not any(arg.startswith("output_dir=") for arg in args):
        args.append(f"output_dir={tmp_path / 'run'}")
    before = snapshot(tmp_path)

    result = invoke(*args)

    assert result.exit_code == 2, result.output  # 1 would mean an unexpected error, not a user mistake
    assert "Traceback" not in result.output
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ")
    assert expected.format(root=root) in message
    assert len(message) < 1000 and "\x00" not in message  # quotes are capped and escaped
    after = snapshot(tmp_path)
    assert {path: after.get(path) for path in before} == before  # nothing there before was changed
    assert not any(path.endswith(("metrics.json", "bench.json")) for path in set(after) - set(before))


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A folder nothing may be written into. chmod stops everyone but root; as root (a container),
    os.access says of it what it says to a user there, or to root on a read-only file system."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:
        real = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, **kwargs: (
            not mode & os.W_OK and real(path, mode, **kwargs)) if Path(path) == folder else real(path, mode, **kwargs))
    yield folder
    folder.chmod(0o755)


def test_every_output_into_a_read_only_folder_is_refused_before_any_work_naming_the_folder(tmp_path, read_only):
    """predict and report failed only after all their work, naming a temporary file; train failed
    on its lock file with a generic error."""
    run = tmp_path / "run"
    assert invoke(*TRAIN, f"output_dir={run}").exit_code == 0
    texts = tmp_path / "texts.txt"
    texts.write_text("a good film\n")
    # (command, where it writes, as the message names it)
    commands = [
        ([*TRAIN, f"output_dir={read_only}"], f"output_dir={read_only}"),
        ([*TRAIN, f"output_dir={read_only / 'run'}"], f"output_dir={read_only / 'run'}"),
        (["sweep", *FAST, *SYNTHETIC, "lambda=0.1", f"output_dir={read_only / 'sweep'}"],
         f"output_dir={read_only / 'sweep'}"),
        (["predict", run, "--input", texts, "--out", read_only / "predictions.tsv"], f"--out {read_only}/predictions.tsv"),
        (["report", run, "--out", read_only / "report"], f"--out {read_only}/report"),
        (["inspect", run, "a good film", "--out", read_only / "film.png"], f"--out {read_only}/film.png"),
        (["bench", "--quick", "--out", read_only / "bench"], f"--out {read_only}/bench"),
    ]
    for args, named in commands:
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        message = result.stderr.strip().splitlines()[-1]
        assert message == (f"error: {named} cannot be written: {read_only} is not writable (pass another folder, "
                           "or make it writable)"), message
        assert "examples/s" not in result.stderr  # predict refused before predicting
    assert not any(read_only.iterdir())


def test_a_run_that_failed_before_training_does_not_block_the_corrected_command(tmp_path):
    failed = invoke(*TRAIN, "method.layers=[7]", f"output_dir={tmp_path}")
    assert failed.exit_code == 2 and (tmp_path / "config.yaml").is_file()
    fixed = invoke(*TRAIN, "method.layers=[1]", f"output_dir={tmp_path}")
    assert fixed.exit_code == 0, fixed.output
    assert OmegaConf.load(tmp_path / "config.yaml").method.layers == [1]


@pytest.mark.parametrize("flags, env", [(["--debug"], {}), ([], {"DYNBERT_DEBUG": "1"})], ids=["--debug", "env"])
def test_debug_shows_the_traceback(tmp_path, monkeypatch, flags, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = subprocess.run(dynbert_command(*flags, "train", "lamda=0.3", f"output_dir={tmp_path}"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "DynbertError" in result.stderr and "'lamda'" in result.stderr


# ---------------------------------------------------------------------------------------------
# Run folder faults

# Gates that move within a few steps, so a resumed run differing from an uninterrupted one shows.
MOVING_GATES = ["lambda=1", "method.start=0", "method.bimodal_weight=0", "method.lr=0.1"]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tmp_path):
    args = ["train", *FAST, *SYNTHETIC, *MOVING_GATES, "train.checkpoint_every=2", "train.max_steps=8"]
    whole = run_dynbert(*args, f"output_dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr
    # Killed right after the checkpoint of step 4: no cleanup ran, so its lock is left behind too.
    killed = train_stopping_at(4, "KILL", *args[1:], f"output_dir={tmp_path / 'killed'}")
    assert killed.returncode == 137
    checkpoint = tmp_path / "killed" / "checkpoint.pt"
    assert torch.load(checkpoint, weights_only=True)["step"] == 4
    assert (tmp_path / "killed" / ".dynbert-lock").is_file() and not (tmp_path / "killed" / "metrics.json").exists()

    resumed = run_dynbert(*args, f"output_dir={tmp_path / 'killed'}")  # takes over the dead process's lock
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr

    first, again = read_json(tmp_path / "whole" / "metrics.json"), read_json(tmp_path / "killed" / "metrics.json")
    assert comparable(first) == comparable(again)
    assert first["flops_ratio"] < 1
    for name in ("model.safetensors", "method.safetensors"):
        a, b = (load_file(tmp_path / run / "model" / name) for run in ("whole", "killed"))
        assert all(torch.equal(a[key], b[key]) for key in a), name
    assert not checkpoint.exists() and not (tmp_path / "killed" / ".dynbert-lock").exists()


def test_finished_run_is_returned_without_training_again(tmp_path):
    args = [*TRAIN, f"output_dir={tmp_path}"]
    assert invoke(*args).exit_code == 0
    before = snapshot(tmp_path)

    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "already complete" in result.stderr
    assert result.stdout.splitlines()[-1] == str(tmp_path.resolve())
    assert snapshot(tmp_path) == before  # no new log line, no new weights


def test_other_config_refuses_to_resume_then_force_starts_over(tmp_path):
    run_dir, fresh = tmp_path / "run", tmp_path / "fresh"
    small_vocab = "model.vocab_size=60"  # the tokenizer then depends on the data (the seed)
    assert invoke(*TRAIN, small_vocab, f"output_dir={run_dir}").exit_code == 0
    before = snapshot(run_dir)

    refused = invoke(*TRAIN, small_vocab, "seed=1", "train.lr=0.001", f"output_dir={run_dir}")
    assert refused.exit_code == 2
    assert "differs in" in refused.stderr and "seed" in refused.stderr and "train.lr" in refused.stderr
    assert "Traceback" not in refused.output
    assert snapshot(run_dir) == before

    for force in (["--force"], ["train.overwrite=true"]):
        forced = invoke(*TRAIN, small_vocab, "seed=1", *force, f"output_dir={run_dir}")
        assert forced.exit_code == 0, forced.output
        # Started over: the same run as in a folder of its own, tokenizer included.
        assert invoke(*TRAIN, small_vocab, "seed=1", f"output_dir={fresh}").exit_code == 0
        assert comparable(read_json(run_dir / "metrics.json")) == comparable(read_json(fresh / "metrics.json"))
        assert (run_dir / "model" / "tokenizer.json").read_bytes() == (fresh / "model" / "tokenizer.json").read_bytes()
        assert read_json(run_dir / "metrics.json")["seed"] == 1


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path):
    result = invoke(*TRAIN, "train.lr=1e30", "train.checkpoint_every=1", f"output_dir={tmp_path}")
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "not finite at step 2" in result.stderr and "checkpoint of step 1" in result.stderr
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 1
    assert not (tmp_path / "metrics.json").exists()


def test_corrupt_checkpoint_is_a_clear_error_and_is_kept(tmp_path):
    args = [*TRAIN, f"output_dir={tmp_path}"]
    assert invoke(*args).exit_code == 0
    (tmp_path / "metrics.json").unlink()
    (tmp_path / "checkpoint.pt").write_bytes(b"half a checkpoint")

    result = invoke(*args)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "checkpoint.pt is not a usable checkpoint" in result.stderr and "train.overwrite=true" in result.stderr
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"half a checkpoint"


@pytest.mark.parametrize("signame, code, said", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "stopped by SIGTERM")])
@pytest.mark.slow
def test_ctrl_c_and_sigterm_save_a_checkpoint_and_say_how_to_resume(tmp_path, signame, code, said):
    args = [*FAST, *SYNTHETIC, "train.checkpoint_every=2", f"output_dir={tmp_path}"]
    result = train_stopping_at(2, signame, *args)
    assert result.returncode == code, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert f"{said} at step 2/4" in message and "run the same command again to resume" in message
    assert "Traceback" not in result.stderr
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / ".dynbert-lock").exists()
    # The same command resumes from there.
    resumed = run_dynbert("train", *args)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr and (tmp_path / "metrics.json").is_file()


def test_results_keep_the_users_umask_not_0600(tmp_path):
    """On a shared cluster a colleague must be able to read a run (mkstemp and safetensors make 0600)."""
    import stat

    from dynbert.errors import FILE_MODE

    assert invoke(*TRAIN, f"output_dir={tmp_path}").exit_code == 0
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert {"metrics.json", "config.yaml", "model.safetensors", "method.safetensors"} <= {p.name for p in written}
    assert {path.name: oct(stat.S_IMODE(path.stat().st_mode)) for path in written} == {
        path.name: oct(FILE_MODE) for path in written}


def test_an_ignored_sigint_stays_ignored_and_a_default_one_is_routed_through_dynbert():
    """A job started in the background by a script inherits SIGINT ignored (so Ctrl-C at the
    terminal leaves it running): dynbert must keep it so, and take over only default handlers."""
    saved = {signum: signal.getsignal(signum) for signum in stop.SIGNALS}
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        stop.install()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is stop._handle
        signal.signal(signal.SIGINT, signal.default_int_handler)
        stop.install()
        assert signal.getsignal(signal.SIGINT) is stop._handle
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
