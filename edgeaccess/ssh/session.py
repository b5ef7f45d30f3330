"""The node's SSH avatar and sessions: shell, exec, subsystems, forwarding.

A :class:`NodeUser` is built once the certificate and the authorizer have
accepted a connection. Its session channels run the login's shell with or
without a PTY, or a command (``scp`` is ``exec`` of ``scp -t/-f``), or the
``sftp`` subsystem, as the login's Unix user. ``direct-tcpip`` is opened
only when the connection's permissions allow port forwarding.

Children get a clean environment built for the login (``HOME``, ``USER``,
``LOGNAME``, ``SHELL``, ``PATH``, ``SSH_CLIENT``...) plus the client's
variables on an allow-list; nothing leaks from the server's own
environment. ``exec`` children get ``SHLVL=1``: Debian's bash sources
``~/.bashrc`` for a non-interactive shell when ``SSH_CLIENT`` is set and
``SHLVL`` < 2, which costs >100 ms per command on hosts whose ``.bashrc``
runs ``pyenv init`` (``sshd`` setups neutralise it the same way with
``SetEnv SHLVL=1``).
"""

from __future__ import annotations

import fcntl
import os
import pty
import pwd
import signal
import struct
import termios
import uuid
from typing import Callable, Iterable

from twisted.conch.avatar import ConchUser
from twisted.conch.error import ConchError
from twisted.conch.interfaces import (
    EnvironmentVariableNotPermitted,
    ISession,
    ISessionSetEnv,
)
from twisted.conch.ssh import common, connection
from twisted.conch.ssh import session as conch_session
from twisted.conch.ssh.transport import DISCONNECT_BY_APPLICATION
from twisted.conch.unix import SSHSessionForUnixConchUser
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ProcessExitedAlready
from twisted.logger import Logger
from twisted.python import components
from zope.interface import implementer

from edgeaccess.errors import AccessDenied
from edgeaccess.ssh.certauth import VerifiedCertificate
from edgeaccess.ssh.forwarding import open_direct_tcpip, parse_direct_tcpip
from edgeaccess.ssh.interfaces import (
    ISessionObserver,
    NullSessionObserver,
    SessionInfo,
    SessionPermissions,
)
from edgeaccess.ssh.process import SessionProcessProtocol
from edgeaccess.tunnel.scheduler import prioritize

_log = Logger()

#: OpenSSH's channel window (CHAN_SES_WINDOW_DEFAULT); Conch's 128 KiB
#: default costs ~40 % of upload throughput (DESIGN.md).
SESSION_WINDOW = 2 * 1024 * 1024
SESSION_MAX_PACKET = 32 * 1024

#: Client environment variables always accepted (plus ``LC_*``).
DEFAULT_ENV_ALLOW = frozenset({"LANG", "TERM"})

_ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_USER_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/games"

def lookup_login(login: str, node_name: str) -> pwd.struct_passwd:
    """The password entry of ``login``, if this server can run sessions as it.

    :raises AccessDenied: no such Unix user on this machine, or the server
        is not root and ``login`` is another user than its own.
    """
    try:
        passwd = pwd.getpwnam(login)
    except (KeyError, ValueError):
        raise AccessDenied(f"login {login} does not exist on node {node_name}")
    if os.getuid() != 0 and passwd.pw_uid != os.getuid():
        raise AccessDenied(
            f"node {node_name} does not run as root and cannot log in as {login}"
        )
    return passwd


