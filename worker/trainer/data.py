"""Training data for the trainer: JSONL examples to token ids and loss labels, packed into sequences.

Chat examples are rendered with the tokenizer's chat template when it has one
(a plain `<|role|>` framing otherwise, which cannot express tools), tool
definitions and calls included; only the assistant turns that carry weight
(their content and tool calls) carry loss unless `train_on_inputs`. A turn's
tokens are found by rendering the conversation up to it with the generation
prompt and through it: what lies between is the assistant's. Short examples
are packed into rows of up to `max_seq_len` tokens; each keeps its own
positions and attends only to itself. A preference pair (DPO) becomes two
sequences, the input with each answer, trained on the answer only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.datasets import TrainingExample, iter_examples
from shared.messages import Message, ToolCall
from worker.trainer.errors import UserError

IGNORE = -100
FALLBACK_TEMPLATE_NOTE = "the tokenizer has no chat template; using <|role|> framing"
_PROBE_TOOL = "tunegrid_probe_tool"
_PROBE_VALUE = "tunegrid-probe-value"


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

    def example_lengths(self) -> list[int]:
        """How many tokens each example packed here holds, in order."""
        lengths: list[int] = []
        for i, segment in enumerate(self.segment_ids):
            if i == 0 or segment != self.segment_ids[i - 1]:
                lengths.append(0)
            lengths[-1] += 1
        return lengths

    def add(self, example: Tokenized) -> None:
        segment = (self.segment_ids[-1] + 1) if self.segment_ids else 1
        self.input_ids += example.input_ids
        self.labels += example.labels
        self.position_ids += list(range(len(example.input_ids)))
        self.segment_ids += [segment] * len(example.input_ids)


def read_examples(path: Path) -> list[TrainingExample]:
    with path.open("rb") as f:
        return [example for _, example in iter_examples(f)]


def render(tokenizer, messages: Sequence[Message], tools: Sequence[dict[str, Any]] = (), *,  # type: ignore[no-untyped-def]
           add_generation_prompt: bool = False) -> str:
    """The text the model sees; a template that refuses the conversation (a role or a call it does not know) is
    the data's problem, said as such."""
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template([m.for_template() for m in messages], tools=list(tools) or None,
                                                 add_generation_prompt=add_generation_prompt, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - jinja2's TemplateError, or whatever the template's own code raises
            raise UserError(f"the model's chat template cannot render an example: {exc}") from None
    if tools or any(m.tool_calls or m.role == "tool" for m in messages):
        raise UserError("the model has no chat template, so it cannot express tools or tool calls")
    text = "".join(f"<|{m.role}|>\n{m.content}<|end|>\n" for m in messages)
    return text + ("<|assistant|>\n" if add_generation_prompt else "")


def check_expresses_tools(tokenizer, model_name: str) -> None:  # type: ignore[no-untyped-def]
    """Refuse tool data for a model whose template would silently drop tool definitions or calls."""
    tool = {"type": "function", "function": {"name": _PROBE_TOOL, "description": "probe",
                                             "parameters": {"type": "object", "properties": {}}}}
    call = Message(role="assistant", content=None,
                   tool_calls=(ToolCall(id="call_probe", name=_PROBE_TOOL, arguments={"probe": _PROBE_VALUE}),))
    try:
        rendered = render(tokenizer, [Message(role="user", content="probe"), call], [tool])
    except UserError:
        rendered = ""
    if rendered.count(_PROBE_TOOL) < 2 or _PROBE_VALUE not in rendered:
        raise UserError(f"the chat template of {model_name} cannot express tools: tool definitions or calls would "
                        "be dropped from the text it trains on; choose a model whose template supports tools "
                        "(e.g. Qwen 2.5 or Llama 3.1)")


def _assistant_spans(tokenizer, messages: Sequence[Message], tools: Sequence[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:  # type: ignore[no-untyped-def]
    """The rendered conversation and the character spans of the assistant turns that carry weight."""
    full = render(tokenizer, messages, tools)
    spans = []
    for i, message in enumerate(messages):
        if not message.trained:
            continue
        through = render(tokenizer, messages[: i + 1], tools)
        before = (render(tokenizer, messages[:i], tools, add_generation_prompt=True) if i
                  else _before_first(tokenizer, message, tools, through))
        if not (full.startswith(through) and through.startswith(before)):
            raise UserError(f"the model's chat template renders message {i} differently once later messages "
                            "follow it, so its tokens cannot be told apart from the rest")
        spans.append((len(before), len(through)))
    return full, spans


_MARK = "\u2063tunegrid-turn-starts-here\u2063"  # never in data: an invisible separator around a fixed word


def _before_first(tokenizer, message: Message, tools: Sequence[dict[str, Any]], through: str) -> str:  # type: ignore[no-untyped-def]
    """The text before an assistant turn that opens the conversation (there is no shorter conversation to render):
    the same turn rendered with a marker before its content shows where the turn's own text begins."""
    probe = Message(role="assistant", content=_MARK + (message.content or ""), tool_calls=message.tool_calls)
    marked = render(tokenizer, [probe], tools)
    start = marked.find(_MARK)
    if start < 0 or not through.startswith(marked[:start]):
        raise UserError("the model's chat template cannot show where an assistant turn that opens the conversation "
                        "begins; start the conversation with a system or user message")
    return marked[:start]


def _label(tokenizer, text: str, spans: list[tuple[int, int]], *, max_seq_len: int, train_all: bool) -> Tokenized:  # type: ignore[no-untyped-def]
    try:
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except Exception as exc:  # noqa: BLE001 - text the tokenizer refuses is the data's problem
        raise UserError(f"the model's tokenizer cannot encode an example: {exc.__class__.__name__}") from None
    ids: list[int] = list(encoding["input_ids"])
    labels = list(ids) if train_all else [IGNORE] * len(ids)
    if not train_all:
        for index, (start, _) in enumerate(encoding["offset_mapping"]):
            if any(span_start <= start < span_end for span_start, span_end in spans):
                labels[index] = ids[index]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id if train_all or (labels and labels[-1] != IGNORE) else IGNORE)
    truncated = len(ids) > max_seq_len
    return Tokenized(input_ids=ids[:max_seq_len], labels=labels[:max_seq_len], truncated=truncated)


def tokenize(example: TrainingExample, tokenizer, *, max_seq_len: int, train_on_inputs: bool) -> Tokenized:  # type: ignore[no-untyped-def]
    """Token ids and labels of a chat or prompt/completion example (the last token learns to stop)."""
    if example.format == "chat":
        text, spans = _assistant_spans(tokenizer, example.messages, example.tools)
    elif example.format == "prompt_completion":
        text = example.prompt + example.completion
        spans = [(len(example.prompt), len(text))]
    else:
        raise UserError("a preference example trains only with the DPO method")
    return _label(tokenizer, text, spans, max_seq_len=max_seq_len, train_all=train_on_inputs)


def tokenize_pair(example: TrainingExample, tokenizer, *, max_seq_len: int) -> tuple[Tokenized, Tokenized]:  # type: ignore[no-untyped-def]
    """A preference pair as (preferred, non-preferred) sequences: the same input, each answer trained."""
    if example.format != "preference" or example.chosen is None or example.rejected is None:
        raise UserError("the DPO method trains on preference examples (input, preferred_output, "
                        "non_preferred_output) only")
    sides = []
    for answer in (example.chosen, example.rejected):
        answered = (*example.messages, Message(role="assistant", content=answer.content, name=answer.name,
                                               tool_calls=answer.tool_calls))
        text, spans = _assistant_spans(tokenizer, answered, example.tools)
        sides.append(_label(tokenizer, text, spans[-1:], max_seq_len=max_seq_len, train_all=False))
    return sides[0], sides[1]


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
