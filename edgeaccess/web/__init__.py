"""The proxy's web UI: sessions, pages, the web terminal (see :mod:`edgeaccess.web.app`)."""
