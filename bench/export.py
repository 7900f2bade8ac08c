"""Export benchmark: how long each export format takes and how large it is, side by side in one run, on the tiny
model and on a model of Qwen 2.5 0.5B's real shape (random bfloat16 weights, 494M parameters: no weights can be
downloaded here), each format as the subprocess the agent starts (`python -m worker.trainer --job DIR`), so Python
start and imports count as they do for a worker. Also the export program's peak memory against the model's size
(the merge streams a tensor at a time), and the coordinator's check of each upload (`export_checks`), which reads
every byte. Prints figures; never passes or fails.

    python bench/export.py [--skip-large]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from coordinator.services import export_checks
from shared.catalog import get_base_model
from shared.jobspec import JobSpec
from shared.lora import lora_shapes
from shared.weights import FORMATS, export_name, merged_member
from worker.jobdir import pack_folder

ROOT = Path(__file__).resolve().parent.parent

def build_qwen_shape(out: Path, tokenizer_from: Path) -> Path:
    """A random Qwen 2.5 0.5B (its config's figures) saved in bfloat16, with the tiny model's tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    base = get_base_model("qwen2.5-0.5b-instruct")
    config = Qwen2Config(vocab_size=base.vocab_size, hidden_size=base.hidden_size,
                         intermediate_size=base.intermediate_size, num_hidden_layers=base.layers,
                         num_attention_heads=base.attention_heads, num_key_value_heads=base.kv_heads,
                         tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1_000_000.0,
                         dtype="bfloat16")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tokenizer_from / name).is_file():
            shutil.copyfile(tokenizer_from / name, out / name)
    return out


def adapter(path: Path, model: str) -> None:
    """A random adapter (numpy: this process never imports torch)."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({n: (rng.standard_normal(s) * 0.01).astype(np.float32)
               for n, s in lora_shapes(get_base_model(model), r=16).items()}, str(path))


def run_format(model: str, model_dir: Path, fmt: str, root: Path) -> dict[str, float]:
    job = root / fmt.replace(":", "-")
    adapter(job / "initial" / "adapter_model.safetensors", model)
    spec = JobSpec(job_id="bench", kind="export", base_model=model, model_dir=str(model_dir), export=[fmt],
                   export_name="ft:bench")
    (job / "spec.json").write_text(spec.model_dump_json())
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "worker.trainer", "--job", str(job)], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    _, status, usage = os.wait4(child.pid, 0)  # this child's own peak memory, not the largest child's so far
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{model} {fmt} failed: {child.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
    peak_mib = usage.ru_maxrss / 1024
    output = job / "out" / "exports" / export_name(fmt)
    base = get_base_model(model)
    started = time.perf_counter()
    if fmt == "merged":
        archive = pack_folder(job, ("out", "exports", "merged"), job / "merged.tar", allowed=merged_member,
                              limit=2**40)  # as the agent packs it
        size = archive.stat().st_size
        export_checks.check_merged(archive, base)
    else:
        size = output.stat().st_size
        export_checks.check_gguf(output, base, fmt)
    checked = time.perf_counter() - started
    shutil.rmtree(job, ignore_errors=True)
    return {"seconds": seconds, "bytes": size, "peak_mib": peak_mib, "check_s": checked}


def table(model: str, model_dir: Path, root: Path) -> None:
    base = get_base_model(model)
    print(f"\n{model} ({base.parameters / 1e6:.1f}M parameters; 16-bit weights {2 * base.parameters / 2**20:.0f} MiB)")
    print(f"{'format':<12} {'seconds':>8} {'MiB':>9} {'MB/s out':>9} {'peak RSS MiB':>13} {'coord. check s':>15}")
    for fmt in FORMATS:
        f = run_format(model, model_dir, fmt, root)
        print(f"{fmt:<12} {f['seconds']:8.2f} {f['bytes'] / 2**20:9.1f} {f['bytes'] / 1e6 / f['seconds']:9.1f} "
              f"{f['peak_mib']:13.0f} {f['check_s']:15.2f}")


def _built(what: str, out: Path, *args: str) -> Path:
    """A model built in a child process: this one stays small, so its children's peak memory is theirs alone (a
    forked child starts out counting its parent's pages)."""
    subprocess.run([sys.executable, __file__, f"--build-{what}", str(out), *args], cwd=ROOT, check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip-large", action="store_true", help="only the tiny model")
    parser.add_argument("--build-tiny", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--build-qwen", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_tiny:
        from worker.trainer.tiny import build  # noqa: PLC0415

        build(args.build_tiny)
        return
    if args.build_qwen:
        build_qwen_shape(*args.build_qwen)
        return

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        tiny = _built("tiny", root / "tiny")
        print("Each format alone, as the agent runs the export program (Python start and imports included); the "
              "peak RSS is that run's own (it counts the pages of the base's file it maps).")
        table("tunegrid/tiny-llama", tiny, root)
        if not args.skip_large:
            started = time.perf_counter()
            qwen = _built("qwen", root / "qwen", str(tiny))
            print(f"\n(random Qwen 2.5 0.5B built in {time.perf_counter() - started:.1f} s)")
            table("qwen2.5-0.5b-instruct", qwen, root)
    print(json.dumps({"cpu_count": os.cpu_count()}))


if __name__ == "__main__":
    main()
