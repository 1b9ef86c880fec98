"""How a looped model decodes: primitives below, one module per strategy above.

    steps       make_rule, prefill, decode (one token's loop steps, dynamic exit)
    host        when the host reads the device (one read per token; adaptive lookahead)
    plain       one graph per loop step, token n+1 queued before token n is read
    compiled    one compiled graph per token (fixed depth)
    speculative drafts from the first loop steps, verified in one call
    pipeline    every loop step busy with a different token in one pass

Every strategy takes ``(prompt, model, rule, cache, **options)`` and yields
``(token, logprobs, loops)`` per emitted token; :func:`token_stream` picks one from
``stream_generate``'s options. Data flows one way: strategy → primitives → model →
exit math; nothing here imports ``ouro_mlx.generation``.
"""

from __future__ import annotations

from typing import Iterator

import mlx.core as mx

from ..exit import ExitRule
from ..model import Model
from ..sampling import Sampler
from .compiled import compiled_step
from .pipeline import pipelined_step
from .plain import generate_step
from .speculative import speculative_step


def token_stream(
    prompt: mx.array,
    model: Model,
    rule: ExitRule,
    cache: list,
    *,
    max_tokens: int,
    sampler: Sampler | None = None,
    logits_processors: list | None = None,
    prefill_step_size: int = 2048,
    compile_step: bool = False,
    pipeline: bool = False,
    draft_loops: int | None = None,
    num_draft_tokens: int | None = None,
) -> Iterator[tuple[int, mx.array, int]]:
    """``(token, logprobs, loops)`` for ``prompt`` (1-D ids) from the strategy the
    options name: ``pipeline``, else self-speculative with ``draft_loops``, else one
    compiled graph per token with ``compile_step``, else plain decoding."""
    common = dict(max_tokens=max_tokens, sampler=sampler, logits_processors=logits_processors,
                  prefill_step_size=prefill_step_size)
    if pipeline:
        if num_draft_tokens is not None:
            raise ValueError("num_draft_tokens does not apply to pipeline (the pipeline "
                             "holds one token per loop step).")
        return pipelined_step(prompt, model, rule, cache, draft_loops=draft_loops or 1,
                              compile_step=compile_step, **common)
    if draft_loops is not None:
        return speculative_step(prompt, model, rule, cache, draft_loops=draft_loops,
                                num_draft_tokens=num_draft_tokens, compile_step=compile_step,
                                **common)
    if compile_step:
        return compiled_step(prompt, model, rule, cache, **common)
    return generate_step(prompt, model, rule, cache, **common)
