"""`python -m devices.agent serve ...`: the agent without the rest of the CLI (what
`start_local_agent` runs; the same options as `lfm2-nas agent serve`)."""

from __future__ import annotations

from devices.agent_cli import agent_app
from lfm2.errors import LfmNasError, exit_with


def main(argv: list[str] | None = None) -> None:
    try:
        agent_app(args=argv, prog_name="python -m devices.agent")
    except LfmNasError as exc:
        exit_with(exc)


if __name__ == "__main__":
    main()
