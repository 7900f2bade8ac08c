"""Training data for the trainer: JSONL examples to token ids and loss labels, packed into sequences.

Chat examples are rendered with the tokenizer's chat template when it has one
(a plain `<|role|>` framing otherwise); only assistant tokens carry loss unless
`train_on_inputs`. Short examples are packed into rows of up to `max_seq_len`
tokens; each keeps its own positions and attends only to itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from shared.datasets import Message, TrainingExample, iter_examples

IGNORE = -100
FALLBACK_TEMPLATE_NOTE = "the tokenizer has no chat template; using <|role|> framing"


@dataclass(slots=True)
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


@dataclass(slots=True)
class PackedRow:
    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    segment_ids: list[int] = field(default_factory=list)  # which example each token belongs to (1-based)

    def __len__(self) -> int:
        return len(self.input_ids)

    def add(self, example: Tokenized) -> None:
        segment = (self.segment_ids[-1] + 1) if self.segment_ids else 1
        self.input_ids += example.input_ids
        self.labels += example.labels
        self.position_ids += list(range(len(example.input_ids)))
        self.segment_ids += [segment] * len(example.input_ids)


def read_examples(path: Path) -> list[TrainingExample]:
    with path.open("rb") as f:
        return [example for _, example in iter_examples(f)]


def _render(tokenizer, messages: list[Message]) -> str:  # type: ignore[no-untyped-def]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                             tokenize=False)
    return "".join(f"<|{m.role}|>\n{m.content}<|end|>\n" for m in messages)


def tokenize(example: TrainingExample, tokenizer, *, max_seq_len: int, train_on_inputs: bool) -> Tokenized:  # type: ignore[no-untyped-def]
    """Token ids and labels; characters of trained spans are found by rendering growing prefixes."""
    if example.format == "chat":
        spans: list[tuple[int, int, bool]] = []  # (start, end, trained) in characters of the rendered text
        rendered = ""
        for i, message in enumerate(example.messages):
            longer = _render(tokenizer, list(example.messages[: i + 1]))
            trained = train_on_inputs or (message.role == "assistant" and message.weight == 1)
            spans.append((len(rendered), len(longer), trained))
            rendered = longer
        text = rendered
    else:
        text = example.prompt + example.completion
        spans = [(0, len(example.prompt), train_on_inputs), (len(example.prompt), len(text), True)]
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(encoding["input_ids"])
    labels = [IGNORE] * len(ids)
    for index, (start, end) in enumerate(encoding["offset_mapping"]):
        for span_start, span_end, trained in spans:
            if span_start <= start < span_end:
                if trained:
                    labels[index] = ids[index]
                break
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)  # learn to stop
    truncated = len(ids) > max_seq_len
    return Tokenized(input_ids=ids[:max_seq_len], labels=labels[:max_seq_len], truncated=truncated)


PACKING_LOOKBACK = 64  # rows still open for filling: keeps packing linear in the dataset size


def pack(examples: Iterable[Tokenized], *, max_seq_len: int) -> list[PackedRow]:
    """First-fit packing in order (deterministic, so a resumed run sees the same rows)."""
    rows: list[PackedRow] = []
    for example in examples:
        for row in rows[-PACKING_LOOKBACK:]:
            if len(row) + len(example.input_ids) <= max_seq_len:
                row.add(example)
                break
        else:
            row = PackedRow()
            row.add(example)
            rows.append(row)
    return rows


def unpacked(examples: Iterable[Tokenized]) -> list[PackedRow]:
    rows = []
    for example in examples:
        row = PackedRow()
        row.add(example)
        rows.append(row)
    return rows
