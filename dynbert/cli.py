"""The `dynbert` command: train, sweep, report, bench, inspect, predict, export.

User mistakes (DynbertError) end in one sentence on stderr and exit code 2, never a traceback;
`--debug` or DYNBERT_DEBUG=1 shows the traceback of anything.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import typer
from rich.console import Console

from rich.markup import escape

from .errors import MESSAGE_LIMIT, DynbertError, first_line, shorten

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Learn which tokens BERT can drop: gated fine-tuning, λ sweeps, reports, benchmarks, "
                       "inspection and prediction.")
stderr = Console(stderr=True)
OVERRIDES_HELP = "Hydra overrides: key=value or group=option, e.g. task=sst2 lambda=0.1 model=tiny."
ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}


def _debug() -> bool:
    return os.environ.get("DYNBERT_DEBUG", "") not in ("", "0")


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks (or DYNBERT_DEBUG=1).")):
    if debug:
        os.environ["DYNBERT_DEBUG"] = "1"


def user_errors(command):
    """Turn errors into one line on stderr and an exit code, unless debugging."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except DynbertError as error:
            if _debug():
                raise
            # A message quotes paths and file contents: capped, and never read as rich markup.
            stderr.print(f"[red]error:[/] {escape(shorten(str(error), 4 * MESSAGE_LIMIT))}", highlight=False,
                         soft_wrap=True)
            raise typer.Exit(getattr(error, "exit_code", 2))
        except KeyboardInterrupt as interrupt:  # before any work worth saving began
            if _debug():
                raise
            stderr.print("[red]interrupted[/]")
            raise typer.Exit(128 + getattr(interrupt, "signum", 2))
        except (typer.Exit, typer.Abort):
            raise
        except BrokenPipeError:  # the reader stopped early (`dynbert predict ... | head`): exit quietly, as rich does
            _silence_stdout()
            raise typer.Exit(1) from None
        except Exception as error:  # noqa: BLE001 - the last line of defence for the user
            if _debug():
                raise
            stderr.print(f"[red]error:[/] {error.__class__.__name__}: {escape(first_line(error))}"
                         " (run with --debug for the traceback)", highlight=False, soft_wrap=True)
            raise typer.Exit(1)

    return wrapper


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit does not fail on the closed pipe again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # not a real file (a test runner's buffer): nothing to flush into a pipe
        pass


def _config_epilog() -> str:
    from .config import conf_dir

    root = conf_dir()
    groups = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_"))
    lines = ["Config groups (group=option):"]
    for group in groups:
        options = sorted(p.stem for p in (root / group).glob("*.yaml"))
        lines.append(f"  {group}: {', '.join(options)}")
    lines.append("Main keys: lambda, seed, output_dir, glue_dir, task.data_dir, task.max_length, "
                 "model.name_or_path, method.layers, method.keep, method.score, method.lr, train.epochs, train.lr, "
                 "train.batch_size, train.max_steps, train.precision, train.device. See them all with --cfg.")
    return "\n\n".join(lines)


@app.command(context_settings=ARGS, epilog=_config_epilog())
@user_errors
def train(overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
          cfg: bool = typer.Option(False, "--cfg", help="Print the resolved config and exit."),
          force: bool = typer.Option(False, "--force", help="Start over in a run folder that holds another run.")):
    """Fine-tune with token pruning on one task, evaluate (soft and hard mode), write a run folder.

    The last line printed is the run folder.
    """
    from omegaconf import OmegaConf

    from .config import compose_config

    overrides = list(overrides or []) + (["train.overwrite=true"] if force else [])
    if cfg:
        overrides = _without_hydra_cfg_word(overrides)
    config = compose_config(overrides)
    if cfg:
        typer.echo(OmegaConf.to_yaml(config), nl=False)
        return
    from .train import train as run_training

    metrics = run_training(config, console=stderr)
    from accelerate import PartialState

    if PartialState().is_main_process:  # several processes (torchrun, accelerate launch) report once
        _print_run_summary(metrics)
        typer.echo(Path(config.output_dir).expanduser().resolve())


def _without_hydra_cfg_word(overrides: list[str]) -> list[str]:
    """``--cfg job`` as a Hydra app takes it: the run's config, which is what --cfg prints. ``train``
    composes without Hydra's runtime, so there is no ``hydra`` part to print (nor ``all`` of it)."""
    for word in ("hydra", "all"):
        if word in overrides:
            raise DynbertError(f"--cfg {word}: dynbert train has no Hydra runtime config, only the run's: "
                               "pass --cfg (or --cfg job)")
    return [line for line in overrides if line != "job"]


