"""Master-key providers, chosen by URI scheme (see :mod:`carnet.providers.base`)."""

from .base import MasterKey, create_master_key, open_master_key

__all__ = ["MasterKey", "create_master_key", "open_master_key"]
