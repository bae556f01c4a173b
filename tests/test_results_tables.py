"""Every results table in README.md and docs/ is what `dynbert report --table` makes of the committed runs.

A table sits between two markers, its folder relative to the repository root:

    <!-- dynbert report results/<study> --table <name> -->
    ...the table, as `dynbert report results/<study> --table <name>` prints it...
    <!-- end report -->

and must equal `render_table` of that folder exactly: a number typed by hand, or left behind when the
runs under results/ changed, fails here with the table to paste instead.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import pytest

from dynbert.report import render_table

ROOT = Path(__file__).resolve().parents[1]
OPENING = re.compile(r"^<!-- dynbert report (?P<folder>\S+) --table (?P<name>\S+) -->$", re.M)
BLOCK = re.compile(OPENING.pattern[:-1] + r"\n(?P<body>.*?)^<!-- end report -->$", re.M | re.S)


def documents(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def blocks(text: str) -> list[tuple[str, str, str]]:
    """(folder, table name, body) of every block; the body without the blank lines Markdown may want
    around a table."""
    return [(m["folder"], m["name"], m["body"].strip("\n")) for m in BLOCK.finditer(text)]


def stale(root: Path, folder: str, name: str, body: str) -> str | None:
    """The table the block must hold when its body differs from it; None when it is current."""
    expected = render_table(root / folder, name)
    return None if body == expected else expected


BLOCKS = [pytest.param(path, folder, name, body, id=f"{path.relative_to(ROOT)}:{folder}:{name}")
          for path in documents(ROOT) if path.is_file()
          for folder, name, body in blocks(path.read_text(encoding="utf-8"))]
NONE_YET = pytest.param(None, None, None, None, marks=pytest.mark.skip(
    reason="README.md and docs/ hold no `<!-- dynbert report results/<study> --table <name> -->` block yet"))


@pytest.mark.parametrize("path, folder, name, body", BLOCKS or [NONE_YET])
def test_each_results_table_is_what_the_report_makes_of_the_committed_runs(path, folder, name, body):
    assert folder.startswith("results/"), f"{path.name}: {folder} is not committed: report on results/<study>"
    expected = stale(ROOT, folder, name, body)
    if expected is not None:
        diff = "\n".join(difflib.unified_diff(body.splitlines(), expected.splitlines(), "in the document",
                                              "from the runs", lineterm=""))
        pytest.fail(f"{path.relative_to(ROOT)}: the table of `dynbert report {folder} --table {name}` differs "
                    f"from the runs; paste its output between the markers:\n{diff}")
    # The comparison is not vacuous for this block: one digit changed fails it.
    assert stale(ROOT, folder, name, re.sub(r"\d", lambda d: str((int(d[0]) + 1) % 10), body, count=1)) is not None


def test_every_opening_marker_has_its_end():
    """A marker without its end would leave its table unchecked."""
    for path in documents(ROOT):
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            assert len(OPENING.findall(text)) == len(blocks(text)), f"{path.name}: a block lacks <!-- end report -->"


def test_the_comparison_catches_one_edited_number(tmp_path):
    from test_report import make_target_study

    make_target_study(tmp_path / "results" / "study")
    table = render_table(tmp_path / "results" / "study", "compare")
    document = f"Prose.\n\n<!-- dynbert report results/study --table compare -->\n\n{table}\n\n<!-- end report -->\n"
    ((folder, name, body),) = blocks(document)
    assert (folder, name) == ("results/study", "compare") and body == table
    assert stale(tmp_path, folder, name, body) is None
    edited = body.replace("90.00±0.71", "90.01±0.71", 1)
    assert edited != body and stale(tmp_path, folder, name, edited) == table
