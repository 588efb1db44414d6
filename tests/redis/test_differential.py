"""The Redis scripts held against the one reference, ``lockd._core.LockTable``.

Seeded random sequences of operations on a lock and a semaphore, by three owners, run
on both: try and queued acquires, re-entries, retries of a request id, releases and
extends (with their own token, none, another owner's, an ended or revoked one, one the
name never issued), waiters checking in and leaving, abandons, force-releases, expiry.
After every operation the outcomes must match (grant, count and error class; tokens by
their order, since Redis draws them from its clock) and so must every name's holders,
waiters and last token.

Time is driven, not waited for: the scripts' clock offset (ARGV[4]) moves Redis's time
forward in steps of ``STEP`` seconds, and the table's ``now`` moves with it. Every ttl
ends halfway between two steps, so no hold's expiry is ever near the real time that
passes while a sequence runs.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

import redis
from lockd import errors
from lockd._core import LockTable, Waiter
from lockd.backends import redis_lua
from lockd.backends.redis import WAKE_PREFIX
from lockd.backends.redis_calls import name_keys
from tests.redisproc import RedisProcess, running_redis

NS = "default"
OWNERS = ("a", "b", "c")
LIMITS = {"L": 1, "S": 2}
"""The names of each sequence and their holder limits."""
STEP = 20.0
"""Seconds one 'advance' moves both clocks."""
TTLS = (10.0, 30.0)
"""Each ends halfway between steps: an operation is never near a hold's expiry."""
LEASE_MS = 10**9
"""A queued waiter's lease in the scripts: waiters leave only when told."""
FIRST_TOKEN = 1000
"""The table's counter starts here, so the small token 1 is issued by neither side."""
HUGE_TOKEN = 9 * 10**15
"""Above every token either side issues (Redis's are microseconds of its clock)."""
SEQUENCES = 60
OPERATIONS = 40

NOT_HELD = {"not_yours": "NotHeld", "not_held": "NotHeld", "revoked": "Revoked",
            "lost": "LockLost"}  # fmt: skip


@pytest.fixture(scope="module")
def server() -> Iterator[RedisProcess]:
    """One redis-server for every sequence (emptied before each)."""
    with running_redis() as s:
        yield s


