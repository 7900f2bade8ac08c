"""The tests mirror the code: each module of `coordinator/`, `worker/`, `shared/` and `client/` has its test file at
the same path under `tests/` (`coordinator/services/leases.py` → `tests/coordinator/services/test_leases.py`;
the trainer's under `tests/trainer/`), or is named below with the test file that exercises it and why it has
none of its own. A new module without either fails here."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("coordinator", "worker", "shared", "client")
MOVED = {"worker/trainer/": "trainer/"}  # the trainer runs in its own container: its tests are a package of their own

# module -> where it is tested instead (declarations, wiring and glue, tested through what uses them)
TESTED_ELSEWHERE: dict[str, str] = {
    "client/api.py": "tests/client/test_cli.py",  # the CLI's HTTP client, through every command
    "coordinator/api/catalog.py": "tests/coordinator/api/test_openai_schemas.py",  # /v1/models against OpenAI's schema
    "coordinator/api/deps.py": "tests/coordinator/api/test_access.py",  # who may call what, every route
    "coordinator/api/limits.py": "tests/coordinator/api/test_rate_limits.py",
    "coordinator/api/providers.py": "tests/coordinator/services/test_payouts.py",  # onboarding over HTTP
    "coordinator/app.py": "tests/coordinator/api/test_errors.py",  # the app's routes and error envelopes
    "coordinator/services/fencing.py": "tests/coordinator/services/test_leases.py",  # stale tokens, others' leases
    "coordinator/background.py": "tests/coordinator/test_tasks.py",
    "coordinator/dashboard/charts.py": "tests/coordinator/dashboard/test_admin.py",
    "coordinator/dashboard/pages.py": "tests/coordinator/dashboard/test_auth.py",  # the guard every page uses
    "coordinator/dashboard/sessions.py": "tests/coordinator/dashboard/test_auth.py",
    "coordinator/db/engine.py": "tests/coordinator/db/test_migrations.py",
    "coordinator/db/ids.py": "tests/coordinator/services/test_job_states.py",
    "coordinator/db/migrate.py": "tests/coordinator/db/test_migrations.py",
    "coordinator/db/tables.py": "tests/coordinator/db/test_migrations.py",  # the tables match the migrations
    "coordinator/dispatch.py": "tests/coordinator/test_hotstate.py",
    "coordinator/effects.py": "tests/coordinator/services/test_worker_states.py",
    "coordinator/heartbeat_flush.py": "tests/coordinator/api/test_workers.py",  # buffered, batched heartbeats
    "coordinator/services/paging.py": "tests/coordinator/api/test_jobs.py",  # cursor paging
    "coordinator/settings.py": "tests/coordinator/test_cli.py",
    "coordinator/s3store.py": "tests/coordinator/test_storage.py",  # every store case on the disk and on S3
    "coordinator/stores.py": "tests/coordinator/test_storage.py",
    "shared/digests.py": "tests/worker/test_files.py",
    "coordinator/stripe_gateway.py": "tests/coordinator/services/test_payouts.py",  # the SDK against the fake Stripe
    "shared/errors.py": "tests/coordinator/api/test_errors.py",
    "shared/jobspec.py": "tests/trainer/test_train.py",
    "coordinator/services/export_rows.py": "tests/coordinator/services/test_exports.py",  # both ways an export is made
    "coordinator/services/batch_rows.py": "tests/coordinator/services/test_batches.py",  # both ways a batch is made
    "coordinator/services/gguf_probe.py": "tests/security/test_export_attacks.py",  # a hostile GGUF, bounded
    "coordinator/api/batches.py": "tests/e2e/test_batches.py",  # through the openai client
    "worker/trainer/merge.py": "tests/trainer/test_export.py",  # the export program's merged format
    "worker/trainer/gguf_export.py": "tests/trainer/test_export.py",  # its GGUF formats, loaded in llama.cpp
    "shared/lora.py": "tests/shared/test_checkpoint.py",
    "shared/messages.py": "tests/shared/test_datasets.py",  # roles, tools and calls, line by line
    "shared/schemas/billing.py": "tests/coordinator/api/test_billing.py",
    "shared/schemas/common.py": "tests/coordinator/api/test_errors.py",
    "shared/schemas/batches.py": "tests/e2e/test_batches.py",  # through the openai client
    "shared/schemas/exports.py": "tests/coordinator/api/test_exports.py",
    "shared/schemas/files.py": "tests/coordinator/api/test_openai_schemas.py",
    "shared/schemas/jobs.py": "tests/coordinator/api/test_openai_schemas.py",
    "shared/schemas/models.py": "tests/coordinator/api/test_openai_schemas.py",
    "shared/schemas/quotes.py": "tests/coordinator/api/test_quotes.py",
    "shared/schemas/workers.py": "tests/coordinator/api/test_workers.py",
    "worker/cli.py": "tests/e2e/test_agent.py",  # registration and `run` as a real process
    "worker/runtimes/base.py": "tests/worker/test_agent.py",  # the interface the scripted runtime implements
    "worker/runtimes/process.py": "tests/security/test_hostile_trainer.py",
    "worker/settings.py": "tests/worker/test_agent.py",
    "worker/trainer/checkpoints.py": "tests/trainer/test_resume.py",
    "worker/trainer/errors.py": "tests/trainer/test_exit_codes.py",
    "worker/trainer/model.py": "tests/trainer/test_gradients_after_eval.py",
    "worker/trainer/progress.py": "tests/trainer/test_train.py",
    "worker/trainer/tiny.py": "tests/trainer/test_train.py",
}


def modules() -> list[str]:
    return sorted(p.relative_to(ROOT).as_posix() for package in PACKAGES for p in (ROOT / package).rglob("*.py")
                  if p.name not in ("__init__.py", "__main__.py"))


def mirror(module: str) -> Path:
    path = module
    for prefix, moved in MOVED.items():
        if path.startswith(prefix):
            path = moved + path.removeprefix(prefix)
    folder, _, name = path.rpartition("/")
    return ROOT / "tests" / folder / f"test_{name}"


def test_every_module_has_its_test_file_or_says_where_it_is_tested() -> None:
    missing = [m for m in modules() if not mirror(m).exists() and m not in TESTED_ELSEWHERE]
    assert missing == [], "add tests/<path>/test_<module>.py, or name where the module is tested in TESTED_ELSEWHERE"


def test_the_list_of_exceptions_stays_true() -> None:
    known = set(modules())
    stale = [m for m, where in TESTED_ELSEWHERE.items()
             if m not in known or mirror(m).exists() or not (ROOT / where).exists()]
    assert stale == []  # a module gone, one that now has its own file, or a test file that moved
