"""GPU classes, expected QLoRA throughput and price math: what placement ranks by and quotes show.

Throughput is relative to an RTX 3090 running QLoRA of a 7B model at sequence 2048 with gradient
checkpointing, which we take as REFERENCE_TOKENS_PER_S_7B. The relative figures are estimates from
each card's dense bf16/fp16 tensor throughput and memory bandwidth; each worker's own measured
tokens/s refines them (its `speed_factor`, a moving average of observed over predicted).
Money stays integer micro-dollars; floats only estimate time.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from shared.catalog import BaseModelSpec
from shared.weights import export_bytes
from shared.money import Micros

REFERENCE_TOKENS_PER_S_7B = 1_200.0
REFERENCE_PARAMETERS = 7_000_000_000
# bitsandbytes' 4-bit kernels and fp16 tensor cores: Turing (7.5) or newer.
MIN_COMPUTE_CAPABILITY = (7, 5)
# CPU workers train only models this small (the tiny test model); anything real needs a GPU.
CPU_MAX_PARAMETERS = 50_000_000
BPS = 10_000


@dataclass(frozen=True, slots=True)
class GpuClass:
    id: str
    label: str
    pattern: str  # regex over the normalised NVML name
    relative_throughput: float  # RTX 3090 = 1.0
    typical_vram_gb: int
    tier: str  # consumer, workstation, datacenter, cpu


# Most specific first: "rtx 4060 ti" must match before "rtx 4060".
GPU_CLASSES: tuple[GpuClass, ...] = (
    GpuClass("rtx-5090", "GeForce RTX 5090", r"rtx 5090", 2.50, 32, "consumer"),
    GpuClass("rtx-5080", "GeForce RTX 5080", r"rtx 5080", 1.45, 16, "consumer"),
    GpuClass("rtx-5070-ti", "GeForce RTX 5070 Ti", r"rtx 5070 ti", 1.15, 16, "consumer"),
    GpuClass("rtx-5070", "GeForce RTX 5070", r"rtx 5070", 0.95, 12, "consumer"),
    GpuClass("rtx-5060-ti", "GeForce RTX 5060 Ti", r"rtx 5060 ti", 0.65, 16, "consumer"),
    GpuClass("rtx-4090", "GeForce RTX 4090", r"rtx 4090", 1.80, 24, "consumer"),
    GpuClass("rtx-4080", "GeForce RTX 4080", r"rtx 4080", 1.25, 16, "consumer"),
    GpuClass("rtx-4070-ti", "GeForce RTX 4070 Ti", r"rtx 4070 ti", 0.95, 12, "consumer"),
    GpuClass("rtx-4070", "GeForce RTX 4070", r"rtx 4070", 0.80, 12, "consumer"),
    GpuClass("rtx-4060-ti", "GeForce RTX 4060 Ti", r"rtx 4060 ti", 0.55, 16, "consumer"),
    GpuClass("rtx-4060", "GeForce RTX 4060", r"rtx 4060", 0.45, 8, "consumer"),
    GpuClass("rtx-3090-ti", "GeForce RTX 3090 Ti", r"rtx 3090 ti", 1.10, 24, "consumer"),
    GpuClass("rtx-3090", "GeForce RTX 3090", r"rtx 3090", 1.00, 24, "consumer"),
    GpuClass("rtx-3080-ti", "GeForce RTX 3080 Ti", r"rtx 3080 ti", 0.90, 12, "consumer"),
    GpuClass("rtx-3080", "GeForce RTX 3080", r"rtx 3080", 0.80, 10, "consumer"),
    GpuClass("rtx-3070", "GeForce RTX 3070", r"rtx 3070", 0.55, 8, "consumer"),
    GpuClass("rtx-3060", "GeForce RTX 3060", r"rtx 3060", 0.40, 12, "consumer"),
    GpuClass("rtx-2080-ti", "GeForce RTX 2080 Ti", r"rtx 2080 ti", 0.50, 11, "consumer"),
    GpuClass("rtx-6000-ada", "RTX 6000 Ada", r"rtx 6000 ada", 1.90, 48, "workstation"),
    GpuClass("rtx-a6000", "RTX A6000", r"rtx a6000", 1.05, 48, "workstation"),
    GpuClass("rtx-a5000", "RTX A5000", r"rtx a5000", 0.85, 24, "workstation"),
    GpuClass("rtx-a4000", "RTX A4000", r"rtx a4000", 0.60, 16, "workstation"),
    GpuClass("h100", "H100", r"\bh100\b", 3.50, 80, "datacenter"),
    GpuClass("h200", "H200", r"\bh200\b", 3.80, 141, "datacenter"),
    GpuClass("a100", "A100", r"\ba100\b", 2.20, 80, "datacenter"),
    GpuClass("l40s", "L40S", r"\bl40s\b", 1.90, 48, "datacenter"),
    GpuClass("l4", "L4", r"\bl4\b", 0.55, 24, "datacenter"),
    GpuClass("a10", "A10", r"\ba10g?\b", 0.70, 24, "datacenter"),
    GpuClass("t4", "T4", r"\bt4\b", 0.25, 16, "datacenter"),
)
OTHER_GPU = GpuClass("other", "Other NVIDIA GPU", r"", 0.30, 0, "consumer")
# Measured here: tiny-llama trains at ~206 tokens/s on this 2-core CPU (bench/trainer.py). Scaled to the
# 7B reference like a GPU, that is 206 * 492160 / 7e9 of a 3090's 1200 tokens/s.
CPU = GpuClass("cpu", "CPU", r"", 206 * 492_160 / REFERENCE_PARAMETERS / REFERENCE_TOKENS_PER_S_7B, 0, "cpu")
_BY_ID = {c.id: c for c in (*GPU_CLASSES, OTHER_GPU, CPU)}


def normalise_gpu_name(name: str) -> str:
    text = re.sub(r"[^a-z0-9]+", " ", name.lower())
    text = re.sub(r"\b(nvidia|geforce|laptop gpu|pcie|sxm\d?|\d+\s?gb)\b", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def gpu_class_for(name: str) -> GpuClass:
    """The class of an NVML device name ('NVIDIA GeForce RTX 4090' -> rtx-4090); unknown cards are 'other'."""
    normalised = normalise_gpu_name(name)
    for gpu_class in GPU_CLASSES:
        if re.search(gpu_class.pattern, normalised):
            return gpu_class
    return OTHER_GPU


def get_gpu_class(class_id: str) -> GpuClass:
    return _BY_ID.get(class_id, OTHER_GPU)


def supports_4bit(compute_capability: str | None) -> bool:
    if not compute_capability:
        return False
    major, _, minor = compute_capability.partition(".")
    return (int(major), int(minor or 0)) >= MIN_COMPUTE_CAPABILITY


def cpu_can_train(model: BaseModelSpec) -> bool:
    return model.parameters <= CPU_MAX_PARAMETERS


def expected_tokens_per_s(model: BaseModelSpec, gpu_class: GpuClass, *, speed_factor: float = 1.0) -> float:
    """Training tokens/s of QLoRA on `model`: compute per token scales with the parameter count."""
    return REFERENCE_TOKENS_PER_S_7B * gpu_class.relative_throughput * speed_factor * (
        REFERENCE_PARAMETERS / model.parameters)


# DPO computes its reference policy's log-probabilities once, before training: a forward pass over every pair's
# two sequences, about a third of what a training step (forward and backward) costs per token.
DPO_REFERENCE_PASS_SHARE = 3


def training_tokens(tokens_per_epoch: int, *, n_epochs: int, method: str = "supervised") -> int:
    """The tokens a job's compute amounts to, in training-step tokens: every epoch's, plus DPO's reference pass.
    A preference file's token count already holds both sequences of each pair (`shared.datasets`)."""
    total = tokens_per_epoch * n_epochs
    return total + (-(-tokens_per_epoch // DPO_REFERENCE_PASS_SHARE) if method == "dpo" else 0)


def training_seconds(tokens: int, tokens_per_s: float) -> int:
    return max(1, math.ceil(tokens / tokens_per_s)) if tokens > 0 else 0


def customer_price(ask: Micros, *, platform_fee_bps: int) -> Micros:
    """What the customer pays per GPU-hour: the worker's ask plus the platform fee, rounded up to a micro."""
    return Micros(ask + -(-ask * platform_fee_bps // BPS))


def cost_for_seconds(price_per_hour: Micros, seconds: int) -> Micros:
    """Per-second metering at an hourly price, rounded up to a micro-dollar."""
    return Micros(-(-price_per_hour * seconds // 3600))


def provider_earnings(ask_per_hour: Micros, seconds: int) -> Micros:
    """What the provider earns for `seconds` at its ask, rounded down to a micro-dollar (the customer's charge
    rounds up, so the fee absorbs both roundings and never goes negative)."""
    return Micros(ask_per_hour * seconds // 3600)


def seconds_for_budget(price_per_hour: Micros, budget: Micros) -> int:
    """The most whole seconds whose charge (`cost_for_seconds`) stays within `budget`."""
    if price_per_hour <= 0:
        return 10**12
    return max(budget, 0) * 3600 // price_per_hour


def throughput_per_dollar(tokens_per_s: float, price_per_hour: Micros) -> float:
    """Ranking score: tokens per micro-dollar. A free worker ranks by speed alone."""
    return tokens_per_s * 3600 / max(price_per_hour, 1)


# An export reads the base once per format, writes each format, and uploads it: bounded by disk and by the
# provider's uplink, not by the GPU. Typical figures for a gaming PC (an NVMe disk, a 100 Mbit/s uplink).
EXPORT_DISK_BYTES_PER_S = 200_000_000
EXPORT_UPLOAD_BYTES_PER_S = 12_500_000


def export_seconds(model: BaseModelSpec, formats: list[str]) -> int:
    """About how long an export lease runs: each format's base read and file written, then its upload."""
    read = 2 * model.parameters * len(formats)
    written = sum(export_bytes(model, fmt) for fmt in formats)
    return max(1, math.ceil((read + written) / EXPORT_DISK_BYTES_PER_S + written / EXPORT_UPLOAD_BYTES_PER_S))


# A batch generates: forward passes only, about a third of a training step's work per token, batched like
# training rows (prompts are read in one pass; answers a token at a time, which batching across requests hides).
INFERENCE_SPEEDUP = 3


def inference_seconds(tokens: int, tokens_per_s: float) -> int:
    """About how long a batch lease runs for `tokens` (prompts and the most each answer may take)."""
    return training_seconds(tokens, tokens_per_s * INFERENCE_SPEEDUP)
