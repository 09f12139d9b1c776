"""sd_notify(3) without libsystemd: service state for a ``Type=notify`` unit.

systemd passes ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace) and reads
one datagram per state change: ``READY=1`` once the listeners are up (``systemctl start``
returns then, and units ordered after this one start), ``RELOADING=1`` while a SIGHUP is
being handled, ``STOPPING=1`` when the drain begins. Without the variable every call is a
no-op, so running outside systemd costs nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("pipeconnect.notify")

# A datagram to the manager is queued at once; the bound only matters if systemd is wedged,
# and then a lost state change is better than a frozen event loop.
SEND_TIMEOUT = 1.0


def notify(state: str) -> bool:
    """Send ``state`` (``KEY=value`` lines) to ``$NOTIFY_SOCKET``; whether it was sent."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    elif not address.startswith("/"):
        return False  # unset, or a transport we do not speak (vsock: VMs only)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(SEND_TIMEOUT)
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", address.lstrip("\0"), exc)
        return False
    return True


def _status(status: str) -> str:
    # STATUS is one line of free text (systemctl status shows it); keep it one line.
    return f"\nSTATUS={' '.join(status.split())}" if status else ""


def ready(status: str = "") -> bool:
    return notify("READY=1" + _status(status))


def reloading(status: str = "reloading") -> bool:
    # systemd >= 253 ignores RELOADING=1 without the time it started (older ones ignore the
    # extra field): it uses it to tell this reload from an earlier one.
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}" + _status(status))


def stopping(status: str = "stopping") -> bool:
    return notify("STOPPING=1" + _status(status))


__all__ = ["notify", "ready", "reloading", "stopping"]
