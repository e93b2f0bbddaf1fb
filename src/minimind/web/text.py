"""The UI strings of both web UIs, in English and Chinese (one table: Streamlit and Gradio read the same one)."""
from __future__ import annotations

import os

LANG_ENV = "MINIMIND_WEB_LANG"  # `minimind web --lang` -> the Streamlit process (it runs in a subprocess)
LANG_NAMES = {"en": "English", "zh": "中文"}

TEXT = {
    "en": {"model": "Model / LoRA", "system": "System prompt", "turns": "History turns", "temperature": "Temperature",
           "top_p": "Top p", "max_tokens": "Max tokens", "clear": "Clear chat", "ask": "Ask something",
           "reasoning": "Reasoning", "tools": "Tool calls", "stop": "Stop", "stopped": "stopped",
           "settings": "Settings",
           "pretrain": "Pretrain weights: the model continues your text (no chat template, system prompt or "
                       "history)."},
    "zh": {"model": "模型 / LoRA", "system": "系统提示词", "turns": "历史对话轮数", "temperature": "温度",
           "top_p": "Top p", "max_tokens": "最大生成长度", "clear": "清空对话", "ask": "请输入问题",
           "reasoning": "思考过程", "tools": "工具调用", "stop": "停止", "stopped": "已停止", "settings": "设置",
           "pretrain": "预训练权重：模型续写你的文本（不使用对话模板、系统提示词和历史对话）。"},
}


def default_lang() -> str:  # `minimind web --lang`; English when unset or unknown
    lang = os.environ.get(LANG_ENV, "en")
    return lang if lang in TEXT else "en"
