"""Prompts from the tokenizer's own chat template, and the token ids that end a reply.

MiniMind ships its chat templates inside tokenizer_config.json and they differ per release (minimind-compat.md,
section 3): MiniMind2 adds a default system prompt, minimind-3 does not; 2510 and minimind-3 know tools and think
blocks. Rendering through the tokenizer's own template keeps every release byte-exact without re-implementing it.

Tools: a template that reads `tools` (2510, minimind-3, Qwen3) renders them itself. One that does not (MiniMind2,
SmolLM2's) would drop them, and drop tool results too, so the tools, the assistant's earlier calls and the tool
results are written into the messages first, in the model family's own format (TOOL_FORMATS): SmolLM2's authors
put the tool list in the system turn between `<tools>` tags and expect one `<tool_call>[calls]</tool_call>` block;
everything else gets the 2510 format (the same prompt 2510's template writes: one `<tool_call>` block per call).
"""
from __future__ import annotations

import json
from functools import lru_cache


def render_prompt(tokenizer, messages: list[dict], *, tools: list[dict] | None = None,
                  open_thinking: bool | None = False, add_generation_prompt: bool = True) -> str:
    """The prompt string for `messages` as the checkpoint was trained to see it.

    open_thinking is passed under both names the templates read: minimind-3 reads `open_thinking` (generation
    prompt `<think>\\n` when true, else an empty closed think block); 2510 reads `enable_thinking` (an empty think
    block only when it is *false*). None passes neither, i.e. each template's own default -- for 2510 that is no
    think block, which is what the original eval_llm.py and the 2510 SFT data used for non-reasoning weights.
    """
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "this tokenizer"
        raise ValueError(f"{name} has no chat template (tokenizer_config.json without 'chat_template'): use a "
                         "chat tokenizer, or pretrain-style prompting (bos + text, e.g. --weight pretrain)")
    kwargs = {}
    if open_thinking is not None:
        kwargs = {"open_thinking": bool(open_thinking), "enable_thinking": bool(open_thinking)}
    if not renders_tools(tokenizer.chat_template):
        messages, tools = inline_tools(messages, tools, tool_format(tokenizer)), None
    return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **kwargs)


def is_pretrain_weight(weight) -> bool:
    """The original scripts' rule: `pretrain*` weights are not chat-tuned and get pretrain_prompt."""
    return "pretrain" in str(weight or "")


def pretrain_prompt(tokenizer, text: str) -> str:
    """Pretrained (not chat-tuned) weights saw `bos + text` during training, never the template."""
    return (tokenizer.bos_token or "") + text


def stop_token_ids(tokenizer, config=None) -> set[int]:
    """eos ids of the tokenizer and the model config, plus ChatML's `<|im_start|>` / `<|im_end|>` when they are
    tokens: a chat model that starts a new turn has finished its answer."""
    ids: set[int] = set()
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    unk = getattr(tokenizer, "unk_token_id", None)
    for tok in ("<|im_start|>", "<|im_end|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid >= 0 and (tid != unk or unk is None):
            ids.add(tid)
    return ids


# "object": `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` per call, blocks joined by "\n"
# "list": one `<tool_call>[{"name": ..., "arguments": {...}}, ...]</tool_call>` block (SmolLM2)
TOOL_FORMATS = ("object", "list")
_SMOLLM_MARK = "SmolLM"  # SmolLM2's template names the model in its default system prompt
_OBJECT_SYSTEM = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided "
                  "with function signatures within <tools></tools> XML tags:\n<tools>{tools}\n</tools>\n\nFor each "
                  "function call, return a json object with function name and arguments within <tool_call></tool_call> "
                  "XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>")
_LIST_SYSTEM = ("You can call functions to help with the user's request. These are their JSON definitions:\n"
                "<tools>{tools}</tools>\n\nTo call functions, answer with a JSON list of calls (each with the function's "
                "name and its arguments) between <tool_call> and </tool_call>, and nothing else:\n"
                '<tool_call>[{{"name": "function_name", "arguments": {{"argument": "value"}}}}]</tool_call>\n'
                "When no function fits, answer in plain text.")


@lru_cache(maxsize=32)
def renders_tools(template: str) -> bool:
    """Whether the jinja template reads a `tools` variable (else it would drop the tool definitions)."""
    import jinja2
    from jinja2 import meta

    try:
        ast = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except jinja2.TemplateError:  # a tag of transformers' own environment ({% generation %}): read the text
        return "tools" in template
    return "tools" in meta.find_undeclared_variables(ast)


def tool_format(tokenizer) -> str:
    """The tool-call format the model was trained on (one of TOOL_FORMATS)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return "list" if _SMOLLM_MARK in template and not renders_tools(template) else "object"


def call_json(call: dict) -> str:
    """`{"name": ..., "arguments": {...}}` of an OpenAI-shaped call; string arguments are written as they are, as
    the templates that know tools do."""
    fn = call.get("function", call)
    args = fn.get("arguments", {})
    args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return '{"name": ' + json.dumps(fn["name"], ensure_ascii=False) + ', "arguments": ' + args + "}"


def inline_tools(messages: list[dict], tools: list[dict] | None, fmt: str) -> list[dict]:
    """Plain system / user / assistant messages carrying the tools (system turn), the assistant's tool calls (its
    content) and the tool results (a user turn of `<tool_response>` blocks, one turn per run of results)."""
    out: list[dict] = []
    if tools:
        listed = (json.dumps(tools, ensure_ascii=False) if fmt == "list"
                  else "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools))
        block = (_LIST_SYSTEM if fmt == "list" else _OBJECT_SYSTEM).format(tools=listed)
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
        out.append({"role": "system", "content": block if not system else system + "\n\n" + block})
        messages = messages[1:] if system is not None else messages
    for m in messages:
        content = m.get("content") or ""
        if m["role"] == "tool":
            response = "<tool_response>\n" + content + "\n</tool_response>"
            if out and out[-1].get("tool_results"):
                out[-1]["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response, "tool_results": True})
        elif m["role"] == "assistant" and m.get("tool_calls"):
            calls = [call_json(c) for c in m["tool_calls"]]
            block = ("<tool_call>[" + ", ".join(calls) + "]</tool_call>" if fmt == "list"
                     else "\n".join("<tool_call>\n" + c + "\n</tool_call>" for c in calls))
            out.append({**m, "content": content + "\n" + block if content else block})
            out[-1].pop("tool_calls")
        else:
            out.append(m)
    for m in out:
        m.pop("tool_results", None)
    return out
