"""The `lfm2-nas` command line. Each package contributes its own commands through a
`register(app)` function; this module only assembles them and turns an error raised on purpose into a clear
message and its exit status (`lfm2.errors`: 2 for bad input, 4 for a failed environment)."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

from lfm2.errors import LfmNasError, exit_with

app = typer.Typer(
    name="lfm2-nas",
    help="Hardware-in-the-loop architecture search for LFM2-style hybrid language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


_registered = False


def _register_commands() -> None:
    global _registered
    if _registered:  # main() may be called many times in one process (tests, scripts)
        return
    _registered = True
    from lfm2 import cli as lfm2_cli
    from nas import export_cli, predict_cli, search_cli
    from nas.quality import cli as quality_cli
    from search_space import cli as space_cli
    from devices import agent_cli, bench_cli, cache_cli
    from reports import cli as reports_cli

    for module in (lfm2_cli, search_cli, predict_cli, space_cli, agent_cli, export_cli, reports_cli, bench_cli, cache_cli, quality_cli):
        module.register(app)


@app.callback()
def _root() -> None:
    """Hardware-in-the-loop architecture search for LFM2-style hybrid language models."""


def main(argv: list[str] | None = None) -> None:
    _register_commands()
    try:
        app(args=argv, prog_name="lfm2-nas")
    except LfmNasError as exc:
        console, label = Console(stderr=True), exc.label

        def write(message: str) -> None:  # the label in red; the message escaped (it may quote `.[extra]`)
            console.print(f"[bold red]{label}:[/]" + escape(message.removeprefix(label + ":")), highlight=False, soft_wrap=True)

        exit_with(exc, write)


if __name__ == "__main__":
    main()
