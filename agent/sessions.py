"""Ranks' sessions with the agent: a clean end (Detach, then the stream closes) or a death. Pure logic.

A rank holds an Attach stream open while it trains. Its end without a Detach first means
the rank's process died (or its node is going): the agent then persists what it holds of
that rank at once (see agent/persist.py). Streams that end because the agent itself stops
are not deaths.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass

from memckpt.agent.slots import Attempt, RankKey


@dataclass(frozen=True, slots=True, kw_only=True)
class Session:
    id: int
    key: RankKey
    attempt: Attempt


class Sessions:
    def __init__(self, limit: int) -> None:
        self.limit = limit  # open streams each hold a server thread
        self._open: dict[int, Session] = {}
        self._detached: set[int] = set()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.stopping = False

    def open(self, key: RankKey, attempt: Attempt) -> Session | None:
        """A new session; None when `limit` are open already."""
        with self._lock:
            if len(self._open) >= self.limit:
                return None
            session = Session(id=next(self._ids), key=key, attempt=attempt)
            self._open[session.id] = session
            return session

    def detach(self, key: RankKey, attempt: Attempt) -> int:
        """Marks the rank's open sessions of `attempt` as ending cleanly; returns how many."""
        with self._lock:
            ids = [s.id for s in self._open.values() if s.key == key and s.attempt == attempt]
            self._detached.update(ids)
            return len(ids)

    def close(self, session: Session) -> bool:
        """Ends a session; True when it was a death (no Detach, and the agent is not stopping)."""
        with self._lock:
            self._open.pop(session.id, None)
            detached = session.id in self._detached
            self._detached.discard(session.id)
            return not detached and not self.stopping

    def training(self, job: str) -> set[int]:
        """The job's ranks with a session open and not ending cleanly: ranks still training here."""
        with self._lock:
            return {s.key.rank for s in self._open.values() if s.key.job == job and s.id not in self._detached}

    def count(self) -> int:
        with self._lock:
            return len(self._open)
