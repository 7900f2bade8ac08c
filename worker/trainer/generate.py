"""The batch program (`spec.kind == "batch"`): a batch's chat requests answered by the base model, with the job's
adapter loaded once when the batch runs a fine-tune, each request with the sampling it asked for.

Reads `spec.json`, `train.jsonl` (the batch's requests, `shared.batches` lines), `batch_done.jsonl` (custom_ids that
earlier leases answered: skipped), the base from `spec.model_dir` and `initial/adapter_model.safetensors` (a
fine-tune's adapter; absent for a base model's batch). Requests that sample alike (temperature, top_p, max_tokens,
stop) are generated together, left-padded, in batches of at most `GENERATION_SEQUENCES` prompts (8 on the CPU) and
`GENERATION_TOKENS` tokens (each prompt padded to the longest, plus its max_tokens: what placement sized the
lease's memory for, shared/memory.py); a request with a `seed` is generated alone after seeding,
so the same seed gives the same answer on the same machine. Answers go to `out/batch/part-N.jsonl` (what
`coordinator/services/batch_leases.py` reads) every few seconds, each announced by a `batch_part` progress line
the agent uploads; on SIGTERM the answers so far are written and the program exits preempted. `out/batch.json`
says it finished.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from shared.batches import BatchRequest, iter_requests
from shared.errors import InvalidFile
from shared.jobspec import JobSpec
from shared.memory import GENERATION_SEQUENCES, GENERATION_TOKENS
from worker.trainer import model as models
from worker.trainer.checkpoints import BadAdapter, load_adapter_weights
from worker.trainer.errors import UserError, WorkerError
from worker.trainer.progress import Progress

ADAPTER = Path("initial") / "adapter_model.safetensors"
PART_EVERY_S = 5.0
PART_MAX = 256  # answers a part holds at most
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")  # chat templates' turn ends, where present


class Parts:
    """Answers collected and written as numbered parts, atomically, each announced to the agent."""

    def __init__(self, folder: Path, progress: Progress) -> None:
        self.folder, self.progress = folder, progress
        folder.mkdir(parents=True, exist_ok=True)
        self.pending: list[dict[str, Any]] = []
        self.number, self.written, self.since = 0, 0, time.monotonic()

    def add(self, answer: dict[str, Any]) -> None:
        self.pending.append(answer)
        if len(self.pending) >= PART_MAX or time.monotonic() - self.since >= PART_EVERY_S:
            self.flush()

    def flush(self) -> None:
        self.since = time.monotonic()
        if not self.pending:
            return
        self.number += 1
        final = self.folder / f"part-{self.number}.jsonl"
        partial = final.with_suffix(".partial")
        partial.write_text("".join(json.dumps(a, ensure_ascii=False) + "\n" for a in self.pending))
        os.replace(partial, final)
        self.written += len(self.pending)
        self.progress.emit("batch_part", part=self.number, answers=len(self.pending), answered=self.written)
        self.pending = []


def _requests(job_dir: Path) -> list[BatchRequest]:
    try:
        with (job_dir / "train.jsonl").open("rb") as f:
            requests = [request for _, request in iter_requests(f)]
    except InvalidFile as exc:
        raise UserError(f"the batch's requests are invalid: {exc.message}") from None
    done_file = job_dir / "batch_done.jsonl"
    done: set[str] = set()
    if done_file.is_file():
        for raw in done_file.read_text().splitlines():
            if raw.strip():
                done.add(json.loads(raw)["custom_id"])
    return [r for r in requests if r.custom_id not in done]


def _groups(requests: list[BatchRequest], size: int) -> Iterator[list[BatchRequest]]:
    """Requests that sample alike, `size` at a time; a seeded request alone."""
    alike: dict[tuple[Any, ...], list[BatchRequest]] = {}
    for request in requests:
        s = request.sampling
        if s.seed is not None:
            yield [request]
            continue
        alike.setdefault((s.temperature, s.top_p, s.max_tokens, s.stop), []).append(request)
    for group in alike.values():
        for start in range(0, len(group), size):
            yield group[start:start + size]


def _within(prompts: list[tuple[BatchRequest, list[int]]], max_tokens: int) -> Iterator[list[tuple[BatchRequest, list[int]]]]:
    """The prompts in order, in pieces whose padded rows (the longest prompt, plus max_tokens) hold at most
    `GENERATION_TOKENS` tokens together; a prompt alone past that still goes (it fits the model's context)."""
    piece: list[tuple[BatchRequest, list[int]]] = []
    width = 0
    for prompt in prompts:
        wider = max(width, len(prompt[1]))
        if piece and (len(piece) + 1) * (wider + max_tokens) > GENERATION_TOKENS:
            yield piece
            piece, wider = [], len(prompt[1])
        piece.append(prompt)
        width = wider
    if piece:
        yield piece


def _generate(model, tokenizer, prompts: list[tuple[BatchRequest, list[int]]], sampling, *,  # type: ignore[no-untyped-def]
              device: torch.device, end: list[int], parts: Parts) -> None:
    """One left-padded piece of alike prompts through `model.generate`, each answer added to `parts`."""
    width = max(len(ids) for _, ids in prompts)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for _, ids in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for _, ids in prompts], device=device)
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    sample = sampling.temperature > 0
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=sampling.max_tokens,
                             do_sample=sample, temperature=sampling.temperature if sample else None,
                             top_p=sampling.top_p if sample else None, top_k=None, eos_token_id=end or None,
                             pad_token_id=pad, stop_strings=list(sampling.stop) or None,
                             tokenizer=tokenizer if sampling.stop else None)
    for row, (request, ids) in enumerate(prompts):
        new = out[row, width:].tolist()
        while new and new[-1] == pad and pad not in end:
            new.pop()
        parts.add(_answer(tokenizer, request, len(ids), new, end))


