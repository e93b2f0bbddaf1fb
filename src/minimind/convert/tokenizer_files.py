"""Tokenizer files that load in transformers 4.x *and* 5.x.

transformers 5 saves `tokenizer_class: TokenizersBackend` (unknown to 4.x: minimind issue #578) and a *list* in
`extra_special_tokens` (4.x expects a dict). Like the original converter we write `PreTrainedTokenizerFast` and
`extra_special_tokens: {}`; the extra specials go to `additional_special_tokens`, which both versions read. The
chat template goes both into tokenizer_config.json (4.x) and chat_template.jinja (5.x prefers the file).
"""
from __future__ import annotations

import json
from pathlib import Path

from .source import write_json

_V5_ONLY = ("backend", "is_local", "local_files_only", "model_specific_special_tokens", "name_or_path",
            "auto_map", "processor_class")


def chat_template(tokenizer) -> str | None:
    """The tokenizer's chat template; of named templates, the default one."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()))
    return template


def save_tokenizer(tokenizer, folder: Path) -> None:
    """save_pretrained, then tokenizer_config.json rewritten so that transformers 4.x and 5.x both read it."""
    folder = Path(folder)
    tokenizer.save_pretrained(str(folder))
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    extra = cfg.get("extra_special_tokens")
    if isinstance(extra, list) and extra:
        cfg["additional_special_tokens"] = extra
    for key in _V5_ONLY:
        cfg.pop(key, None)
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", extra_special_tokens={}, add_bos_token=False,
               add_eos_token=False)
    cfg.setdefault("clean_up_tokenization_spaces", False)
    template = chat_template(tokenizer)
    if template:
        cfg["chat_template"] = template
        (folder / "chat_template.jinja").write_text(template)
    write_json(cfg_path, cfg)
    write_json(folder / "special_tokens_map.json",
               {k: cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if cfg.get(k)})
