"""IncrementalDetokenizer: streamed pieces add up to the full decode and never hold half a character."""
from __future__ import annotations

from functools import cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tokenizer_dir
from minimind.text.detok import IncrementalDetokenizer

ERAS = ["minimind2", "minimind-3"]


@cache
def _load(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir(name)))


def tok(name: str):
    tokenizer_dir(name)
    return _load(name)


def stream(tokenizer, ids, skip_special_tokens=True) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    return [detok.push(i) for i in ids] + [detok.flush()]


pieces = st.one_of(
    st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),  # CJK
    st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF),  # emoji (4 UTF-8 bytes)
    st.sampled_from(["👍🏽", "👨‍👩‍👧", "🇨🇳", "é", "ß", "，", "。", "…", "€"]),  # multi-codepoint / 2-3 byte
    st.characters(min_codepoint=0x20, max_codepoint=0x7E),  # ASCII
    st.sampled_from([" ", "  ", "\n", "\t", "<think>", "</think>", "<tool_call>", "<|im_end|>", "<|im_start|>"]),
)
texts = st.lists(pieces, max_size=40).map("".join)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("era", ERAS)
@SETTINGS
@given(text=texts)
def test_stream_equals_full_decode_and_never_splits_a_character(era, text):
    t = tok(era)
    ids = t.encode(text, add_special_tokens=False)
    chunks = stream(t, ids)
    assert "".join(chunks) == t.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in c for c in chunks)


@pytest.mark.parametrize("era", ERAS)
@SETTINGS
@given(text=texts)
def test_keeping_special_tokens(era, text):
    t = tok(era)
    ids = t.encode(text, add_special_tokens=False)
    assert "".join(stream(t, ids, skip_special_tokens=False)) == t.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("era", ERAS)
@SETTINGS
@given(ids=st.lists(st.integers(min_value=0, max_value=6399), max_size=30))
def test_arbitrary_ids_still_add_up(era, ids):
    # random ids form invalid UTF-8; whatever the full decode shows, the stream shows the same
    t = tok(era)
    assert "".join(stream(t, ids)) == t.decode(ids, skip_special_tokens=True)


def test_emoji_split_over_byte_tokens_comes_out_whole():
    t = tok("minimind2")
    ids = t.encode("😀", add_special_tokens=False)
    assert len(ids) == 4  # one token per UTF-8 byte in this vocabulary
    assert stream(t, ids) == ["", "", "", "😀", ""]


def test_work_per_token_is_bounded():
    """Each push decodes a short window of recent tokens, not the whole sequence."""
    t = tok("minimind-3")
    longest = []

    class Spy:
        def __getattr__(self, name):
            return getattr(t, name)

        def decode(self, ids, **kw):
            longest.append(len(ids))
            return t.decode(ids, **kw)

    ids = t.encode("你好，世界！Hello world 😀 " * 60, add_special_tokens=False)
    assert len(ids) > 500
    out = stream(Spy(), ids)
    assert "".join(out) == t.decode(ids, skip_special_tokens=True)
    assert max(longest) <= 8


def test_backend_decode_only_when_the_wrapper_adds_nothing():
    """The fast path (tokenizers' own decode) is taken for a plain fast tokenizer; a tokenizer class that overrides
    decode keeps its own decode."""
    import copy

    t = tok("minimind2")
    assert IncrementalDetokenizer(t)._backend is not None

    class Custom(type(t)):
        def decode(self, ids, **kwargs):
            return super().decode(ids, **kwargs).upper()  # composes over windows, unlike a wrapper

    custom = copy.copy(t)
    custom.__class__ = Custom
    detok = IncrementalDetokenizer(custom)
    assert detok._backend is None
    ids = t.encode("hello world", add_special_tokens=False)
    assert "".join(detok.push(i) for i in ids) + detok.flush() == "HELLO WORLD"
