"""A damaged run folder is refused in one sentence naming the file; a NaN never becomes a prediction.

Bytes damaged inside a safetensors file still parse (only the header is checked by the format), so
before checksums a run with 4 KB of random bytes in its weights predicted `negative nan nan` with
exit 0.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import struct
import zipfile

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import dynbert
from dynbert.errors import DynbertError
from dynbert.evaluate import predict as evaluate_predict
from dynbert.predictor import Predictor
from dynbert.tasks import get_task
from dynbert.train import load_run

from helpers import FAST, SYNTHETIC, invoke, train_stopping_at

TRAIN = ["train", *FAST, *SYNTHETIC]
TEXT = "a good film , not awful"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("integrity") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = invoke(*TRAIN, f"output_dir={folder}")
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return folder


@pytest.fixture
def run(trained, tmp_path):
    """A copy of the trained run, free to damage."""
    return shutil.copytree(trained, tmp_path / "run")


def damage_middle(path, size: int = 4096) -> None:
    """Random bytes over the middle of a safetensors file's tensor data; its header stays intact."""
    data = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0]  # a u64 header length, then the JSON header
    size = min(size, (len(data) - start) // 2)
    middle = start + (len(data) - start - size) // 2
    data[middle:middle + size] = random.Random(0).randbytes(size)
    path.write_bytes(bytes(data))


def rewrite_tensors(path, change) -> None:
    """Save ``path`` again, valid and with its metadata, after ``change(tensors)``."""
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)


def one_line_error(result, *words) -> None:
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.output
    for word in words:
        assert word in result.stderr, result.stderr


def test_a_saved_model_records_its_weights_sha256_and_one_saved_without_still_predicts(run):
    model = run / "model"
    assert (model / "SHA256SUMS").read_text() == "".join(
        f"{hashlib.sha256((model / name).read_bytes()).hexdigest()}  {name}\n"
        for name in ("model.safetensors", "method.safetensors"))
    # A run saved before checksums existed has no SHA256SUMS: it is not refused for that.
    (model / "SHA256SUMS").unlink()
    result = invoke("predict", run, "--input", "-", "--format", "jsonl", stdin=f"{TEXT}\n")
    assert result.exit_code == 0, result.output
    assert "nan" not in result.stdout.lower()


@pytest.mark.parametrize("name", ["model.safetensors", "method.safetensors"])
def test_damaged_weights_are_refused_by_every_loader_naming_the_file(run, tmp_path, name):
    path = run / "model" / name
    damage_middle(path)
    said = (str(path), "is damaged", "sha256", "train the run again")
    one_line_error(invoke("predict", run, "--input", "-", "--out", tmp_path / "p.tsv", stdin=f"{TEXT}\n"), *said)
    assert not (tmp_path / "p.tsv").exists()
    one_line_error(invoke("inspect", run, TEXT), *said)
    one_line_error(invoke("bench", "--run", run, "--quick", "--out", tmp_path / "bench"), *said)
    for loader in (dynbert.load, load_run):
        with pytest.raises(DynbertError) as error:
            loader(run)
        assert all(word in str(error.value) for word in said), error.value


@pytest.mark.parametrize("name, tensor", [("model.safetensors", "classifier.weight"),
                                          ("method.safetensors", "gates.raw")])
def test_nan_weights_in_a_valid_file_without_checksums_are_refused(run, name, tensor):
    path = run / "model" / name
    rewrite_tensors(path, lambda tensors: tensors[tensor].view(-1)[0].fill_(float("nan")))
    (run / "model" / "SHA256SUMS").unlink()  # as a run saved before checksums: only the values can tell
    one_line_error(invoke("predict", run, "--input", "-", stdin=f"{TEXT}\n"), str(path),
                   f"weights that are not finite (1 in {tensor})")
    with pytest.raises(DynbertError, match="not finite"):
        load_run(run)


def test_outputs_that_are_not_finite_are_never_a_prediction(run, tmp_path):
    # Finite weights whose logits overflow: every pooled value is tanh(1), times 3e38 in each of 32 terms.
    def overflow(tensors):
        tensors["bert.pooler.dense.weight"].zero_()
        tensors["bert.pooler.dense.bias"].fill_(1.0)
        tensors["classifier.weight"].fill_(3e38)

    rewrite_tensors(run / "model" / "model.safetensors", overflow)
    (run / "model" / "SHA256SUMS").unlink()
    said = ("outputs of the model in", str(run / "model"), "not finite")
    out = tmp_path / "predictions.tsv"
    one_line_error(invoke("predict", run, "--input", "-", "--out", out, stdin=f"{TEXT}\ngood\n"), *said)
    assert not out.exists()
    one_line_error(invoke("inspect", run, TEXT), *said)

    # Training's evaluation scores with the same predict: a NaN never reaches metrics.json either.
    predictor = dynbert.load(run)
    encoded, _ = predictor.encode([(TEXT, None)])
    with pytest.raises(DynbertError, match="not finite"):
        evaluate_predict(predictor.gated, encoded, 8, hard=False, spec=get_task("synthetic"))
    predictor.gated.source = None  # a model in memory, as training evaluates it
    with pytest.raises(DynbertError, match="^the outputs of the model are not finite"):
        Predictor(predictor.gated, predictor.tokenizer, predictor.spec, 8).predict([TEXT])


def test_a_damaged_checkpoint_is_refused_on_resume_naming_it(tmp_path):
    args = [*FAST, *SYNTHETIC, f"output_dir={tmp_path}"]
    assert train_stopping_at(2, "KILL", *args).returncode == 137  # killed right after the checkpoint of step 2
    checkpoint = tmp_path / "checkpoint.pt"
    assert (tmp_path / "checkpoint.pt.sha256").read_text() == (
        f"{hashlib.sha256(checkpoint.read_bytes()).hexdigest()}  checkpoint.pt\n")
    # Inside the largest tensor's record: torch.load reads such a file without complaint.
    with zipfile.ZipFile(checkpoint) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(checkpoint.read_bytes())
    middle = record.header_offset + record.file_size // 2
    data[middle:middle + 1024] = random.Random(0).randbytes(1024)
    checkpoint.write_bytes(bytes(data))

    one_line_error(invoke("train", *args), f"{checkpoint} is not a usable checkpoint", "sha256", "delete it",
                   "train.overwrite=true")
    assert checkpoint.read_bytes() == bytes(data)  # kept for the user to look at
