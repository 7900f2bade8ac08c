"""Trainer benchmark: tokens/s and peak memory of our QLoRA trainer against Hugging Face's, side by side on the same
model, data and LoRA, each run in a process of its own (so each peak is its own).

Runs (`--runs`, comma-separated):
- `ours`: our trainer as it runs on this device (flat batches through the varlen kernel on a GPU, dense masks on the
  CPU; the loss in chunks; 16-bit embeddings and head; non-reentrant checkpointing on a GPU);
- `ours-flat`, `ours-dense`: ours with the batch layout forced (what the CPU's choice rests on);
- `padded`: transformers `Trainer` + peft, the usual QLoRA recipe (`prepare_model_for_kbit_training`, SDPA), each
  batch padded to its longest example (DataCollatorForSeq2Seq);
- `flattening`: the same recipe with Hugging Face's padding-free packing (DataCollatorWithFlattening: a batch's
  examples in one row, kept apart by their position ids; SDPA builds the block mask from them);
- `flex`: `flattening` through transformers' FlexAttention (a block-sparse document mask), where it runs (CUDA);
- `dpo`: our DPO on the same examples made preference pairs (two sequences a pair, plus the reference pass).

Every run trains the same examples for the same number of optimizer steps (Hugging Face's batch size is chosen so).
Tokens/s counts real tokens (no padding) from the end of the first step to the end of the last (the first step
pays for kernels' warm-up), over the steps' wall time. Peak memory: `torch.cuda.max_memory_allocated` on a GPU,
the process's peak resident set on the CPU. On a GPU, model FLOPs utilisation (MFU) of the useful work, against
`--peak-tflops` (790: the bf16 matrix product measured on the lent H100/H200, ../shared/MEASURED.md):

    training FLOPs = 4 x linear parameters x tokens  +  3 x 4 x layers x heads x head_dim x (keys each token sees)

(the forward's 2 N T, the backward's 2 N T for activations only, the base being frozen; LoRA's own FLOPs, the
recomputation of checkpointing and the loss's chunks are not counted, as MFU conventionally does not). Shapes:
`small` (a 4-layer Llama, the CPU's), `llama-1b` (Llama 3.2 1B) and `llama-8b` (Llama 3.1 8B), random weights
built locally. Prints a table; `--json FILE` writes the figures. Never passes or fails.

    python bench/trainer.py [--shape small] [--examples 128] [--max-seq-len 256] [--batch-size 4] [--runs ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORDS = "the a model learns small fast data token gpu adapter worker job answer question number".split()
SHAPES = {  # Hugging Face LlamaConfig fields
    "small": {"hidden_size": 256, "intermediate_size": 682, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 4, "vocab_size": 640, "tie_word_embeddings": False},
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "tie_word_embeddings": True,
                 "rope_theta": 500000.0},
    "llama-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "tie_word_embeddings": False,
                 "rope_theta": 500000.0},
}
DEFAULT_RUNS = "ours,ours-flat,ours-dense,padded,flattening,dpo"


# -- setup (parent) ------------------------------------------------------------------------------------------------
def build_model(out: Path, shape: str, hidden: int | None = None) -> Path:
    """Random weights of the shape, in 16-bit, with the tiny model's tokenizer (its ids fit any vocabulary)."""
    import torch  # noqa: PLC0415
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    from worker.trainer.tiny import build_tokenizer  # noqa: PLC0415

    fields = dict(SHAPES[shape])
    if shape == "small" and hidden:
        fields.update(hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_attention_heads=hidden // 64,
                      num_key_value_heads=hidden // 64)
    config = LlamaConfig(**fields, max_position_embeddings=131072 if shape != "small" else 4096,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() and shape != "small" else "cpu"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(out, max_shard_size="20GB")
    del model
    build_tokenizer().save_pretrained(out)
    return out


def mixed_length_chat(n: int, *, mean_words: float, seed: int = 0) -> list[dict]:
    """Many short answers and a long tail (log-normal lengths), as real chat data has."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = int(rng.lognormvariate(math.log(mean_words), 0.9)) + 2
        rows.append({"messages": [
            {"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20)))},
            {"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(words))},
        ]})
    return rows


def preference_pairs(rows: list[dict], seed: int = 1) -> list[dict]:
    """Each chat example as a pair: its answer preferred over another example's."""
    rng = random.Random(seed)
    others = [r["messages"][1] for r in rows]
    rng.shuffle(others)
    return [{"input": {"messages": [r["messages"][0]]}, "preferred_output": [r["messages"][1]],
             "non_preferred_output": [other if other != r["messages"][1] else {**other, "content": other["content"] + " no"}]}
            for r, other in zip(rows, others)]


# -- one run (child) -----------------------------------------------------------------------------------------------
def _peak_bytes() -> dict[str, int]:
    """The training's peak: allocated by tensors (and reserved by PyTorch's allocator) on a GPU, from the start of
    training (both trainers reset it after loading); the process's resident set on the CPU."""
    import torch  # noqa: PLC0415

    if torch.cuda.is_available():
        return {"peak_bytes": int(torch.cuda.max_memory_allocated()),
                "peak_reserved_bytes": int(torch.cuda.max_memory_reserved())}
    return {"peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _steady(times: list[float], tokens: list[int]) -> float:
    """Tokens/s from the end of the first step to the end of the last (all of it when there is one step)."""
    if len(times) < 2:
        return float("nan")
    return (tokens[-1] - tokens[0]) / max(times[-1] - times[0], 1e-9)


def run_ours(job: Path, spec, layout: str | None) -> dict:  # type: ignore[no-untyped-def]
    from worker.trainer import attention  # noqa: PLC0415
    from worker.trainer.progress import Progress  # noqa: PLC0415
    from worker.trainer.train import Trainer  # noqa: PLC0415

    if layout is not None:
        attention.flat_layout = lambda device: layout == "flat"  # type: ignore[assignment]
    progress = Progress(job / "out" / "progress.jsonl")
    Trainer(spec, job, progress).run()
    progress.close()
    steps = [json.loads(line) for line in (job / "out" / "progress.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s["type"] == "step"]
    return {"steps": steps[-1]["step"], "tokens": steps[-1]["tokens"],
            "tokens_per_s": _steady([s["time"] for s in steps], [s["tokens"] for s in steps]), **_peak_bytes()}


def hf_qlora_model(spec, attention: str):  # type: ignore[no-untyped-def]
    """The usual Hugging Face QLoRA recipe: 4-bit base, `prepare_model_for_kbit_training`, peft LoRA."""
    import torch  # noqa: PLC0415
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    from worker.trainer import model as models  # noqa: PLC0415

    kwargs = {"dtype": models.compute_dtype(), "device_map": str(models.device()), "attn_implementation": attention}
    if spec.quantization == "nf4":
        kwargs["quantization_config"] = models.quantization_config()
    model = AutoModelForCausalLM.from_pretrained(spec.model_dir, **kwargs)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=torch.cuda.is_available())
    models.keep_4bit_weights_trainable(model)  # the CPU's eval trap (worker/trainer/model.py), for all alike
    return get_peft_model(model, LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                                            task_type="CAUSAL_LM", target_modules="all-linear"))


def run_hf(job: Path, spec, steps: int, collator_kind: str) -> dict:  # type: ignore[no-untyped-def]
    import torch  # noqa: PLC0415
    from transformers import (  # noqa: PLC0415
        DataCollatorForSeq2Seq, DataCollatorWithFlattening, Trainer, TrainerCallback, TrainingArguments,
    )

    from worker.trainer import data, model as models  # noqa: PLC0415

    tokenizer = models.load_tokenizer(Path(spec.model_dir))
    features = []
    for example in data.read_examples(job / "train.jsonl"):
        t = data.tokenize(example, tokenizer, max_seq_len=spec.max_seq_len, train_on_inputs=False)
        features.append({"input_ids": t.input_ids, "attention_mask": [1] * len(t.input_ids), "labels": t.labels})
    epochs = spec.hyperparameters.n_epochs
    batch = max(1, math.ceil(len(features) * epochs / steps))
    model = hf_qlora_model(spec, "flex_attention" if collator_kind == "flex" else "sdpa")
    inner = (DataCollatorForSeq2Seq(tokenizer, padding="longest") if collator_kind == "padded"
             else DataCollatorWithFlattening())
    consumed: list[int] = [0]

    def collate(rows):  # type: ignore[no-untyped-def]
        consumed.append(consumed[-1] + sum(len(r["input_ids"]) for r in rows))
        return inner(rows)

    marks: list[tuple[float, int]] = []

    class Marks(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks.append((time.perf_counter(), consumed[state.global_step]))

    args = TrainingArguments(output_dir=str(job / "baseline"), per_device_train_batch_size=batch,
                             num_train_epochs=epochs, learning_rate=spec.hyperparameters.learning_rate,
                             logging_steps=10_000, save_strategy="no", report_to=[],
                             use_cpu=not torch.cuda.is_available(), bf16=True, dataloader_num_workers=0,
                             disable_tqdm=True, seed=spec.seed)
    trainer = Trainer(model=model, args=args, train_dataset=features, data_collator=collate, callbacks=[Marks()])
    output = trainer.train()
    return {"steps": output.global_step, "tokens": consumed[-1], "batch_size": batch,
            "tokens_per_s": _steady([m[0] for m in marks], [m[1] for m in marks]), **_peak_bytes()}


def child(args: argparse.Namespace) -> None:
    from shared.jobspec import JobSpec  # noqa: PLC0415

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    spec = JobSpec.model_validate_json((Path(args.job) / "spec.json").read_text())
    job = Path(args.job)
    if args.child in ("ours", "ours-flat", "ours-dense", "dpo"):
        layout = {"ours-flat": "flat", "ours-dense": "dense"}.get(args.child)
        if args.child == "dpo":
            spec = spec.model_copy(update={"method": "dpo"})
        began = time.perf_counter()
        figures = run_ours(job, spec, layout)
        figures["wall_s"] = time.perf_counter() - began
    else:
        figures = run_hf(job, spec, args.steps, args.child)
    print("FIGURES " + json.dumps(figures), flush=True)


def launch(run: str, job: Path, steps: int = 0, timeout: float = 1800) -> dict:
    command = [sys.executable, __file__, "--child", run, "--job", str(job), "--steps", str(steps)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in done.stdout.splitlines():
        if line.startswith("FIGURES "):
            return json.loads(line.removeprefix("FIGURES "))
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return {"error": " | ".join(tail)[-400:]}


# -- figures -------------------------------------------------------------------------------------------------------
def layer_parameters(shape: dict) -> int:
    """The parameters of one decoder layer's linear projections (attention q, k, v, o; the MLP's three)."""
    hidden, heads = shape["hidden_size"], shape["num_attention_heads"]
    head_dim = shape.get("head_dim", hidden // heads)
    kv = shape["num_key_value_heads"] * head_dim
    return hidden * heads * head_dim * 2 + hidden * kv * 2 + 3 * hidden * shape["intermediate_size"]


def training_flops(shape: dict, lengths: list[int]) -> float:
    """Model FLOPs of one pass over examples of these lengths (see the module's docstring)."""
    hidden, layers, heads = shape["hidden_size"], shape["num_hidden_layers"], shape["num_attention_heads"]
    head_dim = shape.get("head_dim", hidden // heads)
    linear = layers * layer_parameters(shape) + hidden * shape["vocab_size"]  # the LM head too
    keys = sum(n * (n + 1) / 2 for n in lengths)
    return 4 * linear * sum(lengths) + 3 * 4 * layers * heads * head_dim * keys


def estimate(shape_name: str, shape: dict, *, max_seq_len: int, batch_size: int, lora_r: int):  # type: ignore[no-untyped-def]
    from shared.catalog import BaseModelSpec  # noqa: PLC0415
    from shared.memory import estimate_qlora  # noqa: PLC0415

    hidden, layers = shape["hidden_size"], shape["num_hidden_layers"]
    embeddings = shape["vocab_size"] * hidden * (1 if shape["tie_word_embeddings"] else 2)
    model = BaseModelSpec(id=shape_name, hf_repo=None, owned_by="bench", license="-", created=0,
                          parameters=layers * layer_parameters(shape) + embeddings, layers=layers, hidden_size=hidden,
                          intermediate_size=shape["intermediate_size"], attention_heads=shape["num_attention_heads"],
                          kv_heads=shape["num_key_value_heads"], vocab_size=shape["vocab_size"],
                          max_seq_len=max_seq_len, tied_embeddings=shape["tie_word_embeddings"])
    return estimate_qlora(model, seq_len=max_seq_len, batch_size=batch_size, lora_r=lora_r)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the small shape")
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument("--mean-words", type=float, default=25.0, help="median answer length in words")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4, help="our packed rows per step")
    parser.add_argument("--quantization", choices=["nf4", "none"], default="nf4")
    parser.add_argument("--runs", default=DEFAULT_RUNS)
    parser.add_argument("--peak-tflops", type=float, default=790.0)
    parser.add_argument("--budget-s", type=float, default=3600.0, help="runs not done within this are cut off")
    parser.add_argument("--model-dir", type=Path, help="reuse a model built earlier (else built in a temp dir)")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    parser.add_argument("--build", type=Path, help="only build the shape's model into this folder, then stop")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.build:
        began = time.perf_counter()
        build_model(args.build, args.shape, args.hidden)
        print(f"{args.shape} built in {args.build} in {time.perf_counter() - began:.0f} s")
        return
    import torch  # noqa: PLC0415

    from shared.datasets import parse_line  # noqa: PLC0415
    from shared.jobspec import JobSpec  # noqa: PLC0415
    from worker.trainer import data, model as models  # noqa: PLC0415

    runs = [r for r in args.runs.split(",") if r]
    shape = dict(SHAPES[args.shape])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        began = time.perf_counter()
        model_dir = args.model_dir or build_model(root / "model", args.shape, args.hidden)
        built_s = time.perf_counter() - began
        if args.shape == "small":
            shape = json.loads((model_dir / "config.json").read_text())
        rows = mixed_length_chat(args.examples, mean_words=args.mean_words)
        spec = JobSpec(job_id="bench", base_model="tunegrid/tiny-llama", model_dir=str(model_dir),
                       quantization=args.quantization,
                       hyperparameters={"n_epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": 1e-4},
                       lora={"r": 16, "alpha": 32, "dropout": 0.0}, max_seq_len=args.max_seq_len,
                       checkpoint_every_steps=10**9, eval_every_steps=10**9, validation_fraction=0.0)
        tokenizer = models.load_tokenizer(model_dir)
        lengths = [len(data.tokenize(parse_line(json.dumps(r).encode()), tokenizer, max_seq_len=args.max_seq_len,
                                     train_on_inputs=False).input_ids) for r in rows]
        results: dict[str, dict] = {}
        steps = 0
        deadline = time.monotonic() + args.budget_s
        for run in runs:
            if deadline - time.monotonic() < 20:
                results[run] = {"error": "not run: the budget was spent"}
                continue
            job = root / run
            job.mkdir()
            train = preference_pairs(rows) if run == "dpo" else rows
            (job / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
            (job / "spec.json").write_text(spec.model_dump_json())
            results[run] = launch(run, job, steps, timeout=deadline - time.monotonic())
            if run.startswith("ours") and "steps" in results[run]:
                steps = steps or results[run]["steps"]
            print(f"  {run}: {json.dumps(results[run])}", flush=True)  # as it comes: a cut-off run keeps the rest
    flops = training_flops(shape, lengths) * args.epochs
    predicted = estimate(args.shape, shape, max_seq_len=args.max_seq_len, batch_size=args.batch_size, lora_r=16)
    device = f"{torch.cuda.get_device_name()}" if torch.cuda.is_available() else "cpu"
    print(f"device={device} shape={args.shape} examples={args.examples} tokens={sum(lengths)} "
          f"(mean {sum(lengths) / len(lengths):.0f}, longest {max(lengths)}) epochs={args.epochs} "
          f"max_seq_len={args.max_seq_len} batch={args.batch_size} rows quantization={args.quantization} "
          f"model built in {built_s:.0f} s")
    print(f"{'run':<11} {'steps':>5} {'batch':>5} {'tokens':>8} {'tokens/s':>10} {'peak MiB':>9} {'reserved':>9} "
          f"{'MFU':>6}")
    for run, f in results.items():
        if "error" in f:
            print(f"{run:<11} failed: {f['error']}")
            continue
        mfu = ""
        if torch.cuda.is_available() and run != "dpo" and f["tokens_per_s"] == f["tokens_per_s"]:
            mfu = f"{flops / sum(lengths) / args.epochs * f['tokens_per_s'] / (args.peak_tflops * 1e12):6.1%}"
        print(f"{run:<11} {f['steps']:>5} {f.get('batch_size', args.batch_size):>5} {f['tokens']:>8} "
              f"{f['tokens_per_s']:>10.1f} {f['peak_bytes'] / 2**20:>9.0f} "
              f"{f.get('peak_reserved_bytes', float('nan')) / 2**20:>9.0f} {mfu:>6}")
    if "dpo" in results and "wall_s" in results["dpo"]:
        print(f"dpo: tokens count both answers' sequences; {results['dpo']['wall_s']:.1f} s end to end with loading "
              f"and the reference pass ({args.examples * args.epochs / results['dpo']['wall_s']:.2f} pairs/s)")
    baselines = [results[r]["tokens_per_s"] for r in ("padded", "flattening", "flex")
                 if r in results and "tokens_per_s" in results[r]]
    if "ours" in results and "tokens_per_s" in results["ours"] and baselines:
        best = max(baselines)
        print(f"ours / best baseline: {results['ours']['tokens_per_s'] / best:.2f}x tokens/s")
    print(f"estimator (shared/memory.py) for batch {args.batch_size} x {args.max_seq_len}: "
          f"{predicted.total / 2**20:.0f} MiB in all (weights {predicted.weights / 2**20:.0f}, LoRA "
          f"{predicted.lora / 2**20:.0f}, activations {predicted.activations / 2**20:.0f}, logits "
          f"{predicted.logits / 2**20:.0f}, CUDA context {predicted.overhead / 2**20:.0f}, x slack)")
    ours = results.get("ours", {})
    if "peak_reserved_bytes" in ours:
        held = ours["peak_reserved_bytes"] + predicted.overhead  # what the card must hold: the allocator's and the context
        print(f"ours held {held / 2**20:.0f} MiB at its peak (reserved + the estimator's CUDA context): the estimate "
              f"is {predicted.total / held:.2f}x that")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "shape": args.shape, "args": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("child", "job")},
            "tokens": sum(lengths), "flops": flops, "runs": results,
            "estimate": {"total": predicted.total, "weights": predicted.weights, "lora": predicted.lora,
                         "activations": predicted.activations, "logits": predicted.logits}}, indent=2))


if __name__ == "__main__":
    main()
