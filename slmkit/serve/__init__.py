"""``slm serve``: an OpenAI-compatible HTTP server with continuous batching, and a playground page.

Read in this order:

1. ``config``: ``ServeConfig``, the ``[serve]`` section and the flags.
2. ``protocol``: OpenAI request bodies checked and read into ``generate.continuous.Seq``s, the
   error shape (``ApiError``) and the logprobs objects.
3. ``engine``: one worker thread owns the model and a ``ContinuousBatch``; jobs, the bounded
   queue, cancellation, text pieces with stop strings (``TextStream``).
4. ``process``: the same engine in a child process of its own (``slm serve``'s default), and the
   HTTP side's handle on it (one message per step, the mirrored sequences, /metrics from the child).
5. ``metrics``: the Prometheus counters.
6. ``app``: the Starlette routes; ``static/playground.html`` is ``GET /``.
7. ``cli``: ``slm serve RUN``.

Only ``cli`` is imported by ``slm`` (lazily); the rest needs the ``serve`` extra.
"""
