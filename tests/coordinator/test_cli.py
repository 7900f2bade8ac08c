"""`tunegrid-coordinator keys create` and `migrate`: the key is printed once, on the last line, and works."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session

from coordinator.cli import main
from coordinator.db.models import Role
from coordinator.services.keys import authenticate
from coordinator.settings import CoordinatorSettings


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
