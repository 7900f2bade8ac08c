"""A base model's tensors (names and shapes) and the export formats each model offers."""

from __future__ import annotations

import math

import pytest

from shared.catalog import CATALOG, get_base_model
from shared.errors import InvalidRequest
from shared.weights import check_formats, export_bytes, export_name, formats_for, weight_shapes


@pytest.mark.parametrize("base", [m for m in CATALOG if "merged" in formats_for(m)], ids=lambda m: m.id)
def test_the_layout_counts_the_models_published_parameters(base) -> None:  # type: ignore[no-untyped-def]
    """Every tensor of the layout, summed, is the parameter count from the model's card: names or shapes that
    were wrong (a missing bias, an lm_head a tied model does not have) would not add up."""
    assert sum(math.prod(s) for s in weight_shapes(base).values()) == base.parameters


def test_the_tiny_models_layout_is_what_it_saves(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    from safetensors import safe_open  # noqa: PLC0415

    with safe_open(str(tiny_model_dir / "model.safetensors"), framework="pt") as f:
        saved = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    assert saved == weight_shapes(get_base_model("tunegrid/tiny-llama"))


def test_formats_follow_what_the_converters_know() -> None:
    assert formats_for(get_base_model("tunegrid/tiny-llama")) == ("merged", "gguf:f16", "gguf:q8_0", "gguf:q4_k_m")
    assert formats_for(get_base_model("mistral-7b-instruct-v0.3")) == ("merged",)  # a SentencePiece vocabulary
    assert formats_for(get_base_model("phi-3-mini-4k-instruct")) == ()  # fused projections: no layout yet
    with pytest.raises(ValueError):
        weight_shapes(get_base_model("gemma-2-2b-it"))


def test_formats_asked_for_are_checked_and_ordered() -> None:
    tiny = get_base_model("tunegrid/tiny-llama")
    assert check_formats(tiny, ["gguf:q4_k_m", "merged", "gguf:q4_k_m"]) == ["merged", "gguf:q4_k_m"]
    for bad, code in (([], "invalid_export"), (["gguf:q2_k"], "invalid_export"), (["onnx"], "invalid_export")):
        with pytest.raises(InvalidRequest) as caught:
            check_formats(tiny, bad)
        assert caught.value.code == code
    with pytest.raises(InvalidRequest) as caught:
        check_formats(get_base_model("mistral-7b-instruct-v0.3"), ["gguf:q8_0"])
    assert caught.value.code == "export_not_available" and "offers: merged" in caught.value.message


def test_names_and_sizes() -> None:
    llama = get_base_model("llama-3.1-8b-instruct")
    assert export_name("merged") == "merged" and export_name("gguf:q4_k_m") == "model-q4_k_m.gguf"
    assert export_bytes(llama, "merged") == 2 * llama.parameters
    assert 4.5e9 < export_bytes(llama, "gguf:q4_k_m") < 5.2e9  # published Q4_K_M files of Llama 3.1 8B: 4.9 GB
