"""`lfm2-nas space show` and `lfm2-nas space sample`: look at a search space and its costs."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from lfm2.backends import DEFAULT_BACKEND, default_quant
from lfm2.errors import UserError

space_app = typer.Typer(help="The search space: its choices, size, and sampled architectures with their costs.", no_args_is_help=True)

SPACE_OPTION = typer.Option("default", "--space", help="A built-in space (default, small) or the path of a .toml/.yaml space file.")


def _format_count(count: int) -> str:
    return f"{count:,}" if count < 10**12 else f"{count:.3e} ({count:,})"


@space_app.command("show")
def show(
    space: str = SPACE_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print the description as one JSON object."),
) -> None:
    """The ranges and operators of a space, its trial parameters and the number of distinct architectures."""
    from search_space.space import SearchSpace

    description = SearchSpace.load(space).describe()
    if as_json:
        typer.echo(json.dumps(description))
        return
    console = Console(width=max(Console().width, 120))
    console.print(f"[bold]{description['name']}[/]: {description['description']}  ({description['origin']})", highlight=False)
    table = Table(show_header=True)
    table.add_column("key")
    table.add_column("values")
    for key, value in description["fixed"].items():
        table.add_row(key, f"{value} (fixed)")
    for key, values in description["choices"].items():
        table.add_row(key, ", ".join(str(v) for v in values))
    for d_model, widths in description["ffn_widths"].items():
        table.add_row(f"ffn_dim at d_model {d_model}", ", ".join(str(w) for w in widths))
    console.print(table)
    console.print(f"distinct architectures: {_format_count(description['architectures'])}", highlight=False)
    console.print(f"parameters: {description['parameters_min']:,} to {description['parameters_max']:,}", highlight=False)
    console.print(f"trial parameters: {len(description['trial_parameters'])} ({', '.join(description['trial_parameters'])})", highlight=False)
    console.print(f"presets in the space: {', '.join(description['presets_in_space']) or 'none'}", highlight=False)


@space_app.command("sample")
def sample(
    n: int = typer.Option(5, "--n", help="How many architectures to draw."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random sampler: the same seed gives the same architectures."),
    space: str = SPACE_OPTION,
    context: int | None = typer.Option(None, "--context", help="Context (tokens) for FLOPs, KV cache and memory [default: min(2048, the space's max_seq_len)]."),
    backend: str = typer.Option(DEFAULT_BACKEND, "--backend", help="Runtime for the memory estimate: executorch, onnx, llamacpp or eager."),
    quant: Optional[str] = typer.Option(None, "--quant", help="Precision for the memory estimate: 8da4w|fp32 (executorch), int8|fp32 (onnx), q4_0|q8_0|f16 (llamacpp) [default: the first, what ships; as search and bench]."),
) -> None:
    """Draw architectures at random from a space: one JSON line each, with the spec and its costs."""
    import optuna

    from search_space import costs
    from search_space.space import SearchSpace

    if n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    loaded = SearchSpace.load(space)
    context = context if context is not None else min(2048, loaded.definition.max_seq_len)
    if not 1 <= context <= loaded.definition.max_seq_len:
        raise UserError(f"--context must be between 1 and the space's max_seq_len ({loaded.definition.max_seq_len}), got {context}")
    quant = quant or default_quant(backend)
    costs.memory.check_backend_quant(backend, quant)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    for index in range(n):
        trial = study.ask()
        spec = loaded.sample(trial)
        row = {
            "index": index,
            "key": spec.key,
            "layout": spec.layout,
            "spec": spec.to_dict(),
            "params": trial.params,
            "costs": costs.describe(spec, context, backend, quant),
        }
        typer.echo(json.dumps(row))


def register(app: typer.Typer) -> None:
    app.add_typer(space_app, name="space")