def _print_run_summary(metrics: dict) -> None:
    from .report import format_knob

    knob = format_knob(metrics["method"], metrics["knob"], metrics["knob_value"])
    stderr.print(f"{metrics['task']} {metrics['method']} {knob}: {metrics['metric']} "
                 f"{metrics['score']:.4f} (hard) / {metrics['score_soft']:.4f} (soft), "
                 f"FLOPs ratio {metrics['flops_ratio']:.3f} ({1 / metrics['flops_ratio']:.2f}× fewer)",
                 highlight=False, soft_wrap=True)
    # Pruning that silently did nothing, or rounding that changed the model, must be heard.
    for warning in metrics.get("warnings", []):
        stderr.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)


@app.command(context_settings=ARGS, epilog=_config_epilog())
@user_errors
def sweep(overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP + " Comma lists and "
                                                "range(...)/choice(...) expand into runs.", show_default=False),
          dry_run: bool = typer.Option(False, "--dry-run", help="Check every run's config and list "
                                       "the run folders; train nothing.")):
    """Run a sweep of each method's knob (and task, seed, ...) as Hydra multiruns; re-running resumes it.

    Each method varies its own knob over its own grid (method.grid: λ, or method.keep); a knob given
    here or in sweep.params replaces it (docs/methods.md). Launchers scale it out: hydra/launcher=joblib,
    hydra/launcher=submitit_slurm. The last line printed is the sweep folder.
    """
    from .sweep import plan_jobs, plan_sweep, run_sweep

    if dry_run:
        folder, multiruns, _ = plan_sweep(list(overrides or []))
        jobs = plan_jobs(folder, multiruns)
        stderr.print(f"{len(jobs)} runs, every config checked; nothing trained:", highlight=False)
        for run_dir, _ in jobs:
            typer.echo(run_dir)
        typer.echo(folder.resolve())
        return
    folder, failed = run_sweep(list(overrides or []), console=stderr)
    typer.echo(folder.resolve())
    if failed:
        raise typer.Exit(1)


@app.command()
@user_errors
def report(folder: Path = typer.Argument(None, help="A sweep or any folder of runs (default: the latest sweep)."),
           format: str = typer.Option(None, "--format", help="Comma list of md, csv, png, svg (default: all).",
                                      show_default=False),
           out: Path = typer.Option(None, "--out", help="Write here instead of into FOLDER."),
           outputs: Path = typer.Option(Path("outputs"), "--outputs", help="Where to look for the latest sweep."),
           table: str = typer.Option(None, "--table", help="Print one Markdown table to stdout and write nothing: "
                                     "runs (every task's runs), compare (the methods at equal knob value) or best "
                                     "(each method's largest FLOPs reduction within 1 point of the baseline).")):
    """Gather runs into tables (terminal, CSV, Markdown) and accuracy-vs-FLOPs curves (PNG, SVG).

    With --table: one Markdown table on stdout, the text README.md's results tables hold.
    """
    from .report import FORMATS, check_table, latest_sweep, render_table, write_report

    if table is not None:
        check_table(table)
        if format is not None or out is not None:
            raise DynbertError("--table prints one table to stdout and writes no file: drop --format and --out")
        typer.echo(render_table(folder or latest_sweep(outputs), table, console=stderr))
        return
    folder = folder or latest_sweep(outputs)
    formats = FORMATS if format is None else tuple(part.strip() for part in format.split(",") if part.strip())
    for path in write_report(folder, out=out, formats=formats, console=stderr):
        typer.echo(path)


