"""Who the members are right now, and who they were before the last change.

The membership service owns the signed snapshot and writes its peer IDs here; the document bus
(forwarding, access checks), the host's protection of member connections and every service that
asks "is this peer a member?" read it. Previous members are kept so that a snapshot that removes
a node still reaches that node (it must learn that it is out).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ..identity import PeerId

Listener = Callable[[], None]


class Roster:
    def __init__(self, me: PeerId):
        self.me = me
        self.members: frozenset[PeerId] = frozenset()
        self.previous: frozenset[PeerId] = frozenset()
        self._listeners: list[Listener] = []

    def is_member(self, peer_id: PeerId) -> bool:
        return peer_id in self.members

    @property
    def configured(self) -> bool:
        """This node is itself a member."""
        return self.me in self.members

    def others(self) -> list[PeerId]:
        return sorted(p for p in self.members if p != self.me)

    def on_change(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def update(self, members: Iterable[PeerId]) -> None:
        new = frozenset(members)
        if new == self.members:
            return
        self.previous, self.members = self.members, new
        for listener in list(self._listeners):
            listener()
