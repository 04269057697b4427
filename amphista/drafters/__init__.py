from .base import Drafter
from .testing import AdversarialDrafter, OracleDrafter, RandomDrafter

__all__ = ["AdversarialDrafter", "Drafter", "OracleDrafter", "RandomDrafter"]
