"""Engine text paths with the real MiniMind2 tokenizer: UTF-8-safe streaming, stop strings across tokens,
chat messages. Tiny random model (vocab 6400); no timing asserts."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tiny_model, tokenizer_dir
from minimind.engine import LLM, SamplingParams
from minimind.engine.sequence import Sequence


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir("minimind2")))


@pytest.fixture(scope="module")
def llm(tokenizer):
    return LLM(tiny_model(vocab_size=6400), tokenizer=tokenizer, max_num_seqs=2, max_model_len=128)


TEXT = st.text(alphabet=st.one_of(st.characters(min_codepoint=0x4E00, max_codepoint=0x4FFF),
                                  st.characters(min_codepoint=0x1F300, max_codepoint=0x1F64F),
                                  st.sampled_from(list("abc xyz,.!?\n"))), min_size=1, max_size=40)


def stream_text(tokenizer, ids: list[int], params: SamplingParams) -> tuple[list[str], Sequence]:
    seq = Sequence("r", 0, [1], params, 0, set(), tokenizer)
    deltas = []
    for token in ids:
        seq.append_token(token, max_len=10_000)
        deltas.append(seq.output().delta_text)
        if seq.is_finished:
            break
    if not seq.is_finished:
        seq._finish("length")
        deltas.append(seq.output().delta_text)
    return deltas, seq


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT, data=st.data())
def test_utf8_streaming_never_splits_characters(tokenizer, text, data):
    ids = tokenizer.encode(text, add_special_tokens=False)
    full = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    deltas, seq = stream_text(tokenizer, ids, SamplingParams(max_tokens=None))
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == full == seq.text
    # A stop string taken from anywhere in the text, usually spanning several tokens.
    start = data.draw(st.integers(0, len(full) - 1))
    stop = full[start:start + data.draw(st.integers(1, 4))]
    deltas, seq = stream_text(tokenizer, ids, SamplingParams(max_tokens=None, stop=[stop]))
    assert "".join(deltas) == seq.text == full[:full.find(stop)]
    assert seq.finish_reason == "stop" and seq.stop_reason == stop


def test_stop_string_across_token_boundary(llm, tokenizer):
    from minimind.text.detok import IncrementalDetokenizer

    base = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)  # each token's text, as the engine forms it
    pieces = [detok.push(t) for t in llm.generate("你好，请介绍一下自己", base)[0].outputs[0].token_ids]
    text = "".join(pieces)
    # The first stop string that occurs first exactly where one token's text ends and the next one's begins.
    j = next(i for i in range(1, len(pieces) - 1) if pieces[i] and pieces[i + 1]
             and text.find(pieces[i][-1] + pieces[i + 1][0]) == len("".join(pieces[:i + 1])) - 1)
    stop = pieces[j][-1] + pieces[j + 1][0]
    expect = text[:text.find(stop)]
    streamed = list(llm.stream("你好，请介绍一下自己", SamplingParams(temperature=0, max_tokens=40, stop=stop,
                                                                  ignore_eos=True)))
    final = streamed[-1].outputs[0]
    assert final.text == expect and final.finish_reason == "stop" and final.stop_reason == stop
    assert "".join(o.outputs[0].delta_text for o in streamed) == expect
    kept = llm.generate("你好，请介绍一下自己", SamplingParams(temperature=0, max_tokens=40, stop=stop,
                                                       include_stop_str_in_output=True, ignore_eos=True))[0]
    assert kept.outputs[0].text == expect + stop


def test_chat_messages_and_eos(llm, tokenizer):
    messages = [{"role": "user", "content": "你好"}]
    out = llm.generate(messages, SamplingParams(temperature=0, max_tokens=5))[0]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert out.prompt_token_ids == tokenizer.encode(prompt, add_special_tokens=False)
    eos = tokenizer.eos_token_id
    forced = llm.generate(messages, SamplingParams(temperature=0, max_tokens=5, logit_bias={eos: 100.0}))[0]
    assert forced.outputs[0].token_ids == [eos] and forced.outputs[0].finish_reason == "stop"
    assert forced.outputs[0].text == ""


def test_prefix_cache_serves_next_chat_turn(llm):
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    turn = [{"role": "user", "content": "讲个故事"}]
    first = llm.generate(turn, sp)[0]
    turn = turn + [{"role": "assistant", "content": first.outputs[0].text}, {"role": "user", "content": "继续"}]
    second = llm.generate(turn, sp)[0]
    assert second.num_cached_tokens >= len(first.prompt_token_ids)
    fresh = LLM(tiny_model(vocab_size=6400), tokenizer=llm.tokenizer, max_num_seqs=1,
                max_model_len=128, enable_prefix_caching=False).generate(turn, sp)[0]
    assert fresh.outputs[0].token_ids == second.outputs[0].token_ids and fresh.num_cached_tokens == 0
    assert torch.equal(torch.tensor(fresh.prompt_token_ids), torch.tensor(second.prompt_token_ids))
