"""Loglikelihood scoring through /v1/completions (echo with logprobs, max_tokens=0, token-id prompts) with the
official openai client, /tokenizer_info with lm-eval's remote tokenizer, and a 5-choice task through lm-eval's
`local-completions` model: every logprob is checked against the tiny model's own logits (a plain forward)."""
from __future__ import annotations

import json

import httpx
import pytest
import torch

from conftest import serve, tiny_model, tokenizer_dir

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir("minimind2")))


@pytest.fixture(scope="module")
def model():
    return tiny_model("minimind2", use_moe=True, vocab_size=6400)


@pytest.fixture(scope="module")
def url(model, tokenizer):
    from minimind.engine import LLM
    from minimind.serve import create_app

    llm = LLM(model, tokenizer=tokenizer, max_num_seqs=4, max_model_len=256, dtype="float32")
    with serve(create_app(llm, served_model_name="tiny")) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


def logprobs_of(model, ids: list[int]) -> torch.Tensor:
    """[L, V]: log-softmax of the model's logits at every position (position i predicts token i + 1)."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(dim=-1)


def check_logprobs(lp, ids: list[int], want: torch.Tensor, token_text, top_n: int) -> None:
    """The legacy logprobs object of tokens `ids` (the first one unscored) against the model's log-softmax."""
    assert lp.tokens == [token_text(t) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    offsets = [0]
    for tok in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(tok))
    assert lp.text_offset == offsets
    for i in range(1, len(ids)):
        row = want[i - 1]
        assert lp.token_logprobs[i] == pytest.approx(row[ids[i]].item(), abs=1e-4)
        top = {token_text(t): v for t, v in zip(row.topk(top_n).indices.tolist(), row.topk(top_n).values.tolist())}
        top.setdefault(token_text(ids[i]), row[ids[i]].item())  # the chosen token is always there (OpenAI's rule)
        assert lp.top_logprobs[i] == pytest.approx(top, abs=1e-4)


def test_echo_max_tokens_zero_scores_the_prompt(client, model, tokenizer):
    text = "The capital of France is Paris."
    ids = tokenizer.encode(text, add_special_tokens=False)
    r = client.completions.create(model="tiny", prompt=text, max_tokens=0, echo=True, logprobs=2)
    [c] = r.choices
    assert c.text == tokenizer.decode(ids) and c.finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0
    text_of = lambda t: tokenizer.decode([t])
    check_logprobs(c.logprobs, ids, logprobs_of(model, ids), text_of, 2)
    plain = client.completions.create(model="tiny", prompt=text, max_tokens=0, echo=True)
    assert plain.choices[0].text == c.text and plain.choices[0].logprobs is None


