"""The ``lockd`` command line: serve, run a job under a lock, inspect and manage locks.

Every command but ``serve`` reaches locks through ``--server URL`` (a lockd server; also
``LOCKD_URL``) or ``--store URL`` (any store URL, used directly).

``lockd run`` exit codes (documented in README):

* the child's own exit code when it ran to the end with the lock held;
* ``EXIT_NOT_ACQUIRED`` (75) when the lock was not granted within ``--wait``;
* ``EXIT_LOCK_LOST`` (76) when the lock was lost while the child ran (the child got
  SIGTERM, then SIGKILL after ``--grace`` seconds);
* ``EXIT_STORE`` (69) when the store could not be reached or refused the request.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from dataclasses import asdict

import click
from rich.console import Console
from rich.table import Table

import lockd

__all__ = ["EXIT_LOCK_LOST", "EXIT_NOT_ACQUIRED", "EXIT_STORE", "main"]

EXIT_NOT_ACQUIRED = 75
EXIT_LOCK_LOST = 76
EXIT_STORE = 69
DEFAULT_SERVER = "http://127.0.0.1:7700"

console = Console()
errors = Console(stderr=True)


def _store_url(server: str | None, store: str | None) -> str:
    if server and store:
        raise click.UsageError("give --server or --store, not both")
    return store or server or DEFAULT_SERVER


def _client(ctx: click.Context) -> lockd.Client:
    url: str = ctx.obj["url"]
    try:
        return lockd.Client(url, namespace=ctx.obj["namespace"])
    except lockd.LockError as exc:
        errors.print(f"[red]cannot open {url}:[/red] {exc}")
        sys.exit(EXIT_STORE)


@click.group()
@click.option("--server", envvar="LOCKD_URL", help=f"lockd server URL (default {DEFAULT_SERVER}).")
@click.option("--store", help="Use a store directly: memory://, file://PATH, http://...")
@click.option("--namespace", default="default", show_default=True)
@click.version_option(lockd.__version__, prog_name="lockd")
@click.pass_context
def main(ctx: click.Context, server: str | None, store: str | None, namespace: str) -> None:
    """lockd: distributed locks with leases, fencing tokens and fair queues."""
    ctx.obj = {"url": _store_url(server, store), "namespace": namespace}


@main.command()
@click.option("--store", "store_url", default="file://./lockd-data", show_default=True,
              help="Where locks live: any store URL.")  # fmt: skip
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=7700, show_default=True, type=int)
@click.option("--log-level", default="info", show_default=True)
def serve(store_url: str, host: str, port: int, log_level: str) -> None:
    """Serve the lock API over HTTP."""
    from lockd.server.run import serve as run_server

    run_server(store_url, host=host, port=port, log_level=log_level)


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--ttl", default=30.0, show_default=True, help="Lease seconds (renewed every ttl/3).")
@click.option("--wait", default=0.0, show_default=True, help="Seconds to wait for the lock.")
@click.option("--grace", default=10.0, show_default=True,
              help="Seconds between SIGTERM and SIGKILL when the lock is lost.")  # fmt: skip
@click.pass_context
def run(ctx: click.Context, name: str, command: tuple[str, ...], ttl: float, wait: float,
        grace: float) -> None:  # fmt: skip
    """Run COMMAND while holding lock NAME (for cron on many hosts).

    The child gets LOCKD_NAME, LOCKD_TOKEN and LOCKD_OWNER in its environment.
    """
    client = _client(ctx)
    lost = threading.Event()
    lock = client.lock(name, ttl=ttl, on_lost=lambda error: lost.set())
    try:
        lock.acquire(wait=wait)
    except lockd.AcquireTimeout as exc:
        errors.print(f"lockd: {name!r} not acquired within {wait} s: {exc}")
        client.close()
        sys.exit(EXIT_NOT_ACQUIRED)
    except lockd.LockError as exc:
        errors.print(f"lockd: cannot acquire {name!r}: {exc}")
        client.close()
        sys.exit(EXIT_STORE)
    env = {**os.environ, "LOCKD_NAME": name, "LOCKD_TOKEN": str(lock.token),
           "LOCKD_OWNER": lock.owner}  # fmt: skip
    child = subprocess.Popen(command, env=env)
    code = _supervise(child, lost, grace)
    if lost.is_set():
        errors.print(f"lockd: lock {name!r} was lost while the command ran; it was stopped")
        code = EXIT_LOCK_LOST
    with contextlib.suppress(lockd.LockError):  # already lost: reported above
        lock.release()
    client.close()
    sys.exit(code)


def _supervise(child: subprocess.Popen[bytes], lost: threading.Event, grace: float) -> int:
    """Wait for the child; forward SIGTERM/SIGINT; stop it if the lock is lost."""

    def forward(signum: int, frame: object) -> None:
        child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while child.poll() is None:
            if lost.wait(0.05):
                child.terminate()
                try:
                    child.wait(grace)
                except subprocess.TimeoutExpired:
                    child.kill()
                break
        return child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@main.command()
@click.argument("prefix", default="")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
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
@click.argument("name")
@click.option("--ttl", default=30.0, show_default=True)
@click.option("--wait", default=0.0, show_default=True)
@click.option("--owner", help="Owner id (default: generated). Release with the same id.")
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
        errors.print(f"lockd: {name!r} not acquired: {exc}")
        sys.exit(EXIT_NOT_ACQUIRED)
    except lockd.LockError as exc:
        errors.print(f"lockd: {exc}")
        sys.exit(EXIT_STORE)
    finally:
        client.close(release=False)
    click.echo(json.dumps({"name": name, "owner": lock.owner, "token": token, "ttl": ttl}))


@main.command()
@click.argument("name")
@click.option("--owner", required=True, help="The owner id printed by `lockd acquire`.")
@click.pass_context
def release(ctx: click.Context, name: str, owner: str) -> None:
    """Release NAME held by OWNER."""
    with _client(ctx) as client:
        try:
            client.lock(name, owner=owner).release()
        except lockd.NotHeld as exc:
            errors.print(f"lockd: {exc}")
            sys.exit(1)
    click.echo(json.dumps({"name": name, "owner": owner, "released": True}))


@main.command("force-release")
@click.argument("name")
@click.option("--owner", help="Evict only this owner.")
@click.pass_context
def force_release(ctx: click.Context, name: str, owner: str | None) -> None:
    """Evict the holders of NAME (admin); their next operation gets `revoked`."""
    with _client(ctx) as client:
        evicted = client.force_release(name, owner)
    click.echo(json.dumps({"name": name, "revoked": [asdict(h) for h in evicted]}))


if __name__ == "__main__":
    main()
