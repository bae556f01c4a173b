"""Tiny GLUE folders in each task's real TSV layout (header rows, column order, label spelling).

Shared by the task, train and bad-input tests.
"""

from __future__ import annotations

from dynbert.tasks import get_task

GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")

# The header rows of GLUE's own files (CoLA has none; MNLI's dev files have five annotator labels).
HEADERS = {
    "sst2": "sentence\tlabel",
    "mrpc": "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
    "qqp": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
    "stsb": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
    "mnli": "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
            "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label",
    "mnli_dev": "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\t"
                "label5\tgold_label",
    "qnli": "index\tquestion\tsentence\tlabel",
    "rte": "index\tsentence1\tsentence2\tlabel",
    "wnli": "index\tsentence1\tsentence2\tlabel",
}


def glue_line(task: str, index: int, a: str, b: str | None, label: str, dev: bool = False) -> str:
    """One data row in the task's real layout, the other columns filled the way GLUE fills them."""
    if task == "cola":
        return f"gj04\t{label}\t{'' if label == '1' else '*'}\t{a}"
    if task == "sst2":
        return f"{a}\t{label}"
    if task == "mrpc":
        return f"{label}\t{1000 + index}\t{2000 + index}\t{a}\t{b}"
    if task == "qqp":
        return f"{index}\t{2 * index}\t{2 * index + 1}\t{a}\t{b}\t{label}"
    if task == "stsb":
        return f"{index}\tmain-captions\tMSRvid\t2012test\t{index:04d}\tnone\tnone\t{a}\t{b}\t{label}"
    if task == "mnli":
        annotators = f"{label}\t{label}\tneutral\t{label}\t{label}" if dev else label
        return (f"{index}\t{31193 + index}\t{31193 + index}n\tfiction\t( ( {a} ) )\t( ( {b} ) )\t(ROOT {a})\t"
                f"(ROOT {b})\t{a}\t{b}\t{annotators}\t{label}")
    return f"{index}\t{a}\t{b}\t{label}"


def write_glue_tsv(folder, task: str, rows, filename: str = "train.tsv"):
    """Write rows (text_a, text_b, label as GLUE writes it) to one file in the task's real layout."""
    folder.mkdir(parents=True, exist_ok=True)
    dev = filename.startswith("dev")
    lines = [] if task == "cola" else [HEADERS["mnli_dev" if task == "mnli" and dev else task]]
    lines += [glue_line(task, index, a, b, label, dev) for index, (a, b, label) in enumerate(rows)]
    path = folder / filename
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# Per task: rows as GLUE writes them, and the labels load_glue must return (the hub's ids).
# Texts carry quote characters: a csv reader with default quoting would merge rows.
CASES = {
    "cola": ([('"Our friends won\'t buy this analysis.', None, "1"), ("The more we study.", None, "0")], [1, 0]),
    "sst2": ([("it 's a charming journey ", None, "1"), ('a "dull" film ', None, "0")], [1, 0]),
    "mrpc": ([('He said "no".', '"No," he said.', "1"), ("A cat.", "A dog.", "0")], [1, 0]),
    "qqp": ([("How do I learn?", "What is the way to learn?", "1"), ("Why?", "When?", "0")], [1, 0]),
    "stsb": ([("A man plays.", "A man is playing.", "4.750"), ("A cat.", "A plane.", "0.000")], [4.75, 0.0]),
    "mnli": ([("He ran.", "He moved.", "entailment"), ("He ran.", "He was fast.", "neutral"),
              ('"He sat."', "He ran.", "contradiction")], [0, 1, 2]),
    "qnli": ([("Who ran?", "Bob ran.", "entailment"), ("Who ran?", "It rained.", "not_entailment")], [0, 1]),
    "rte": ([("Bob ran home.", "Bob ran.", "entailment"), ("Bob ran.", "Bob flew.", "not_entailment")], [0, 1]),
    "wnli": ([("The cup fell; it broke.", "The cup broke.", "1"), ("I saw it.", "It saw me.", "0")], [1, 0]),
}


def write_glue_folder(folder, task: str):
    """train.tsv and the eval files, each with different rows so split names can be told apart."""
    rows, _ = CASES[task]
    spec = get_task(task)
    write_glue_tsv(folder, task, rows, "train.tsv")
    for number, filename in enumerate(spec.tsv_eval_files, start=1):
        write_glue_tsv(folder, task, [(f"{filename} {a}", b, label) for a, b, label in rows[:number]], filename)
    return folder


def write_glue_run_folder(folder, task: str, copies: int = 3):
    """A folder a whole run can use: train.tsv and every eval file hold all of the task's rows,
    ``copies`` times (a metric such as Pearson's needs two eval examples or more)."""
    rows, _ = CASES[task]
    for filename in ("train.tsv", *get_task(task).tsv_eval_files):
        write_glue_tsv(folder, task, rows * copies, filename)
    return folder
