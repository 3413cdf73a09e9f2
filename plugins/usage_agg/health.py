"""Health of the two stores, and of what silently loses usage data.

Counters live only in Redis until they are aggregated, and they carry a TTL. So a
Redis that evicts keys with a TTL, has already evicted keys, or keeps nothing on
disk can lose usage without any error; each is reported as a problem here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from redis.exceptions import ResponseError

from usage_agg.schema import SCHEMA_VERSION, missing_objects, resolve_names, schema_is_current


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class HealthReport:
    checks: list[Check] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return all(check.ok for check in self.checks)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append(Check(name, ok, detail))

    def to_dict(self) -> dict:
        return {"healthy": self.healthy, "checks": [asdict(c) for c in self.checks]}


def check_redis(client, report: HealthReport) -> None:
    """Reachability, eviction policy, evictions so far, persistence."""
    client.ping()
    info = client.info()
    report.add("redis", True, f"reachable, Redis {info.get('redis_version', '?')}")

    policy = str(info.get("maxmemory_policy", "unknown"))
    evicts_ttl_keys = policy.startswith(("volatile-", "allkeys-"))
    limit = int(info.get("maxmemory", 0) or 0)
    report.add(
        "redis maxmemory-policy",
        not evicts_ttl_keys,
        f"{policy}: evicts usage keys (they carry a TTL) when maxmemory ({limit or 'unset'}) is reached; use noeviction"
        if evicts_ttl_keys
        else f"{policy}: usage keys are never evicted",
    )

    evicted = int(info.get("evicted_keys", 0) or 0)
    report.add(
        "redis evicted_keys",
        evicted == 0,
        "none evicted" if evicted == 0 else f"{evicted} keys evicted since the server started; usage may be lost",
    )

    aof = str(info.get("aof_enabled", "0")) == "1"
    try:
        save = client.config_get("save").get("save", "")
    except ResponseError:  # CONFIG disabled, as on many managed services
        save = None
    if aof or save:
        report.add("redis persistence", True, "append-only file on" if aof else f"RDB snapshots ({save})")
    else:
        report.add(
            "redis persistence",
            False,
            "off: a restart loses every counter not yet aggregated"
            if save == ""
            else "append-only file off and RDB settings unreadable (CONFIG disabled); check snapshots are on",
        )


def check_postgres(conn, table: str, report: HealthReport) -> None:
    """Reachability and the schema (usage table, audit and dead-letter tables, rollup views)."""
    with conn.cursor() as cur:
        cur.execute("SHOW server_version")
        version = cur.fetchone()[0]
    conn.rollback()
    report.add("postgres", True, f"reachable, PostgreSQL {version}")
    names = resolve_names(conn, table)
    missing = missing_objects(conn, names)
    if missing:
        report.add("postgres schema", False, f"missing {', '.join(missing)}; the next aggregation run creates them")
    elif not schema_is_current(conn, names):
        report.add(
            "postgres schema", False, f"older than version {SCHEMA_VERSION}; the next aggregation run upgrades it"
        )
    else:
        report.add("postgres schema", True, f"{names.usage} and its companions exist, schema version {SCHEMA_VERSION}")
