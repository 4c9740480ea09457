"""The values carnet's pipeline hands around: text bound to a practice, a sealed
value waiting for its practice, and where a row's practice lives.

- :class:`BoundText`: plaintext on its way to the database, bound to its
  row's practice by the write guard or the ORM;
- :class:`Sealed`: a value read without a practice to open it with; holds
  ciphertext only;
- :class:`ParentPractice`: a row whose practice lives on a parent row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import envelope

if TYPE_CHECKING:
    from .manager import KeyManager
    from .types import EncryptedText


@dataclass(frozen=True, eq=False)
class ParentPractice:
    """A row whose practice lives on a parent row: ``tenant="patient.practice_id"``.

    ``fk``: this table's foreign key column; ``pk``: the parent's primary key
    it references; ``practice``: the parent's practice column. The one
    representation of the concept, used by the ORM (which resolves it at
    mapper configuration), the write guard and the parent-move guard.
    """

    fk: Any
    pk: Any
    practice: Any

    @property
    def fk_key(self) -> str:
        return str(self.fk.key)


class BoundText(str):
    """Plaintext on its way to the database, bound to its row's practice.

    ``carnet_moved_from`` is set when carnet itself re-seals the values of a
    row moved to another practice: the write is allowed under a scope of the
    practice the row leaves.
    """

    carnet_tenant: str
    carnet_moved_from: str | None = None
    # A value that is not text (a date, a document, a JSON value) travels
    # through a flush as its type's text form; the ORM puts this back after.
    carnet_original: Any = None


class Sealed:
    """A value read without a tenant to open it. Holds ciphertext only.

    ``open(tenant)`` decrypts it; with the ORM this happens by itself when the
    row's tenant column is loaded too.
    """

    __slots__ = ("data", "_type", "_manager")

    def __init__(
        self, data: bytes, type_: EncryptedText, manager: KeyManager | None = None
    ) -> None:
        self.data = data
        self._type = type_
        # The manager of the engine the value was read from (several databases
        # may serve one model, each with its own key table).
        self._manager = manager

    @property
    def manager(self) -> KeyManager:
        return self._manager if self._manager is not None else self._type.manager

    def open(self, tenant: str) -> str:
        """Decrypt under ``tenant``; with ``require_scope`` only inside a scope of that tenant."""
        manager = self.manager
        self._type.check_scope(tenant, manager)
        return self._type.decrypt(self.data, tenant, manager)

    def __repr__(self) -> str:
        kid = envelope.short_key_id(self.data)
        return f"<carnet.Sealed {len(self.data)} bytes key={kid}… field={self._type.field_label!r}>"

    __str__ = __repr__