def _end_ids(tokenizer) -> list[int]:  # type: ignore[no-untyped-def]
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocabulary = tokenizer.get_vocab()
    ids.update(vocabulary[t] for t in END_OF_TURN if t in vocabulary)
    return sorted(ids)


def _answer(tokenizer, request: BatchRequest, prompt_tokens: int, new: list[int], end: list[int]) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    stopped = next((i for i, t in enumerate(new) if t in end), None)
    tokens = new[:stopped] if stopped is not None else new
    text = tokenizer.decode(tokens, skip_special_tokens=True).replace("\x00", "\ufffd")  # no store holds a NUL
    cut = min((i for i in (text.find(s) for s in request.sampling.stop) if i >= 0), default=None)
    if cut is not None:
        text = text[:cut]
    finish = "stop" if stopped is not None or cut is not None or len(tokens) < request.sampling.max_tokens else "length"
    return {"custom_id": request.custom_id, "content": text, "finish_reason": finish, "prompt_tokens": prompt_tokens,
            "completion_tokens": len(tokens)}


def run(spec: JobSpec, job_dir: Path, progress: Progress, stop: threading.Event | None = None) -> dict[str, Any]:
    """Answer the batch's remaining requests; {"answered", "parts"}, or {"preempted": True} after SIGTERM."""
    stop = stop or threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    model_dir = Path(spec.model_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"no model at {model_dir} (config.json missing)")
    todo = _requests(job_dir)
    device = models.device()
    progress.emit("started", kind="batch", total_steps=len(todo), device=str(device))
    parts = Parts(job_dir / "out" / "batch", progress)
    if not todo:
        return {"answered": 0, "parts": 0}
    tokenizer = models.load_tokenizer(model_dir)
    tokenizer.padding_side = "left"
    model = models.load_base(model_dir, quantization=spec.quantization, gradient_checkpointing=False,
                             attention="sdpa")
    if spec.initial_adapter:
        model = models.with_lora(model, spec)
        try:
            load_adapter_weights(model, job_dir / ADAPTER)
        except BadAdapter as exc:  # the coordinator checked it: a bad one here is this worker's problem
            raise WorkerError(f"the fine-tune's adapter cannot be loaded: {exc}") from None
    model.eval()
    end = _end_ids(tokenizer)
    size = GENERATION_SEQUENCES if device.type == "cuda" else 8
    for group in _groups(todo, size):
        if stop.is_set():
            parts.flush()
            return {"preempted": True}
        sampling = group[0].sampling
        prompts = []
        for request in group:
            ids = tokenizer.apply_chat_template(list(request.messages), add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            if len(ids) + sampling.max_tokens > spec.max_seq_len:
                parts.add({"custom_id": request.custom_id, "error": {
                    "code": "context_length_exceeded",
                    "message": f"the prompt's {len(ids)} tokens and max_tokens {sampling.max_tokens} exceed the "
                               f"model's {spec.max_seq_len}"}})
            else:
                prompts.append((request, list(ids)))
        for piece in _within(prompts, sampling.max_tokens):
            _generate(model, tokenizer, piece, sampling, device=device, end=end, parts=parts)
    parts.flush()
    return {"answered": parts.written, "parts": parts.number}
