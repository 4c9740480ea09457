"""Master-key providers, chosen by URI scheme (see :mod:`carnet.providers.base`)."""

from ._local import EphemeralMasterKey
from .base import MasterKey, create_master_key, open_master_key

__all__ = ["EphemeralMasterKey", "MasterKey", "create_master_key", "open_master_key"]
