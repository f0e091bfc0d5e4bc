"""Serving many fine-tunes from one base: the adapter bank (``bank.py``) and the OpenAI-compatible server
(``server.py``, needs the ``serve`` extra: FastAPI + uvicorn)."""

from .bank import AdapterBank, check_name

__all__ = ["AdapterBank", "check_name"]
