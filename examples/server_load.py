"""A bounded loopback load test of ouro-mlx's OpenAI-compatible server.

    python examples/server_load.py [--model PATH | --random-hidden 2048] [--clients 1 4 16]
        [--peer] [--rounds 2] [--mixed] [--extra '{"exit_threshold": 1.0}']

Serves the model with ``ouro-mlx serve`` on 127.0.0.1 (a free port, its own process),
then for each N in --clients sends N concurrent streaming chat requests and reports
time to first token, tokens/s per stream and in total, and whether any request failed
(no [DONE], wrong usage). --peer also serves the same directory with ``mlx_lm.server``
and alternates the two, round by round. --mixed gives client i its own loop options
(ut_steps 1-4, Q-exit at 0.5 and 0.9, exit_at_step 1, the model's default) and checks
that every answer equals the one the same request gets alone. --cache-turns also measures time to first token on a
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


MIXED = [{"ut_steps": 1}, {"ut_steps": 2}, {"ut_steps": 3}, {"ut_steps": 4},
         {"exit_threshold": 0.5}, {"exit_threshold": 0.9}, {"exit_at_step": 1}, {}]


def start_server(model_path: str, model_id: str, peer: bool = False,
                 flags: tuple[str, ...] = ()):
    """``ouro-mlx serve`` (with ``flags``), or ``mlx_lm.server``, in its own process
    (the clients here would share its GIL)."""
    import subprocess
    import sys

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if peer:
        cmd = [sys.executable, "-m", "mlx_lm.server", "--model", model_path,
               "--port", str(port), "--log-level", "ERROR"]
    else:
        cmd = [sys.executable, "-m", "ouro_mlx", "serve", "--model", model_path,
               "--model-id", model_id, "--port", str(port), "--max-concurrency", "64",
               *flags]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the server did not start")
        try:
            if httpx.get(url + ("/v1/models" if peer else "/health"),
                         timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)


def stream(url: str, model_id: str, messages: list[dict], max_tokens: int,
           timeout: float = 600, **extra) -> dict:
    """One streamed request on its own client (``astream``)."""
    import asyncio

    import httpx

    async def one():
        async with httpx.AsyncClient(timeout=timeout) as client:
            return await astream(client, url, model_id, messages, max_tokens, extra)

    return asyncio.run(one())


def prompts_for(n: int) -> list[str]:
    if SWAPS:
        from ouro_mlx.demo.task import eval_problems

        return [p.question for p in eval_problems(n, 10_000, SWAPS, SWAPS)]
    return [f"{(7 * i) % 40},{(11 * i) % 40},{(3 * i) % 40},{i % 40}" for i in range(n)]


async def astream(client, url: str, model_id: str, messages: list[dict], max_tokens: int,
                  extra: dict) -> dict:
    """One streamed request (greedy unless ``extra`` says otherwise): ttft, seconds,
    tokens, text, cached, ok. N of them share one asyncio client in one thread, so
    that the load generator takes little of the CPU the servers share with it."""
    body = {"model": model_id, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}, **extra}
    if ROUTE == "completions":  # the prompt as raw text: no chat template, no early eos
        body["prompt"] = messages[-1]["content"]
    else:
        body["messages"] = messages
    start = time.perf_counter()
    first, lines = None, []
    try:
        async with client.stream("POST", f"{url}/v1/{ROUTE}", json=body) as r:
            if r.status_code != 200:
                return {"ok": False, "why": f"HTTP {r.status_code}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                lines.append(line[6:])
                if first is None and any(f'"{k}": "' in line and f'"{k}": ""' not in line
                                         for k in ("content", "text")):
                    first = time.perf_counter() - start  # the first token's text
    except Exception as e:  # counted as a failure, not a crash of the test
        return {"ok": False, "why": repr(e)}
    seconds = time.perf_counter() - start
    if not lines or lines[-1] != "[DONE]":
        return {"ok": False, "why": "no [DONE]"}
    chunks = [json.loads(x) for x in lines[:-1]]
    usage = next((c["usage"] for c in reversed(chunks) if c.get("usage")), {})
    tokens = usage.get("completion_tokens") or 0
    ok = tokens > 0 and not any("error" in c for c in chunks)
    text = "".join(ch["delta"].get("content") or "" if "delta" in ch else ch.get("text") or ""
                   for c in chunks for ch in c.get("choices") or [])
    return {"ok": ok, "why": "" if ok else "usage", "ttft": first or seconds,
            "seconds": seconds, "tokens": tokens, "text": text,
            "cached": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)}


def load_round(url: str, model_id: str, n: int, max_tokens: int, extra: dict,
               mixed: bool) -> dict:
    """N concurrent streams: the row of the table, and every answer's text."""
    import asyncio

    import httpx

    prompts = prompts_for(n)
    opts = [{**extra, **(MIXED[i % len(MIXED)] if mixed else {})} for i in range(n)]

    async def go():
        limits = httpx.Limits(max_connections=n + 4)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            return await asyncio.gather(*(astream(
                client, url, model_id, [{"role": "user", "content": p}], max_tokens, o)
                for p, o in zip(prompts, opts)))

    start = time.perf_counter()
    results = asyncio.run(go())
    wall = time.perf_counter() - start
    good = [r for r in results if r["ok"]]
    per = [(r["tokens"] - 1) / (r["seconds"] - r["ttft"]) for r in good
           if r["tokens"] > 1 and r["seconds"] > r["ttft"]]
    ttfts = [r["ttft"] for r in good] or [0.0]
    return {"clients": n, "ttft_median": statistics.median(ttfts), "ttft_max": max(ttfts),
            "tokens": sum(r["tokens"] for r in good) / max(len(good), 1),
            "per_stream": statistics.median(per) if per else 0.0,
            "total": sum(r["tokens"] for r in good) / wall,
            "failed": len(results) - len(good), "texts": [r.get("text") for r in results],
            "opts": opts}


