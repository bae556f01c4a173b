"""Task table, GLUE TSV loading in each task's real layout, metrics, and the synthetic task."""

from __future__ import annotations

import math
import time

import pytest

from dynbert.errors import DynbertError
from dynbert.tasks import (CUE_COUNTS, FILLER_WORDS, NEGATIVE_WORDS, NEGATOR, POSITIVE_WORDS, TASKS, Example,
                           compute_metrics, get_task, load_glue, make_synthetic)

from glue_data import CASES, GLUE_TASKS, HEADERS, glue_line, write_glue_folder, write_glue_tsv


@pytest.mark.parametrize("task", GLUE_TASKS)
def test_load_glue_reads_each_tasks_real_tsv_layout(tmp_path, task):
    rows, labels = CASES[task]
    spec = get_task(task)
    data = load_glue(spec, write_glue_folder(tmp_path, task))

    assert list(data) == ["train", *spec.eval_splits]
    assert [(e.text_a, e.text_b) for e in data["train"]] == [(a, b) for a, b, _ in rows]
    assert [e.label for e in data["train"]] == labels
    assert all(type(e.label) is (float if task == "stsb" else int) for e in data["train"])
    assert all(e.cue_words == () for e in data["train"])
    for number, (split, filename) in enumerate(zip(spec.eval_splits, spec.tsv_eval_files), start=1):
        assert [e.text_a for e in data[split]] == [f"{filename} {a}" for a, _, _ in rows[:number]]
        assert [e.label for e in data[split]] == labels[:number]


def test_task_table_matches_glue():
    assert set(TASKS) == {*GLUE_TASKS, "synthetic"}
    assert TASKS["mnli"].eval_splits == ("validation_matched", "validation_mismatched")
    assert TASKS["mnli"].label_names == ("entailment", "neutral", "contradiction")
    assert TASKS["stsb"].num_labels == 1 and TASKS["stsb"].label_names == ()
    main = {name: spec.main_metric for name, spec in TASKS.items()}
    assert main == {"cola": "matthews_correlation", "mrpc": "f1", "qqp": "f1", "stsb": "spearmanr",
                    **{name: "accuracy" for name in ("sst2", "mnli", "qnli", "rte", "wnli", "synthetic")}}
    for spec in TASKS.values():
        assert spec.num_labels == max(1, len(spec.label_names))


def test_get_task_unknown_name_lists_known_tasks():
    assert get_task("MNLI") is TASKS["mnli"]
    with pytest.raises(DynbertError, match="'glue'") as info:
        get_task("glue")
    assert all(name in str(info.value) for name in TASKS)


# ---------------------------------------------------------------------------------------------
# Bad data: one-sentence errors that name the file (and line and value)


def test_missing_or_non_folder_data_dir(tmp_path):
    with pytest.raises(DynbertError, match="nowhere.*does not exist"):
        load_glue(get_task("rte"), tmp_path / "nowhere")
    (tmp_path / "file.tsv").write_text("x\n")
    with pytest.raises(DynbertError, match="file.tsv.*is not a folder"):
        load_glue(get_task("rte"), tmp_path / "file.tsv")


def test_missing_file_is_named(tmp_path):
    write_glue_folder(tmp_path, "mnli")
    (tmp_path / "dev_mismatched.tsv").unlink()
    with pytest.raises(DynbertError, match="dev_mismatched.tsv is missing"):
        load_glue(get_task("mnli"), tmp_path)


@pytest.mark.parametrize("task", ["cola", "sst2"])
def test_empty_file(tmp_path, task):
    write_glue_folder(tmp_path, task)
    (tmp_path / "dev.tsv").write_text("\n\n")
    with pytest.raises(DynbertError, match=r"dev.tsv is empty"):
        load_glue(get_task(task), tmp_path)


def test_header_without_rows_is_an_empty_split(tmp_path):
    write_glue_folder(tmp_path, "qnli")
    (tmp_path / "dev.tsv").write_text(HEADERS["qnli"] + "\n")
    with pytest.raises(DynbertError, match="dev.tsv has a header but no examples"):
        load_glue(get_task("qnli"), tmp_path)


def test_wrong_header_names_file_and_expected_columns(tmp_path):
    write_glue_folder(tmp_path, "rte")
    # A headerless file: its first row is taken as the header, and does not fit.
    (tmp_path / "train.tsv").write_text("0\tBob ran.\tBob moved.\tentailment\n")
    with pytest.raises(DynbertError, match=r"train.tsv has columns .*\['sentence1', 'sentence2', 'label'\]"):
        load_glue(get_task("rte"), tmp_path)