class NodeUser(ConchUser):
    """The avatar of one authenticated SSH connection to the node.

    :param verified: the verified certificate (identity, login,
        force-command, peer address).
    :param permissions: what the authorizer allowed.
    :param passwd: the login's password entry.
    :param reactor: an ``IReactorProcess`` + ``IReactorTCP`` for children and
        forwarding.
    :param new_session_id: makes the id of each session channel.
    """

    def __init__(
        self,
        verified: VerifiedCertificate,
        permissions: SessionPermissions,
        *,
        passwd: pwd.struct_passwd,
        node_name: str,
        reactor,
        env_allow: Iterable[str] = (),
        observer: ISessionObserver | None = None,
        new_session_id: Callable[[], str] = lambda: str(uuid.uuid4()),
    ) -> None:
        ConchUser.__init__(self)
        self.verified = verified
        self.identity = verified.identity
        self.login = verified.login
        self.permissions = permissions
        self.passwd = passwd
        self.node_name = node_name
        self.reactor = reactor
        self.env_allow = DEFAULT_ENV_ALLOW | frozenset(env_allow)
        self.observer = observer or NullSessionObserver()
        self.new_session_id = new_session_id
        self.connection_info = self.session_info()
        from edgeaccess.ssh.sftp import NodeFileTransferServer

        self.channelLookup.update(
            {b"session": NodeSessionChannel, b"direct-tcpip": self._open_direct_tcpip}
        )
        self.subsystemLookup.update({b"sftp": NodeFileTransferServer})

    def session_info(self) -> SessionInfo:
        """A fresh :class:`SessionInfo` for a new session of this user."""
        return SessionInfo(
            session_id=self.new_session_id(),
            username=self.identity.username,
            login=self.login,
            peer_address=self.verified.peer_address,
            node_name=self.node_name,
            roles=tuple(self.permissions.roles),
        )

    def user_group_id(self) -> tuple[int | None, int | None]:
        """``(uid, gid)`` to switch to, or ``(None, None)`` when the server
        already runs as that user (spawning with uid 0 as root warns into
        the session's stderr)."""
        uid, gid = self.passwd.pw_uid, self.passwd.pw_gid
        if (uid, gid) == (os.getuid(), os.getgid()):
            return None, None
        return uid, gid

    def run_as_user(self, f, *args, **kwargs):
        """Run ``f`` with the login's effective uid/gid (no switch when the
        server already runs as that user)."""
        uid, gid = self.user_group_id()
        if uid is None:
            return f(*args, **kwargs)
        euid, egid, groups = os.geteuid(), os.getegid(), os.getgroups()
        os.setegid(0)
        os.seteuid(0)
        os.initgroups(self.login, gid)
        os.setegid(gid)
        os.seteuid(uid)
        try:
            return f(*args, **kwargs)
        finally:
            os.seteuid(0)
            os.setegid(0)
            os.setgroups(groups)
            os.setegid(egid)
            os.seteuid(euid)

    def _runAsUser(self, f, *args, **kwargs):
        # Conch's Unix SFTP file objects call this, with one function or a
        # list of (function, args[, kwargs]) tuples run in order.
        if callable(f):
            return self.run_as_user(f, *args, **kwargs)

        def run_all():
            result = None
            for item in f:
                result = item[0](*(item[1] if len(item) > 1 else ()),
                                 **(item[2] if len(item) > 2 else {}))
            return result

        return self.run_as_user(run_all)

    def _open_direct_tcpip(self, remoteWindow, remoteMaxPacket, data, avatar):
        # Needs ForwardingSSHConnection: the channel is confirmed only once
        # the target is connected, so failures reach the client readably.
        (host, port), _origin = parse_direct_tcpip(data)
        allowed = self.permissions.port_forwarding
        self.observer.port_forward(self.connection_info, host, port, allowed)
        if not allowed:
            _log.warn(
                "refused port forwarding for {user} as {login} to {host}:{port}",
                user=self.identity.username,
                login=self.login,
                host=host,
                port=port,
            )
            raise ConchError(
                "port forwarding is not permitted for this user",
                connection.OPEN_ADMINISTRATIVELY_PROHIBITED,
            )
        return open_direct_tcpip(
            HostnameEndpoint(self.reactor, host, port),
            remote_window=remoteWindow,
            remote_max_packet=remoteMaxPacket,
            avatar=avatar,
            target_description=f"{host}:{port}",
        )

    #: The registration with the node's live sessions (locks end it).
    live_session = None

    def terminate(self, message: str) -> None:
        """End this connection now, telling the user why: the message is
        written to every open session channel (the user's terminal) and
        sent as the SSH disconnect reason."""
        conn = getattr(self, "conn", None)
        if conn is None:
            return
        line = f"\r\nedgeaccess: {message}\r\n".encode("utf-8", "replace")
        for channel in list(conn.channels.values()):
            if isinstance(channel, conch_session.SSHSession):
                try:
                    channel.write(line)
                except Exception:
                    _log.failure("could not tell the user why the session ends")
        conn.transport.sendDisconnect(
            DISCONNECT_BY_APPLICATION, f"edgeaccess: {message}".encode("utf-8", "replace"))

    def logout(self) -> None:
        """Called when the connection ends."""
        if self.live_session is not None:
            self.live_session.unregister()
        _log.info(
            "SSH connection of {user} as {login} from {peer} ended",
            user=self.identity.username,
            login=self.login,
            peer=self.verified.peer_address,
        )


