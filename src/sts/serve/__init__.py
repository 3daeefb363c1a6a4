"""Serving: the continuous-batching scheduler over :class:`sts.engine.Engine`, and the OpenAI-compatible HTTP server.

:mod:`sts.serve.scheduler` and :mod:`sts.serve.text` need only the library (the Python API,
:class:`sts.LLM`, runs on them); :mod:`sts.serve.app`, :mod:`sts.serve.metrics` and
:mod:`sts.serve.options` need the ``serve`` extra (FastAPI, uvicorn, prometheus-client).
"""
