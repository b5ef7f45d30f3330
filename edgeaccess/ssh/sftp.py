"""The ``sftp`` subsystem of the node, on the login's files.

Conch's ``SFTPServerForUnixConchUser`` is broken on current Twisted
(twisted#9845): ``_absPath`` reads ``home.path`` of a ``str``, and
``realPath`` and directory listings hand ``str`` to a protocol layer that
packs ``bytes``. This module keeps every path as ``bytes`` end to end and
runs each file operation as the login (no uid switch when the server
already runs as that user).
"""

from __future__ import annotations

import os

from twisted.conch.interfaces import ISFTPServer
from twisted.conch.ls import lsLine
from twisted.conch.ssh.filetransfer import FileTransferServer
from twisted.conch.unix import SFTPServerForUnixConchUser, UnixSFTPFile
from twisted.logger import Logger
from twisted.python import components
from zope.interface import implementer

from edgeaccess.ssh.session import NodeUser

_log = Logger()


@implementer(ISFTPServer)
class NodeSFTPServer(SFTPServerForUnixConchUser):
    """Conch's Unix SFTP server with bytes paths relative to the login's home."""

    def __init__(self, avatar: NodeUser) -> None:
        super().__init__(avatar)
        self._home = os.fsencode(avatar.passwd.pw_dir)

    def _absPath(self, path: bytes) -> bytes:
        if isinstance(path, str):
            path = os.fsencode(path)
        return os.path.join(self._home, path)

    def realPath(self, path: bytes) -> bytes:
        """The canonical absolute path (relative paths start at home)."""
        return os.path.realpath(self._absPath(path))

    def openDirectory(self, path: bytes) -> "NodeSFTPDirectory":
        """An iterator of ``(name, longname, attrs)`` with bytes names."""
        return NodeSFTPDirectory(self, self._absPath(path))

    def readLink(self, path: bytes) -> bytes:
        """The target of a symbolic link."""
        return self.avatar.run_as_user(os.readlink, self._absPath(path))

    def removeDirectory(self, path: bytes) -> None:
        """Remove an empty directory."""
        self.avatar.run_as_user(os.rmdir, self._absPath(path))

    def openFile(self, filename: bytes, flags: int, attrs: dict) -> "NodeSFTPFile":
        """An open file whose attributes can be set (``fsetstat``)."""
        return NodeSFTPFile(self, self._absPath(filename), flags, attrs)


class NodeSFTPFile(UnixSFTPFile):
    """Conch's Unix SFTP file plus ``setAttrs`` on the open descriptor.

    OpenSSH 9's ``scp`` speaks SFTP and sets the mode and times of every
    uploaded file through ``fsetstat``; Conch's file raises
    ``NotImplementedError`` there, which made each upload exit 1.
    """

    def setAttrs(self, attrs: dict) -> None:
        self.server.avatar.run_as_user(_set_fd_attrs, self.fd, attrs)


def _set_fd_attrs(fd: int, attrs: dict) -> None:
    if "uid" in attrs and "gid" in attrs:
        os.fchown(fd, attrs["uid"], attrs["gid"])
    if "permissions" in attrs:
        os.fchmod(fd, attrs["permissions"] & 0o7777)
    if "atime" in attrs and "mtime" in attrs:
        os.utime(fd, (attrs["atime"], attrs["mtime"]))


class NodeSFTPDirectory:
    """A directory listing for the SFTP protocol layer, names as bytes."""

    def __init__(self, server: NodeSFTPServer, directory: bytes) -> None:
        self.server = server
        self.files = server.avatar.run_as_user(os.listdir, directory)
        self.dir = directory

    def __iter__(self) -> "NodeSFTPDirectory":
        return self

    def __next__(self):
        if not self.files:
            raise StopIteration
        name = self.files.pop(0)
        s = self.server.avatar.run_as_user(os.lstat, os.path.join(self.dir, name))
        longname = lsLine(os.fsdecode(name), s).encode("utf-8", "surrogateescape")
        return name, longname, self.server._getAttrs(s)

    def close(self) -> None:
        """Forget the rest of the listing."""
        self.files = []


class _PerPacketLogger(Logger):
    """Conch logs every SFTP packet at info level ("dispatching: WRITE"):
    thousands of lines per file. Those go to debug; failures stay."""

    def info(self, format=None, **kwargs) -> None:
        self.debug(format, **kwargs)


class NodeFileTransferServer(FileTransferServer):
    """The ``sftp`` subsystem protocol for a :class:`NodeUser`."""

    _log = _PerPacketLogger(namespace="edgeaccess.ssh.sftp")


components.registerAdapter(NodeSFTPServer, NodeUser, ISFTPServer)
