"""One app instance per user and data dir: a second launch asks the first to show its window, then exits."""

from __future__ import annotations

import getpass
import hashlib
from pathlib import Path

from app.qt import QLocalServer, QLocalSocket, QObject, Signal


def server_name(data_dir: Path) -> str:
    digest = hashlib.sha1(str(Path(data_dir).resolve()).encode()).hexdigest()[:12]
    try:
        user = getpass.getuser()
    except Exception:
        user = "user"
    return f"pollinate-{user}-{digest}"


class SingleInstance(QObject):
    """`claim()` makes this process the instance, or asks the running one to show its window (False)."""

    activated = Signal()

    def __init__(self, data_dir: Path, parent: QObject | None = None):
        super().__init__(parent)
        self.name = server_name(data_dir)
        self._server: QLocalServer | None = None

    def claim(self, timeout_ms: int = 500) -> bool:
        socket = QLocalSocket()
        socket.connectToServer(self.name)
        if socket.waitForConnected(timeout_ms):
            socket.write(b"show\n")
            socket.flush()
            socket.waitForBytesWritten(timeout_ms)
            socket.disconnectFromServer()
            return False
        # Nobody answers: a server file left by a crashed instance is stale.
        QLocalServer.removeServer(self.name)
        if self._server is None:
            self._server = QLocalServer(self)
        self._server.setSocketOptions(QLocalServer.SocketOption.UserAccessOption)
        if not self._server.listen(self.name):
            return True  # cannot guard, but still run
        self._server.newConnection.connect(self._connection)
        return True

    def _connection(self) -> None:
        assert self._server is not None
        while self._server.hasPendingConnections():
            socket = self._server.nextPendingConnection()
            socket.readyRead.connect(self._read)
            socket.disconnected.connect(socket.deleteLater)

    def _read(self) -> None:
        socket = self.sender()
        if isinstance(socket, QLocalSocket) and b"show" in bytes(socket.readAll().data()):
            self.activated.emit()

    def release(self) -> None:
        if self._server is not None:
            self._server.close()  # kept as an object (a child of self): its sockets may still have events
