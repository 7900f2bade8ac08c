"""A fine-tune's evaluation: the first prompts of its validation file answered by the base and by the fine-tune,
side by side with the reference answers, as two batches on the fleet (billed like any batch) when the job
succeeds; the job's dashboard page shows them. Asked for at creation (`evaluation: {"examples": N}`, a validation
file needed).

Each prompt is an example's conversation up to its last assistant turn (a preference pair's input; a
prompt/completion pair's prompt as a user turn), the reference that turn (the preferred answer; the completion);
examples with tools are left out (batches answer without tools). Greedy decoding, so the two answers compare.
"""

from __future__ import annotations

import io
import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.db.ids import new_id
from coordinator.db.tables import BatchRequestModel, FileModel, FileStatus, JobModel, utcnow
from coordinator.services import batch_rows, continuation, files
from coordinator.services.job_states import record_event
from coordinator.storage import BlobStore
from shared.batches import ENDPOINT, iter_requests
from shared.catalog import get_base_model
from shared.datasets import TrainingExample, iter_examples
from shared.errors import InvalidFile

MAX_EXAMPLES = 20
MAX_SHOWN = 2000  # characters of a prompt or reference kept for the page
MAX_TOKENS = 128


def _pair(example: TrainingExample) -> tuple[list[dict[str, Any]], str] | None:
    """(prompt messages, reference) of one validation example, or None when it cannot be a batch request."""
    if example.uses_tools:
        return None
    if example.format == "prompt_completion":
        return [{"role": "user", "content": example.prompt}], example.completion
    if example.format == "preference":
        assert example.chosen is not None
        return [m.for_template() for m in example.messages], example.chosen.content or ""
    last = max((i for i, m in enumerate(example.messages) if m.role == "assistant"), default=None)
    if last is None or last == 0 or example.messages[last - 1].role == "assistant":
        return None  # a prompt must end with a turn to answer
    return [m.for_template() for m in example.messages[:last]], example.messages[last].content or ""


def _lines(model: str, prompts: list[list[dict[str, Any]]]) -> bytes:
    return b"".join(json.dumps({"custom_id": f"eval-{i}", "method": "POST", "url": ENDPOINT, "body": {
        "model": model, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}},
        ensure_ascii=False).encode() + b"\n" for i, messages in enumerate(prompts))


def _file(session: Session, store: BlobStore, parent: JobModel, model: str, lines: bytes, prompts: int,
          which: str) -> FileModel:
    file = FileModel(id=new_id("file-"), account_id=parent.account_id, filename=f"{parent.id}-evaluation-{which}.jsonl",
                     purpose="batch", bytes=0, sha256="", status=FileStatus.processed, format="batch",
                     examples=prompts, estimated_tokens=len(lines) // 4 + MAX_TOKENS * prompts, model=model,
                     created_at=utcnow())
    blob = store.put(files.blob_key(file.id), io.BytesIO(lines))
    file.bytes, file.sha256 = blob.bytes, blob.sha256
    session.add(file)
    session.flush()
    return file


def queue_asked(*, session: Session, store: BlobStore, parent: JobModel, result: FileModel) -> None:
    """A fine-tuning job that asked for an evaluation has just succeeded with `result` (its adapter, linked, not
    yet committed): its two batches, queued without a hold (the budgets sweep places one)."""
    asked = parent.evaluation or {}
    if not asked.get("examples") or asked.get("base_batch_id") or parent.validation_file_id is None:
        return
    validation = session.get(FileModel, parent.validation_file_id)
    pairs: list[tuple[list[dict[str, Any]], str]] = []
    if validation is not None:
        for _, example in iter_examples(store.iter_lines(files.blob_key(validation.id), max_line=files.MAX_LINE_BYTES)):
            pair = _pair(example)
            if pair is not None:
                pairs.append(pair)
            if len(pairs) >= min(int(asked["examples"]), MAX_EXAMPLES):
                break
    if not pairs:
        parent.evaluation = {**asked, "skipped": "no validation example without tools to evaluate"}
        return
    prompts = [messages for messages, _ in pairs]
    base = get_base_model(parent.model)
    inputs = {"base": (base.id, _lines(base.id, prompts)),
              "tuned": (parent.fine_tuned_model or "", _lines(parent.fine_tuned_model or "", prompts))}
    try:  # checked before anything is made: an evaluation never stands in the way of the job's success
        for _, lines in inputs.values():
            if any(len(raw) > files.MAX_LINE_BYTES for raw in lines.splitlines()):
                raise InvalidFile("an evaluation prompt is longer than a batch line may be", param="file")
            list(iter_requests(lines.splitlines()))
    except InvalidFile as exc:
        parent.evaluation = {**asked, "skipped": f"the validation prompts cannot be batched: {exc.message}"}
        record_event(session=session, job=parent, level="warn", message=f"Evaluation skipped: {exc.message}")
        return
    tuned_start = continuation.Start(parent=parent, key=files.blob_key(result.id), sha256=result.sha256,
                                     member=continuation.ADAPTER_MEMBER, step=None)
    made = {}
    for which, start in (("base", None), ("tuned", tuned_start)):
        model, lines = inputs[which]
        file = _file(session, store, parent, model, lines, len(prompts), which)
        batch = batch_rows.new_batch(session=session, store=store, file=file, base=base, start=start,
                                     max_price=parent.max_price_per_gpu_hour)
        batch_rows.queue(session=session, batch=batch, message=f"Evaluation of {parent.id} ({which}): "
                         f"{len(prompts)} validation prompts queued")
        made[which] = batch.id
    parent.evaluation = {**asked, "base_batch_id": made["base"], "tuned_batch_id": made["tuned"], "references": [
        {"custom_id": f"eval-{i}", "prompt": (messages[-1].get("content") or "")[:MAX_SHOWN],
         "reference": reference[:MAX_SHOWN]} for i, (messages, reference) in enumerate(pairs)]}
    record_event(session=session, job=parent, message=f"Evaluation queued: {len(prompts)} validation prompts through "
                 f"the base ({made['base']}) and the fine-tune ({made['tuned']})", data=made)


def side_by_side(session: Session, job: JobModel) -> list[dict[str, Any]]:
    """The evaluation's rows for the job's page: prompt, the base's answer, the fine-tune's, the reference."""
    state = job.evaluation or {}
    if not state.get("base_batch_id"):
        return []
    answers: dict[tuple[str, str], str | None] = {}
    for row in session.scalars(select(BatchRequestModel).where(
            BatchRequestModel.job_id.in_([state["base_batch_id"], state["tuned_batch_id"]]))):
        which = "base" if row.job_id == state["base_batch_id"] else "tuned"
        answers[(which, row.custom_id)] = row.content if row.status == "completed" else (
            None if row.status == "pending" else f"({(row.error or {}).get('code', 'failed')})")
    return [{**r, "base": answers.get(("base", r["custom_id"])), "tuned": answers.get(("tuned", r["custom_id"]))}
            for r in state.get("references", [])]
