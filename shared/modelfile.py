"""The Ollama `Modelfile` that comes with a GGUF export: `FROM` the GGUF file, a Go `TEMPLATE` that renders a
conversation as the model's chat template does, its default system prompt, and the stop tokens that end a turn.

The coordinator writes it (it is text the worker has no say in). Ollama hands the template `.Messages` with the
Modelfile's `SYSTEM` prepended when a conversation has no system message of its own; the templates below render
that list exactly as the Jinja chat templates of these families render the same conversation with the generation
prompt (tests/shared/test_modelfile.py renders both, the Go side with Go's text/template as Ollama does).
Tool definitions are not rendered: a tool-calling prompt through Ollama differs from the training format.
"""

from __future__ import annotations

from shared.catalog import BaseModelSpec

_LLAMA3_DATES = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
# A turn per message and, after a turn that is not the assistant's, the assistant's opening: the generation prompt.
_TEMPLATES = {
    "chatml": (
        "{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 -}}\n"
        "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
        "{{ if and $last (ne .Role \"assistant\") }}<|im_start|>assistant\n{{ end }}"
        "{{- end }}"
    ),
    # Meta's Llama 3.1 template opens every conversation with a system turn carrying its knowledge dates; the
    # `<|begin_of_text|>` it also writes is the BOS token llama.cpp adds itself.
    "llama3": (
        "{{- if or (not .Messages) (ne (index .Messages 0).Role \"system\") -}}\n"
        "<|start_header_id|>system<|end_header_id|>\n\n" + _LLAMA3_DATES + "<|eot_id|>{{ end }}"
        "{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 -}}\n"
        "<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
        "{{ if eq .Role \"system\" }}" + _LLAMA3_DATES + "{{ end }}{{ .Content }}<|eot_id|>"
        "{{ if and $last (ne .Role \"assistant\") }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}"
        "{{- end }}"
    ),
}
STOPS = {
    "chatml": ("<|im_end|>", "<|im_start|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
}


def offered(base: BaseModelSpec) -> bool:
    return base.chat_format in _TEMPLATES


def template(base: BaseModelSpec) -> str:
    return _TEMPLATES[base.chat_format]


def render(base: BaseModelSpec, *, gguf_name: str, model_name: str) -> str:
    """The Modelfile for the GGUF file `gguf_name` (downloaded beside it) of the fine-tune `model_name`."""
    if not offered(base):
        raise ValueError(f"no Ollama template for the {base.chat_format} chat format")
    if '"""' in gguf_name or "\n" in gguf_name or "\n" in model_name:
        raise ValueError("a file name for a Modelfile is one line without triple quotes")
    lines = [f"# Ollama Modelfile for {model_name} (from {base.id}), written by tunegrid.",
             f"# Put it beside {gguf_name}, then: ollama create <name> -f Modelfile",
             f"FROM ./{gguf_name}", f'TEMPLATE """{template(base)}"""']
    if base.default_system:
        lines.append(f'SYSTEM """{base.default_system}"""')
    lines.extend(f'PARAMETER stop "{stop}"' for stop in STOPS[base.chat_format])
    return "\n".join(lines) + "\n"