class Scripts:
    """The scripts called directly, with the clock offset under the test's control."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.sha = {n: client.script_load(getattr(redis_lua, n)) for n in redis_lua.__all__
                    if n.isupper() and n != "KEY_SUFFIXES"}  # fmt: skip
        self.offset_ms = 0

    def run(self, script: str, name: str, *args: Any) -> list[Any]:
        keys = name_keys(NS, name)
        shared = (WAKE_PREFIX, 600_000, "clock", self.offset_ms)
        return list(self.client.evalsha(self.sha[script], len(keys), *keys, *shared, *args))


@dataclass
class Queued:
    """A queued acquire, as both sides know it."""

    name: str
    owner: str
    rid: str
    attempt: str
    limit: int
    waiter: Waiter[None]
    gone: bool = False
    """Left, abandoned or replaced: nothing more to ask."""


@dataclass
class Run:
    """One sequence: both stores, the token correspondence, and what has been asked."""

    rng: random.Random
    scripts: Scripts
    table: LockTable[None] = field(default_factory=lambda: LockTable(retention=10**9))
    now: float = 0.0
    tokens: dict[str, dict[int, int]] = field(default_factory=dict)
    """Per name: table token -> Redis token, for every token either side reported."""
    rids: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    queued: list[Queued] = field(default_factory=list)
    counter: int = 0
    log: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.table.last_token = FIRST_TOKEN

    # --- tokens -------------------------------------------------------------------

    def same_token(self, name: str, ours: int, theirs: int) -> None:
        """``ours`` (the table's) and ``theirs`` (Redis's) must be the same grant."""
        seen = self.tokens.setdefault(name, {})
        if ours in seen:
            assert seen[ours] == theirs, f"{name}: token {ours} is {seen[ours]}, now {theirs}"
            return
        assert theirs not in seen.values(), f"{name}: Redis token {theirs} given twice"
        assert all(o < ours for o in seen), f"{name}: table token {ours} not the newest"
        assert all(t < theirs for t in seen.values()), f"{name}: Redis token {theirs} went down"
        seen[ours] = theirs

    def pick_token(self, name: str, owner: str) -> tuple[int | None, int]:
        """A token to release or extend with: (the table's, Redis's)."""
        known = list(self.tokens.get(name, {}).items())
        choice = self.rng.random()
        if choice < 0.4 or not known:
            return None, 0
        if choice < 0.8:
            return self.rng.choice(known)
        if choice < 0.9:
            return 1, 1  # issued by neither
        return HUGE_TOKEN, HUGE_TOKEN

    # --- operations ---------------------------------------------------------------

    def new_rid(self, name: str, owner: str) -> str:
        self.counter += 1
        rid = f"r{self.counter}"
        self.rids.setdefault((name, owner), []).append(rid)
        return rid

    def rid(self, name: str, owner: str) -> str:
        """A new request id, or one this owner used on this name before (a retry)."""
        used = self.rids.get((name, owner), [])
        if used and self.rng.random() < 0.3:
            return self.rng.choice(used)
        return self.new_rid(name, owner)

    def limit(self, name: str) -> int:
        return LIMITS[name] + (1 if self.rng.random() < 0.05 else 0)  # sometimes wrong

    def step(self) -> None:
        rng = self.rng
        name, owner = rng.choice(sorted(LIMITS)), rng.choice(OWNERS)
        kind = rng.choices(
            ["try_", "queue", "release", "extend", "check_in", "leave", "abandon", "force",
             "advance"],
            [6, 3, 5, 2, 2, 1, 1, 1, 2],
        )[0]  # fmt: skip
        getattr(self, kind)(name, owner)
        self.compare()

    def acquire_outcome(self, reply: list[Any], name: str) -> tuple[Any, ...]:
        status = reply[0]
        if status == "granted":
            return ("granted", int(reply[2]), int(reply[1]))
        if status == "queued":
            return ("queued",)
        if status == "lost":
            return ("LockLost",)
        if status == "invalid":
            return ("InvalidRequest",)
        return ("AcquireTimeout",)  # denied, gone, abandoned, replaced

    def table_acquire(self, name: str, owner: str, ttl: float, limit: int, rid: str | None
                      ) -> tuple[Any, ...]:  # fmt: skip
        try:
            grant = self.table.acquire((NS, name), owner, ttl, limit, self.now, 0.0, rid)
        except errors.LockError as exc:
            return (type(exc).__name__,)
        if grant is None:
            return ("denied",)
        return ("granted", grant.count, grant.token)

    def agree(self, what: str, name: str, ours: tuple[Any, ...], theirs: tuple[Any, ...]
              ) -> None:  # fmt: skip
        self.log.append(f"{what}: table {ours} redis {theirs}")
        if ours[0] == "granted" and theirs[0] == "granted":
            assert ours[1] == theirs[1], f"{what}: counts differ\n" + self.trail()
            self.same_token(name, ours[2], theirs[2])
            return
        assert ours == theirs, f"{what}: outcomes differ\n" + self.trail()

    def try_(self, name: str, owner: str) -> None:
        ttl, limit = self.rng.choice(TTLS), self.limit(name)
        rid = self.rid(name, owner) if self.rng.random() < 0.7 else None
        ours = self.table_acquire(name, owner, ttl, limit, rid)
        if ours == ("denied",):
            ours = ("AcquireTimeout",)
        self.counter += 1
        reply = self.scripts.run("ACQUIRE", name, owner, rid or "", f"t.{self.counter}",
                                 round(ttl * 1000), limit, "try", LEASE_MS)  # fmt: skip
        self.agree(f"try {name} {owner} {rid} ttl={ttl} limit={limit}", name, ours,
                   self.acquire_outcome(reply, name))  # fmt: skip

    def queue(self, name: str, owner: str) -> None:
        ttl, limit, rid = self.rng.choice(TTLS), self.limit(name), self.rid(name, owner)
        ours = self.table_acquire(name, owner, ttl, limit, rid)
        waiter: Waiter[None] = Waiter((NS, name), owner, ttl, self.now, None, rid)
        if ours == ("denied",):
            replaced = self.table.enqueue(waiter)
            for q in self.queued:
                if q.waiter is replaced:
                    q.gone = True
            ours = ("queued",)
        self.counter += 1
        attempt = f"q.{self.counter}"
        reply = self.scripts.run("ACQUIRE", name, owner, rid, attempt, round(ttl * 1000), limit,
                                 "new", LEASE_MS)  # fmt: skip
        self.agree(f"queue {name} {owner} {rid} ttl={ttl} limit={limit}", name, ours,
                   self.acquire_outcome(reply, name))  # fmt: skip
        if ours == ("queued",):
            self.queued.append(Queued(name, owner, rid, attempt, limit, waiter))

    def waiting(self) -> Queued | None:
        live = [q for q in self.queued if not q.gone]
        return self.rng.choice(live) if live else None

    def table_answer(self, q: Queued) -> tuple[Any, ...]:
        """What the table says of a queued acquire asked again: still queued, or the
        outcome of its request id (granted meanwhile, ended, abandoned)."""
        if self.table.is_queued(q.waiter):
            return ("queued",)
        if q.waiter.grant is None and not self.table._remembered(
            ("abandon", NS, q.name, q.owner, q.rid)
        ):
            return ("AcquireTimeout",)  # it left the queue ungranted
        return self.table_acquire(q.name, q.owner, q.waiter.ttl, q.limit, q.rid)

    def ask_again(self, q: Queued, mode: str) -> list[Any]:
        """The scripts' answer to a queued acquire checking in (``wait``) or leaving."""
        ttl_ms = round(q.waiter.ttl * 1000)
        return self.scripts.run("ACQUIRE", q.name, q.owner, q.rid, q.attempt, ttl_ms, q.limit,
                                mode, LEASE_MS)  # fmt: skip

    def check_in(self, name: str, owner: str) -> None:
        q = self.waiting()
        if q is None:
            return
        ours = self.table_answer(q)
        reply = self.ask_again(q, "wait")
        self.agree(f"check in {q.name} {q.owner} {q.rid}", q.name, ours,
                   self.acquire_outcome(reply, q.name))  # fmt: skip
        if ours != ("queued",):
            q.gone = True

    def leave(self, name: str, owner: str) -> None:
        q = self.waiting()
        if q is None:
            return
        ours = self.table_answer(q)
        if ours == ("queued",):
            self.table.dequeue(q.waiter, self.now)
            ours = ("AcquireTimeout",)
        reply = self.ask_again(q, "leave")
        self.agree(f"leave {q.name} {q.owner} {q.rid}", q.name, ours,
                   self.acquire_outcome(reply, q.name))  # fmt: skip
        q.gone = True

    def release(self, name: str, owner: str) -> None:
        ours_token, their_token = self.pick_token(name, owner)
        used = self.rids.get((name, owner), [])
        rid = self.rng.choice(used) if used and self.rng.random() < 0.2 else None
        rid = rid or (self.new_rid(name, owner) if self.rng.random() < 0.5 else None)
        try:
            left = self.table.release((NS, name), owner, ours_token, self.now, rid)[0]
            ours: tuple[Any, ...] = ("ok", left)
        except errors.LockError as exc:
            ours = (type(exc).__name__,)
        reply = self.scripts.run("RELEASE", name, owner, their_token, rid or "")
        theirs = ("ok", int(reply[1])) if reply[0] == "ok" else (NOT_HELD[reply[0]],)
        self.agree(f"release {name} {owner} token={ours_token} {rid}", name, ours, theirs)

    def extend(self, name: str, owner: str) -> None:
        ours_token, their_token = self.pick_token(name, owner)
        ttl = self.rng.choice(TTLS)
        try:
            grant = self.table.extend((NS, name), owner, ours_token, ttl, self.now)
            ours: tuple[Any, ...] = ("granted", grant.count, grant.token)
        except errors.LockError as exc:
            ours = (type(exc).__name__,)
        reply = self.scripts.run("EXTEND", name, owner, their_token, round(ttl * 1000))
        theirs = (
            ("granted", int(reply[2]), int(reply[1])) if reply[0] == "granted"
            else (NOT_HELD[reply[0]],)
        )  # fmt: skip
        self.agree(f"extend {name} {owner} token={ours_token} ttl={ttl}", name, ours, theirs)

    def abandon(self, name: str, owner: str) -> None:
        used = self.rids.get((name, owner), [])
        rid = self.rng.choice(used) if used and self.rng.random() < 0.8 else f"x{self.counter}"
        waiter, _ = self.table.abandon((NS, name), owner, rid, self.now)
        for q in self.queued:
            if q.waiter is waiter:
                q.gone = True
        reply = self.scripts.run("ABANDON", name, owner, rid)
        self.agree(f"abandon {name} {owner} {rid}", name, ("ok",), (reply[0],))

    def force(self, name: str, owner: str) -> None:
        only = owner if self.rng.random() < 0.5 else None
        evicted = self.table.force_release((NS, name), only, self.now)[0]
        reply = self.scripts.run("FORCE_RELEASE", name, only or "")
        ours = sorted((h.owner, h.count) for h in evicted)
        theirs = sorted((str(row[0]), int(row[2])) for row in reply[1])
        self.log.append(f"force {name} {only}: table {ours} redis {theirs}")
        assert ours == theirs, "force-release evicted other holds\n" + self.trail()
        tokens = {h.owner: h.token for h in evicted}
        for row in reply[1]:
            self.same_token(name, tokens[str(row[0])], int(row[1]))

    def advance(self, name: str, owner: str) -> None:
        self.now += STEP
        self.scripts.offset_ms += round(STEP * 1000)
        self.table.expire(self.now)
        self.log.append(f"advance to {self.now}")

    # --- state --------------------------------------------------------------------

    def compare(self) -> None:
        for name in sorted(LIMITS):
            info = self.table.inspect((NS, name), self.now, 0.0)
            _, limit, last, holders, waiters = self.scripts.run("INSPECT", name)
            theirs_holders = sorted((str(h[0]), int(h[2])) for h in holders)
            ours_holders = sorted((h.owner, h.count) for h in info.holders)
            assert ours_holders == theirs_holders, f"{name}: holders differ\n" + self.trail()
            tokens = {h.owner: h.token for h in info.holders}
            for h in holders:
                self.same_token(name, tokens[str(h[0])], int(h[1]))
            assert [w.owner for w in info.waiters] == [str(w[0]) for w in waiters], (
                f"{name}: waiters differ\n" + self.trail()
            )
            if info.holders or info.waiters:
                assert info.limit == int(limit), f"{name}: limits differ\n" + self.trail()
            if info.last_token == 0:
                assert int(last) == 0, f"{name}: Redis has a last token\n" + self.trail()
            else:
                self.same_token(name, info.last_token, int(last))
        self.table.take_handoffs()

    def trail(self) -> str:
        return "\n".join(self.log[-15:])


def test_the_scripts_decide_as_the_lock_table_does(server: RedisProcess) -> None:
    with redis.Redis(port=server.port, decode_responses=True) as client:
        scripts = Scripts(client)
        for seed in range(SEQUENCES):
            client.flushall()
            scripts.offset_ms = 0
            run = Run(random.Random(seed), scripts)
            run.log.append(f"seed {seed}")
            for _ in range(OPERATIONS):
                run.step()