@app.command()
@user_errors
def bench(quick: bool = typer.Option(False, "--quick", help="Few sizes and repeats (a small model): seconds."),
          train: bool = typer.Option(False, "--train", help="Time training steps instead: plain, gated, "
                                     "length-grouped, bf16; writes train_bench.json."),
          model: str = typer.Option(None, "--model", help="A model family (bert, ...) or a checkpoint folder; "
                                    "with --train a checkpoint folder (default: the tiny model)."),
          run: Path = typer.Option(None, "--run", help="Bench a trained run folder's model and its method."),
          data: Path = typer.Option(None, "--data", help="With --train: a GLUE task folder, e.g. glue/SST-2 "
                                    "(default: the synthetic task)."),
          device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
          dtype: str = typer.Option(None, "--dtype", help="fp32 (default), bf16 or fp16 (CUDA): a converted model."),
          threads: int = typer.Option(None, "--threads", help="torch threads (default: torch's)."),
          batch_size: list[int] = typer.Option(None, "--batch-size", help="Batch size to time; repeat for "
                                               "several (default 1 and 32; quick 1 and 8)."),
          schedule: list[str] = typer.Option(None, "--schedule", help="Keep schedule to time (full, keep70, ..., "
                                             "power, learned with --run); repeat for several (default: all)."),
          inputs: str = typer.Option("random", "--inputs", help="random: full-length random ids; dev: the run's dev "
                                     "texts as served (needs --run; writes serve_bench.json)."),
          runtime: str = typer.Option(None, "--runtime", help="With --inputs dev: torch, onnxruntime or both "
                                      "(comma list; default torch): dense and pruned models in each."),
          out: Path = typer.Option(Path("outputs/bench"), "--out", help="Folder for bench.json / train_bench.json, "
                                   "or a .json path.")):
    """Time pruned inference (gathered vs masked) against the plain model; print a table, write bench.json.

    With --train: time training steps (plain, gated, length-grouped, bf16) and write train_bench.json.
    With --inputs dev: time the run on its own dev texts in PyTorch and ONNX Runtime (docs/export.md).
    """
    from .bench import BENCH_FILE, run_bench
    from .measure import result_path
    from .serve_bench import INPUTS, SERVE_BENCH_FILE, parse_runtimes, run_serve_bench

    if inputs not in INPUTS:
        raise DynbertError(f"--inputs {inputs} is not one of {', '.join(INPUTS)}")
    if inputs == "dev" or runtime is not None:
        if inputs != "dev" or run is None:
            raise DynbertError("--runtime and --inputs dev time a trained run on its dev texts: pass --run RUN "
                               "--inputs dev")
        if train or model or data or dtype or schedule or device not in ("auto", "cpu"):
            raise DynbertError("--inputs dev times the run's fp32 model on the CPU at --batch-size: drop --train, "
                               "--model, --data, --dtype, --schedule and --device")
        run_serve_bench(run, runtimes=parse_runtimes(runtime), batch_sizes=batch_size or None, quick=quick,
                        threads=threads, out=out, console=stderr)
        typer.echo(result_path(out, SERVE_BENCH_FILE))
        return

    if train:
        from .train_bench import TRAIN_BENCH_FILE, run_train_bench

        if run is not None or dtype is not None or batch_size or schedule:
            raise DynbertError("--train times fp32 and bf16 training of one model itself at the loop's batch size: "
                               "drop --run, --dtype, --batch-size and --schedule")
        run_train_bench(quick=quick, data=data, model=model, device=device, threads=threads, out=out,
                        console=stderr)
        typer.echo(result_path(out, TRAIN_BENCH_FILE))
        return
    if data is not None:
        raise DynbertError("--data is for --train: the inference bench times random tokens")
    run_bench(quick=quick, model=model, run=run, device=device, dtype=dtype or "fp32", threads=threads, out=out,
              batch_sizes=batch_size or None, schedules=schedule or None, console=stderr)
    typer.echo(result_path(out, BENCH_FILE))


@app.command("inspect")
@user_errors
def inspect_command(run: Path = typer.Argument(..., help="A finished run folder."),
                    text: str = typer.Argument(None, help="The text to look at.", show_default=False),
                    text_b: str = typer.Argument(None, help="Pair tasks: the second text.", show_default=False),
                    input_path: str = typer.Option(None, "--input", help="Inspect the rows of this file instead: a "
                                                   "TSV with the task's header, one text per line, or - for stdin."),
                    limit: int = typer.Option(10, "--limit", min=1, help="With --input: at most this many rows."),
                    out: Path = typer.Option(None, "--out", help="Also draw it: file.png, .svg or .html (with "
                                             "--input: file-lineN.png for input line N).")):
    """Show what the pruned model does to one input: the tokens each layer keeps, their scores, the
    prediction and its FLOPs against the un-pruned model."""
    from .errors import check_writable_file
    from .inspection import PICTURE_FORMATS, print_inspection, write_picture

    if (text is None) == (input_path is None):
        raise DynbertError("pass the text to inspect, or --input FILE, but not both")
    if out is not None:
        check_writable_file(out, "--out", PICTURE_FORMATS)
    from .predictor import InputRow, finished_run, load, read_inputs

    _, spec = finished_run(run)
    rows = read_inputs(input_path, spec)[:limit] if input_path else [InputRow(0, text, text_b)]
    predictor = load(run)
    console = Console(highlight=False)
    written, truncated = [], 0
    for row in rows:
        inspection = predictor.inspect(row.text_a, row.text_b)
        truncated += inspection.prediction["truncated"]
        if input_path:
            console.rule(f"line {row.line}")
        print_inspection(console, inspection)
        if out is not None:
            path = out.with_name(f"{out.stem}-line{row.line}{out.suffix}") if input_path else out
            write_picture(inspection, path)
            written.append(path)
    if truncated:
        _say_truncated(truncated, len(rows), predictor.max_length)
    for path in written:
        typer.echo(path)


