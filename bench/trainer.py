"""Trainer benchmark: tokens/s of our QLoRA trainer against a naive baseline, on data of mixed lengths, and of
our DPO beside our SFT on the same examples (each turned into a preference pair).

Baselines: transformers `Trainer` + peft on the same 4-bit model, each batch padded to its longest example
(DataCollatorForSeq2Seq), and Hugging Face's best packing, padding-free flattening with position ids
(DataCollatorWithFlattening); batch size chosen so all make the same number of optimizer steps over the same
examples. Tokens/s counts real (non-padding) tokens over the training loop's wall time. DPO's pairs are the
same examples with a second, non-preferred answer (another example's): two sequences a pair, plus the reference
pass before the first step, which its end-to-end figure includes. Prints figures; never passes or fails.

    python bench/trainer.py [--examples 128] [--hidden 256] [--epochs 1] [--max-seq-len 256]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from pathlib import Path

import torch
from transformers import (
    DataCollatorForSeq2Seq, DataCollatorWithFlattening, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments,
)

from shared.jobspec import JobSpec
from worker.trainer import data, model as models
from worker.trainer.progress import Progress
from worker.trainer.tiny import build_tokenizer
from worker.trainer.train import Trainer as OurTrainer

WORDS = "the a model learns small fast data token gpu adapter worker job answer question number".split()


def build_small_llama(out: Path, hidden: int) -> Path:
    """A Llama a few times the tiny one, so that matrix work, not Python overhead, dominates a step."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=640, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=4,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    LlamaForCausalLM(config).save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    return out


def mixed_length_chat(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = int(rng.lognormvariate(3.2, 0.9)) + 2  # many short answers, a long tail
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


def run_ours(job: Path, spec: JobSpec) -> dict:
    progress = Progress(job / "out" / "progress.jsonl")
    began = time.perf_counter()
    OurTrainer(spec, job, progress).run()
    wall = time.perf_counter() - began
    progress.close()
    steps = [json.loads(l) for l in (job / "out" / "progress.jsonl").read_text().splitlines()]
    last = [s for s in steps if s["type"] == "step"][-1]
    return {"steps": last["step"], "tokens": last["tokens"], "tokens_per_s": last["tokens_per_s"], "wall_s": wall}


def run_baseline(job: Path, spec: JobSpec, steps: int, n_examples: int, *, flattening: bool = False) -> dict:
    """transformers `Trainer` + peft on the same model and examples: each batch padded to its longest example, or
    with `flattening` Hugging Face's padding-free packing (`DataCollatorWithFlattening`: a batch's examples in one
    row, kept apart by their position ids)."""
    tokenizer = models.load_tokenizer(Path(spec.model_dir))
    examples = data.read_examples(job / "train.jsonl")
    features = []
    for example in examples:
        t = data.tokenize(example, tokenizer, max_seq_len=spec.max_seq_len, train_on_inputs=False)
        features.append({"input_ids": t.input_ids, "attention_mask": [1] * len(t.input_ids), "labels": t.labels})
    real_tokens = sum(len(f["input_ids"]) for f in features) * spec.hyperparameters.n_epochs
    batch = max(1, math.ceil(n_examples * spec.hyperparameters.n_epochs / steps))
    model = models.load_for_training(spec)
    args = TrainingArguments(output_dir=str(job / "baseline"), per_device_train_batch_size=batch,
                             num_train_epochs=spec.hyperparameters.n_epochs,
                             learning_rate=spec.hyperparameters.learning_rate, logging_steps=10_000,
                             save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
                             bf16=True, dataloader_num_workers=0, disable_tqdm=True, seed=spec.seed)
    collator = (DataCollatorWithFlattening() if flattening
                else DataCollatorForSeq2Seq(tokenizer, padding="longest"))
    trainer = Trainer(model=model, args=args, train_dataset=features, data_collator=collator)
    began = time.perf_counter()
    output = trainer.train()
    elapsed = time.perf_counter() - began
    return {"steps": output.global_step, "tokens": real_tokens, "tokens_per_s": real_tokens / elapsed,
            "batch_size": batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the benchmark Llama (4 layers)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4, help="our packed rows per step")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = build_small_llama(root / "model", args.hidden)
        job = root / "job"
        job.mkdir()
        rows = mixed_length_chat(args.examples)
        (job / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        spec = JobSpec(job_id="bench", base_model="tunegrid/tiny-llama", model_dir=str(model_dir),
                       hyperparameters={"n_epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": 1e-3},
                       lora={"r": 16, "alpha": 32, "dropout": 0.0}, max_seq_len=args.max_seq_len,
                       checkpoint_every_steps=10**9, eval_every_steps=10**9, validation_fraction=0.0)
        ours = run_ours(job, spec)
        baseline = run_baseline(job, spec, ours["steps"], args.examples)
        flattened = run_baseline(job, spec, ours["steps"], args.examples, flattening=True)
        pairs_job = root / "dpo"
        pairs_job.mkdir()
        (pairs_job / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preference_pairs(rows)))
        dpo = run_ours(pairs_job, spec.model_copy(update={"method": "dpo"}))
    print(f"device={models.device()} examples={args.examples} epochs={args.epochs} max_seq_len={args.max_seq_len}")
    print(f"{'trainer':<10} {'steps':>6} {'batch':>6} {'tokens':>8} {'tokens/s':>10}")
    print(f"{'ours':<10} {ours['steps']:>6} {args.batch_size:>6} {ours['tokens']:>8} {ours['tokens_per_s']:>10.1f}")
    print(f"{'baseline':<10} {baseline['steps']:>6} {baseline['batch_size']:>6} {baseline['tokens']:>8} "
          f"{baseline['tokens_per_s']:>10.1f}")
    print(f"{'flattening':<10} {flattened['steps']:>6} {flattened['batch_size']:>6} {flattened['tokens']:>8} "
          f"{flattened['tokens_per_s']:>10.1f}")
    print(f"ratio ours/baseline: {ours['tokens_per_s'] / baseline['tokens_per_s']:.2f}x; ours/flattening: "
          f"{ours['tokens_per_s'] / flattened['tokens_per_s']:.2f}x")
    print(f"\n{'method':<10} {'steps':>6} {'tokens':>8} {'tokens/s':>10} {'end-to-end s':>13} {'examples/s':>11}")
    for name, run in (("sft", ours), ("dpo", dpo)):
        print(f"{name:<10} {run['steps']:>6} {run['tokens']:>8} {run['tokens_per_s']:>10.1f} {run['wall_s']:>13.1f} "
              f"{args.examples * args.epochs / run['wall_s']:>11.2f}")
    print("dpo: tokens count both answers' sequences; end-to-end includes loading and the reference pass")


if __name__ == "__main__":
    main()
