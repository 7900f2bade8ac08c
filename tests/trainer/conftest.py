"""Trainer fixtures: the tiny Llama built once per session, and job directories with chat data."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from shared.jobspec import JobSpec
from tests.conftest import built_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return built_tiny_model(tmp_path_factory)


def arithmetic_chat(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 30), rng.randint(0, 30)
        rows.append({"messages": [
            {"role": "system", "content": "Reply with only the number."},
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": str(a + b)},
        ]})
    return rows


def write_job(job_dir: Path, model_dir: Path, *, train: list[dict], validation: list[dict] | None = None,
              **spec_fields) -> Path:  # type: ignore[no-untyped-def]
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    if validation is not None:
        (job_dir / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in validation))
    spec = JobSpec(job_id="ftjob-test", base_model="tunegrid/tiny-llama", model_dir=str(model_dir),
                   **{"max_seq_len": 256, "seed": 3, **spec_fields})
    (job_dir / "spec.json").write_text(spec.model_dump_json())
    return job_dir


def progress_lines(job_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (job_dir / "out" / "progress.jsonl").read_text().splitlines()]


def arithmetic_preferences(n: int, seed: int = 0) -> list[dict]:
    """Pairs that prefer the right sum, stated, over a wrong one: what DPO must learn to rank."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 30), rng.randint(0, 30)
        wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
        rows.append({"input": {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"}]},
                     "preferred_output": [{"role": "assistant", "content": f"The answer is {a + b}."}],
                     "non_preferred_output": [{"role": "assistant", "content": f"I think {wrong}, maybe."}]})
    return rows