@app.command("predict")
@user_errors
def predict_command(run: Path = typer.Argument(..., help="A finished run folder."),
                    input_path: str = typer.Option(..., "--input", help="A TSV with the task's header, one text per "
                                                   "line (pair tasks: text_a<TAB>text_b), or - for stdin."),
                    out: Path = typer.Option(None, "--out", help="file.tsv or file.jsonl (default: stdout)."),
                    format: str = typer.Option(None, "--format",
                                               help="tsv or jsonl (default: --out's suffix, else tsv)."),
                    batch_size: int = typer.Option(None, "--batch-size", min=1, help="Default: the run's "
                                                   "train.eval_batch_size, the batches its evaluation used.")):
    """Predict with the pruned model (length-sorted batches, dropped tokens gathered away): labels,
    probabilities, tokens kept per layer and FLOPs per example. A summary goes to stderr."""
    import time

    from .errors import atomic_write_text, check_writable_file
    from .predictor import OUTPUT_FORMATS

    fmt = None if format is None else "." + format.strip().lower().lstrip(".")
    if fmt is not None and fmt not in OUTPUT_FORMATS:
        raise DynbertError(f"--format {format} is not one of tsv, jsonl")
    if out is not None:
        check_writable_file(out, "--out", OUTPUT_FORMATS)
        if fmt is not None and fmt != out.suffix.lower():
            raise DynbertError(f"--format {format} but --out {out} ends in {out.suffix}: pass one of them")
        fmt = out.suffix.lower()
    from .predictor import finished_run, format_records, load, read_inputs

    _, spec = finished_run(run)
    rows = read_inputs(input_path, spec)
    predictor = load(run)
    texts = [(row.text_a, row.text_b) if predictor.takes_pairs else row.text_a for row in rows]
    started = time.perf_counter()
    records = predictor.predict(texts, batch_size)
    seconds = time.perf_counter() - started
    truncated = sum(record["truncated"] for record in records)
    if truncated:
        _say_truncated(truncated, len(rows), predictor.max_length)
    ratio = sum(r["flops"] for r in records) / sum(r["baseline_flops"] for r in records)
    stderr.print(f"{len(records)} examples in {seconds:.2f} s ({len(records) / seconds:.1f} examples/s), "
                 f"mean FLOPs ratio {ratio:.3f} ({1 / ratio:.2f}× fewer than un-pruned)", highlight=False,
                 soft_wrap=True)
    text = format_records(records, rows, fmt or ".tsv", spec)
    if out is None:
        typer.echo(text, nl=False)
    else:
        atomic_write_text(out, text)
        typer.echo(out)


@app.command("export")
@user_errors
def export_command(run: Path = typer.Argument(..., help="A finished run folder."),
                   out: Path = typer.Option(..., "--out", help="The folder to write (new or empty)."),
                   format: str = typer.Option("hf", "--format", help="hf: a transformers folder that loads pruned "
                                              "with trust_remote_code=True; onnx: model.onnx for ONNX Runtime."),
                   quantize: str = typer.Option(None, "--quantize", help="With --format onnx: int8 also writes "
                                                "model.int8.onnx (onnxruntime's dynamic quantization)."),
                   check: bool = typer.Option(True, "--check/--no-check", help="Compare the export with dynbert's "
                                              "hard mode on the run's dev set (printed, and in export.json).")):
    """Export the pruned model to serve it without dynbert: a transformers folder, or ONNX (docs/export.md)."""
    from .export import export_run

    export_run(run, out, fmt=format, quantize=quantize, check=check, console=stderr)
    typer.echo(out)


def _say_truncated(truncated: int, total: int, max_length: int) -> None:
    one = truncated == 1
    what = "the input" if total == 1 else f"{truncated} of {total} inputs"
    stderr.print(f"[yellow]note:[/] {what} {'is' if one else 'are'} longer than the run's {max_length} tokens "
                 f"(task.max_length) and {'was' if one else 'were'} cut to that length", highlight=False,
                 soft_wrap=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
