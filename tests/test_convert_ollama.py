"""Modelfile TEMPLATEs render, with Go's own text/template (the engine Ollama uses), the same prompt text as each
release's Jinja chat template. Needs the `go` toolchain (apt: golang-go); skipped without it."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from minimind.checkpoint.loader import load_tokenizer
from minimind.convert import ConvertError, export_ollama
from minimind.convert.ollama import detect_template_era, go_template
from test_convert_util import native_era

# Ollama's template values (server/template.go `Values` and api.Message) as Go structs, and its `json` function.
GO_RENDERER = r"""
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type ToolCallFunction struct {
	Name      string         `json:"name"`
	Arguments map[string]any `json:"arguments"`
}
type ToolCall struct {
	Function ToolCallFunction `json:"function"`
}
type Message struct {
	Role      string     `json:"role"`
	Content   string     `json:"content"`
	Thinking  string     `json:"thinking"`
	ToolCalls []ToolCall `json:"tool_calls"`
}
type Values struct {
	Messages   []Message        `json:"messages"`
	Tools      []map[string]any `json:"tools"`
	Think      bool             `json:"think"`
	IsThinkSet bool             `json:"is_think_set"`
}

func main() {
	var in struct {
		Template string `json:"template"`
		Values   Values `json:"values"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	t := template.Must(template.New("").Option("missingkey=zero").Funcs(funcs).Parse(in.Template))
	if err := t.Execute(os.Stdout, in.Values); err != nil {
		panic(err)
	}
}
"""

TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                          "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                         "required": ["city"]}}}
ARGS = {"city": "Paris", "unit": "c"}


@pytest.fixture(scope="module")
def render_go(tmp_path_factory):
    if shutil.which("go") is None:
        pytest.skip("Go toolchain not installed (apt-get install golang-go): Modelfile TEMPLATEs not rendered")
    folder = tmp_path_factory.mktemp("gorender")
    (folder / "main.go").write_text(GO_RENDERER)
    subprocess.run(["go", "mod", "init", "render"], cwd=folder, check=True, capture_output=True)
    subprocess.run(["go", "build", "-o", "render", "."], cwd=folder, check=True, capture_output=True, timeout=600)

    def render(template: str, messages: list[dict], tools=None, think=None) -> str:
        values = {"messages": messages, "tools": tools or [], "think": bool(think), "is_think_set": think is not None}
        out = subprocess.run([str(folder / "render")], input=json.dumps({"template": template, "values": values}),
                             capture_output=True, text=True, check=True)
        return out.stdout

    return render


def _jinja(tok, messages, tools=None, think=None, add_generation_prompt=True):
    kwargs = {} if think is None else {"open_thinking": think, "enable_thinking": think}
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False,
                                   add_generation_prompt=add_generation_prompt, **kwargs)
    for tool in tools or []:  # Go's json: compact, sorted keys (Jinja's tojson: ", " and ": ")
        text = text.replace(json.dumps(tool, ensure_ascii=False), json.dumps(tool, separators=(",", ":"),
                                                                             sort_keys=True))
    return text


def _ollama_messages(messages):
    """Ollama's view: reasoning in `thinking`, tool-call arguments as an object."""
    out = []
    for m in messages:
        m = dict(m)
        if "reasoning_content" in m:
            m["thinking"] = m.pop("reasoning_content")
        if "tool_calls" in m:
            m["tool_calls"] = [{"function": {"name": c["function"]["name"],
                                             "arguments": json.loads(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
        out.append(m)
    return out


CALL = [{"type": "function", "function": {"name": "get_weather",
                                          "arguments": json.dumps(ARGS, separators=(",", ":"), sort_keys=True)}}]
CONVERSATIONS = {
    "plain": [{"role": "user", "content": "Hi"}],
    "system": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello!", "reasoning_content": "greet"},
               {"role": "user", "content": "2+2?"}],
    "tools": [{"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "content": "", "reasoning_content": "use tool", "tool_calls": CALL},
              {"role": "tool", "content": "18C"}, {"role": "tool", "content": "sunny"}],
}
CASES = [("minimind2", "plain", None), ("minimind2", "system", None),
         ("minimind2-2510", "plain", None), ("minimind2-2510", "system", False), ("minimind2-2510", "tools", None),
         ("minimind-3", "plain", None), ("minimind-3", "system", True), ("minimind-3", "tools", False)]


@pytest.mark.parametrize("tok_name,conv,think", CASES)
def test_modelfile_template_renders_like_the_chat_template(render_go, tok_name, conv, think):
    from conftest import tokenizer_dir

    tok = load_tokenizer(tokenizer_dir(tok_name))
    messages = CONVERSATIONS[conv]
    if tok_name == "minimind2":  # MiniMind2's template knows no reasoning or tools
        messages = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in messages]
    tools = [TOOL] if conv == "tools" else None
    expected = _jinja(tok, messages, tools, think)
    got = render_go(go_template(tok.chat_template), _ollama_messages(messages), tools, think)
    assert got == expected


def test_default_model_chatml_template(render_go):
    smol = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>"
            "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
            "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    import jinja2

    for messages in (CONVERSATIONS["plain"], [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]):
        expected = jinja2.Template(smol).render(messages=messages, add_generation_prompt=True)
        assert render_go(go_template(smol), messages) == expected


def test_unknown_template_is_refused():
    with pytest.raises(ConvertError, match="unrecognised chat template"):
        detect_template_era("{{ messages[0].content }}")


def test_export_ollama_folder(tmp_path, capsys):
    from minimind.convert import main

    pth, tok = native_era(tmp_path, "minimind3")
    assert main([str(pth), str(tmp_path / "ol"), "--to", "ollama", "--tokenizer", str(tok), "--name", "mm3",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "ollama create mm3 -f Modelfile" in out
    text = (tmp_path / "ol" / "Modelfile").read_text()
    assert text.startswith("FROM ./model.gguf\n") and 'PARAMETER stop "<|im_end|>"' in text
    assert (tmp_path / "ol" / "model.gguf").stat().st_size > 0
    with pytest.raises(ConvertError, match="exists"):
        export_ollama(pth, tmp_path / "ol", tokenizer=tok, show_progress=False)
