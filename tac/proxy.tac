# twistd -ny tac/proxy.tac  — the edgeproxy service from a tac file.
# Edit the options below (same names as `twistd edgeproxy --help`).
from twisted.application import service

from edgeaccess.proxy.tap import Options, makeService

options = Options()
options.parseOptions([
    "--data-dir", "data/proxy",
    "--cluster-name", "example",
    "--public-addr", "127.0.0.1",
    "--web-listen", "127.0.0.1:3080",
    "--ssh-listen", "127.0.0.1:3023",
    "--auth-listen", "127.0.0.1:3025",
])
application = service.Application("edgeproxy")
makeService(options).setServiceParent(application)
