"""`tunegrid-worker`: the provider's agent (arrives with the worker issue; this prints what exists)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("tunegrid-worker: the provider agent is not built yet (see the project's open issues).", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
