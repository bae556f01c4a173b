"""One input through the pruned model, layer by layer: the terminal view and the picture.

``Predictor.inspect`` fills an ``Inspection`` from the real hard forward pass (gathered tokens,
``GatedOutput.present`` and ``.scores``). Here it is drawn: a rich table for the terminal, and a
layers × tokens picture like the paper's figure (PNG or SVG through matplotlib, or a self-contained
HTML table). Plain lists in, no torch.
"""

from __future__ import annotations

import html
import io
from dataclasses import dataclass
from pathlib import Path

from .errors import atomic_write_bytes, atomic_write_text

PICTURE_FORMATS = (".png", ".svg", ".html")
GONE, DROPPED, KEPT = 0, 1, 2
"""A token's state at a layer: dropped by an earlier layer, dropped by this one, still present."""
STATE_COLORS = {GONE: "#eeeeee", DROPPED: "#e4572e", KEPT: "#2e86ab"}
STATE_NAMES = {GONE: "dropped earlier", DROPPED: "dropped by this layer", KEPT: "kept"}


@dataclass
class Inspection:
    task: str
    text_a: str
    text_b: str | None
    tokens: list[str]
    """The input's tokens as the model saw them (special tokens included, cut to max_length)."""
    present: list[list[bool]]
    """(layers, tokens): whether each token is still present after each layer's decision."""
    scores: list[list[float | None]]
    """(layers, tokens): the score each layer ranked each present token by; None where it ranked nothing."""
    pruned_layers: list[int]
    score_name: str
    prediction: dict
    """What ``Predictor.predict`` returns for this input."""

    @property
    def num_layers(self) -> int:
        return len(self.present)

    def states(self) -> list[list[int]]:
        """(layers, tokens): KEPT, DROPPED (by this layer) or GONE (by an earlier one)."""
        entering = [True] * len(self.tokens)
        states = []
        for after in self.present:
            states.append([KEPT if kept else DROPPED if was else GONE for was, kept in zip(entering, after)])
            entering = after
        return states

    def kept_tokens(self, layer: int) -> list[str]:
        """The tokens present after ``layer``, in their original order."""
        return [token for token, kept in zip(self.tokens, self.present[layer]) if kept]

    def headline(self, separator: str = "; ") -> str:
        """The prediction, then the FLOPs against the un-pruned model (``separator`` between them)."""
        prediction = self.prediction
        if "label" in prediction:
            said = f"{prediction['label']} (p={prediction['score']:.3f})"
        else:
            said = f"score {prediction['score']:.3f}"
        ratio = prediction["flops_ratio"]
        return (f"{self.task}: {said}{separator}FLOPs {_short(prediction['flops'])} of "
                f"{_short(prediction['baseline_flops'])} un-pruned (ratio {ratio:.3f}, {1 / ratio:.2f}× fewer); "
                f"{len(self.tokens)} tokens")


