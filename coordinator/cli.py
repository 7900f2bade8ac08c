"""`tunegrid-coordinator`: serve the API, migrate the database, create API keys."""

from __future__ import annotations

import argparse
import sys

from coordinator.db.models import Role
from coordinator.settings import CoordinatorSettings


def _migrate(settings: CoordinatorSettings) -> None:
    from coordinator.db.migrate import upgrade_head

    upgrade_head(settings.resolved_database_url)


def cmd_serve(args: argparse.Namespace, settings: CoordinatorSettings) -> int:
    import uvicorn

    if settings.should_auto_migrate:
        _migrate(settings)  # once, before any worker process starts
    uvicorn.run(
        "coordinator.app:create_app", factory=True, host=args.host or settings.host, port=args.port or settings.port,
        workers=args.workers, log_level=settings.log_level, timeout_graceful_shutdown=10,
    )
    return 0


def cmd_migrate(_: argparse.Namespace, settings: CoordinatorSettings) -> int:
    _migrate(settings)
    print(f"database at head: {settings.resolved_database_url.split('@')[-1]}")
    return 0


def cmd_keys_create(args: argparse.Namespace, settings: CoordinatorSettings) -> int:
    from coordinator.db.engine import make_engine, make_sessionmaker
    from coordinator.services.keys import create_account_with_key

    if settings.should_auto_migrate:
        _migrate(settings)
    engine = make_engine(settings)
    with make_sessionmaker(engine)() as session:
        created = create_account_with_key(session=session, name=args.name, role=Role(args.role))
        session.commit()
    engine.dispose()
    print(f"Created {args.role} account {created.account.id} ({args.name}), key {created.api_key.id}.")
    print("Store this key now; it is not shown again:")
    print(created.key)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunegrid-coordinator", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the API server (uvicorn)")
    serve.add_argument("--host", default=None, help="default: TUNEGRID_HOST")
    serve.add_argument("--port", type=int, default=None, help="default: TUNEGRID_PORT")
    serve.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    serve.set_defaults(func=cmd_serve)

    migrate = sub.add_parser("migrate", help="upgrade the database schema to head (Alembic)")
    migrate.set_defaults(func=cmd_migrate)

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser("create", help="create an account and its key; prints the key once, on the last line")
    create.add_argument("--role", required=True, choices=[r.value for r in Role])
    create.add_argument("--name", required=True)
    create.set_defaults(func=cmd_keys_create)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args, CoordinatorSettings())


if __name__ == "__main__":
    sys.exit(main())
