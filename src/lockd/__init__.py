"""lockd: distributed locks with leases, fencing tokens, fair queues and a watchdog.

import lockd

with lockd.Client("file:///var/lib/lockd") as client:
    with client.lock("order:42", ttl=30) as lock:
        ship(order=42, fence=lock.token)
"""

from __future__ import annotations

from lockd.backends import Backend, connect
from lockd.client import (
    Acquired,
    AsyncAcquired,
    AsyncClient,
    AsyncLock,
    AsyncSemaphore,
    Client,
    Lock,
    Semaphore,
)
from lockd.errors import (
    AcquireTimeout,
    BackendUnavailable,
    ClientClosed,
    InvalidRequest,
    LockError,
    LockLost,
    NotHeld,
    Revoked,
    SafetyUnavailable,
    SessionLost,
    StoreBusy,
    StoreRefused,
)
from lockd.model import (
    Capabilities,
    Grant,
    HolderInfo,
    LockState,
    ResourceInfo,
    SafetyLevel,
    WaiterInfo,
)

__all__ = [
    "AcquireTimeout",
    "Acquired",
    "AsyncAcquired",
    "AsyncClient",
    "AsyncLock",
    "AsyncSemaphore",
    "Backend",
    "BackendUnavailable",
    "Capabilities",
    "Client",
    "ClientClosed",
    "Grant",
    "HolderInfo",
    "InvalidRequest",
    "Lock",
    "LockError",
    "LockLost",
    "LockState",
    "NotHeld",
    "ResourceInfo",
    "Revoked",
    "SafetyLevel",
    "SafetyUnavailable",
    "Semaphore",
    "SessionLost",
    "StoreBusy",
    "StoreRefused",
    "WaiterInfo",
    "connect",
]
__version__ = "0.1.0"
