"""The base-model catalog: the models we promise exist, are findable, and have sane figures."""

from __future__ import annotations

import pytest

from shared.catalog import CATALOG, find_base_model, get_base_model
from shared.errors import InvalidRequest

REQUIRED = ["mistral-7b-instruct-v0.3", "llama-3.1-8b-instruct", "qwen2.5-0.5b-instruct", "qwen2.5-1.5b-instruct",
            "qwen2.5-7b-instruct", "gemma-2-2b-it", "phi-3-mini-4k-instruct", "tunegrid/tiny-llama"]


@pytest.mark.parametrize("model_id", REQUIRED)
def test_required_models_are_listed(model_id: str) -> None:
    model = get_base_model(model_id)
    assert model.layers > 0 and model.hidden_size > 0 and model.vocab_size > 0
    assert model.hidden_size % model.attention_heads == 0
    assert model.attention_heads % model.kv_heads == 0


def test_found_by_hugging_face_repository_case_insensitively() -> None:
    assert find_base_model("Qwen/Qwen2.5-7B-Instruct") is find_base_model("qwen/qwen2.5-7b-instruct")
    assert find_base_model("qwen/qwen2.5-7b-instruct").id == "qwen2.5-7b-instruct"  # type: ignore[union-attr]


def test_parameter_counts_match_architecture_within_a_few_percent() -> None:
    # Embeddings + attention + MLP; norms and biases are noise at this scale.
    for m in CATALOG:
        head_dim = m.hidden_size // m.attention_heads
        attention = m.hidden_size * head_dim * (2 * m.attention_heads + 2 * m.kv_heads)
        mlp = 3 * m.hidden_size * m.intermediate_size
        embeddings = m.vocab_size * m.hidden_size
        tied = m.parameters < embeddings * 2 + m.layers * (attention + mlp) * 0.99
        estimate = embeddings * (1 if tied else 2) + m.layers * (attention + mlp)
        assert abs(estimate - m.parameters) / m.parameters < 0.05, m.id


def test_unknown_model_error_lists_the_choices() -> None:
    with pytest.raises(InvalidRequest, match="tunegrid/tiny-llama") as caught:
        get_base_model("gpt-9")
    assert caught.value.param == "model"
