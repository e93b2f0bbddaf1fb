"""Moved to minimind.text.reply (kept until the serve modules import it from there)."""
from ..text.reply import ReplyParser as ChatOutputParser, collect  # noqa: F401
