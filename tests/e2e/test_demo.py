"""`make demo`'s whole path (the same `demo.run.run`), checked at its end: the job succeeded and was charged,
the provider earned, the ledger balances, and the downloaded adapter loads and lowers the loss."""

from __future__ import annotations

from pathlib import Path

import pytest

from demo.run import run


@pytest.mark.live
def test_the_demo_runs_the_whole_marketplace(tmp_path: Path) -> None:
    result = run(tmp_path / "demo", quiet=True)
    assert result.job["status"] == "succeeded" and float(result.job["cost"]) > 0
    assert result.job["fine_tuned_model"].endswith(result.job["id"])
    assert float(result.earnings["lifetime_earned"]) > 0
    spent = float(result.job["cost"]) + float(result.used["export"]["cost"]) + float(result.used["batch"]["cost"])
    assert float(result.earnings["lifetime_earned"]) < spent  # the platform kept its fee
    assert result.used["export"]["status"] == "succeeded" and result.used["batch"]["status"] == "completed"
    assert "postings total: 0 micro-dollars; unbalanced transactions: 0; drifted balances: 0" in result.audit
    assert result.adapter.is_file() and result.adapter.stat().st_size > 0
    assert result.lora_parameters > 0 and result.loss_after < result.loss_before
