"""``ouro-mlx app``: a desktop chat window (Qt for Python, the ``[desktop]`` extra).

- :mod:`.store` — conversations and settings in SQLite (no Qt);
- :mod:`.worker` — the thread that owns the model and the :class:`ChatSession`;
- :mod:`.window` — the window: it only renders what the worker's signals carry;
- :mod:`.app` — start-up (``run``).
"""
