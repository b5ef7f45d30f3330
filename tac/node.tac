# twistd -ny tac/node.tac  — the edgenode service from a tac file.
# Fill in the token and CA pin from `edgectl tokens add --type node`.
import os

from twisted.application import service

from edgeaccess.node.tap import Options, makeService

options = Options()
options.parseOptions([
    "--data-dir", "data/node",
    "--auth-server", os.environ.get("EDGE_AUTH_SERVER", "127.0.0.1:3025"),
    "--token", os.environ.get("EDGE_TOKEN", ""),
    "--ca-pin", os.environ.get("EDGE_CA_PIN", ""),
    "--nodename", os.environ.get("EDGE_NODENAME", "node1"),
    "--ssh-listen", "127.0.0.1:3022",
])
application = service.Application("edgenode")
makeService(options).setServiceParent(application)
