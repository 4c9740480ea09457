"""``carnet_migrations``: now :mod:`carnet.migrations`, with carnet's other own tables."""

from ..migrations import MIGRATIONS, RUNNING, STRICT, ensure, get, record

__all__ = ["MIGRATIONS", "RUNNING", "STRICT", "ensure", "get", "record"]
