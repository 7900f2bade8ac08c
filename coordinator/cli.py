"""`tunegrid-coordinator`: serve the API, migrate the database, create API keys, grant credit, audit the ledger."""

from __future__ import annotations

import argparse
import sys

from coordinator.db.tables import Role
from coordinator.settings import CoordinatorSettings


def _migrate(settings: CoordinatorSettings) -> None:
    from coordinator.db.migrate import upgrade_head

    upgrade_head(settings.resolved_database_url)


def cmd_serve(args: argparse.Namespace, settings: CoordinatorSettings) -> int:
    import uvicorn

    if settings.should_auto_migrate:
        _migrate(settings)  # once, before any worker process starts
    from coordinator.request_ids import configure_logging

    configure_logging(json_lines=settings.json_logs, level=settings.log_level)
    # uvicorn's own logging config and access lines are off: coordinator/request_ids.py logs each request once,
    # with its id, through the same handler.
    uvicorn.run(
        "coordinator.app:create_app", factory=True, host=args.host or settings.host, port=args.port or settings.port,
        workers=args.workers, log_level=settings.log_level, timeout_graceful_shutdown=10, log_config=None,
        access_log=False,
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


def _session(settings: CoordinatorSettings):  # type: ignore[no-untyped-def]
    from coordinator.db.engine import make_engine, make_sessionmaker

    if settings.should_auto_migrate:
        _migrate(settings)
    return make_sessionmaker(make_engine(settings))()


def cmd_credits_grant(args: argparse.Namespace, settings: CoordinatorSettings) -> int:
    import secrets

    from coordinator.db.tables import AccountModel
    from coordinator.services import billing
    from shared.errors import TunegridError
    from shared.money import micros_to_usd, usd_to_micros

    try:
        amount = usd_to_micros(args.amount)
    except ValueError as exc:
        print(f"error: --amount {args.amount!r}: {exc}", file=sys.stderr)
        return 2
    with _session(settings) as session:
        account = session.get(AccountModel, args.account)
        if account is None:
            print(f"error: no account {args.account}", file=sys.stderr)
            return 2
        key = args.key or f"cli-{secrets.token_hex(8)}"
        try:
            posted = billing.grant(session=session, account=account, amount=amount, key=key, memo=args.memo)
        except TunegridError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return 2
        session.commit()
        available = billing.balance_of(session=session, account=account).available
    if posted is None:
        print(f"Grant {key} was already made; nothing changed. {account.id} has ${micros_to_usd(available)} available.")
    else:
        print(f"Granted ${micros_to_usd(amount)} to {account.id} ({account.name}); ${micros_to_usd(available)} available.")
    return 0


def cmd_workers_suspend(args: argparse.Namespace, settings: CoordinatorSettings) -> int:
    from coordinator.services import workers
    from shared.errors import TunegridError

    with _session(settings) as session:
        try:
            worker = workers.suspend(session=session, worker_id=args.worker, reason=args.reason, settings=settings)
        except TunegridError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return 2
        print(f"Suspended worker {worker.id} of provider {worker.account_id}: {args.reason}. New machines of that "
              "provider register suspended.")
    return 0


def cmd_ledger_audit(_: argparse.Namespace, settings: CoordinatorSettings) -> int:
    from coordinator.services import ledger

    with _session(settings) as session:
        result = ledger.audit(session)
    print(f"postings total: {result.total} micro-dollars; unbalanced transactions: {result.unbalanced_transactions}; "
          f"drifted balances: {len(result.drifted_balances)}")
    for book, owner, kept, summed in result.drifted_balances:
        print(f"  {book} {owner}: kept {kept}, postings sum {summed}")
    return 0 if result.ok else 1


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

    credits = sub.add_parser("credits", help="customer credit").add_subparsers(dest="credits_command", required=True)
    grant = credits.add_parser("grant", help="grant credit to a customer account (no Stripe needed)")
    grant.add_argument("--account", required=True, help="the account id (acct-...)")
    grant.add_argument("--amount", required=True, help="USD, e.g. 25 or 12.50")
    grant.add_argument("--memo", default="granted by an admin", help="shown in the customer's transactions")
    grant.add_argument("--key", default=None, help="idempotency key: the same key grants once (default: random)")
    grant.set_defaults(func=cmd_credits_grant)

    fleet = sub.add_parser("workers", help="providers' machines").add_subparsers(dest="workers_command", required=True)
    suspend = fleet.add_parser("suspend", help="suspend a worker: never placed again; its lease resumes elsewhere")
    suspend.add_argument("--worker", required=True, help="the worker id (wrk-...)")
    suspend.add_argument("--reason", default="suspended by an admin")
    suspend.set_defaults(func=cmd_workers_suspend)

    ledger = sub.add_parser("ledger", help="the double-entry ledger").add_subparsers(dest="ledger_command", required=True)
    audit = ledger.add_parser("audit", help="check that postings balance and kept balances match; exit 1 if not")
    audit.set_defaults(func=cmd_ledger_audit)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args, CoordinatorSettings())


if __name__ == "__main__":
    sys.exit(main())
