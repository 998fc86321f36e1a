"""``slm serve``: an OpenAI-compatible HTTP server with continuous batching, and a playground page.

Read in this order:

1. ``config``: ``ServeConfig``, the ``[serve]`` section and the flags.
2. ``protocol``: OpenAI request bodies checked and read into ``generate.continuous.Seq``s, the
   error shape (``ApiError``) and the logprobs objects.
3. ``engine``: one worker thread owns the model and a ``ContinuousBatch``; jobs, the bounded
   queue, cancellation, text pieces with stop strings (``TextStream``).
4. ``metrics``: the Prometheus counters.
5. ``app``: the Starlette routes; ``static/playground.html`` is ``GET /``.
6. ``cli``: ``slm serve RUN``.

Only ``cli`` is imported by ``slm`` (lazily); the rest needs the ``serve`` extra.
"""
