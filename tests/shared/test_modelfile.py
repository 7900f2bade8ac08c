"""The Ollama Modelfile of a GGUF export renders a conversation as the model's chat template does.

The Go side runs in Go's text/template, the engine Ollama uses, with what Ollama hands a template: `.Messages`
(role and content), the Modelfile's `SYSTEM` prepended when the conversation has no system message. The Jinja side
is the tiny model's own tokenizer (`apply_chat_template` with the generation prompt). Go comes from Debian's
golang-go (`.ci/run` installs it); outside CI a machine without Go skips the rendering cases.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from shared.catalog import CATALOG, get_base_model
from shared.modelfile import STOPS, offered, render
from shared.weights import formats_for
from tests.conftest import IN_CI

RENDER_GO = r"""
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string
	Content string
}

func main() {
	var in struct {
		Template string
		System   string
		Messages []Message
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	// Ollama: the Modelfile's SYSTEM opens a conversation that brings no system message of its own.
	if in.System != "" && (len(in.Messages) == 0 || in.Messages[0].Role != "system") {
		in.Messages = append([]Message{{Role: "system", Content: in.System}}, in.Messages...)
	}
	t := template.Must(template.New("modelfile").Parse(in.Template))
	if err := t.Execute(os.Stdout, map[string]any{"Messages": in.Messages}); err != nil {
		panic(err)
	}
}
"""

CONVERSATIONS = [
    [{"role": "user", "content": "What is 3 plus 4?"}],
    [{"role": "system", "content": "Reply with only the number."}, {"role": "user", "content": "What is 3 plus 4?"}],
    [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello, how can I help?"},
     {"role": "user", "content": "what is two plus two?\nthink first"}],
]


def _parse(modelfile: str) -> dict[str, object]:
    template = re.search(r'^TEMPLATE """(.*?)"""$', modelfile, re.S | re.M)
    system = re.search(r'^SYSTEM """(.*?)"""$', modelfile, re.S | re.M)
    assert template is not None
    return {"template": template.group(1), "system": system.group(1) if system else "",
            "from": re.search(r"^FROM (.*)$", modelfile, re.M).group(1),  # type: ignore[union-attr]
            "stops": re.findall(r'^PARAMETER stop "(.*)"$', modelfile, re.M)}


@pytest.fixture(scope="module")
def go_render(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    go = shutil.which("go")
    if go is None:
        if IN_CI:
            pytest.fail("Go is not installed (CI=true requires it: `.ci/run` installs golang-go)")
        pytest.skip("Go is not installed (Debian: apt-get install golang-go)")
    folder = tmp_path_factory.mktemp("ollama-render")
    (folder / "render.go").write_text(RENDER_GO)
    env = {**os.environ, "GOCACHE": str(folder / "cache"), "GOPATH": str(folder / "gopath"), "GO111MODULE": "off",
           "GOFLAGS": "", "CGO_ENABLED": "0"}
    subprocess.run([go, "build", "-o", str(folder / "render"), str(folder / "render.go")], cwd=folder, env=env,
                   check=True, timeout=240, capture_output=True)

    def rendered(modelfile: str, messages: list[dict[str, str]]) -> str:
        parsed = _parse(modelfile)
        body = json.dumps({"Template": parsed["template"], "System": parsed["system"],
                           "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]})
        done = subprocess.run([str(folder / "render")], input=body, capture_output=True, text=True, timeout=30,
                              check=True)
        return done.stdout

    return rendered


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chatml_modelfile_renders_as_the_tokenizers_template(go_render, tiny_model_dir: Path,
                                                             messages: list[dict[str, str]]) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer  # noqa: PLC0415

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    jinja = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    modelfile = render(get_base_model("tunegrid/tiny-llama"), gguf_name="ft-tiny-q8_0.gguf", model_name="ft:tiny")
    assert go_render(modelfile, messages) == jinja


def test_llama3_modelfile_renders_metas_format(go_render) -> None:  # type: ignore[no-untyped-def]
    """Meta's Llama 3.1 format (its model card): the knowledge-date system turn, one header per turn, `<|eot_id|>`
    after each, the assistant's header to answer; the BOS token is llama.cpp's to add."""
    modelfile = render(get_base_model("llama-3.1-8b-instruct"), gguf_name="m.gguf", model_name="ft:x")
    dates = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    assert go_render(modelfile, CONVERSATIONS[1]) == (
        f"<|start_header_id|>system<|end_header_id|>\n\n{dates}Reply with only the number.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 3 plus 4?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert go_render(modelfile, CONVERSATIONS[0]) == (
        f"<|start_header_id|>system<|end_header_id|>\n\n{dates}<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 3 plus 4?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_stop_tokens_end_a_turn_of_the_family(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer  # noqa: PLC0415

    parsed = _parse(render(get_base_model("tunegrid/tiny-llama"), gguf_name="a b.gguf", model_name="ft:tiny"))
    assert parsed["stops"] == list(STOPS["chatml"])
    assert parsed["from"] == "./a b.gguf"
    vocabulary = AutoTokenizer.from_pretrained(tiny_model_dir).get_vocab()
    assert all(stop in vocabulary for stop in parsed["stops"])  # each is one token of the model


def test_every_model_offering_gguf_has_a_modelfile_template() -> None:
    for base in CATALOG:
        if any(f.startswith("gguf:") for f in formats_for(base)):
            assert offered(base), base.id


def test_a_file_name_cannot_break_out_of_its_line() -> None:
    with pytest.raises(ValueError):
        render(get_base_model("tunegrid/tiny-llama"), gguf_name='x.gguf\nSYSTEM """pwned', model_name="ft:tiny")
