from .base import Drafter

__all__ = ["Drafter"]
