"""vLLM's tokenizer routes at the server root (/tokenize, /detokenize, /tokenizer_info), as harnesses use them:
lm-eval's remote tokenizer reads ``eos_token`` from /tokenizer_info, resolves its id through /tokenize, and
counts on /tokenize reading text exactly as the completions route does."""

from __future__ import annotations

from pathlib import Path

import jinja2
import requests
from helpers.serve import deployed, expect_error

from pipeline.model.tokenizer import get_tokenizer
from pipeline.serve.protocol import ChatMessage, chat_template

TEXT = "Hello world, naïve café 東京 😀\n\n  spaces<|endoftext|>ROMEO: O Romeo"


def test_tokenizer_routes_follow_vllm_and_agree_with_completions(
    tmp_path: Path, serve_port: int, exports: dict[str, str]
) -> None:
    tokenizer = get_tokenizer()
    key = "sk-test-tokenizer-routes"
    auth = {"Authorization": f"Bearer {key}"}
    with deployed(tmp_path, serve_port, exports["a"], api_key=key) as url:
        for method, path, body in (
            ("GET", "/tokenizer_info", None),
            ("POST", "/tokenize", {"prompt": "x"}),
            ("POST", "/detokenize", {"tokens": [1]}),
        ):
            expect_error(requests.request(method, f"{url}{path}", json=body, timeout=30), 401, "invalid_api_key")

        info = requests.get(f"{url}/tokenizer_info", headers=auth, timeout=30).json()
        context = requests.get(f"{url}/v1/models", headers=auth, timeout=30).json()["data"][0]["max_model_len"]
        assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == context
        assert info["vocab_size"] == 50257 and info["add_bos_token"] is False

        r = requests.post(f"{url}/tokenize", json={"prompt": TEXT, "add_special_tokens": False}, headers=auth)
        body = r.json()
        assert r.status_code == 200 and set(body) == {"count", "max_model_len", "tokens", "token_strs"}
        expected = tokenizer.encoding.encode(TEXT, allowed_special="all")
        assert body["tokens"] == expected and body["count"] == len(expected) and body["max_model_len"] == context
        assert 50256 in body["tokens"]  # the special token's text is that token, as OpenAI and HF read it
        eos = requests.post(f"{url}/tokenize", json={"prompt": info["eos_token"]}, headers=auth).json()
        assert eos["tokens"] == [50256]
        strs = requests.post(f"{url}/tokenize", json={"prompt": "ROMEO:", "return_token_strs": True}, headers=auth)
        assert strs.json()["token_strs"] == ["ROM", "EO", ":"]

        # longer than the context: tokenized whole (a harness windows it)
        long = requests.post(f"{url}/tokenize", json={"prompt": " word" * (3 * context)}, headers=auth).json()
        assert long["count"] == 3 * context

        back = requests.post(f"{url}/detokenize", json={"tokens": expected}, headers=auth).json()
        assert back == {"prompt": TEXT}
        expect_error(requests.post(f"{url}/detokenize", json={"tokens": [50257]}, headers=auth), 400)
        expect_error(requests.post(f"{url}/detokenize", json={"tokens": "1 2"}, headers=auth), 400)
        expect_error(requests.post(f"{url}/tokenize", json={}, headers=auth), 400)
        expect_error(requests.post(f"{url}/tokenize", json={"prompt": "x", "model": "other"}, headers=auth), 404)

        # one count everywhere: the completions route reads the same text into the same tokens
        done = requests.post(
            f"{url}/v1/completions", json={"prompt": TEXT, "max_tokens": 1}, headers=auth, timeout=60
        ).json()
        assert done["usage"]["prompt_tokens"] == len(expected)
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Romeo?"}]
        chat = requests.post(
            f"{url}/v1/chat/completions", json={"messages": messages, "max_tokens": 1}, headers=auth, timeout=60
        ).json()
        tokenized = requests.post(f"{url}/tokenize", json={"messages": messages}, headers=auth).json()
        assert chat["usage"]["prompt_tokens"] == tokenized["count"]
        # the served chat template renders what the chat route sends the model
        rendered = (
            jinja2.Environment()
            .from_string(info["chat_template"])
            .render(messages=messages, add_generation_prompt=True)
        )
        assert rendered == chat_template([ChatMessage(**m) for m in messages])
