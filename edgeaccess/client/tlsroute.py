"""OpenSSH ``ProxyCommand`` of TLS routing: stdin/stdout <-> mutual TLS to the proxy.

``python -I -S tlsroute.py --ca CA --cert CERT --key KEY --verify-host HOST
--alpn edge-ssh/1 --cluster CLUSTER --servername NODE.CLUSTER --connect HOST:PORT
[--stock]``

Opens a TLS 1.3 connection to the proxy's tunnel port with the user's
certificate, the ALPN and the target node as the server name (SNI), checks
that the proxy's certificate (from the cluster CA only) is a proxy's of
``--cluster`` and names ``--verify-host`` (the SNI names the node, so the
name is checked here rather than by OpenSSL), then relays bytes until the
proxy closes the stream.

Why not ``openssl s_client``: it relays 1 KiB per read and write (a million
system calls per GiB: 1.5-2.2 CPU-seconds per GiB measured, as much as the
proxy). This relay reads 256 KiB from the socket at a time, decrypts every
record of it through a memory BIO and writes the result to ssh in one call.

Standard library only, nothing imported from the package: ssh starts it for
every connection and waits for it. ``-I -S`` and CPython's C modules
(``_ssl``, ``_socket``: the objects ``ssl.py`` and ``socket.py`` wrap,
without the ~13 ms their enums cost to import; ``_thread`` is the documented
low-level threading API) keep the start at ~10 ms instead of ~21.

That use is the ``cpython-tls-route`` reach of :mod:`edgeaccess.internals`
(its probe is there; its code is the block marked below: nothing of the
package is importable here). Where the probe fails, ``edge`` writes
``--stock`` into the ``ProxyCommand``: ``ssl`` and ``socket`` only. Where the
private context API differs at run time anyway (another CPython since the
profile was written), ``ssl``'s context is used.
"""

from __future__ import annotations

import _socket as _net
import _ssl as _tls
import _thread
import fcntl
import os
import sys

# -- the cpython-tls-route reach (edgeaccess.internals) --------------------------------------
# The C modules as _net and _tls (the same functions, constants and exception
# classes socket and ssl export) until use_stock_modules() swaps in socket and
# ssl; _private_client is the only use of _ssl's private context API.
#: Whether the private C modules are in use (:func:`use_stock_modules` clears it).
_private = True
#: TLS 1.3 as ``_SSLContext.minimum_version`` takes it.
_TLS13 = _tls.PROTO_TLSv1_3


def use_stock_modules() -> None:
    """The reach's fallback: ``ssl`` and ``socket`` (public) from now on."""
    global _net, _tls, _private, _TLS13
    import socket
    import ssl

    _net, _tls, _private, _TLS13 = socket, ssl, False, ssl.TLSVersion.TLSv1_3


def _private_client(context_setup, alpn: str, server_name: str, incoming, outgoing):
    """A client ``_ssl._SSLObject`` over two memory BIOs, from a private
    ``_ssl._SSLContext`` that ``context_setup`` configures."""
    import _ssl

    context = _ssl._SSLContext(_ssl.PROTOCOL_TLS_CLIENT)
    context_setup(context)
    name = alpn.encode("ascii")
    context._set_alpn_protocols(bytes([len(name)]) + name)
    return context._wrap_bio(incoming, outgoing, False, server_name, owner=None, session=None)


# -- end of the reach ----------------------------------------------------------------------

#: Bytes read from the socket or from ssh per call.
READ_SIZE = 256 * 1024
#: Pipe capacity asked for (the default unprivileged maximum).
PIPE_SIZE = 1024 * 1024
#: Plaintext of one TLS record at most.
_RECORD = 16384

USAGE = ("usage: tlsroute.py --ca FILE --cert FILE --key FILE --verify-host HOST "
         "--alpn PROTOCOL --cluster NAME --servername NAME --connect HOST:PORT [--stock]")


class RouteError(Exception):
    """A reason to give up, printed on stderr."""


def parse_args(argv: list[str]) -> dict[str, str]:
    """``--name value`` pairs, every one required; ``--stock`` (no value)
    asks for the public modules only."""
    names = ("ca", "cert", "key", "verify-host", "alpn", "cluster", "servername", "connect")
    options: dict[str, str] = {}
    items = iter(argv)
    for item in items:
        if item == "--stock":
            options["stock"] = "yes"
            continue
        name = item[2:] if item.startswith("--") else None
        if name not in names:
            raise RouteError(f"unknown argument {item!r}\n{USAGE}")
        value = next(items, None)
        if value is None:
            raise RouteError(f"{item} needs a value\n{USAGE}")
        options[name] = value
    missing = [f"--{n}" for n in names if n not in options]
    if missing:
        raise RouteError(f"missing {' '.join(missing)}\n{USAGE}")
    return options


