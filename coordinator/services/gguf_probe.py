"""`python -m coordinator.services.gguf_probe FILE`: a stranger's GGUF file parsed by llama.cpp's own reader
(`gguf.GGUFReader`) in a child process, and what the export checks need printed as JSON.

The reader trusts the counts a file claims (an array of 2^62 elements loops for ever), so it never runs in the
coordinator's process: `probe` starts this program with an address-space limit and a deadline, and a file that
breaks either is refused."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

FIELDS = ("general.architecture", "general.alignment", "tokenizer.ggml.model")
HEADROOM = 1024**3  # the reader's own memory beside the file it maps
DEADLINE_S = 4.0  # an honest file's metadata parses in well under a second
BYTES_PER_S = 200_000_000  # the reader maps the file; only its metadata is read, at disk speed at worst


class ProbeFailed(Exception):
    pass


def facts(path: Path) -> dict[str, Any]:
    import gguf  # noqa: PLC0415

    reader = gguf.GGUFReader(path)
    fields = {name: reader.fields[name].contents() for name in FIELDS if name in reader.fields}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    return {"fields": fields, "tokens": len(tokens.data) if tokens is not None else 0, "kv": len(reader.fields),
            "data_offset": int(reader.data_offset),
            "tensors": [{"name": t.name, "shape": [int(d) for d in t.shape], "type": t.tensor_type.name,
                         "offset": int(t.data_offset), "bytes": int(t.n_bytes)} for t in reader.tensors]}


def _limits(size: int) -> None:
    memory = size + HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    seconds = int(DEADLINE_S + size / BYTES_PER_S)
    resource.setrlimit(resource.RLIMIT_CPU, (seconds, seconds + 1))


def probe(path: Path) -> dict[str, Any]:
    """The file's facts from a bounded child; `ProbeFailed` when it cannot be parsed within the bounds."""
    size = path.stat().st_size
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "PYTHONPATH", "HOME", "LANG")}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    try:
        done = subprocess.run([sys.executable, "-m", "coordinator.services.gguf_probe", str(path)], env=env,
                              cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, check=False,
                              timeout=DEADLINE_S + size / BYTES_PER_S, preexec_fn=lambda: _limits(size))
    except subprocess.TimeoutExpired:
        raise ProbeFailed("parsing it did not finish in time") from None
    if done.returncode != 0:
        return_code = done.returncode
        raise ProbeFailed(f"not a readable GGUF file (the reader stopped: {return_code})")
    try:
        return json.loads(done.stdout)
    except ValueError:
        raise ProbeFailed("not a readable GGUF file") from None


def main(argv: list[str]) -> int:
    try:
        found = facts(Path(argv[0]))
    except Exception as exc:  # noqa: BLE001 - any failure on a stranger's file is a refusal, said by the exit code
        print(exc.__class__.__name__, file=sys.stderr)
        return 3
    print(json.dumps(found))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
