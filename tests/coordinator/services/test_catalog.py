"""`services/catalog.py` (OpenAI's Models API): every base model of the catalog, plus the caller's own fine-tuned
models once their job succeeded; someone else's, or one still training, is the same 404 as a missing one."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session

from coordinator.db.tables import AccountModel
from coordinator.services import catalog
from shared.catalog import CATALOG
from shared.errors import NotFound
from tests.fakes import ServiceAgent


def test_base_models_and_the_callers_succeeded_fine_tunes(session: Session, customer_account: AccountModel,  # type: ignore[no-untyped-def]
                                                          service_agent, new_job, make_caller) -> None:
    agent: ServiceAgent = service_agent()
    done = new_job(suffix="sums")
    a = agent.claim()
    assert a is not None
    agent.finish(a.lease_id)
    running = new_job(suffix="later")
    session.refresh(done)
    listed = catalog.list_models(session=session, account=customer_account)
    assert [m.id for m in listed] == [m.id for m in CATALOG] + [done.fine_tuned_model]
    tuned = catalog.get(session=session, account=customer_account, model_id=done.fine_tuned_model)  # type: ignore[arg-type]
    assert tuned.kind == "fine-tuned" and tuned.base_model == "tunegrid/tiny-llama" and tuned.owned_by == customer_account.id
    assert catalog.get(session=session, account=customer_account, model_id=CATALOG[0].id).kind == "base"
    bob = session.get(AccountModel, make_caller("customer", "bob").account_id)
    assert bob is not None
    assert [m.id for m in catalog.list_models(session=session, account=bob)] == [m.id for m in CATALOG]
    for account, model_id in ((bob, done.fine_tuned_model), (customer_account, f"ft:x:{running.id}"),
                              (customer_account, "gpt-9")):
        with pytest.raises(NotFound) as missing:
            catalog.get(session=session, account=account, model_id=model_id)  # type: ignore[arg-type]
        assert missing.value.code == "model_not_found"