@pytest.mark.parametrize("task, bad", [("rte", "maybe"), ("mnli", "-"), ("sst2", "2"), ("cola", "yes"),
                                       ("stsb", "high"), ("stsb", "7.5")])
def test_label_outside_the_label_set_names_file_line_and_value(tmp_path, task, bad):
    write_glue_folder(tmp_path, task)
    rows, _ = CASES[task]
    write_glue_tsv(tmp_path, task, [rows[0], (rows[1][0], rows[1][1], bad)], "train.tsv")
    line = 2 if task == "cola" else 3  # the header is line 1
    with pytest.raises(DynbertError, match=rf"train.tsv line {line} has (label|score) '{bad}'"):
        load_glue(get_task(task), tmp_path)


@pytest.mark.parametrize("task", ["cola", "mrpc"])
def test_row_with_wrong_column_count_names_file_and_line(tmp_path, task):
    write_glue_folder(tmp_path, task)
    path = tmp_path / "dev.tsv"
    # A text with a tab in it: one column too many.
    path.write_text(path.read_text() + glue_line(task, 9, "left\tright", "b", "1") + "\n")
    line = len(path.read_text().splitlines())
    with pytest.raises(DynbertError, match=rf"dev.tsv line {line} has \d+ tab-separated columns, expected"):
        load_glue(get_task(task), tmp_path)


def test_non_utf8_file(tmp_path):
    write_glue_folder(tmp_path, "sst2")
    (tmp_path / "train.tsv").write_bytes(b"sentence\tlabel\ncaf\xe9\t1\n")
    with pytest.raises(DynbertError, match="train.tsv is not UTF-8"):
        load_glue(get_task("sst2"), tmp_path)


def test_non_utf8_byte_past_the_readers_first_chunk_is_named_by_its_offset_and_line(tmp_path):
    """The reader decodes 8 KB at a time: its own offset (4587) counted from the chunk, not the file."""
    write_glue_folder(tmp_path, "sst2")
    head = ("sentence\tlabel\n" + "".join(f"a fine film number {i}\t1\n" for i in range(3000))).encode()
    (tmp_path / "train.tsv").write_bytes(head + b"caf\xe9\t1\n")
    with pytest.raises(DynbertError, match=rf"train.tsv is not UTF-8 text \(invalid continuation byte at byte "
                                           rf"{len(head) + 3}, line 3002\)"):
        load_glue(get_task("sst2"), tmp_path)


def test_a_mostly_empty_split_is_refused_and_a_few_empty_rows_are_counted(tmp_path, capsys):
    from dynbert.config import compose_config
    from dynbert.data import load_splits

    rows, _ = CASES["rte"]
    write_glue_tsv(tmp_path, "rte", rows * 4, "dev.tsv")
    cfg = compose_config(["task=rte", "model=tiny", f"task.data_dir={tmp_path}"])
    write_glue_tsv(tmp_path, "rte", [("", b, label) for _, b, label in rows[:1]] + rows * 3)
    splits = load_splits(cfg, get_task("rte"))
    assert len(splits["train"]) == 7  # kept, and counted
    assert f"warning: 1 of the 7 train examples of rte ({tmp_path}/train.tsv) have an empty 'sentence1'; they are " \
           "kept" in " ".join(capsys.readouterr().err.split())
    write_glue_tsv(tmp_path, "rte", [(a, " ", label) for a, _, label in rows * 2] + [("", "", "entailment")] + rows)
    with pytest.raises(DynbertError, match=r"5 of the 7 train examples of rte \(.*\) have an empty 'sentence1' \(1\) "
                                           r"or 'sentence2' \(5\): a model would learn from or be scored on next to"):
        load_splits(cfg, get_task("rte"))


def test_a_pair_whose_second_text_is_empty_is_still_encoded_as_a_pair():
    from dynbert.data import encode
    from dynbert.modeling import train_wordpiece

    tokenizer = train_wordpiece(["bob ran home"], vocab_size=50)
    encoded = encode([Example("bob ran", "", 0), Example("bob", "", 1)], tokenizer, 16, get_task("rte"))
    sep = tokenizer.sep_token_id
    assert [ids.count(sep) for ids in encoded.input_ids] == [2, 2]  # [CLS] a [SEP] [SEP], as for any pair
    assert [types[-1] for types in encoded.token_type_ids] == [1, 1]


