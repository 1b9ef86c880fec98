"""A bounded loopback load test of ouro-mlx's OpenAI-compatible server.

    python examples/server_load.py [--model PATH | --random-hidden 2048] [--clients 1 4 16]

Serves the model with ``ouro-mlx serve`` on 127.0.0.1 (a free port, its own process),
then for each N in --clients sends N concurrent streaming chat requests and reports
time to first token, tokens/s per stream and in total, and whether any request failed
(no [DONE], wrong usage). --cache-turns also measures time to first token on a
prompt-cache miss (a conversation's first, long turn) against a hit (its next turn)
at growing lengths. Every request has a timeout; nothing leaves loopback.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor


def start_server(model_path: str, model_id: str):
    """``ouro-mlx serve`` in its own process (the clients here would share its GIL)."""
    import subprocess
    import sys

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "ouro_mlx", "serve", "--model", model_path,
                             "--model-id", model_id, "--port", str(port),
                             "--max-concurrency", "64"], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the server did not start")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)


def stream(url: str, model_id: str, messages: list[dict], max_tokens: int,
           timeout: float = 600, **extra) -> dict:
    """One streamed chat request: ttft, seconds, tokens, text, cached, ok."""
    import httpx

    body = {"model": model_id, "messages": messages, "max_tokens": max_tokens,
            "stream": True, **extra}
    start = time.perf_counter()
    first, lines = None, []
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body,
                          timeout=timeout) as r:
            if r.status_code != 200:
                return {"ok": False, "why": f"HTTP {r.status_code}"}
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                lines.append(line[6:])
                if first is None and len(lines) == 2:  # the first token's chunk
                    first = time.perf_counter() - start
    except Exception as e:  # counted as a failure, not a crash of the test
        return {"ok": False, "why": repr(e)}
    seconds = time.perf_counter() - start
    if not lines or lines[-1] != "[DONE]":
        return {"ok": False, "why": "no [DONE]"}
    chunks = [json.loads(x) for x in lines[:-1]]
    usage = chunks[-1].get("usage") or {}
    tokens = len(chunks) - 1
    ok = usage.get("completion_tokens") == tokens and "error" not in chunks[-1]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    return {"ok": ok, "why": "" if ok else "usage", "ttft": first, "seconds": seconds,
            "tokens": tokens, "text": text,
            "cached": usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)}


def load_rounds(url: str, model_id: str, clients: list[int], max_tokens: int) -> None:
    print("| clients | TTFT median / max (s) | tokens per answer | tok/s per stream | "
          "total tok/s | failed |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in clients:
        prompts = [f"{(7 * i) % 40},{(11 * i) % 40},{(3 * i) % 40},{i % 40}" for i in range(n)]
        start = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            results = list(pool.map(lambda p: stream(url, model_id, [
                {"role": "user", "content": p}], max_tokens, temperature=0.0), prompts))
        wall = time.perf_counter() - start
        good = [r for r in results if r["ok"]]
        ttfts = [r["ttft"] for r in good]
        per = [(r["tokens"] - 1) / (r["seconds"] - r["ttft"]) for r in good if r["tokens"] > 1]
        total = sum(r["tokens"] for r in good) / wall
        failed = len(results) - len(good)
        mean = sum(r["tokens"] for r in good) / max(len(good), 1)
        print(f"| {n} | {statistics.median(ttfts):.3f} / {max(ttfts):.3f} | {mean:.1f} | "
              f"{statistics.median(per) if per else 0:.1f} | {total:.1f} | {failed} |",
              flush=True)


def cache_rounds(url: str, model_id: str, lengths: list[int]) -> None:
    """TTFT of a conversation's first turn (a miss: nothing shared) against its next turn
    (a hit: only the new tokens are processed)."""
    print("| conversation tokens | TTFT miss (s) | TTFT hit (s) | cached tokens |")
    print("|---:|---:|---:|---:|")
    for i, n in enumerate(lengths):
        # one long user turn of about n byte-level tokens, a unique start: no shared prefix
        history = [{"role": "user", "content": f"{i}#" + "ab" * (n // 2)}]
        miss = stream(url, model_id, history, 4)
        history += [{"role": "assistant", "content": miss.get("text", "")},
                    {"role": "user", "content": "and then?"}]
        hit = stream(url, model_id, history, 2)
        if not (miss["ok"] and hit["ok"]):
            print(f"| {n} | failed: {miss.get('why')} {hit.get('why')} |")
            continue
        print(f"| {n} | {miss['ttft']:.3f} | {hit['ttft']:.3f} | {hit['cached']} |",
              flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="A checkpoint (default: the bundled model).")
    p.add_argument("--random-hidden", type=int, default=None, metavar="H",
                   help="Serve a random 2-layer model of hidden size H (e.g. 2048) instead.")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16],
                   help="Concurrent streaming clients per round.")
    p.add_argument("--max-tokens", type=int, default=16, help="Tokens per request.")
    p.add_argument("--cache-turns", type=int, nargs="*", default=[],
                   help="Conversation lengths (tokens) for the cache hit/miss rounds.")
    args = p.parse_args()
    if args.random_hidden:
        from ouro_mlx.random_model import make_random_checkpoint

        h = args.random_hidden
        dims = dict(hidden_size=h, num_hidden_layers=2, num_attention_heads=h // 128,
                    num_key_value_heads=h // 128, head_dim=128, intermediate_size=h * 11 // 4,
                    vocab_size=512, max_position_embeddings=16384, rope_theta=1e6)
        path = str(make_random_checkpoint(tempfile.mkdtemp() + "/m", dims, seed=0))
        model_id = f"random-h{h}"
    else:
        from ouro_mlx.demo import model_path

        path, model_id = args.model or str(model_path()), args.model or "ouro-demo"
    server, url = start_server(path, model_id)
    try:
        stream(url, model_id, [{"role": "user", "content": "warm up"}], 2)
        print(f"{model_id}, {args.max_tokens} tokens per request")
        load_rounds(url, model_id, args.clients, args.max_tokens)
        if args.cache_turns:
            cache_rounds(url, model_id, args.cache_turns)
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