def load_rounds(servers: dict, clients: list[int], max_tokens: int, extra: dict,
                mixed: bool, rounds: int) -> None:
    """Each server in turn, round after round; the table takes each cell's median."""
    rows: dict = {}
    for _ in range(rounds):
        for n in clients:
            for name, (url, model_id) in servers.items():
                rows.setdefault((name, n), []).append(
                    load_round(url, model_id, n, max_tokens, extra if name == "ouro-mlx"
                               else {}, mixed and name == "ouro-mlx"))
    print("| server | clients | TTFT median / max (s) | tokens per answer | "
          "tok/s per stream | total tok/s | failed |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    med = lambda runs, k: statistics.median(r[k] for r in runs)  # noqa: E731
    for (name, n), runs in rows.items():
        print(f"| {name} | {n} | {med(runs, 'ttft_median'):.3f} / {med(runs, 'ttft_max'):.3f}"
              f" | {med(runs, 'tokens'):.1f} | {med(runs, 'per_stream'):.1f} | "
              f"{med(runs, 'total'):.1f} | {sum(r['failed'] for r in runs)} |", flush=True)
    ours = {n: statistics.median(r["total"] for r in runs)
            for (name, n), runs in rows.items() if name == "ouro-mlx"}
    if 1 in ours:
        for n in clients:
            print(f"ouro-mlx total tok/s at {n} clients / 1 client: {ours[n] / ours[1]:.2f}x")
    if "mlx_lm.server" in servers:
        for n in clients:
            peer = statistics.median(r["total"] for r in rows[("mlx_lm.server", n)])
            print(f"ouro-mlx / mlx_lm.server total tok/s at {n} clients: "
                  f"{ours[n] / peer:.2f}x")
    url, model_id = servers["ouro-mlx"]
    for (name, n), runs in rows.items():  # every answer equals the same request alone
        if name != "ouro-mlx":
            continue
        run = runs[0]
        for prompt, opts, text in zip(prompts_for(n), run["opts"], run["texts"]):
            solo = stream(url, model_id, [{"role": "user", "content": prompt}], max_tokens,
                          **opts)
            if solo.get("text") != text:
                print(f"MISMATCH at {n} clients, {opts}: {text!r} alone {solo.get('text')!r}")
                break
        else:
            print(f"{n} clients: every answer equals the request alone")


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
    p.add_argument("--peer", action="store_true",
                   help="Also serve the model with mlx_lm.server and alternate the two.")
    p.add_argument("--route", choices=["chat/completions", "completions"],
                   default="chat/completions",
                   help="completions sends the prompt as raw text: the bundled model then "
                        "writes until --max-tokens instead of a short answer.")
    p.add_argument("--swaps", type=int, default=0,
                   help="Prompts: shell games of this many swaps (the bundled model answers "
                        "with swaps + 1 tokens; at most 12).")
    p.add_argument("--rounds", type=int, default=1, help="Rounds per server (medians).")
    p.add_argument("--mixed", action="store_true",
                   help="Give each ouro-mlx client its own loop options.")
    p.add_argument("--extra", default="{}",
                   help="JSON body fields for every ouro-mlx request, e.g. "
                        "'{\"exit_threshold\": 1.0}' for full depth.")
    p.add_argument("--cache-turns", type=int, nargs="*", default=[],
                   help="Conversation lengths (tokens) for the cache hit/miss rounds.")
    args = p.parse_args()
    global SWAPS, ROUTE
    SWAPS, ROUTE = args.swaps, args.route
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
    procs, servers = [], {}
    try:
        proc, url = start_server(path, model_id)
        procs.append(proc)
        servers["ouro-mlx"] = (url, model_id)
        if args.peer:
            proc, peer_url = start_server(path, model_id, peer=True)
            procs.append(proc)
            servers["mlx_lm.server"] = (peer_url, path)
        for u, m in servers.values():
            stream(u, m, [{"role": "user", "content": "warm up"}], 2)
        print(f"{model_id}, {args.max_tokens} tokens per request, ouro-mlx options "
              f"{json.loads(args.extra)}{', mixed per client' if args.mixed else ''}")
        load_rounds(servers, args.clients, args.max_tokens, json.loads(args.extra),
                    args.mixed, args.rounds)
        if args.cache_turns:
            cache_rounds(url, model_id, args.cache_turns)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)

if __name__ == "__main__":
    main()
