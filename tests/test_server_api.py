"""What real OpenAI clients send to ``ouro-mlx serve``, through the openai SDK (sync,
async, streaming): batched requests at mixed loop depths, prompt lists and token ids,
echo and logprobs, n, include_usage, tools refused, the tokenizer endpoints."""

from __future__ import annotations

import asyncio

import mlx.core as mx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from ouro_mlx import load, stream_generate  # noqa: E402
from ouro_mlx.demo import model_path  # noqa: E402
from ouro_mlx.encoding import encode_chat, encode_text  # noqa: E402
from ouro_mlx.server import Limits  # noqa: E402
from tests.test_server import GAMES, Running, user  # noqa: E402

MIXED = [dict(ut_steps=1), dict(ut_steps=2), dict(ut_steps=3), dict(ut_steps=4),
         dict(exit_threshold=0.5), dict(exit_threshold=0.9), dict(exit_at_step=1), {}]


@pytest.fixture(scope="module")
def demo():
    model, tokenizer = load(str(model_path()))
    run = Running(model, tokenizer, limits=Limits(max_tokens=256, max_active=16))
    yield run
    run.stop()


def alone(demo, ids, max_tokens, **opts):
    rs = list(stream_generate(demo.model, demo.tokenizer, ids, max_tokens=max_tokens,
                              **opts))
    return "".join(r.text for r in rs), [r.loops for r in rs]


def test_async_clients_at_mixed_depths_get_what_they_get_alone(demo):
    """Eight concurrent streaming requests, each at its own loop options, share the
    batch; each gets the text and loop counts of a request served alone."""
    client = openai.AsyncOpenAI(base_url=demo.url + "/v1", api_key="none", max_retries=0)
    games = [GAMES[i % len(GAMES)] for i in range(len(MIXED))]

    async def one(game, opts):
        text, loops = "", []
        stream = await client.chat.completions.create(
            model="ouro-demo", messages=user(game), max_tokens=12, stream=True,
            extra_body=opts)
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            loops += chunk.model_extra["ouro"]["loops"]
        return text, loops

    async def main():
        return await asyncio.gather(*(one(g, o) for g, o in zip(games, MIXED)))

    got = asyncio.run(main())
    for game, opts, (text, loops) in zip(games, MIXED, got):
        ids = encode_chat(demo.tokenizer, user(game), add_generation_prompt=True)
        want_text, want_loops = alone(demo, ids, 12, **opts)
        assert (text, loops) == (want_text, want_loops), opts
    assert len({tuple(x[1]) for x in got}) > 3


def test_completion_prompt_shapes(demo):
    """A string, a list of strings, token ids and a list of id lists: one choice per
    prompt, each what that prompt gets alone."""
    texts = [g + " -> " for g in GAMES[:3]]
    ids = [encode_text(demo.tokenizer, t) for t in texts]
    want = [alone(demo, i, 6)[0] for i in ids]
    c = demo.client.completions
    for prompt in (texts, ids):
        r = c.create(model="ouro-demo", prompt=prompt, max_tokens=6)
        assert [ch.text for ch in sorted(r.choices, key=lambda x: x.index)] == want
        assert r.usage.prompt_tokens == sum(map(len, ids))
    assert c.create(model="ouro-demo", prompt=ids[1], max_tokens=6).choices[0].text == want[1]
    with pytest.raises(openai.BadRequestError) as e:
        c.create(model="ouro-demo", prompt=[[1, 2], [10 ** 9]], max_tokens=2)
    assert e.value.body["param"] == "prompt"


