"""Prompts from the tokenizer's own chat template, and the token ids that end a reply.

MiniMind ships its chat templates inside tokenizer_config.json and they differ per release (minimind-compat.md,
section 3): MiniMind2 adds a default system prompt, minimind-3 does not; 2510 and minimind-3 know tools and think
blocks. Rendering through the tokenizer's own template keeps every release byte-exact without re-implementing it.
"""
from __future__ import annotations


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
