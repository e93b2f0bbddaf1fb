"""`--to ollama`: the GGUF plus a Modelfile whose Go-template TEMPLATE reproduces the model's chat template.

Ollama renders TEMPLATE with Go's text/template over {.Messages (Role, Content, Thinking, ToolCalls), .Tools,
.Think, .IsThinkSet} and the functions `json`, `slice`, `index`, `eq`, ... (no arithmetic, no string ops), so each
release's Jinja template is rewritten by hand below (the two inherent differences: docs/deploy.md).
"""
from __future__ import annotations

import re
from pathlib import Path

from .gguf_export import check_outtype, export_gguf
from .output import atomic_output, chat_template, generation_config
from .source import ConvertError, Source, load_source

# The templates spell out ChatML's <|im_start|> / <|im_end|> and have no `{{-` trim markers: every byte between
# actions is meant (there is no cosmetic whitespace).
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
_FIRST_IS_SYSTEM = 'and .Messages (eq (index .Messages 0).Role "system")'

# $last: whether this is the final message; $prev / $next: the neighbouring messages' roles (Go has no `sub`).
_LOOP_HEAD = ('{{ $prev := "" }}{{ range $i, $m := .Messages }}'
              '{{ $last := eq (len (slice $.Messages $i)) 1 }}'
              '{{ $next := "" }}{{ if not $last }}{{ $next = (index (slice $.Messages $i) 1).Role }}{{ end }}')
_LOOP_TAIL = '{{ $prev = .Role }}{{ end }}'

_TOOLS_BLOCK = (
    '<|im_start|>system\n{{ if ' + _FIRST_IS_SYSTEM + ' }}{{ (index .Messages 0).Content }}\n\n{{ end }}'
    '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n'
    'You are provided with function signatures within <tools></tools> XML tags:\n<tools>'
    '{{ range .Tools }}\n{{ json . }}{{ end }}\n</tools>\n\n'
    'For each function call, return a json object with function name and arguments within '
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    '</tool_call><|im_end|>\n')

_TOOL_CALLS = ('{{ range $j, $tc := .ToolCalls }}{{ if or (and (eq $j 0) $m.Content) (gt $j 0) }}\n{{ end }}'
               '<tool_call>\n{"name": "{{ .Function.Name }}", "arguments": {{ json .Function.Arguments }}}\n'
               '</tool_call>{{ end }}')

_TOOL_RESULT = ('{{ else if eq .Role "tool" }}{{ if ne $prev "tool" }}<|im_start|>user{{ end }}'
                '\n<tool_response>\n{{ .Content }}\n</tool_response>'
                '{{ if ne $next "tool" }}<|im_end|>\n{{ end }}')

_USER = ('{{ if or (eq .Role "user") (and (eq .Role "system") (ne $i 0)) }}'
         '<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n')

_GENERATION = '{{ if and $last (ne .Role "assistant") }}<|im_start|>assistant\n'


def _system(default: str | None) -> str:
    """The leading system block: the first message if it is a system one, else the default (if any)."""
    fallback = '{{ else }}<|im_start|>system\n' + default + '<|im_end|>\n' if default is not None else ""
    return ('{{ if ' + _FIRST_IS_SYSTEM + ' }}<|im_start|>system\n{{ (index .Messages 0).Content }}<|im_end|>\n'
            + fallback + '{{ end }}')


def minimind2_template() -> str:
    """MiniMind2: default system prompt; every user turn opens the assistant turn; no tools, no think."""
    return (_system("You are a helpful assistant") + '{{ range .Messages }}'
            '{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n<|im_start|>assistant\n'
            '{{ else if eq .Role "assistant" }}{{ .Content }}<|im_end|>\n{{ end }}{{ end }}')