def test_crlf_and_blank_lines_are_tolerated(tmp_path):
    (tmp_path / "train.tsv").write_bytes(b"sentence\tlabel\r\n\r\nfine \"film\t1\r\n\nbad\t0\r\n")
    (tmp_path / "dev.tsv").write_bytes(b"\xef\xbb\xbfsentence\tlabel\nok\t1\n")  # a byte-order mark
    data = load_glue(get_task("sst2"), tmp_path)
    assert data["train"] == [Example('fine "film', None, 1), Example("bad", None, 0)]
    assert data["validation"] == [Example("ok", None, 1)]


def test_hub_offline_fails_fast_and_says_what_to_pass(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # An empty cache, so a copy of GLUE on this machine cannot make the load succeed.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    # load_glue switches the clients offline for the rest of the process, as the variables ask:
    # restore the flags afterwards so the tests after this one see the state they started with.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)
    start = time.perf_counter()
    with pytest.raises(DynbertError, match="could not download") as info:
        load_glue(get_task("rte"), None)
    assert time.perf_counter() - start < 10
    assert "task.data_dir=" in str(info.value) and "task=synthetic model=tiny" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Metrics against hand-computed values


def test_cola_matthews_correlation():
    # TP=2, FP=1, TN=2, FN=0: MCC = (2·2 − 1·0) / sqrt(3·2·3·2) = 4/6.
    metrics = compute_metrics(get_task("cola"), [1, 1, 0, 0, 1], [1, 0, 0, 0, 1])
    assert metrics == {"matthews_correlation": pytest.approx(4 / 6)}


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_accuracy_f1_and_combined_score(task):
    # TP=3, FP=1, FN=1, TN=1: precision = recall = 3/4, F1 = 3/4; accuracy 4/6.
    metrics = compute_metrics(get_task(task), [1, 1, 1, 0, 0, 1], [1, 0, 1, 1, 0, 1])
    assert metrics == pytest.approx({"accuracy": 4 / 6, "f1": 0.75, "combined_score": (4 / 6 + 0.75) / 2})


def test_stsb_pearson_and_spearman():
    # Same order (Spearman 1), not a straight line: Pearson = 11.5 / sqrt(28.75 · 5).
    metrics = compute_metrics(get_task("stsb"), [1.0, 2.0, 4.0, 8.0], [1.0, 2.0, 3.0, 4.0])
    pearson = 11.5 / math.sqrt(28.75 * 5)
    assert metrics == pytest.approx({"pearson": pearson, "spearmanr": 1.0, "combined_score": (pearson + 1) / 2})
    # Regression outputs of shape (n, 1) are accepted as they come.
    assert compute_metrics(get_task("stsb"), [[1.0], [2.0], [4.0], [8.0]], [1, 2, 3, 4]) == metrics


@pytest.mark.parametrize("task", ["mnli", "rte", "synthetic"])
def test_accuracy_only(task):
    metrics = compute_metrics(get_task(task), [0, 2, 1, 1], [0, 2, 2, 1])
    assert metrics == {"accuracy": 0.75}
    assert all(type(value) is float for value in metrics.values())


def test_metrics_refuse_mismatched_lengths():
    with pytest.raises(ValueError):
        compute_metrics(get_task("rte"), [0, 1], [0, 1, 1])


# ---------------------------------------------------------------------------------------------
# Synthetic task


def majority_label(words: list[str]) -> int:
    """The rule, recomputed from the words: "not" flips the cue right after it; majority wins
    (three cues in the shipped task, CUE_COUNTS)."""
    votes = []
    for index, word in enumerate(words):
        if word in POSITIVE_WORDS or word in NEGATIVE_WORDS:
            negated = index > 0 and words[index - 1] == NEGATOR
            votes.append((word in POSITIVE_WORDS) != negated)
    assert len(votes) in CUE_COUNTS
    return int(sum(votes) * 2 > len(votes))


def test_synthetic_is_deterministic_by_seed():
    first, again = make_synthetic(50, 20, seed=3), make_synthetic(50, 20, seed=3)
    other = make_synthetic(50, 20, seed=4)
    assert first == again
    assert first["train"] != other["train"] and first["validation"] != other["validation"]
    # The eval set depends on the seed only: more training data leaves it alone.
    assert make_synthetic(80, 20, seed=3)["validation"] == first["validation"]


def test_synthetic_label_follows_the_cue_words_only():
    data = make_synthetic(2000, 200, seed=0, min_words=8, max_words=30)
    assert list(data) == ["train", "validation"] and len(data["validation"]) == 200
    train = data["train"]
    assert 0.4 <= sum(example.label for example in train) / len(train) <= 0.6
    cue_vocabulary = {*POSITIVE_WORDS, *NEGATIVE_WORDS, NEGATOR}
    negated = cues = 0
    for example in train + data["validation"]:
        words = example.text_a.split(" ")
        assert example.text_b is None and example.text_a.isascii() and example.text_a.islower()
        assert 8 <= len(words) <= 30
        assert example.label == majority_label(words)
        # cue_words: exactly the cues and their negators; every other word is filler.
        assert example.cue_words == tuple(i for i, word in enumerate(words) if word in cue_vocabulary)
        assert all(word in FILLER_WORDS for i, word in enumerate(words) if i not in example.cue_words)
        # A negator always sits right before a cue.
        negators = [i for i in example.cue_words if words[i] == NEGATOR]
        assert all(words[i + 1] in POSITIVE_WORDS + NEGATIVE_WORDS for i in negators)
        negated += len(negators)
        cues += len(example.cue_words) - len(negators)
    # Half the cues negated: a cue's polarity alone says nothing about its vote.
    assert 0.45 < negated / cues < 0.55


def test_synthetic_label_needs_each_cue_and_the_word_before_it():
    """Why keeping tokens buys accuracy: one cue often decides the vote, and only the cue with the
    word before it says how it votes, which a bag of words (what CLS reads in one layer) misses."""
    examples = make_synthetic(2000, 1, seed=0)["train"]
    decisive = 0
    for example in examples:
        words = example.text_a.split(" ")
        cues = [i for i in example.cue_words if words[i] != NEGATOR]
        # Without one of its cues (and that cue's "not"), is the vote still the same? A tie is not.
        for cue in cues:
            rest = [word for i, word in enumerate(words) if i != cue and not (i == cue - 1 and word == NEGATOR)]
            votes = [(word in POSITIVE_WORDS) != (index > 0 and rest[index - 1] == NEGATOR)
                     for index, word in enumerate(rest) if word in POSITIVE_WORDS + NEGATIVE_WORDS]
            decisive += 2 * sum(votes) == len(votes)
    # 2-to-1 votes (3/4 of texts) have two decisive cues; 3-to-0 votes none.
    assert 0.45 < decisive / (3 * len(examples)) < 0.55
    # The same cue words and negators can carry either label: the order decides.
    labels_by_bag = {}
    for example in examples:
        words = example.text_a.split(" ")
        bag = tuple(sorted(words[i] for i in example.cue_words))
        labels_by_bag.setdefault(bag, []).append(example.label)
    best_from_bags = sum(max(labels.count(0), labels.count(1)) for labels in labels_by_bag.values())
    assert 0.75 < best_from_bags / len(examples) < 0.9


def test_synthetic_vocabulary():
    assert len(set(FILLER_WORDS)) == len(FILLER_WORDS) >= 200
    assert all(word.isascii() and word.isalpha() and word.islower() for word in FILLER_WORDS)
    assert not set(FILLER_WORDS) & {*POSITIVE_WORDS, *NEGATIVE_WORDS, NEGATOR}


def test_synthetic_rejects_bad_sizes():
    with pytest.raises(DynbertError, match="min_words=1"):
        make_synthetic(10, 10, seed=0, min_words=1, max_words=10)
    with pytest.raises(DynbertError, match="max_words=10"):
        make_synthetic(10, 10, seed=0, min_words=20, max_words=10)
    with pytest.raises(DynbertError, match="num_eval=0"):
        make_synthetic(10, 0, seed=0)


def test_load_glue_refuses_the_synthetic_task(tmp_path):
    with pytest.raises(DynbertError, match="make_synthetic"):
        load_glue(get_task("synthetic"), tmp_path)


def test_correlation_of_constant_predictions_is_zero_not_nan():
    # NaN would make metrics.json invalid JSON for strict readers.
    metrics = compute_metrics(get_task("stsb"), [2.0, 2.0, 2.0], [0.5, 3.0, 4.5])
    assert metrics["pearson"] == 0.0 and metrics["spearmanr"] == 0.0
