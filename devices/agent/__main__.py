"""`python -m devices.agent serve ...`: the agent without the rest of the CLI (what
`start_local_agent` runs; the same options as `lfm2-nas agent serve`)."""

from __future__ import annotations

import sys

from devices.agent_cli import agent_app
from lfm2.errors import UserError


def main(argv: list[str] | None = None) -> None:
    try:
        agent_app(args=argv, prog_name="python -m devices.agent")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