def qwen_style_template(era: str) -> str:
    """2510 (default system prompt, empty think block only when thinking is switched off) and minimind-3 (no
    default system prompt, every assistant turn carries a think block, `<think>\\n` opens when thinking is on)."""
    v3 = era == "minimind3"
    head = '{{ if .Tools }}' + _TOOLS_BLOCK + '{{ else }}' + _system(None if v3 else "You are a helpful assistant")
    think_history = '<think>\n{{ .Thinking }}\n</think>\n\n' if v3 else ''
    assistant = ('{{ else if eq .Role "assistant" }}<|im_start|>assistant\n' + think_history + '{{ .Content }}'
                 + _TOOL_CALLS + '<|im_end|>\n')
    think = ('{{ if $.Think }}<think>\n{{ else }}<think>\n\n</think>\n\n{{ end }}' if v3 else
             '{{ if and $.IsThinkSet (not $.Think) }}<think>\n\n</think>\n\n{{ end }}')
    return (head + '{{ end }}' + _LOOP_HEAD + _USER + assistant + _TOOL_RESULT + '{{ end }}'
            + _GENERATION + think + '{{ end }}' + _LOOP_TAIL)


def chatml_template(default_system: str | None) -> str:
    """Plain ChatML (the default SmolLM2 model): optional default system prompt, every role as is."""
    fallback = ('{{ if not (' + _FIRST_IS_SYSTEM + ') }}<|im_start|>system\n' + default_system
                + '<|im_end|>\n{{ end }}') if default_system is not None else ""
    return (fallback + _LOOP_HEAD + '<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n' + _GENERATION
            + '{{ end }}' + _LOOP_TAIL)


def detect_template_era(jinja: str | None) -> str:
    if not jinja:
        raise ConvertError("the tokenizer has no chat template: an Ollama model needs one (use a chat tokenizer)")
    if "open_thinking" in jinja:
        return "minimind3"
    if "enable_thinking" in jinja and "# Tools" in jinja:
        return "2510"
    if "You are a helpful assistant" in jinja and "tools" not in jinja:
        return "minimind2"
    if IM_START in jinja and "tools" not in jinja:
        return "chatml"
    raise ConvertError("unrecognised chat template: no Ollama TEMPLATE is known for it; write one by hand "
                       "(https://github.com/ollama/ollama/blob/main/docs/template.md)")


def go_template(jinja: str) -> str:
    era = detect_template_era(jinja)
    if era == "minimind2":
        return minimind2_template()
    if era in ("2510", "minimind3"):
        return qwen_style_template(era)
    default_system = re.search(r"<\|im_start\|>system(?:\\n|\n)(.*?)<\|im_end\|>", jinja)  # real or escaped newline
    return chatml_template(default_system.group(1) if default_system else None)


def modelfile(gguf_name: str, source: Source) -> str:
    template = go_template(chat_template(source.tokenizer))
    if '"""' in template:
        raise ConvertError('the TEMPLATE contains """, which a Modelfile cannot quote')
    gen = generation_config(source.config)
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""', f'PARAMETER stop "{IM_END}"',
             f'PARAMETER stop "{IM_START}"', f"PARAMETER num_ctx {min(source.config.max_position_embeddings, 8192)}",
             "PARAMETER repeat_penalty 1"]
    if "temperature" in gen:
        lines += [f"PARAMETER temperature {gen['temperature']}", f"PARAMETER top_p {gen['top_p']}",
                  f"PARAMETER top_k {gen['top_k']}"]
    return "\n".join(lines) + "\n"


def export_ollama(src, out_dir, *, outtype: str = "f16", name: str | None = None, tokenizer=None, lora=None,
                  force: bool = False, show_progress: bool = True) -> Path:
    """Folder with `model.gguf`, `Modelfile` and `README.txt` (the `ollama create` command)."""
    check_outtype(outtype)  # before the slow load
    source = load_source(src, tokenizer=tokenizer, lora=lora, need_tokenizer=True)
    name = name or re.sub(r"[^a-z0-9._-]+", "-", source.name.lower()).strip("-") or "minimind"
    text = modelfile("model.gguf", source)  # fails early on an unknown template, before the slow GGUF
    with atomic_output(out_dir, force, folder=True) as tmp:
        export_gguf(source, tmp / "model.gguf", outtype=outtype, force=True, show_progress=show_progress)
        (tmp / "Modelfile").write_text(text)
        (tmp / "README.txt").write_text(_README.format(name=name, dst=Path(out_dir).resolve()))
    return Path(out_dir)


_README = """Ollama model folder. To register and run it:

    cd {dst}
    ollama create {name} -f Modelfile
    ollama run {name}

Thinking (minimind-3): `ollama run {name} --think`, or `"think": true` in the API request.
"""