def _short(flops: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if flops >= size:
            return f"{flops / size:.3g} {unit}"
    return str(flops)


# ---------------------------------------------------------------------------------------------
# Terminal


def print_inspection(console, inspection: Inspection) -> None:
    """The prediction and FLOPs, a token × layer table of decisions and scores, then each layer's survivors."""
    from rich.markup import escape
    from rich.table import Table

    console.print(escape(inspection.headline()), highlight=False, soft_wrap=True)
    pruned = set(inspection.pruned_layers)
    table = Table(caption=f"cells: the layer's {inspection.score_name} score; ✗ dropped there, blank gone "
                          "before, ✓ kept unranked (the layer kept every token); * layers that prune",
                  caption_justify="left")
    table.add_column("#", justify="right", style="dim")
    table.add_column("token")
    for layer in range(inspection.num_layers):
        table.add_column(f"L{layer}{'*' if layer in pruned else ''}", justify="right")
    states = inspection.states()
    for position, token in enumerate(inspection.tokens):
        cells = []
        for layer in range(inspection.num_layers):
            state, score = states[layer][position], inspection.scores[layer][position]
            shown = "✓" if score is None else f"{score:.3g}"
            cells.append("" if state == GONE else f"[green]{shown}[/]" if state == KEPT else f"[red]✗ {shown}[/]")
        table.add_row(str(position), escape(token), *cells)
    table.add_row("", "kept", *[f"{sum(row)}/{len(row)}" for row in inspection.present], style="bold")
    console.print(table)
    for layer in range(inspection.num_layers):
        console.print(f"after L{layer}: " + escape(" ".join(inspection.kept_tokens(layer))), highlight=False,
                      soft_wrap=True)


# ---------------------------------------------------------------------------------------------
# Pictures


def inspection_figure(inspection: Inspection):
    """A layers × tokens picture (rows: layers, top first; columns: tokens), on the Agg canvas.

    No pyplot and no global backend change: a CLI or a test can draw many.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    num_tokens, num_layers = len(inspection.tokens), inspection.num_layers
    # At least wide enough for the title's FLOPs line, however short the input.
    fig = Figure(figsize=(max(6.0, 1.6 + 0.26 * num_tokens), 2.1 + 0.32 * num_layers), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colormap = ListedColormap([STATE_COLORS[state] for state in (GONE, DROPPED, KEPT)])
    ax.imshow(inspection.states(), cmap=colormap, vmin=GONE, vmax=KEPT, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(num_tokens), [_plain(token) for token in inspection.tokens], rotation=90, fontsize=8)
    ax.set_yticks(range(num_layers), [f"layer {layer}" for layer in range(num_layers)], fontsize=8)
    ax.set_xticks([x - 0.5 for x in range(1, num_tokens)], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, num_layers)], minor=True)
    ax.grid(which="minor", color="white", linewidth=1)
    ax.tick_params(which="minor", length=0)
    ax.set_title(_plain(inspection.headline(separator="\n")), fontsize=9, loc="left")
    fig.legend(handles=[Patch(color=STATE_COLORS[state], label=STATE_NAMES[state]) for state in (KEPT, DROPPED, GONE)],
               loc="outside lower left", ncols=3, fontsize=8, frameon=False)
    return fig


def _plain(text: str) -> str:
    """Text matplotlib shows as written: two $ signs would start mathtext."""
    return text.replace("$", r"\$")


def inspection_html(inspection: Inspection) -> str:
    """The same picture as one self-contained HTML page: a table, each cell's score in its tooltip."""
    states = inspection.states()
    header = "".join(f"<th>{html.escape(token)}</th>" for token in inspection.tokens)
    body = []
    for layer, row in enumerate(states):
        cells = []
        for position, state in enumerate(row):
            score = inspection.scores[layer][position]
            tip = f"{STATE_NAMES[state]}" + ("" if score is None or state == GONE else f", score {score:.4g}")
            cells.append(f'<td style="background:{STATE_COLORS[state]}" title="{html.escape(tip)}"></td>')
        body.append(f"<tr><th>layer {layer}</th>{''.join(cells)}</tr>")
    legend = " ".join(f'<span style="background:{STATE_COLORS[state]}">&nbsp;&nbsp;&nbsp;</span> '
                      f"{STATE_NAMES[state]}" for state in (KEPT, DROPPED, GONE))
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>dynbert inspect</title><style>"
            "body{font-family:sans-serif;font-size:13px} table{border-collapse:collapse}"
            "td{width:22px;height:18px;border:1px solid #fff} thead th{writing-mode:vertical-rl;"
            "transform:rotate(180deg);font-weight:normal;padding:2px} tbody th{text-align:right;"
            "font-weight:normal;padding-right:6px;white-space:nowrap}</style></head><body>\n"
            f"<p>{html.escape(inspection.headline())}</p>\n"
            f"<table><thead><tr><th></th>{header}</tr></thead><tbody>\n" + "\n".join(body) + "\n</tbody></table>\n"
            f"<p>{legend}</p>\n</body></html>\n")


def write_picture(inspection: Inspection, path: Path) -> None:
    """``path``'s suffix picks the format (one of PICTURE_FORMATS); written atomically."""
    fmt = path.suffix.lower()
    if fmt == ".html":
        atomic_write_text(path, inspection_html(inspection))
        return
    buffer = io.BytesIO()
    inspection_figure(inspection).savefig(buffer, format=fmt[1:], dpi=150,
                                          metadata={"Date": None} if fmt == ".svg" else None)
    atomic_write_bytes(path, buffer.getvalue())
