"""Printing to the terminal and to logs alike."""

from __future__ import annotations


def print_table(console, table) -> None:
    """Print a rich table; off a terminal (a log, a pipe) nothing limits the width, so it is
    printed whole, not cut to 80 columns of '…'."""
    width = console.width
    if not console.is_terminal:
        console.width = max(width, console.measure(table, options=console.options.update_width(1000)).maximum)
    try:
        console.print(table)
    finally:
        console.width = width