def split_host_port(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise RouteError(f"--connect {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def configure(context, ca: str, cert: str, key: str) -> None:
    """TLS 1.3 client trusting only ``ca``, presenting ``cert``; the
    hostname is checked by :func:`certificate_names_host` (the SNI is the node)."""
    context.minimum_version = _TLS13
    context.check_hostname = False
    context.verify_mode = _tls.CERT_REQUIRED
    context.load_verify_locations(cafile=ca)
    context.load_cert_chain(cert, key)


def open_tls(ca: str, cert: str, key: str, alpn: str, server_name: str,
             incoming, outgoing, *, private: bool | None = None):
    """A client TLS object over two memory BIOs (``do_handshake``, ``read``,
    ``write``, ``getpeercert``, ``selected_alpn_protocol``): ``_ssl``'s own
    when its private context API is there (``private``, by default unless
    :func:`use_stock_modules` was called), else ``ssl``'s."""
    if _private if private is None else private:
        try:
            return _private_client(lambda context: configure(context, ca, cert, key),
                                   alpn, server_name, incoming, outgoing)
        except (AttributeError, TypeError):
            pass  # another CPython's internals: the public module below
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    configure(context, ca, cert, key)
    context.set_alpn_protocols([alpn])
    return context.wrap_bio(incoming, outgoing, server_hostname=server_name)


def connect(host: str, port: int, timeout: float = 30.0):
    """A TCP connection to the first address of ``host`` that answers."""
    failure: OSError | None = None
    for family, kind, proto, _, address in _net.getaddrinfo(host, port, 0, _net.SOCK_STREAM):
        sock = _net.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(address)
            sock.setsockopt(_net.IPPROTO_TCP, _net.TCP_NODELAY, 1)
            return sock
        except OSError as error:
            failure = error
            sock.close()
    raise failure or RouteError(f"no address for {host}")


def packed_ip(text: str) -> bytes | None:
    """An IPv4 or IPv6 address in binary form (None: not an address); what
    ``ipaddress`` would compare, without its ~3 ms import on ssh's path."""
    for family in (_net.AF_INET, _net.AF_INET6):
        try:
            return _net.inet_pton(family, text)
        except OSError:
            continue
    return None


def certificate_names_host(certificate: dict, host: str) -> bool:
    """Whether a verified peer certificate (``getpeercert()``) names ``host``:
    an IP address against its IP SANs, a name against its DNS SANs (exact, or
    a ``*.`` wildcard for the leftmost label)."""
    sans = certificate.get("subjectAltName", ())
    address = packed_ip(host)
    if address is not None:
        return any(kind == "IP Address" and packed_ip(value.strip()) == address
                   for kind, value in sans)
    wanted = host.rstrip(".").lower()
    for kind, value in sans:
        if kind != "DNS":
            continue
        name = value.rstrip(".").lower()
        if name == wanted:
            return True
        if name.startswith("*.") and "." in wanted:
            if wanted.split(".", 1)[1] == name[2:] and not wanted.startswith("."):
                return True
    return False


def certificate_is_proxy_of(certificate: dict, cluster: str) -> bool:
    """Whether a verified peer certificate (``getpeercert()``) is a proxy's
    of ``cluster``: subject OU ``proxy`` and O ``cluster``.

    The cluster CA writes the identity's kind and cluster into the subject
    of every certificate it issues, exactly as in its identity extension
    (which the standard library cannot read; the package's clients check
    that, :func:`edgeaccess.pki.x509ca.check_server_certificate`). OpenSSL
    has already refused a certificate without EKU serverAuth.
    """
    fields: dict[str, list[str]] = {}
    for rdn in certificate.get("subject", ()):
        for name, value in rdn:
            fields.setdefault(name, []).append(value)
    return (fields.get("organizationalUnitName") == ["proxy"]
            and fields.get("organizationName") == [cluster])


def handshake(sock, tls, incoming, outgoing) -> None:
    """Complete the TLS handshake on a blocking socket through memory BIOs."""
    while True:
        try:
            tls.do_handshake()
            break
        except _tls.SSLWantReadError:
            pending = outgoing.read()
            if pending:
                sock.sendall(pending)
            data = sock.recv(READ_SIZE)
            if not data:
                raise RouteError("the proxy closed the connection during the TLS handshake")
            incoming.write(data)
    pending = outgoing.read()
    if pending:
        sock.sendall(pending)


def enlarge_pipe(fd: int) -> None:
    """Give a pipe to ssh room for a whole socket read (Linux: 64 KiB by
    default), so a read from the proxy is one write and one wake-up of ssh."""
    setter = getattr(fcntl, "F_SETPIPE_SZ", None)
    if setter is None:
        return
    try:
        fcntl.fcntl(fd, setter, PIPE_SIZE)
    except OSError:
        pass  # not a pipe, or above /proc/sys/fs/pipe-max-size


class Relay:
    """Moves bytes between ssh (``stdin``/``stdout``) and the TLS stream.

    Two threads on blocking descriptors, one a direction: each wakes up
    straight from its ``recv``/``read`` (no poll, no registrations), and the
    TLS object is used under one lock. Reads go into buffers allocated once
    (a fresh 256 KiB ``bytes`` per read costs an ``mmap`` and ``munmap``).
    """

    def __init__(self, sock, tls, incoming, outgoing, stdin: int, stdout: int) -> None:
        self.sock = sock
        self.tls = tls
        self.incoming = incoming
        self.outgoing = outgoing
        self.stdin = stdin
        self.stdout = stdout
        self.lock = _thread.allocate_lock()

    def run(self) -> None:
        """Relay until the proxy closes the stream (ssh's end of file on
        stdin only stops that direction: the proxy closes when the node's
        side ends, as ``s_client -quiet`` waited for it)."""
        for fd in (self.stdin, self.stdout):
            enlarge_pipe(fd)
        # Not joined: the process ends with the stream, whatever ssh still sends.
        _thread.start_new_thread(self._ssh_to_net, ())
        self._net_to_ssh()

    def _net_to_ssh(self) -> None:
        sock, tls, incoming = self.sock, self.tls, self.incoming
        received = bytearray(READ_SIZE)
        received_view = memoryview(received)
        # Room for a whole read's plaintext and a record left in the BIO.
        plain = bytearray(READ_SIZE + 2 * _RECORD)
        plain_view = memoryview(plain)
        while True:
            try:
                got = sock.recv_into(received)
            except ConnectionError:
                got = 0
            if not got:
                return
            filled = 0
            closed = False
            with self.lock:
                incoming.write(received_view[:got])
                while True:
                    try:
                        count = tls.read(_RECORD, plain_view[filled:])
                    except _tls.SSLWantReadError:
                        break
                    except _tls.SSLZeroReturnError:
                        closed = True
                        break
                    if not count:
                        closed = True
                        break
                    filled += count
                self._send_tls_output()
            write_all(self.stdout, plain_view[:filled])
            if closed:
                return

    def _ssh_to_net(self) -> None:
        buffer = bytearray(READ_SIZE)
        view = memoryview(buffer)
        while True:
            try:
                got = os.readv(self.stdin, [buffer])
            except OSError:
                return
            if not got:
                return
            with self.lock:
                self.tls.write(view[:got])
                try:
                    self._send_tls_output()
                except OSError:
                    return

    def _send_tls_output(self) -> None:
        # Under the lock: records leave in the order they were made.
        pending = self.outgoing.read()
        if pending:
            self.sock.sendall(pending)


def write_all(fd: int, data: memoryview) -> None:
    """``os.write`` until all of ``data`` is written."""
    while data:
        written = os.write(fd, data)
        data = data[written:]


def main(argv: list[str]) -> int:
    """Connect, check the proxy, relay; 0 when the proxy ended the stream."""
    try:
        options = parse_args(argv)
        if "stock" in options:
            use_stock_modules()
        host, port = split_host_port(options["connect"])
        sock = connect(host, port)
        try:
            incoming, outgoing = _tls.MemoryBIO(), _tls.MemoryBIO()
            tls = open_tls(options["ca"], options["cert"], options["key"], options["alpn"],
                           options["servername"], incoming, outgoing)
            handshake(sock, tls, incoming, outgoing)
            if not certificate_is_proxy_of(tls.getpeercert() or {}, options["cluster"]):
                raise RouteError(f"the server at {options['connect']} is not a proxy of "
                                 f"cluster {options['cluster']}")
            if not certificate_names_host(tls.getpeercert() or {}, options["verify-host"]):
                raise RouteError(f"the proxy's certificate does not name {options['verify-host']}")
            if tls.selected_alpn_protocol() != options["alpn"]:
                raise RouteError(f"the proxy does not serve {options['alpn']} (no ALPN agreed)")
            sock.settimeout(None)  # blocking from now on
            Relay(sock, tls, incoming, outgoing, 0, 1).run()
        finally:
            sock.close()
        return 0
    except BrokenPipeError:
        return 0  # ssh went away first: nothing to report
    except (RouteError, OSError) as error:  # ssl.SSLError is an OSError
        print(f"edge tls route: {error}", file=sys.stderr)
        return 255


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
