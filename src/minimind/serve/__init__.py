"""`minimind serve`: OpenAI-compatible HTTP server over the continuous-batching engine (see docs/serving.md)."""
from .openai_server import create_app

__all__ = ["create_app"]
