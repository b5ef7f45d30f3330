from twisted.application.service import ServiceMaker

edgenode = ServiceMaker(
    "edgenode",
    "edgeaccess.node.tap",
    "edgeaccess node agent: SSH service, joins a cluster directly or through a reverse tunnel",
    "edgenode",
)