class NodeSessionChannel(conch_session.SSHSession):
    """A ``session`` channel with OpenSSH's window size, a replaceable
    process protocol, and the ``signal`` request."""

    #: Between the channel and its child: large reads and backpressure both
    #: ways (Conch's SSHSessionProcessProtocol drops in here).
    process_protocol = SessionProcessProtocol

    def __init__(self, localWindow=0, localMaxPacket=0, *args, **kwargs) -> None:
        super().__init__(
            localWindow or SESSION_WINDOW,
            localMaxPacket or SESSION_MAX_PACKET,
            *args,
            **kwargs,
        )

    def _shellOrCommand(self, *, prepare, complete) -> int:
        # Conch's version with the process protocol class made replaceable.
        if self.client is not None:
            _log.error("multiple session-client requests sent to the same session")
            return 0
        if self._audit_wait is not None:
            _log.error("a second session-client request while the first one starts")
            return 0
        if (preparation := prepare()) is None:
            return 0
        protocol = self.process_protocol(self)
        try:
            complete(protocol, preparation)
        except Exception as e:
            self._refuse_start(e)
            return 0
        starting = getattr(self.session, "starting", None)
        if starting is not None:
            # Audit: the program runs once its session.start is durable (see
            # NodeSession._start_when_audited); the reply waits as well.
            return self._after_audit(starting, lambda: self._attach(protocol))
        self.client = protocol
        return 1

    # --- waiting for the audit spool (edgeaccess.audit) -----------------------

    _audit_wait: Deferred | None = None
    _eof_while_waiting = False
    _gave_up = False
    #: Most client bytes held while the audit events are written (Conch
    #: reopens the window regardless, so a stalled disk must not let a client
    #: fill the node's memory): past it the session is refused.
    max_held_bytes = 16 * 1024 * 1024

    def dataReceived(self, data: bytes) -> None:
        if self._audit_wait is not None and not self._gave_up:
            if len(self.buf) + len(data) > self.max_held_bytes:
                self._gave_up = True
                self.buf = b""
                _log.warn("session refused: the client sent more than {n} bytes while "
                          "its audit events were being written", n=self.max_held_bytes)
                self._refuse_start(AccessDenied(
                    "the node's audit spool is too slow: the session was closed"))
                self._close_refused()
                return
        if self._gave_up:
            return
        super().dataReceived(data)

    def _after_audit(self, waiting: Deferred, attach: Callable[[], int]) -> int:
        """Attach the program once ``waiting`` fired (the session's audit
        events are on disk); meanwhile the client's data and EOF are held.

        The request is accepted at once: only the program waits. (Holding the
        reply too made OpenSSH, whose non-interactive sessions keep Nagle on,
        wait for the server's delayed ACK: ~40 ms per session.) If the events
        cannot be written the program never runs: the client is told why,
        gets exit status 255, and the channel closes."""
        self._audit_wait = waiting

        def ready(_) -> None:
            self._audit_wait = None
            if (self.conn is None or self._gave_up
                    or self.session is not None and self.session.closed_early):
                return
            if not attach():
                self._close_refused()
                return
            held, self.buf = self.buf, b""
            if held:
                self.dataReceived(held)
            if self._eof_while_waiting:
                self.eofReceived()

        def refused(failure) -> None:
            self._audit_wait = None
            if self._gave_up:
                return
            self._refuse_start(failure.value)
            self._close_refused()

        waiting.addCallbacks(ready, refused).addErrback(
            lambda f: _log.failure("while starting an audited session", f))
        return 1

    def _close_refused(self) -> None:
        if self.session is not None:
            self.session.closed_early = True  # a start still waiting won't run
        if self.conn is None:
            return
        self.conn.sendRequest(self, b"exit-status", struct.pack(">L", 255))
        self.loseConnection()

    def _attach(self, protocol) -> int:
        self.client = protocol
        return 1

    def _refuse_start(self, error: BaseException) -> None:
        _log.failure("while establishing session client") if not isinstance(
            error, AccessDenied) else _log.warn("session refused: {reason}", reason=error)
        if self.conn is not None and str(error):
            self.writeExtended(
                connection.EXTENDED_DATA_STDERR, f"edgeaccess: {error}\r\n".encode()
            )

    def request_subsystem(self, data: bytes) -> int:
        """Subsystems (sftp), refused under a certificate's force-command."""
        name = common.getNS(data)[0].decode("ascii", "replace")
        if self.avatar.verified.force_command is not None:
            _log.warn(
                "refused subsystem {name} for {user}: the certificate forces a command",
                name=name,
                user=self.avatar.identity.username,
            )
            return 0
        if (self.client is not None or self._audit_wait is not None
                or name.encode() not in getattr(self.avatar, "subsystemLookup", {})):
            return super().request_subsystem(data)  # refuses, saying why
        self._session.started = True
        started = self.avatar.observer.session_started(self._session.info, name)
        if not isinstance(started, Deferred):
            return super().request_subsystem(data)
        # Audit: the subsystem starts once its session.start is durable.
        return self._after_audit(started, lambda: super(
            NodeSessionChannel, self).request_subsystem(data))

    def eofReceived(self) -> None:
        if self._audit_wait is not None:
            self._eof_while_waiting = True  # passed on once the program runs
            return
        # A subsystem has no process whose stdin could be closed: the client
        # is done with it (Conch does the same when it has no ISession).
        if self.session is not None and self.session.pty is not None:
            self.session.eofReceived()
        elif self.client is not None and self.conn is not None:
            # Like sftp-server exiting: OpenSSH's scp (SFTP mode) and sftp
            # exit 1 when the channel closes without an exit status.
            self.conn.sendRequest(self, b"exit-status", struct.pack(">L", 0))
            self.conn.sendClose(self)

    def request_signal(self, data: bytes) -> int:
        """RFC 4254 6.9: deliver a signal to the session's process."""
        name = common.getNS(data)[0].decode("ascii", "replace")
        return self._session.signal(name)

    def requestReceived(self, requestType: bytes, data: bytes) -> int:
        if requestType == b"auth-agent-req@openssh.com":
            # Conch has no server side of agent forwarding (DESIGN.md).
            _log.info("refused agent forwarding: not supported on this node")
            return 0
        return super().requestReceived(requestType, data)


