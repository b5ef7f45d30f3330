from twisted.application.service import ServiceMaker

edgeproxy = ServiceMaker(
    "edgeproxy",
    "edgeaccess.proxy.tap",
    "edgeaccess proxy and auth service for one cluster",
    "edgeproxy",
)
