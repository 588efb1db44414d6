"""The ``lockd`` command line: serve, run a job under a lock, inspect and manage locks.

Every command but ``serve`` reaches locks through ``--server URL`` (a lockd server; else
``LOCKD_URL``) or ``--store URL`` (any store URL, used directly); ``serve`` serves
``--store``. These options may come before or after the command's name.

Exit codes (documented in README):

* ``EXIT_USAGE`` (2) for bad input: nothing was sent and nothing changed;
* ``EXIT_STORE`` (69) when the store could not be reached or refused the request;
* ``lockd run``: the child's own exit code when it ran to the end with the lock held,
  128 + N when a signal N killed it, 127 when the command was not found and 126 when it
  could not be executed (as a shell does; the lock is released), ``EXIT_NOT_ACQUIRED``
  (75) when the lock was not granted within ``--wait``, ``EXIT_LOCK_LOST`` (76) when
  the child was stopped because the lock was at risk or lost.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.table import Table

import lockd
from lockd.backends import redact_url
from lockd.model import (
    check_name,
    check_namespace,
    check_owner,
    check_prefix,
    check_ttl,
    check_wait,
)

__all__ = [
    "EXIT_CANNOT_EXECUTE",
    "EXIT_LOCK_LOST",
    "EXIT_NOT_ACQUIRED",
    "EXIT_NOT_FOUND",
    "EXIT_STORE",
    "EXIT_USAGE",
    "main",
]

EXIT_USAGE = 2  # click's own code for usage errors, used for every bad input
EXIT_STORE = 69
EXIT_NOT_ACQUIRED = 75
EXIT_LOCK_LOST = 76
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127
DEFAULT_SERVER = "http://127.0.0.1:7700"
DEFAULT_STORE = "file://./lockd-data"
POLL = 0.02
"""Seconds between the supervisor's looks at the lock (local state only, no request)."""
KILL_AHEAD = 0.1
"""SIGKILL this long before the local deadline, for the poll and the signal to land."""
_WHERE = "lockd.where"
LOG_LEVELS = ["critical", "error", "warning", "info", "debug", "trace"]

console = Console()
F = TypeVar("F", bound=Callable[..., Any])


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"lockd: {message}", err=True)
    sys.exit(code)


