"""The dashboard in a real browser (headless Debian Chromium driven by Playwright) against a real coordinator
process, with data made through the real APIs: an admin logs in, sees the costs chart drawn from the
jobs that ran, filters jobs, opens a running job and sees its loss curve, cancels it, and logs out; a
customer's session cannot open an admin page. Screenshots of the main pages go to tests/artifacts/."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, update

from coordinator.db.tables import LeaseModel, utcnow
from tests.conftest import IN_CI
from tests.e2e.conftest import LiveServer
from tests.e2e.test_agent import submit
from tests.fakes import FakeAgent, adapter_archive

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
# Chromium as root in a container, on a machine without internet (see the env notes).
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).exists():
        if IN_CI:
            pytest.fail("CI=true needs Chromium (.ci/run installs Debian's chromium)")
        pytest.skip("no Chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright  # noqa: PLC0415

    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=30_000)
        yield instance
        instance.close()


def _database_url(server: LiveServer) -> str:
    return server.env.get("TUNEGRID_DATABASE_URL") or f"sqlite:///{server.env['TUNEGRID_DATA_DIR']}/tunegrid.db"


def seed(server: LiveServer) -> dict[str, str]:
    """Through the real APIs: one job trained (for 20 minutes, as far as billing knows) and succeeded, and one
    running with losses reported."""
    customer = server.new_key("customer", "alice")
    provider = server.new_key("provider", "pat")
    with httpx.Client(base_url=server.url, timeout=30) as http:
        agent = FakeAgent.register(http, provider)
        http.headers["Authorization"] = f"Bearer {customer}"
        done = submit(http, examples=12)
        a = agent.claim(wait_s=5)
        assert a is not None and a["job_id"] == done["id"]
        for step, loss in enumerate((2.4, 2.0, 1.7), start=1):
            agent.progress(a["lease_id"], step=step, loss=loss)
        engine = create_engine(_database_url(server))
        with engine.begin() as conn:
            conn.execute(update(LeaseModel).where(LeaseModel.id == a["lease_id"]).values(
                training_started_at=utcnow() - timedelta(minutes=20)))
        engine.dispose()
        adapter = adapter_archive()
        agent.upload(a["lease_id"], "adapter", adapter)
        assert agent.complete(a["lease_id"], adapter, loss=1.7, usage={"wall_seconds": 1300.0, "gpu_seconds": 1250.0}).status_code == 200
        running = submit(http, examples=12)
        b = agent.claim(wait_s=5)
        assert b is not None and b["job_id"] == running["id"]
        for step, loss in enumerate((2.6, 2.2, 1.9, 1.8), start=1):
            agent.progress(b["lease_id"], step=step, loss=loss)
        for temperature in (58.0, 66.0, 71.0):
            assert agent.heartbeat("working", lease_id=b["lease_id"], gpus=[
                {"uuid": "GPU-0", "utilization_pct": 97.0, "temperature_c": temperature}]).status_code == 200
    return {"customer": customer, "done": done["id"], "running": running["id"], "worker": agent.worker_id}


@pytest.mark.live
@pytest.mark.parametrize("backend", ["sqlite"])
def test_an_admin_watches_and_acts_and_a_customer_cannot(live_server: LiveServer, browser) -> None:  # type: ignore[no-untyped-def]
    data = seed(live_server)
    admin = live_server.new_key("admin", "root")
    ARTIFACTS.mkdir(exist_ok=True)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(15_000)

    page.goto(f"{live_server.url}/admin/costs")
    assert page.url.startswith(f"{live_server.url}/login")  # no session: the login page, no data
    page.fill("#api_key", admin)
    page.click("#login")
    page.wait_for_url("**/admin/costs")
    bars = page.locator("#spend-chart svg rect.bar")
    assert bars.count() == 30
    heights = [float(bars.nth(i).get_attribute("height") or 0) for i in range(bars.count())]
    assert max(heights) > 0 and sorted(heights)[-2] == 0  # today's spend, drawn; the other days empty
    assert page.inner_text("#spend") != "$0.00"
    page.screenshot(path=str(ARTIFACTS / "admin-costs.png"), full_page=True)

    page.goto(f"{live_server.url}/admin/fleet")
    assert data["worker"] in page.inner_text("#fleet")
    assert page.locator("#fleet svg.spark").count() == 2  # temperature and utilisation from its heartbeats
    page.screenshot(path=str(ARTIFACTS / "admin-fleet.png"), full_page=True)

    page.goto(f"{live_server.url}/admin/jobs")
    page.select_option("#status", "running")
    page.click("#filter")
    page.wait_for_url("**/admin/jobs?status=running**")
    rows = page.locator("#jobs tr")
    assert rows.count() == 2 and data["running"] in rows.nth(1).inner_text()
    page.screenshot(path=str(ARTIFACTS / "admin-jobs.png"), full_page=True)

    page.click(f"text={data['running']}")
    page.wait_for_url(f"**/admin/jobs/{data['running']}")
    curve = page.locator("#loss-chart svg path.line-0")
    assert curve.count() == 1 and (curve.get_attribute("d") or "").count("L") == 3  # four steps
    assert page.inner_text("#job-status") == "running"
    page.screenshot(path=str(ARTIFACTS / "admin-job.png"), full_page=True)
    page.click("#cancel-job")
    page.wait_for_url(f"**/admin/jobs/{data['running']}")
    assert page.inner_text("#job-status") == "cancelled"

    page.click("#logout")
    page.wait_for_url("**/login")
    page.goto(f"{live_server.url}/admin/jobs")
    assert page.url.startswith(f"{live_server.url}/login")

    page.fill("#api_key", data["customer"])
    page.click("#login")
    page.wait_for_url("**/dashboard")
    assert data["done"] in page.inner_text("main")
    page.screenshot(path=str(ARTIFACTS / "customer-dashboard.png"), full_page=True)
    response = page.goto(f"{live_server.url}/admin/costs")
    assert response is not None and response.status == 403
    assert "for admins" in page.inner_text("main")
    context.close()
