"""GPU classes from NVML names, throughput estimates and price math in integer micro-dollars."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from shared.catalog import get_base_model
from shared.money import Micros
from shared.pricing import (
    CPU, cost_for_seconds, cpu_can_train, customer_price, expected_tokens_per_s, get_gpu_class, gpu_class_for,
    provider_earnings, seconds_for_budget, supports_4bit, training_seconds,
)


@pytest.mark.parametrize(("name", "expected"), [
    ("NVIDIA GeForce RTX 4090", "rtx-4090"),
    ("NVIDIA GeForce RTX 4060 Ti", "rtx-4060-ti"),
    ("NVIDIA GeForce RTX 4060", "rtx-4060"),
    ("NVIDIA GeForce RTX 3090 Ti", "rtx-3090-ti"),
    ("NVIDIA GeForce RTX 4070 Laptop GPU", "rtx-4070"),
    ("NVIDIA RTX A6000", "rtx-a6000"),
    ("NVIDIA RTX 6000 Ada Generation", "rtx-6000-ada"),
    ("NVIDIA H100 80GB HBM3", "h100"),
    ("NVIDIA A100-SXM4-40GB", "a100"),
    ("NVIDIA L4", "l4"),
    ("NVIDIA L40S", "l40s"),
    ("Tesla T4", "t4"),
    ("NVIDIA GeForce GTX 1080", "other"),
])
def test_gpu_class_from_nvml_name(name: str, expected: str) -> None:
    assert gpu_class_for(name).id == expected


def test_faster_cards_are_faster_and_smaller_models_train_faster() -> None:
    llama8b, qwen05 = get_base_model("llama-3.1-8b-instruct"), get_base_model("qwen2.5-0.5b-instruct")
    assert expected_tokens_per_s(llama8b, get_gpu_class("rtx-4090")) > expected_tokens_per_s(llama8b, get_gpu_class("rtx-3060"))
    assert expected_tokens_per_s(qwen05, get_gpu_class("rtx-3060")) > expected_tokens_per_s(llama8b, get_gpu_class("rtx-3060"))
    # The CPU class is calibrated on what bench/trainer.py measured for the tiny model here (~206 tokens/s).
    assert expected_tokens_per_s(get_base_model("tunegrid/tiny-llama"), CPU) == pytest.approx(206, rel=0.01)


def test_compute_capability_floor_for_4bit_kernels() -> None:
    assert supports_4bit("8.9") and supports_4bit("7.5") and supports_4bit("12.0")
    assert not supports_4bit("6.1") and not supports_4bit(None)


def test_cpu_workers_only_train_tiny_models() -> None:
    assert cpu_can_train(get_base_model("tunegrid/tiny-llama"))
    assert not cpu_can_train(get_base_model("qwen2.5-0.5b-instruct"))


def test_fee_and_metering_round_up_to_the_micro_dollar() -> None:
    assert customer_price(Micros(300_000), platform_fee_bps=2000) == 360_000
    assert customer_price(Micros(1), platform_fee_bps=2000) == 2  # 0.2 micro rounds up, never down to free
    assert customer_price(Micros(0), platform_fee_bps=2000) == 0
    assert cost_for_seconds(Micros(360_000), 3600) == 360_000
    assert cost_for_seconds(Micros(360_000), 1) == 100
    assert cost_for_seconds(Micros(1_000_000), 1) == 278  # 277.7… rounded up
    assert training_seconds(0, 100.0) == 0 and training_seconds(1, 100.0) == 1 and training_seconds(1000, 100.0) == 10


@given(price=st.integers(min_value=1, max_value=10**9), ask_share=st.integers(min_value=0, max_value=10_000),
       seconds=st.integers(min_value=0, max_value=10**7))
def test_the_fee_absorbs_the_roundings_and_never_goes_negative(price: int, ask_share: int, seconds: int) -> None:
    ask = price * ask_share // 10_000
    charge, earned = cost_for_seconds(price, seconds), provider_earnings(ask, seconds)
    assert charge * 3600 >= price * seconds > (charge - 1) * 3600  # rounded up to the micro-dollar
    assert earned * 3600 <= ask * seconds < (earned + 1) * 3600  # rounded down
    assert charge >= earned >= 0


@given(price=st.integers(min_value=1, max_value=10**9), budget=st.integers(min_value=0, max_value=10**12))
def test_seconds_for_budget_is_the_most_the_budget_pays_for(price: int, budget: int) -> None:
    seconds = seconds_for_budget(price, budget)
    assert cost_for_seconds(price, seconds) <= budget < cost_for_seconds(price, seconds + 1)
