"""Verification benchmark: what independent verification costs as a share of the training it checks.

Measured on the tiny model (4-bit NF4 on this CPU), side by side in one run: the trainer on a job, then the
verification program on the same job (the base and the adapter on the held-out sample and the validation rows),
each as the subprocess the agent starts (`python -m worker.trainer --job DIR`), so model loading and Python start
count as they do for a worker. A verification lease is paid at the verifier's ask like training at the
trainer's, so the time share is the cost share (a dispute asks a second verifier: twice the share).

Then, from the estimator and the catalog, the same share for a 7B model on an RTX 3090: training tokens over
the reference QLoRA throughput, against two forward passes over the held-out and validation tokens at forward
throughput (a training step is about four forward passes' work with gradient checkpointing: forward, recompute,
and backward at twice a forward) plus the base model's load. For each, what `verification: "redundant"` costs
the customer and the platform: two trainings (the customer's) and four verifications (the platform's: two
concurring verifiers measure each training's held-out loss, since that figure decides which one is paid). Prints
figures; never passes or fails.

    python bench/verification.py [--examples 400] [--epochs 3] [--load-7b-s 60]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from coordinator.services.held_out import kept_back
from shared.catalog import get_base_model
from shared.jobspec import JobSpec
from shared.pricing import expected_tokens_per_s, get_gpu_class
from worker.trainer.tiny import build

FORWARDS_PER_TRAINING_STEP = 4


def chat(n: int, seed: int) -> list[dict]:  # type: ignore[type-arg]
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        rows.append({"messages": [{"role": "system", "content": "Reply with only the number."},
                                  {"role": "user", "content": f"What is {a} plus {b}?"},
                                  {"role": "assistant", "content": str(a + b)}]})
    return rows


def write(job: Path, model: Path, *, kind: str, train: list[dict], held: list[dict], epochs: int) -> None:  # type: ignore[type-arg]
    job.mkdir(parents=True)
    (job / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    if kind == "verify":
        (job / "held_out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
    spec = JobSpec(job_id="ftjob-bench", kind=kind, base_model="tunegrid/tiny-llama", model_dir=str(model),  # type: ignore[arg-type]
                   max_seq_len=256, seed=1, hyperparameters={"n_epochs": epochs, "batch_size": 4})  # type: ignore[arg-type]
    (job / "spec.json").write_text(spec.model_dump_json())


def timed(job: Path) -> tuple[float, float]:
    """(the subprocess's wall time, the time its program reported between starting work and finishing)."""
    began = time.monotonic()
    subprocess.run([sys.executable, "-m", "worker.trainer", "--job", str(job)], check=True, capture_output=True)
    wall = time.monotonic() - began
    lines = [json.loads(line) for line in (job / "out" / "progress.jsonl").read_text().splitlines()]
    at = {line["type"]: line["time"] for line in lines}
    return wall, at["finished"] - at["started"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--load-7b-s", type=float, default=60.0, help="assumed: read and quantize a 7B base")
    args = parser.parse_args()
    held_n = kept_back(args.examples)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = root / "tiny-llama"
        build(model)
        data, held = chat(args.examples - held_n, 1), chat(held_n, 2)
        write(root / "train", model, kind="train", train=data, held=held, epochs=args.epochs)
        train_s, train_work = timed(root / "train")
        write(root / "verify", model, kind="verify", train=data, held=held, epochs=args.epochs)
        (root / "verify" / "adapter").mkdir()
        shutil.copy(root / "train" / "out" / "adapter" / "adapter_model.safetensors", root / "verify" / "adapter")
        verify_s, verify_work = timed(root / "verify")
        figures = json.loads((root / "verify" / "out" / "verification.json").read_text())
    print(f"tiny model, {args.examples} examples ({held_n} held out), {args.epochs} epochs, this CPU:")
    print(f"  training   {train_s:7.1f} s   (the trainer subprocess, model load included)")
    print(f"  verifying  {verify_s:7.1f} s   = {100 * verify_s / train_s:.1f}% of training "
          f"({2 * 100 * verify_s / train_s:.1f}% when a dispute asks a second verifier)")
    print(f"  past start-up (Python, torch, the model load): training {train_work:.1f} s, verifying "
          f"{verify_work:.1f} s = {100 * verify_work / train_work:.1f}%")
    print(f"  redundant: the customer pays two trainings ({2 * train_s:.1f} s), the platform four verifications "
          f"({4 * verify_s:.1f} s, {2 * 100 * verify_s / train_s:.1f}% of the two trainings)")
    print(f"  figures: held-out loss {figures['heldout_base_loss']:.3f} -> {figures['heldout_adapter_loss']:.3f}, "
          f"validation {figures['valid_adapter_loss']:.3f}")

    base, gpu = get_base_model("mistral-7b-instruct-v0.3"), get_gpu_class("rtx-3090")
    tokens_per_example, examples, epochs = 500, 2000, 3
    held_7b = kept_back(examples)
    valid = int((examples - held_7b) * JobSpec.model_fields["validation_fraction"].default)
    train_tps = expected_tokens_per_s(base, gpu)
    train_7b = tokens_per_example * (examples - held_7b - valid) * epochs / train_tps
    eval_tokens = tokens_per_example * (held_7b + valid) * 2  # the base and the adapter
    verify_7b = args.load_7b_s + eval_tokens / (train_tps * FORWARDS_PER_TRAINING_STEP)
    print(f"{base.id} on a {gpu.label}, {examples} examples of {tokens_per_example} tokens, {epochs} epochs "
          f"(estimated, {train_tps:.0f} training tokens/s):")
    print(f"  training   {train_7b:7.0f} s")
    print(f"  verifying  {verify_7b:7.0f} s   = {100 * verify_7b / train_7b:.1f}% of training "
          f"({held_7b} held-out + {valid} validation examples, two forward passes, {args.load_7b_s:.0f} s to load)")
    print(f"  redundant: the customer pays {2 * train_7b:.0f} s of training (2.00x), the platform "
          f"{4 * verify_7b:.0f} s of verification ({2 * 100 * verify_7b / train_7b:.1f}% of the two trainings)")


if __name__ == "__main__":
    main()