@implementer(ISession, ISessionSetEnv)
class NodeSession(SSHSessionForUnixConchUser):
    """The ``ISession`` of a :class:`NodeUser`: one per session channel."""

    def __init__(self, avatar: NodeUser) -> None:
        super().__init__(avatar, reactor=avatar.reactor)
        self.environ = {}
        self.client_env: dict[str, str] = {}
        self.info = avatar.session_info()
        self.pty = None
        self.ptyTuple = None
        self.modes = None
        self.started = False
        #: A Deferred while the session waits for its audit events (the
        #: channel replies to the request when it fires).
        self.starting: Deferred | None = None
        self.closed_early = False

    # -- requests before the program starts

    def setEnv(self, name: bytes, value: bytes) -> None:
        """Accept ``LANG``, ``LC_*``, ``TERM`` and configured names only."""
        text = name.decode("utf-8", "replace")
        if not (text in self.avatar.env_allow or text.startswith("LC_")):
            raise EnvironmentVariableNotPermitted(name)
        self.client_env[text] = value.decode("utf-8", "replace")

    def getPty(self, term: bytes, windowSize, modes) -> None:
        """Allocate a PTY (refused when the certificate lacks permit-pty)."""
        if not self.avatar.identity.permit_pty:
            raise ConchError("the certificate does not permit a PTY")
        self.client_env["TERM"] = term.decode("ascii", "replace")
        self.winSize = windowSize
        self.modes = modes
        master, slave = pty.openpty()
        self.ptyTuple = (master, slave, os.ttyname(slave))
        # A terminal: its keystrokes and echo go ahead of bulk data on the
        # tunnel that carries this connection (the proxy is told too).
        prioritize(self.avatar.conn.transport.transport)

    # -- starting the program

    def _environment(self) -> dict[str, str]:
        pw = self.avatar.passwd
        transport = self.avatar.conn.transport.transport
        peer, host = transport.getPeer(), transport.getHost()
        env = dict(self.client_env)
        env.update(
            HOME=pw.pw_dir,
            USER=pw.pw_name,
            LOGNAME=pw.pw_name,
            SHELL=self._shell(),
            PATH=_ROOT_PATH if pw.pw_uid == 0 else _USER_PATH,
            SSH_CLIENT=f"{peer.host} {peer.port} {host.port}",
            SSH_CONNECTION=f"{peer.host} {peer.port} {host.host} {host.port}",
            EDGE_SESSION_ID=self.info.session_id,
        )
        if self.ptyTuple:
            env["SSH_TTY"] = self.ptyTuple[2]
        return env

    def _shell(self) -> str:
        return self.avatar.passwd.pw_shell or "/bin/sh"

    def _spawn(self, proto, argv: list[str], env: dict[str, str]) -> None:
        uid, gid = self.avatar.user_group_id()
        if self.ptyTuple and uid is not None:
            os.chown(self.ptyTuple[2], uid, os.stat(self.ptyTuple[2]).st_gid)
        home = self.avatar.passwd.pw_dir
        self.pty = self._reactor.spawnProcess(
            proto,
            self._shell(),
            argv,
            env,
            home if os.path.isdir(home) else "/",
            uid,
            gid,
            usePTY=self.ptyTuple or False,
        )
        self.started = True
        if self.ptyTuple:
            self.windowChanged(self.winSize)
            if self.modes:
                self.setModes()

    def openShell(self, proto) -> None:
        """The login shell, with a PTY when one was requested."""
        forced = self.avatar.verified.force_command
        if forced is not None:
            return self._exec(proto, forced, original=None)
        started = self.avatar.observer.session_started(self.info, "shell")
        shell = self._shell()
        env = self._environment()

        def start() -> None:
            self._spawn(proto, ["-" + os.path.basename(shell)], env)
            self._start_recording(proto)

        self._start_when_audited([started], start)

    def _start_when_audited(self, waits, start: Callable[[], None]) -> None:
        """Run ``start`` once the observer's Deferreds in ``waits`` fired (the
        session's audit events are durable), at once if there are none; a
        failure refuses the session (nothing runs unaudited)."""
        self.started = True  # session.start was emitted: session.end will be
        waits = [w for w in waits if isinstance(w, Deferred)]
        if not waits:
            start()
            return

        def go(_) -> None:
            if not self.closed_early:
                start()

        def refused(failure):
            failure = getattr(failure.value, "subFailure", failure)
            raise AccessDenied(f"the session cannot be audited: {failure.value}")

        self.starting = gatherResults(waits, consumeErrors=True).addCallbacks(go, refused)

    def _start_recording(self, proto) -> None:
        # Audit (edgeaccess.audit.observer): tee PTY output to a recorder
        # when the roles ask for recording and the observer records.
        open_recording = getattr(self.avatar.observer, "open_recording", None)
        if not (self.ptyTuple and self.avatar.permissions.record_session and open_recording):
            return
        rows, cols = self.winSize[0], self.winSize[1]
        self.recorder = open_recording(self.info, cols, rows,
                                       self.client_env.get("TERM", "xterm"))
        if self.recorder is not None:
            deliver, recorder = proto.outReceived, self.recorder

            def tee(data: bytes) -> None:
                recorder.output(data)
                deliver(data)

            proto.outReceived = tee

    def execCommand(self, proto, cmd: bytes) -> None:
        """``$SHELL -c cmd`` (or the certificate's force-command)."""
        command = cmd.decode("utf-8", "replace")
        forced = self.avatar.verified.force_command
        if forced is not None:
            return self._exec(proto, forced, original=command)
        self._exec(proto, command, original=None)

    def _exec(self, proto, command: str, original: str | None) -> None:
        started = self.avatar.observer.session_started(self.info, "exec")
        executed = self.avatar.observer.exec_started(self.info, command)
        env = self._environment()
        env["SHLVL"] = "1"
        if original is not None:
            env["SSH_ORIGINAL_COMMAND"] = original
        argv = [self._shell(), "-c", command]
        self._start_when_audited([started, executed], lambda: self._spawn(proto, argv, env))

    # -- while it runs

    def windowChanged(self, winSize) -> None:
        """Resize the PTY (the child gets SIGWINCH)."""
        self.winSize = winSize
        if getattr(self, "recorder", None) is not None:
            self.recorder.resize(winSize[1], winSize[0])
        if self.pty is not None and self.ptyTuple:
            fcntl.ioctl(
                self.pty.fileno(), termios.TIOCSWINSZ, struct.pack("4H", *winSize)
            )

    def signal(self, name: str) -> int:
        """Deliver ``SIG<name>`` to the process; 1 when delivered."""
        if name not in conch_session.SUPPORTED_SIGNALS or self.pty is None:
            return 0
        try:
            self.pty.signalProcess(name)
        except (OSError, ProcessExitedAlready):
            return 0
        return 1

    def eofReceived(self) -> None:
        """The client closed its side: close the child's stdin."""
        if self.pty is not None:
            self.pty.closeStdin()

    def closed(self) -> None:
        """The channel closed: hang up the child, tell the observer."""
        self.closed_early = self.pty is None  # (a start still waiting won't run)
        status = None
        if self.pty is not None:
            status = getattr(self.pty, "status", None)
            if self.pty.pid is not None:
                try:
                    self.pty.signalProcess("HUP")
                except (OSError, ProcessExitedAlready):
                    pass
            self.pty.loseConnection()
        if self.started:
            exit_status = exit_signal = None
            if isinstance(status, int) and status >= 0:
                if os.WIFEXITED(status):
                    exit_status = os.WEXITSTATUS(status)
                elif os.WIFSIGNALED(status):
                    exit_signal = _signal_name(os.WTERMSIG(status))
            reason = self._lost_reason()
            if reason is None:
                self.avatar.observer.session_ended(self.info, exit_status, exit_signal)
            else:
                self.avatar.observer.session_ended(self.info, exit_status, exit_signal,
                                                   reason=reason)

    def _lost_reason(self) -> str | None:
        """Why the connection under the session was lost, if it says
        (a tunnel channel whose outage outlasted its budget does)."""
        try:
            reason = self.avatar.conn.transport.transport.lost_reason
        except AttributeError:
            return None
        return reason if isinstance(reason, str) and reason else None


def _signal_name(number: int) -> str:
    """``TERM`` for 15 (RFC 4254 signal names have no ``SIG`` prefix)."""
    try:
        return signal.Signals(number).name[3:]
    except ValueError:
        return str(number)


components.registerAdapter(NodeSession, NodeUser, ISession)
