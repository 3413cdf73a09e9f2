"""A simulator of one counter's life in Redis, and of the runs that read it into one row.

Plain Python, no I/O: it stands in for Redis (one key, on one of two primaries ``a`` and
``b``), for the ``usage_redis_incarnations`` registry (:func:`usage_agg.lives.register_incarnations`)
and for the merge (:func:`usage_agg.counter_model.next_state`), so a whole history can be
checked against the true count (the sum of all ``INCRBY``) in microseconds.

What a server *life* is follows :mod:`usage_agg.servers`: a new life at every start (a
new ``run_id``) and whenever the data came by replication (a promoted replica, a failback:
``run_id/replid``). A life *reports* started empty when it loaded no keys, was never a
replica and ran no ``RESTORE`` (``MIGRATE``); the registry keeps that flag sticky (once a
run saw keys taken in, it stays false). A registered life's predecessors are the other
registered lives last seen before it started, when it started empty; Redis gives its
start in whole seconds and the reader rounds a second down, so with the whole-second
clock here a life that started at ``t`` reports ``t - 1``.

The key is read when it exists: a missing key (evicted, not yet written in a new life)
is not in any read, and its row is left alone (``usage_agg.source``).

Beside the true count the simulator keeps the README's loss bound ("What a reset can lose
is bounded by what happened around it"): between two reads of the key, increments are
exact when nothing happened to the key but increments; after an empty restart noticed
as one, only the increments before the restart that no run read can be lost; after any
other reset or change of life (eviction, snapshot restore, failover, reshard move, a
restart within two seconds of the last read, taken for a drop), the growth between the
last read and the next one can be lost, never what was already counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from usage_agg.counter_model import Read, Row, Step, next_state

NODES = ("a", "b")  # registered in this order, as register_incarnations sorts addresses


@dataclass(eq=False)
class Life:
    """One life of one primary, and what the registry knows of it once a run saw it."""

    node: str
    started_at: int
    #: what INFO says now: no keys loaded, never a replica, no RESTORE calls
    reports_empty: bool
    id: int | None = None
    last_seen: int | None = None
    registered_empty: bool = True


@dataclass
class Sim:
    """One counter, two primaries, one stored row."""

    time: int = 0
    true_count: int = 0
    key_node: str = "a"
    value: int | None = None
    #: the values the key held in the current dataset (what a lagging replica may hold)
    lineage: list[int | None] = field(default_factory=lambda: [None])
    snapshots: list[int | None] = field(default_factory=list)
    row: Row | None = None
    #: the README's lower bound on the stored quantity
    floor: int = 0
    #: increments since the key was last read, and those before the last empty restart
    since_read: int = 0
    before_restart: int = 0
    #: what happened to the key since it was last read: "restart" only, or anything else ("reset")
    happened: set[str] = field(default_factory=set)
    last_restart_at: int = 0
    #: a history the README lists as not covered (see the strict xfails)
    not_covered: list[str] = field(default_factory=list)
    lives: dict[str, Life] = field(default_factory=dict)
    registry: list[Life] = field(default_factory=list)

    def __post_init__(self) -> None:
        for node in NODES:
            self.lives[node] = Life(node, started_at=0, reports_empty=True)

    # Time and writers

    def tick(self, seconds: int = 1) -> None:
        self.time += seconds

    def incr(self, n: int) -> None:
        """``INCRBY n`` (creates the key where it is missing)."""
        self.value = (self.value or 0) + n
        self.lineage.append(self.value)
        self.true_count += n
        self.since_read += n

    def save(self) -> None:
        """``BGSAVE``: a snapshot of the key as it is now, to restore later."""
        self.snapshots.append(self.value)

    # What happens to the server

    def _new_life(self, node: str, reports_empty: bool) -> Life:
        life = Life(node, started_at=self.time, reports_empty=reports_empty)
        self.lives[node] = life
        return life

    def _reset(self, value: int | None) -> None:
        self.happened.add("reset")
        self.value = value
        self.lineage = [value]

    def restart_empty(self, node: str) -> None:
        """A restart without persistence: a new life, started empty, the key gone if it was there."""
        self._note_uncovered_reshard_restart(node)
        self._new_life(node, reports_empty=True)
        if node == self.key_node:
            self.happened.add("restart")
            self.before_restart = self.since_read
            self.last_restart_at = self.time
            self.value = None
            self.lineage = [None]

    def restore_snapshot(self, which: int) -> None:
        """A restart that loads an earlier snapshot (RDB) on the key's primary: not started empty."""
        self._new_life(self.key_node, reports_empty=False)
        self._reset(self.snapshots[which % len(self.snapshots)] if self.snapshots else None)

    def failover(self, lag: int) -> None:
        """The key's primary fails over to a replica ``lag`` writes behind (or back to the old
        primary, resynced): a new life, never started empty, the value possibly behind."""
        self._new_life(self.key_node, reports_empty=False)
        self._reset(self.lineage[max(len(self.lineage) - 1 - lag, 0)])

    def evict(self) -> None:
        """The key is evicted (or expires early): gone in the same life."""
        self.happened.add("reset")
        self.value = None
        self.lineage.append(None)

    def reshard(self, *, reset_stats: bool = False) -> None:
        """``MIGRATE`` moves the key to the other primary, whose life then ran ``RESTORE``: not
        started empty (unless ``CONFIG RESETSTAT`` hides it before a run saw it, not covered)."""
        target = NODES[1 - NODES.index(self.key_node)]
        if not reset_stats:
            self.lives[target].reports_empty = False
        elif self.lives[target].reports_empty:
            self.not_covered.append("statistics reset after keys were taken in, before a run saw them")
        self.key_node = target
        self.happened.add("reset")
        self.lineage = [self.value]

    def restore_replace(self, value: int) -> None:
        """``RESTORE ... REPLACE`` of an older ``DUMP`` into the same life (not covered)."""
        self.not_covered.append("RESTORE REPLACE of an older DUMP into the same life")
        self._reset(value)

    def restart_from_aof_then_appendonly_off(self) -> None:
        """A restart that loads the AOF, then ``CONFIG SET appendonly no`` before any run reads
        the new life: it reports started empty though it holds every count (not covered)."""
        self.not_covered.append("AOF loaded, appendonly switched off before a run read it")
        self._new_life(self.key_node, reports_empty=True)
        self.happened.add("reset")

    def _note_uncovered_reshard_restart(self, node: str) -> None:
        """README, not covered: a row whose key a reshard moved keeps the life it was last read
        from while its value is unchanged; if the new primary restarts empty while that life
        lives on, the restart is taken for a drop."""
        if node != self.key_node or self.row is None:
            return
        other = self.lives[NODES[1 - NODES.index(node)]]
        if self.row.life is not None and self.row.life == other.id:
            self.not_covered.append("reshard: the new primary restarted empty, the row holds the old one's life")

    # Runs

    def _register(self) -> dict[str, Read]:
        """What ``register_incarnations`` returns for each primary: its id and predecessors."""
        found = {}
        for node in NODES:
            life = self.lives[node]
            if life.id is None:
                life.id = len(self.registry) + 1
                life.registered_empty = life.reports_empty
                self.registry.append(life)
            else:
                life.registered_empty = life.registered_empty and life.reports_empty
            life.last_seen = self.time if life.last_seen is None else max(life.last_seen, self.time)
            reported_start = life.started_at - 1
            predecessors = frozenset(
                other.id
                for other in self.registry
                if life.registered_empty and other is not life and other.last_seen < reported_start
            )
            found[node] = (life.id, predecessors)
        return found

    def run(self, *, allow_decrease: bool = False) -> Step | None:
        """One run: note the lives, read the key where it exists and merge it into the row.
        Returns the step, or ``None`` when the key was not there (the row is left)."""
        noticed = self._restart_noticed()  # before this run's read of the lives moves their last_seen
        lives = self._register()
        if self.value is None:
            return None
        life, predecessors = lives[self.key_node]
        read = Read(self.value, life, predecessors, allow_decrease)
        step = next_state(self.row, read)
        self.row = step.row
        self._account(allow_decrease, noticed)
        return step

    def _account(self, allow_decrease: bool, restart_noticed: bool) -> None:
        """Move the README's floor on to this read."""
        if allow_decrease:
            self.floor = self.value  # Redis is the truth from here on
        elif not self.happened:
            self.floor += self.since_read
        elif self.happened == {"restart"} and restart_noticed:
            self.floor += self.since_read - self.before_restart
        # any other reset: the growth since the last read may be lost, what was counted stays
        self.since_read, self.before_restart, self.happened = 0, 0, set()

    def _restart_noticed(self) -> bool:
        """The restart came two seconds or more after the last read of the life the row holds
        (no row yet: the new row takes only what was counted since the restart)."""
        if self.row is None:
            return True
        held = next((life for life in self.registry if life.id == self.row.life), None)
        return held is not None and held.last_seen < self.last_restart_at - 1
