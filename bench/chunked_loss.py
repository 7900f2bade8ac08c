"""Chunked loss benchmark: peak memory and time of the next-token loss (forward and backward) at a real vocabulary,
side by side in one run: the whole batch's logits at once (the trainer's loss before issue 19) against the chunked
loss with recomputation (`worker/trainer/batches.losses_from_hidden`). Llama 3's vocabulary (128,256) and a
2,048-token row; the hidden size is smaller than an 8B model's (the head's weight is not what is measured). Each
case runs in a child process of its own, so its peak resident memory is its alone. Prints figures; never passes or
fails.

    python bench/chunked_loss.py [--vocab 128256] [--tokens 2048] [--hidden 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(mode: str, vocab: int, tokens: int, hidden: int, chunk: int) -> None:
    import torch

    from worker.trainer.batches import losses_from_hidden

    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    head.weight.requires_grad_(False)  # frozen, as the base's output head is under LoRA
    states = torch.randn(1, tokens, hidden, requires_grad=True)
    targets = torch.randint(0, vocab, (1, tokens))
    started = time.perf_counter()
    if mode == "whole":
        logits = head(states).float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    else:
        loss = losses_from_hidden(states, targets, head, chunk=chunk or None).sum()  # 0: the trainer's own
    loss.backward()
    seconds = time.perf_counter() - started
    import resource

    print(json.dumps({"loss": float(loss), "seconds": seconds,
                      "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "grad_norm": float(states.grad.norm())}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.vocab, args.tokens, args.hidden, int(args.child[1]))
        return
    rows = {}
    from shared.memory import loss_chunk_tokens  # noqa: PLC0415

    own = f"chunked, {loss_chunk_tokens(args.vocab)} (trainer's)"
    for name, mode, chunk in (("whole logits", "whole", 0), ("chunked, 1024 tokens", "chunked", 1024),
                              (own, "chunked", 0), ("chunked, 256 tokens", "chunked", 256)):
        done = subprocess.run([sys.executable, __file__, "--child", mode, str(chunk), "--vocab", str(args.vocab),
                               "--tokens", str(args.tokens), "--hidden", str(args.hidden)], cwd=ROOT, check=True,
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
    logits_mib = args.tokens * args.vocab * 4 / 2**20
    print(f"vocabulary {args.vocab}, {args.tokens} tokens, hidden {args.hidden} (float32 logits of the row: "
          f"{logits_mib:.0f} MiB); each case's own peak resident memory")
    print(f"{'':26} {'peak MiB':>9} {'seconds':>8} {'loss':>14} {'grad norm':>11}")
    for name, r in rows.items():
        print(f"{name:26} {r['peak_mib']:9.0f} {r['seconds']:8.2f} {r['loss']:14.2f} {r['grad_norm']:11.4f}")


if __name__ == "__main__":
    main()
