from .amphista import AmphistaDrafter
from .base import Drafter
from .config import AmphistaConfig, MedusaConfig
from .io import load_drafter
from .medusa import MedusaDrafter
from .testing import AdversarialDrafter, OracleDrafter, RandomDrafter

__all__ = [
    "AdversarialDrafter",
    "AmphistaConfig",
    "AmphistaDrafter",
    "Drafter",
    "MedusaConfig",
    "MedusaDrafter",
    "OracleDrafter",
    "RandomDrafter",
    "load_drafter",
]
