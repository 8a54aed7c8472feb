"""The control socket, served from the supervisor's own loop (no threads).

The socket is created with mode 0600 (0660 and the configured group when one is set),
so only its owner can stop providers or shut the daemon down. A socket file left by a
crashed run is detected (nothing answers on it) and replaced; a live one is refused.
"""

from __future__ import annotations

import errno
import grp
import os
import socket
import stat
from typing import Any, Callable, Dict, Optional

from .protocol import MAX_REQUEST, ControlError, decode_request, encode

Handler = Callable[[Dict[str, Any]], Dict[str, Any]]


class SocketError(Exception):
    """The control socket cannot be created where the configuration says (one line)."""


class SocketInUse(SocketError):
    pass


def _remove_stale(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):  # never remove what is not ours: a typo must not cost a file
        raise SocketError(f"{path}: exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # With a timeout the connect does not wait for room in the backlog of a daemon that
    # is not accepting (out of descriptors): EAGAIN at once, which is a live one too.
    probe.settimeout(5.0)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            os.unlink(path)  # left behind by a run that did not exit cleanly
            return
        if exc.errno != errno.EAGAIN:
            raise
    finally:
        probe.close()
    raise SocketInUse(f"control socket {path} is in use by a running stoqd")


def listen(path: str, group: str = "") -> socket.socket:
    """Bind the control socket at ``path`` with owner-only (or group) permissions."""
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        _remove_stale(path)
        return _bind(path, group)
    except OSError as exc:
        raise SocketError(f"{path}: cannot create it: {exc.strerror}") from None
    except KeyError:  # the group vanished since the configuration was checked
        raise SocketError(f"{path}: no group named {group!r}") from None


def _bind(path: str, group: str) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound = False
    old_umask = os.umask(0o177)  # never world- or group-writable, even for an instant
    try:
        server.bind(path)
        bound = True
        if group:
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
            os.chmod(path, 0o660)
        server.listen(16)
    except BaseException:
        server.close()
        if bound:  # only the path we created: a failed bind names another daemon's socket
            os.unlink(path)
        raise
    finally:
        os.umask(old_umask)
    server.setblocking(False)
    return server


class Connection:
    """One client: read a request line, answer it, close."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.buffer = bytearray()

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self, handle: Handler) -> bool:
        """Returns True when the connection is finished (answered or dropped)."""
        try:
            data = self.sock.recv(MAX_REQUEST)
        except BlockingIOError:
            return False
        except OSError:
            return True
        if not data:
            return True
        self.buffer += data
        if b"\n" not in self.buffer and len(self.buffer) < MAX_REQUEST:
            return False
        line = bytes(self.buffer.split(b"\n", 1)[0])
        self._answer(self._dispatch(line, handle))
        return True

    @staticmethod
    def _dispatch(line: bytes, handle: Handler) -> Dict[str, Any]:
        try:
            return {"ok": True, **handle(decode_request(line))}
        except ControlError as exc:
            return {"ok": False, "error": str(exc)}

    def _answer(self, response: Dict[str, Any]) -> None:
        # Answers are small; a client that does not read them within a second is dropped.
        self.sock.setblocking(True)
        self.sock.settimeout(1.0)
        try:
            self.sock.sendall(encode(response))
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


def accept(server: socket.socket) -> Optional[Connection]:
    try:
        sock, _ = server.accept()
    except (BlockingIOError, InterruptedError):
        return None
    return Connection(sock)
