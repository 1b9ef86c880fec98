"""Embed an Ouro chat in your own program with ``ouro_mlx.ChatSession``.

    python examples/embed_session.py                     # the bundled demo model
    python examples/embed_session.py --model ByteDance/Ouro-1.4B-Thinking

Each streamed ``TokenEvent`` carries its text, token id, the loop steps it ran and
whether it is thinking text; the last one says why the answer ended. ``cancel()``
may be called from any thread (a GUI's Stop button); here a callback calls it.
"""

from __future__ import annotations

import argparse

from ouro_mlx import ChatSession


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="Directory or HF repo id (default: demo).")
    p.add_argument("--prompt", default="2,23,14,31", help="The first message.")
    args = p.parse_args()

    # Per-session options: loop depth and exit, KV cache layout, sampling.
    session = ChatSession.load(args.model, loop={"exit_threshold": 0.7},
                               sampling={"max_tokens": 64})

    # 1. Stream an answer: every token with the loop steps it took.
    print(f">> {args.prompt}")
    for event in session.send(args.prompt):
        if event.text and not event.thinking:  # the eos token adds no text
            print(f"{event.text}[{event.loops}]", end="", flush=True)
    print(f"\n({session.stats.finish_reason})")
    print(session.stats)

    # 2. The history is plain data: save it, or assign it to restore a conversation.
    print("history:", session.messages)

    # 3. Stop an answer early. The partial answer stays in the history and the
    #    prompt cache stays consistent, so the conversation can go on.
    session.reset()
    first = []

    def stop_after_first(event):
        first.append(event)
        session.cancel()  # thread-safe: a GUI calls this from its main thread

    events = list(session.send(args.prompt, on_token=stop_after_first))
    print(f"stopped after {len(events)} tokens: {events[-1].finish_reason}; "
          f"kept {session.messages[-1]!r}")


if __name__ == "__main__":
    main()
