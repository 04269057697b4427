"""Serving: `amphista generate` (streaming text in the terminal), `amphista serve` (OpenAI-compatible HTTP).

`create_app` is imported lazily so that the CLI works without the optional `serve` extra (fastapi, uvicorn).
"""

from __future__ import annotations

__all__ = ["create_app"]


def __getattr__(name):
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module 'amphista.serve' has no attribute {name!r}")
