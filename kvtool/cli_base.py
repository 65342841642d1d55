"""What both command modules share (kvtool.cli: profile, inspect, calibrate, merge, cache; kvtool.cli_run: run,
bench): the typer app, the two consoles, option checks and table/progress rendering. Neither command module imports
the other's code; kvtool.cli imports kvtool.cli_run once, to register its commands on the app."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from kvtool.errors import KvtoolError
from kvtool.textsafe import plain, shown


def _bare_flags(params):
    """typer shows every option's type (`<int>`, `<path>`); a flag takes no value, so it shows none."""
    for p in params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""
    return params


class _Command(typer.core.TyperCommand):
    def get_params(self, ctx):
        return _bare_flags(super().get_params(ctx))


class _Group(typer.core.TyperGroup):
    def get_params(self, ctx):
        return _bare_flags(super().get_params(ctx))


app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Offline KV-cache profiling and calibration for LLMs.")
out = Console(highlight=False, emoji=False)          # emoji=False: `streaming:-1:5` is text, not an emoji code
err = Console(stderr=True, highlight=False, emoji=False)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _writable_target(path: Path) -> Path:
    """Refuse an output path we could not write, before any expensive work."""
    if path.is_dir():
        raise KvtoolError(f"output path {path} is a directory; give a file name such as {path / 'model.kv.st'}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise KvtoolError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise KvtoolError(f"cannot write {path}: directory {parent} is not writable")
    from kvtool.fileio import sweep_stale

    sweep_stale(parent)              # temporary files of an earlier run that was killed (SIGKILL) mid-write
    return path


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=err, transient=True)


def _table(title: str, rows: list[dict]) -> Table:
    """Cells are plain text (never markup, control characters shown) and are folded onto more lines, never cut,
    when the terminal (or a pipe, 80 columns) is too narrow: two long policy names always stay distinguishable."""
    table = Table(title=shown(title), title_justify="left")
    for col in rows[0]:
        table.add_column(shown(col), justify="left" if col == "cache" else "right", overflow="fold")
    for r in rows:
        table.add_row(*(Text(plain(v)) for v in r.values()))
    return table


def _default_output(model: Optional[str], method: Optional[str] = None) -> Path:
    """`smollm2.kv.st` for the embedded model (not the shipped profile's name, so the two are never confused),
    else `<model directory or file stem>.kv.st`; a calibration without --profile adds `.<method>`."""
    stem = "smollm2" if model is None else Path(model.rstrip("/")).name.lower().removesuffix(".gguf")
    return Path(f"{stem}.{method}.kv.st" if method else f"{stem}.kv.st")