def test_echo_token_id_prompts_then_generated_tokens(client, model, tokenizer):
    prompts = [[10, 200, 3000, 45, 6], [7, 7, 7], list(range(100, 140))]
    r = client.completions.create(model="tiny", prompt=prompts, max_tokens=2, echo=True, logprobs=1, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    text_of = lambda t: tokenizer.decode([t])
    for ids, c in zip(prompts, r.choices):
        whole = list(ids)
        for _ in range(2):  # greedy: the model's most likely next token, twice
            whole.append(int(logprobs_of(model, whole)[-1].argmax()))
        assert c.finish_reason == "length" and c.text == tokenizer.decode(ids) + tokenizer.decode(whole[len(ids):])
        check_logprobs(c.logprobs, whole, logprobs_of(model, whole), text_of, 1)
    one = client.completions.create(model="tiny", prompt=prompts[0], max_tokens=0, echo=True, logprobs=0)
    assert one.choices[0].logprobs.token_logprobs[0] is None  # scored alone: the same numbers as in the batch
    assert one.choices[0].logprobs.token_logprobs[1:] == pytest.approx(
        r.choices[0].logprobs.token_logprobs[1:len(prompts[0])], abs=1e-4)


def test_streamed_echo_equals_the_whole_answer(client):
    kwargs = dict(model="tiny", prompt=["Once upon a time", "Hello"], max_tokens=4, echo=True, logprobs=2,
                  temperature=0)
    whole = client.completions.create(**kwargs)
    parts: dict[int, dict] = {}
    for chunk in client.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            p = parts.setdefault(c.index, {"text": "", "tokens": [], "token_logprobs": [], "text_offset": []})
            p["text"] += c.text
            if c.logprobs is not None:
                for key in ("tokens", "token_logprobs", "text_offset"):
                    p[key] += getattr(c.logprobs, key)
    for c in whole.choices:
        p = parts[c.index]
        assert p["text"] == c.text and p["tokens"] == c.logprobs.tokens
        assert p["text_offset"] == c.logprobs.text_offset and p["token_logprobs"][0] is None
        # equal up to rounding: the two requests' prompts share engine steps (GEMM shapes) differently
        assert p["token_logprobs"][1:] == pytest.approx(c.logprobs.token_logprobs[1:], abs=1e-4)
    zero = list(client.completions.create(model="tiny", prompt="Hello", max_tokens=0, echo=True, logprobs=1,
                                          stream=True))
    assert zero[0].choices[0].text == "Hello" and zero[0].choices[0].logprobs.token_logprobs[0] is None
    assert zero[-1].choices[0].finish_reason == "length"


def test_max_tokens_zero_fills_the_context_and_bad_values_are_400(url):
    full = httpx.post(url + "/v1/completions", json={"prompt": [5] * 256, "max_tokens": 0, "echo": True,
                                                     "logprobs": 0}, timeout=60)
    assert full.status_code == 200 and len(full.json()["choices"][0]["logprobs"]["tokens"]) == 256
    for body, param in (({"prompt": "x", "max_tokens": -1}, "max_tokens"),
                        ({"prompt": [5] * 257, "max_tokens": 0}, "prompt"),
                        ({"prompt": [99999], "max_tokens": 0, "echo": True}, "prompt")):
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_tokenizer_info_serves_lm_evals_remote_tokenizer(url, tokenizer):
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    info = httpx.get(url + "/tokenizer_info", timeout=30).json()
    assert info["eos_token"] == tokenizer.eos_token and info["bos_token"] == tokenizer.bos_token
    assert info["chat_template"] == tokenizer.chat_template and info["model_max_length"] == 256
    assert info["tokenizer_class"] and "name_or_path" not in info and "vocab_file" not in info
    assert check_remote_tokenizer_support(url + "/v1/completions")
    remote = RemoteTokenizer(url + "/v1/completions")
    text = "Hello, 世界! 1 + 1 = 2"
    assert remote.encode(text) == tokenizer.encode(text, add_special_tokens=False)
    assert remote.decode(remote.encode(text)) == text and remote.eos_token_id == tokenizer.eos_token_id
    assert httpx.get(url + "/tokenizer_info", params={"model": "nope"}, timeout=30).status_code == 404


DOCS = [  # lm-eval puts its target delimiter, a space, between the question and each choice
    {"question": "Q: What is two plus two?\nA:", "choices": ["three", "four", "five", "six", "seven"], "answer": 1},
    {"question": "The sky on a clear day is", "choices": ["green", "blue", "red", "black", "white"], "answer": 1},
    {"question": "Water freezes at zero degrees", "choices": ["Celsius", "Kelvin", "Fahrenheit", "Rankine", "percent"],
     "answer": 0},
    {"question": "猫是一种", "choices": ["动物", "植物", "矿物", "颜色", "数字"], "answer": 0},
]


def direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """lm-eval's causal-LM scoring done by hand: encode context + continuation whole and split it where the context's
    own encoding ends (trailing spaces moved to the continuation), then sum the continuation tokens' logprobs."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    n = len(tokenizer.encode(context, add_special_tokens=False))
    lp = logprobs_of(model, whole)
    return sum(lp[i - 1, whole[i]].item() for i in range(n, len(whole)))


def test_lm_eval_multiple_choice_picks_the_models_own_answer(url, model, tokenizer, tmp_path, monkeypatch):
    """A 5-choice task through lm-eval's local-completions model (loglikelihood requests: echo, logprobs=1,
    max_tokens=1, token-id prompts in batches) gives every document the choice the model's logits give."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in DOCS))
    (tmp_path / "minimind_choice.yaml").write_text(
        "task: minimind_choice\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: question\ndoc_to_choice: choices\n"
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n")
    results = lm_eval.simple_evaluate(
        model="local-completions", tasks=["minimind_choice"], task_manager=TaskManager(include_path=str(tmp_path)),
        model_args={"base_url": url + "/v1/completions", "model": "tiny", "tokenizer_backend": "remote",
                    "batch_size": 5, "max_retries": 1}, log_samples=True)
    samples = sorted(results["samples"]["minimind_choice"], key=lambda s: s["doc_id"])
    assert len(samples) == len(DOCS)
    for sample, doc in zip(samples, DOCS):
        assert [tuple(a) for a in sample["arguments"]] == [(doc["question"], " " + c) for c in doc["choices"]]
        want = [direct_loglikelihood(model, tokenizer, doc["question"], " " + c) for c in doc["choices"]]
        got = [r[0][0] for r in sample["resps"]]
        assert got == pytest.approx(want, abs=1e-3)
        assert max(range(5), key=got.__getitem__) == max(range(5), key=want.__getitem__)
        assert sample["acc"] == float(max(range(5), key=want.__getitem__) == doc["answer"])
