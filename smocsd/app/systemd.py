"""The systemd side: sd_notify, the watchdog and journal priority prefixes.

A few lines of stdlib instead of a dependency, following the reference
implementation in sd_notify(3): one datagram per message to $NOTIFY_SOCKET
(an abstract socket when it starts with '@').
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time

from ..common.state import TIME_FORMAT


def notify(*fields: str) -> bool:
    """Sends e.g. notify("READY=1", "STATUS=idle"); a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or not fields:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            # Never wait: a receiver that does not read (its queue holds
            # net.unix.max_dgram_qlen datagrams, 10 by default) would otherwise stop the
            # daemon at its next status line, a training cycle's a dozen epochs in.
            sock.send("\n".join(fields).encode(), socket.MSG_DONTWAIT)
    except OSError:
        return False  # systemd gone, busy or socket unusable: never fatal for the daemon
    return True


class Watchdog:
    """Sends WATCHDOG=1 at half of $WATCHDOG_USEC; cheap enough to call every batch.

    It must be pinged from the loop that does the work (training included), so
    that a hung training stops the pings and systemd restarts the service.
    """

    def __init__(self) -> None:
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        enabled = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        self.interval = int(usec) / 2e6 if enabled else None
        self._last = 0.0

    def ping(self) -> None:
        if self.interval is None:
            return
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            notify("WATCHDOG=1")


# syslog priorities as journald reads them from a "<N>" line prefix
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def _under_journal() -> bool:
    """True when stderr is the journal stream systemd gave us ($JOURNAL_STREAM=dev:ino)."""
    try:
        device, inode = (int(x) for x in os.environ["JOURNAL_STREAM"].split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (KeyError, ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_PRIORITY.get(record.levelno, 6)}>"
        # Each line gets the prefix, so a multi-line traceback keeps its priority.
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def configure_logging(level: str) -> None:
    """Logs to stderr: "<N>message" under the journal (it adds time and unit), else timestamped."""
    handler = logging.StreamHandler(sys.stderr)
    if _under_journal():
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        # smocsd's one time format (UTC, whole seconds, Z), as in status and state.json.
        stamped = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", TIME_FORMAT)
        stamped.converter = time.gmtime
        handler.setFormatter(stamped)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