def _checked(check: Callable[[Any], Any]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback that validates with a ``lockd.model`` check (None passes)."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        try:
            return check(value)
        except lockd.InvalidRequest as exc:
            raise click.BadParameter(exc.message, ctx, param) from None

    return callback


def _where(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """Record --server, --store or --namespace, given before or after the command."""
    if value is None:
        return
    if param.name == "namespace":
        value = _checked(check_namespace)(ctx, param, value)
    elif not value:
        raise click.BadParameter("must not be empty", ctx, param)
    given: dict[str, str] = ctx.find_root().meta.setdefault(_WHERE, {})
    if given.setdefault(str(param.name), value) != value:
        raise click.BadParameter(
            f"given twice: {given[str(param.name)]!r} and {value!r}", ctx, param
        )


def _where_option(name: str, help_text: str) -> Callable[[F], F]:
    return click.option(name, callback=_where, expose_value=False, help=help_text)


_server_option = _where_option(
    "--server", f"lockd server URL (else LOCKD_URL, else {DEFAULT_SERVER})."
)
_store_option = _where_option(
    "--store", "A store URL: memory://, file://PATH, redis://, http://..."
)
_namespace_option = _where_option("--namespace", "Namespace of the locks (default: default).")


def _where_options(func: F) -> F:
    return _server_option(_store_option(_namespace_option(func)))


def _given(ctx: click.Context) -> dict[str, str]:
    given: dict[str, str] = ctx.find_root().meta.get(_WHERE, {})
    return given


def _url(ctx: click.Context) -> str:
    given = _given(ctx)
    if "server" in given and "store" in given:
        raise click.UsageError("give --server or --store, not both")
    return (
        given.get("store") or given.get("server") or os.environ.get("LOCKD_URL") or DEFAULT_SERVER
    )


def _shown(url: str) -> str:
    """``url`` fit for a message: its password hidden, or all before "@" if unparseable."""
    try:
        return redact_url(url)
    except ValueError:
        return url.rpartition("@")[2]


def _client(ctx: click.Context) -> lockd.Client:
    url = _url(ctx)
    try:
        return lockd.Client(url, namespace=_given(ctx).get("namespace", "default"))
    except ValueError as exc:  # InvalidRequest, or a URL that urllib cannot split
        raise click.UsageError(f"bad store URL {_shown(url)!r}: {exc}") from None
    except lockd.LockError as exc:
        _fail(f"cannot open {_shown(url)}: {exc}", EXIT_STORE)


class _Group(click.Group):
    """Maps lockd's errors to one line and an exit code, wherever a command raises them."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except lockd.InvalidRequest as exc:
            raise click.UsageError(exc.message) from None
        except lockd.BackendUnavailable as exc:
            _fail(exc.message, EXIT_STORE)
        except lockd.LockError as exc:
            _fail(exc.message, 1)


@click.group(cls=_Group)
@_where_options
@click.version_option(lockd.__version__, prog_name="lockd")
def main() -> None:
    """lockd: distributed locks with leases, fencing tokens and fair queues."""


@main.command()
@_where_option("--store", f"Where locks live: any store URL (default {DEFAULT_STORE}).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=7700, show_default=True, type=click.IntRange(0, 65535))
@click.option("--log-level", default="info", show_default=True, type=click.Choice(LOG_LEVELS))
@click.pass_context
def serve(ctx: click.Context, host: str, port: int, log_level: str) -> None:
    """Serve the lock API over HTTP.

    "lockd serving ..." is printed once the address is bound and the store open; a
    failure to do either is one line and a non-zero exit (69 for the store).
    """
    from lockd.server.run import serve as run_server

    if "server" in _given(ctx):
        raise click.UsageError("serve serves a store: give --store, not --server")
    try:
        run_server(_given(ctx).get("store", DEFAULT_STORE), host=host, port=port,
                   log_level=log_level)  # fmt: skip
    except OSError as exc:
        _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}", 1)


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("name", callback=_checked(check_name))
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--ttl", default=30.0, show_default=True, type=float, callback=_checked(check_ttl),
              help="Lease seconds (renewed every ttl/3).")  # fmt: skip
@click.option("--wait", default=0.0, show_default=True, type=float,
              callback=_checked(check_wait), help="Seconds to wait for the lock.")  # fmt: skip
@click.option("--grace", type=float,
              help="Seconds of lease the command gets to stop: when renewal is failing and "
                   "less than this is left, it gets SIGTERM; it gets SIGKILL before the lease "
                   "ends, or at once if the lock is found lost or revoked. At least 0 and "
                   "below --ttl (default: ttl/3).")  # fmt: skip
@_where_options
@click.pass_context
def run(ctx: click.Context, name: str, command: tuple[str, ...], ttl: float, wait: float,
        grace: float | None) -> None:  # fmt: skip
    """Run COMMAND while holding lock NAME (for cron on many hosts).

    The child runs in a process group of its own and gets LOCKD_NAME, LOCKD_TOKEN and
    LOCKD_OWNER in its environment.
    """
    grace = ttl / 3 if grace is None else grace
    if not (math.isfinite(grace) and 0 <= grace < ttl):
        raise click.BadParameter(f"must be at least 0 and below --ttl ({ttl:g}), not {grace:g}",
                                 ctx, param_hint="'--grace'")  # fmt: skip
    with _client(ctx) as client:
        lock = client.lock(name, ttl=ttl)
        try:
            lock.acquire(wait=wait)
        except lockd.AcquireTimeout as exc:
            _fail(f"{name!r} not acquired within {wait:g} s: {exc}", EXIT_NOT_ACQUIRED)
        env = {**os.environ, "LOCKD_NAME": name, "LOCKD_TOKEN": str(lock.token),
               "LOCKD_OWNER": lock.owner}  # fmt: skip
        try:
            child = subprocess.Popen(command, env=env, process_group=0)
        except OSError as exc:
            lock.release()
            code = EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError) else EXIT_CANNOT_EXECUTE
            _fail(f"cannot run {command[0]!r}: {exc.strerror or exc}", code)
        code, why = _supervise(child, lock, grace)
        if why is not None:
            _fail(f"lock {name!r} was {why} while the command ran; the command was stopped",
                  EXIT_LOCK_LOST)  # fmt: skip
        with contextlib.suppress(lockd.NotHeld):  # ended after the command did
            lock.release()
    sys.exit(code)


def _supervise(
    child: subprocess.Popen[bytes], lock: lockd.Lock, grace: float
) -> tuple[int, str | None]:
    """Wait for the child, forwarding SIGTERM and SIGINT to its group; stop it if the lock
    is in danger. Returns its exit code as a shell gives it, and why it was stopped.

    SIGTERM once the lock is ``at_risk`` with at most ``grace`` seconds of lease left;
    SIGKILL ``grace`` seconds later, or ``KILL_AHEAD`` before the local deadline (a lower
    bound of the store's lease), or at once when the hold has ended.
    """

    def forward(signum: int, frame: object) -> None:
        _signal_group(child, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    term_at: float | None = None
    at_risk = "at risk (renewal failing)"
    try:
        while child.poll() is None:
            state, left, now = lock.state, lock.lease_left, time.monotonic()
            ended = state not in (lockd.LockState.HELD, lockd.LockState.AT_RISK)
            if ended or left <= KILL_AHEAD or (term_at is not None and now >= term_at + grace):
                _signal_group(child, signal.SIGKILL)
                child.wait()
                return _shell_code(child.returncode), state.value if ended else at_risk
            if term_at is None and state is lockd.LockState.AT_RISK and left <= grace:
                _signal_group(child, signal.SIGTERM)
                term_at = now
            timeout = min(POLL, left - KILL_AHEAD)
            if term_at is not None:
                timeout = min(timeout, term_at + grace - now)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(max(0.0, timeout))
        return _shell_code(child.returncode), None if term_at is None else at_risk
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _signal_group(child: subprocess.Popen[bytes], signum: int) -> None:
    """Signal the child's process group (its own children too), unless it was reaped."""
    if child.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signum)


def _shell_code(returncode: int) -> int:
    """A child's exit code as a shell reports it: 128 + N when signal N ended it."""
    return 128 - returncode if returncode < 0 else returncode


@main.command()
@click.argument("prefix", default="", callback=_checked(check_prefix))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_where_options
@click.pass_context
def status(ctx: click.Context, prefix: str, as_json: bool) -> None:
    """List held and awaited locks whose names start with PREFIX."""
    with _client(ctx) as client:
        infos = client.list_locks(prefix)
    if as_json:
        click.echo(json.dumps([asdict(i) for i in infos], indent=2))
        return
    table = Table("name", "holder", "token", "count", "ttl left", "waiters")
    for info in infos:
        holders = info.holders or ()
        for h in holders:
            table.add_row(info.name, h.owner, str(h.token), str(h.count), f"{h.ttl_left:.1f}s",
                          str(len(info.waiters)))  # fmt: skip
        if not holders:
            table.add_row(info.name, "-", "-", "-", "-", str(len(info.waiters)))
    console.print(table)


@main.command()
@click.argument("name", callback=_checked(check_name))
@click.option("--ttl", default=30.0, show_default=True, type=float, callback=_checked(check_ttl))
@click.option("--wait", default=0.0, show_default=True, type=float, callback=_checked(check_wait))
@click.option("--owner", callback=_checked(check_owner),
              help="Owner id (default: generated). Release with the same id.")  # fmt: skip
@_where_options
@click.pass_context
def acquire(ctx: click.Context, name: str, ttl: float, wait: float, owner: str | None) -> None:
    """Acquire NAME for a script and print JSON with its owner and token.

    The hold is not renewed: it ends at its ttl unless `lockd release` ends it first.
    """
    client = _client(ctx)
    lock = client.lock(name, ttl=ttl, owner=owner or f"cli-{uuid.uuid4().hex}", renew=False)
    try:
        token = lock.acquire(wait=wait).token
    except lockd.AcquireTimeout as exc:
        _fail(f"{name!r} not acquired: {exc}", EXIT_NOT_ACQUIRED)
    finally:
        client.close(release=False)
    click.echo(json.dumps({"name": name, "owner": lock.owner, "token": token, "ttl": ttl}))


@main.command()
@click.argument("name", callback=_checked(check_name))
@click.option("--owner", required=True, callback=_checked(check_owner),
              help="The owner id printed by `lockd acquire`.")  # fmt: skip
@_where_options
@click.pass_context
def release(ctx: click.Context, name: str, owner: str) -> None:
    """Release one count of NAME held by OWNER; print the count left ("released" at 0)."""
    with _client(ctx) as client:
        try:
            client.lock(name, owner=owner).release()
        except lockd.NotHeld as exc:
            _fail(exc.message, 1)
        left = sum(h.count for h in client.inspect(name).holders if h.owner == owner)
    click.echo(json.dumps({"name": name, "owner": owner, "count": left, "released": left == 0}))


@main.command("force-release")
@click.argument("name", callback=_checked(check_name))
@click.option("--owner", callback=_checked(check_owner), help="Evict only this owner.")
@_where_options
@click.pass_context
def force_release(ctx: click.Context, name: str, owner: str | None) -> None:
    """Evict the holders of NAME (admin); their next operation gets `revoked`."""
    with _client(ctx) as client:
        evicted = client.force_release(name, owner)
    click.echo(json.dumps({"name": name, "revoked": [asdict(h) for h in evicted]}))


if __name__ == "__main__":
    main()
