"""The base models tunegrid fine-tunes, with the architecture figures placement and pricing need.

Figures come from each model's `config.json` on the Hugging Face Hub. `created`
is the model's public release (Unix seconds), used as the OpenAI `model.created`.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.errors import InvalidRequest


@dataclass(frozen=True, slots=True)
class BaseModelSpec:
    id: str
    hf_repo: str | None  # None: built locally (the tiny test model), never downloaded
    owned_by: str
    license: str
    created: int
    parameters: int
    layers: int
    hidden_size: int
    intermediate_size: int
    attention_heads: int
    kv_heads: int
    vocab_size: int
    max_seq_len: int
    tools: bool = False  # the family's chat template renders tool definitions and calls (checked again by the trainer)
    # What exporting needs (shared/weights.py, shared/modelfile.py): the Hugging Face architecture, whether the
    # output projection is the embedding's (no `lm_head` tensor), q/k/v biases, the chat format an Ollama
    # Modelfile renders, and llama.cpp's pre-tokenizer for a byte-level BPE vocabulary (None: a SentencePiece
    # vocabulary, which the GGUF export does not convert yet).
    architecture: str = "llama"
    tied_embeddings: bool = False
    attention_bias: bool = False
    chat_format: str = "chatml"
    tokenizer_pre: str | None = None
    default_system: str | None = None  # the system turn the chat template renders when a conversation has none


QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

CATALOG: tuple[BaseModelSpec, ...] = (
    BaseModelSpec(
        id="mistral-7b-instruct-v0.3", hf_repo="mistralai/Mistral-7B-Instruct-v0.3", owned_by="mistralai",
        license="apache-2.0", created=1716422400, parameters=7_248_023_552, layers=32, hidden_size=4096,
        intermediate_size=14336, attention_heads=32, kv_heads=8, vocab_size=32768, max_seq_len=32768, tools=True,
        chat_format="mistral",
    ),
    BaseModelSpec(
        id="llama-3.1-8b-instruct", hf_repo="meta-llama/Llama-3.1-8B-Instruct", owned_by="meta-llama",
        license="llama3.1", created=1721692800, parameters=8_030_261_248, layers=32, hidden_size=4096,
        intermediate_size=14336, attention_heads=32, kv_heads=8, vocab_size=128256, max_seq_len=131072, tools=True,
        chat_format="llama3", tokenizer_pre="llama-bpe",
    ),
    BaseModelSpec(
        id="qwen2.5-0.5b-instruct", hf_repo="Qwen/Qwen2.5-0.5B-Instruct", owned_by="Qwen",
        license="apache-2.0", created=1726531200, parameters=494_032_768, layers=24, hidden_size=896,
        intermediate_size=4864, attention_heads=14, kv_heads=2, vocab_size=151936, max_seq_len=32768, tools=True,
        architecture="qwen2", tied_embeddings=True, attention_bias=True, tokenizer_pre="qwen2",
        default_system=QWEN_SYSTEM,
    ),
    BaseModelSpec(
        id="qwen2.5-1.5b-instruct", hf_repo="Qwen/Qwen2.5-1.5B-Instruct", owned_by="Qwen",
        license="apache-2.0", created=1726531200, parameters=1_543_714_304, layers=28, hidden_size=1536,
        intermediate_size=8960, attention_heads=12, kv_heads=2, vocab_size=151936, max_seq_len=32768, tools=True,
        architecture="qwen2", tied_embeddings=True, attention_bias=True, tokenizer_pre="qwen2",
        default_system=QWEN_SYSTEM,
    ),
    BaseModelSpec(
        id="qwen2.5-7b-instruct", hf_repo="Qwen/Qwen2.5-7B-Instruct", owned_by="Qwen",
        license="apache-2.0", created=1726531200, parameters=7_615_616_512, layers=28, hidden_size=3584,
        intermediate_size=18944, attention_heads=28, kv_heads=4, vocab_size=152064, max_seq_len=32768, tools=True,
        architecture="qwen2", attention_bias=True, tokenizer_pre="qwen2", default_system=QWEN_SYSTEM,
    ),
    BaseModelSpec(
        id="gemma-2-2b-it", hf_repo="google/gemma-2-2b-it", owned_by="google",
        license="gemma", created=1722470400, parameters=2_614_341_888, layers=26, hidden_size=2304,
        intermediate_size=9216, attention_heads=8, kv_heads=4, vocab_size=256000, max_seq_len=8192,
        architecture="gemma2", tied_embeddings=True, chat_format="gemma",
    ),
    BaseModelSpec(
        id="phi-3-mini-4k-instruct", hf_repo="microsoft/Phi-3-mini-4k-instruct", owned_by="microsoft",
        license="mit", created=1713830400, parameters=3_821_079_552, layers=32, hidden_size=3072,
        intermediate_size=8192, attention_heads=32, kv_heads=32, vocab_size=32064, max_seq_len=4096,
        architecture="phi3", chat_format="phi3",
    ),
    BaseModelSpec(
        id="tunegrid/tiny-llama", hf_repo=None, owned_by="tunegrid",
        license="apache-2.0", created=1767225600, parameters=492_160, layers=2, hidden_size=128,
        intermediate_size=256, attention_heads=4, kv_heads=4, vocab_size=640, max_seq_len=512, tools=True,
        tokenizer_pre="gpt-2", default_system="You are a helpful assistant.",
    ),
)

_BY_NAME: dict[str, BaseModelSpec] = {
    **{m.id: m for m in CATALOG},
    **{m.hf_repo.lower(): m for m in CATALOG if m.hf_repo},
}


def find_base_model(name: str) -> BaseModelSpec | None:
    """The catalog entry for a catalog id or a Hugging Face repository id (case-insensitive)."""
    return _BY_NAME.get(name) or _BY_NAME.get(name.lower())


def get_base_model(name: str, *, param: str = "model") -> BaseModelSpec:
    model = find_base_model(name)
    if model is None:
        known = ", ".join(m.id for m in CATALOG)
        raise InvalidRequest(
            f"Model {name!r} is not available for fine-tuning. Choose one of: {known}.",
            param=param, code="model_not_available",
        )
    return model
