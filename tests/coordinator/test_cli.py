"""`tunegrid-coordinator keys create` and `migrate`: the key is printed once, on the last line, and works;
`credits grant` grants once per key; `ledger audit` checks the books."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session

from coordinator.cli import main
from coordinator.db.tables import Book, Role
from coordinator.services import ledger
from coordinator.services.keys import authenticate
from coordinator.settings import CoordinatorSettings
from shared.money import usd_to_micros


@pytest.mark.parametrize("role", [r.value for r in Role])
def test_keys_create_prints_the_bare_key_last(role: str, settings: CoordinatorSettings, session: Session,
                                              monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TUNEGRID_DATABASE_URL", settings.resolved_database_url)
    monkeypatch.setenv("TUNEGRID_DATA_DIR", str(settings.data_dir))
    assert main(["migrate"]) == 0
    assert main(["keys", "create", "--role", role, "--name", "someone"]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    account = authenticate(session=session, key=key)
    assert account.role.value == role and account.name == "someone"


def test_unknown_role_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["keys", "create", "--role", "root", "--name", "x"])
    assert exited.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_credits_grant_once_per_key_and_the_ledger_audits_clean(
    settings: CoordinatorSettings, session: Session, customer, monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("TUNEGRID_DATABASE_URL", settings.resolved_database_url)
    monkeypatch.setenv("TUNEGRID_DATA_DIR", str(settings.data_dir))
    grant = ["credits", "grant", "--account", customer.account_id, "--amount", "12.50", "--key", "promo-1"]
    assert main(grant) == 0
    assert "Granted $12.500000" in capsys.readouterr().out
    assert main(grant) == 0  # the same key again: nothing changes
    assert "already made" in capsys.readouterr().out
    assert ledger.balance(session, Book.customer_available, customer.account_id) == usd_to_micros("112.50")
    assert main(["credits", "grant", "--account", customer.account_id, "--amount", "1.0000001"]) == 2
    assert main(["credits", "grant", "--account", "acct-nobody", "--amount", "1"]) == 2
    assert main(["credits", "grant", "--account", customer.account_id, "--amount", "-1"]) == 2
    assert "positive" in capsys.readouterr().err
    assert main(["ledger", "audit"]) == 0
    assert "postings total: 0 micro-dollars" in capsys.readouterr().out