def test_echo_and_logprobs_score_the_prompt(demo):
    """lm-eval's loglikelihood request: token ids, echo, logprobs 1, max_tokens 1."""
    ids = encode_text(demo.tokenizer, GAMES[0] + " -> =1")
    r = demo.client.completions.create(model="ouro-demo", prompt=ids, echo=True, logprobs=3,
                                       max_tokens=1, temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None
    assert r.choices[0].text.startswith(demo.tokenizer.decode(ids))
    logits = demo.model(mx.array([ids]))[0].astype(mx.float32)  # the model's exit rule
    ref = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(ref[i - 1, ids[i]].item(), abs=1e-3)
        best = max(lp.top_logprobs[i].items(), key=lambda kv: kv[1])
        assert best[1] == pytest.approx(ref[i - 1].max().item(), abs=1e-3)
        assert len(lp.top_logprobs[i]) <= 3
    assert lp.text_offset == sorted(lp.text_offset)
    # echo with max_tokens 0: the prompt only
    r = demo.client.completions.create(model="ouro-demo", prompt=ids, echo=True, logprobs=0,
                                       max_tokens=0)
    assert len(r.choices[0].logprobs.tokens) == len(ids) and r.usage.completion_tokens == 0
    r = demo.client.completions.create(model="ouro-demo", prompt=GAMES[1], echo=True,
                                       max_tokens=4)
    assert r.choices[0].text.startswith(GAMES[1]) and r.choices[0].logprobs is None


def test_chat_logprobs_n_and_usage_chunk(demo):
    messages = user(GAMES[2])
    r = demo.client.chat.completions.create(model="ouro-demo", messages=messages,
                                            max_tokens=10, logprobs=True, top_logprobs=2,
                                            n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) == 1  # greedy copies agree
    content = r.choices[0].logprobs.content
    assert content and all(len(e.top_logprobs) == 2 for e in content)
    assert all(e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob for e in content)
    assert "".join(e.token for e in content) == r.choices[0].message.content
    assert all(e.logprob == pytest.approx(e.top_logprobs[0].logprob) for e in content)
    assert r.usage.completion_tokens == 3 * len(content) + 3 * (
        r.choices[0].finish_reason == "stop")  # each choice's eos counts
    chunks = list(demo.client.chat.completions.create(
        model="ouro-demo", messages=messages, max_tokens=10, stream=True, n=2,
        stream_options={"include_usage": True}))
    assert "ouro" in chunks[0].model_extra
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    for i in range(2):
        text = "".join(c.choices[0].delta.content or "" for c in chunks
                       if c.choices and c.choices[0].index == i)
        assert text == r.choices[0].message.content
    sampled = demo.client.chat.completions.create(
        model="ouro-demo", messages=messages, max_tokens=10, n=4, temperature=1.5)
    assert len(sampled.choices) == 4


def test_tokenizer_endpoints(demo):
    text = "2,23,14,31 <|im_end|>"
    r = httpx.post(demo.url + "/tokenize", json={"prompt": text}, timeout=10).json()
    # as the HF tokenizer does (lm-eval's remote tokenizer): <|im_end|> is the special token
    assert r["tokens"] == demo.tokenizer.encode(text, add_special_tokens=False)
    assert r["tokens"][-1] in demo.tokenizer.eos_token_ids or len(r["tokens"]) < len(
        encode_text(demo.tokenizer, text))
    assert r["count"] == len(r["tokens"])
    assert r["max_model_len"] == demo.model.args.max_position_embeddings
    r2 = httpx.post(demo.url + "/tokenize", json={"messages": user("1,23")},
                    timeout=10).json()
    assert r2["tokens"] == encode_chat(demo.tokenizer, user("1,23"), add_generation_prompt=True)
    back = httpx.post(demo.url + "/detokenize", json={"tokens": r["tokens"]}, timeout=10)
    assert back.json()["prompt"] == text
    bad = httpx.post(demo.url + "/detokenize", json={"tokens": [-1]}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    info = httpx.get(demo.url + "/tokenizer_info", timeout=10).json()
    assert info["eos_token_ids"] == sorted(demo.tokenizer.eos_token_ids)
    assert info["chat_template"]


def test_lm_eval_requests(demo):
    """The requests lm-eval's local-completions sends (lm-eval 0.4): the remote
    tokenizer's probe, then a batch of id-list prompts scored by loglikelihood, which
    it slices as ``token_logprobs[ctxlen:-1]`` and checks greedy by exact equality."""
    info = httpx.get(demo.url + "/tokenizer_info", timeout=10).json()
    assert {"eos_token", "bos_token", "pad_token", "chat_template"} <= set(info)
    tok = httpx.post(demo.url + "/tokenize", json={"prompt": info["eos_token"],
                                                   "add_special_tokens": False}).json()
    assert tok["tokens"] == [info["eos_token_id"]]
    context = encode_chat(demo.tokenizer, user(GAMES[0]), add_generation_prompt=True)
    right = [r.token for r in stream_generate(demo.model, demo.tokenizer, context,
                                              max_tokens=8)][:-1]  # "=133", no eos
    wrong = [right[0], right[2], right[1], *right[3:]]  # "=313"
    assert right != wrong
    conts = [right, wrong]
    body = {"model": "ouro-demo", "prompt": [context + c for c in conts], "temperature": 0,
            "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True}
    r = httpx.post(demo.url + "/v1/completions", json=body, timeout=60).json()
    scores = []
    for choice, cont in zip(sorted(r["choices"], key=lambda c: c["index"]), conts):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(context) + len(cont) + 1
        picked = lp["token_logprobs"][len(context):-1]
        tops = lp["top_logprobs"][len(context):-1]
        scores.append(sum(picked))
        greedy = all(v == max(t.values()) for v, t in zip(picked, tops))
        assert greedy == (cont == right)
    assert scores[0] > scores[1]


def test_streamed_completions_with_echo_logprobs_and_two_prompts(demo):
    texts = [GAMES[3] + " -> ", GAMES[4] + " -> "]
    whole = demo.client.completions.create(model="ouro-demo", prompt=texts, max_tokens=5,
                                           echo=True, logprobs=2)
    chunks = list(demo.client.completions.create(
        model="ouro-demo", prompt=texts, max_tokens=5, echo=True, logprobs=2, stream=True,
        stream_options={"include_usage": True}))
    for choice in whole.choices:
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text
        assert choice.text.startswith(texts[choice.index])
        lp = [v for c in mine for v in c.logprobs.token_logprobs]
        assert lp == choice.logprobs.token_logprobs and lp[0] is None
        assert mine[-1].finish_reason == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
