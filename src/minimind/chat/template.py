"""Prompts from the tokenizer's own chat template, and parsers for what the model writes back.

MiniMind ships its chat templates inside tokenizer_config.json and they differ per release (minimind-compat.md,
section 3): MiniMind2 adds a default system prompt, minimind-3 does not; 2510 and minimind-3 know tools and think
blocks. Rendering through the tokenizer's own template keeps every release byte-exact without re-implementing it.
"""
from __future__ import annotations

import json
import re

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


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
    return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **kwargs)


def is_pretrain_weight(weight) -> bool:
    """The original scripts' rule: `pretrain*` weights are not chat-tuned and get pretrain_prompt."""
    return "pretrain" in str(weight or "")


def pretrain_prompt(tokenizer, text: str) -> str:
    """Pretrained (not chat-tuned) weights saw `bos + text` during training, never the template."""
    return (tokenizer.bos_token or "") + text


def split_reasoning(text: str, *, started_in_think: bool = False) -> tuple[str, str]:
    """(reasoning, content) of a reply that may contain a `<think>...</think>` block.

    minimind-3 with open_thinking puts `<think>\\n` into the generation prompt, so the reply starts *inside* the
    block and only `</think>` appears; that case is handled by the `</think>` split alone. A reply that has not
    reached `</think>` yet is all reasoning if it opened the block itself or `started_in_think` says the prompt did.
    """
    stripped = text.lstrip()
    if THINK_CLOSE in text:
        head, _, tail = text.partition(THINK_CLOSE)
        head = head.lstrip().removeprefix(THINK_OPEN)
        return head.strip("\n"), tail.lstrip("\n")
    if stripped.startswith(THINK_OPEN):
        return stripped[len(THINK_OPEN):].lstrip("\n"), ""
    if started_in_think:
        return text.lstrip("\n"), ""
    return "", text


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """(content, [{"name", "arguments"}]) from `<tool_call>{json}</tool_call>` blocks.

    `arguments` is a JSON string, the OpenAI wire form. A block whose body is not a JSON object with a "name" stays
    in the content untouched, so nothing the model wrote is silently lost.
    """
    calls: list[dict] = []

    def take(match: re.Match) -> str:
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError:
            return match.group(0)
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return match.group(0)
        args = call.get("arguments", call.get("parameters", {}))
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        calls.append({"name": call["name"], "arguments": args})
        return ""

    content = _TOOL_CALL.sub(take, text)
    return (content.strip() if calls else content), calls
