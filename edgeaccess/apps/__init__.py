"""Web application access: internal HTTP(S) apps behind NAT at ``https://APP.<public host>``.

- :mod:`edgeaccess.apps.spec`: the node's ``--app`` values;
- :mod:`edgeaccess.apps.agent`: the node side, serving ``app`` tunnel channels;
- the HTTP/1.1 reader is :mod:`edgeaccess.httpwire` (shared with the Kubernetes relays);
- :mod:`edgeaccess.apps.proxy`: the proxy side on the web port (routing by host name,
  checks, header rewriting, streaming, upgrades);
- :mod:`edgeaccess.apps.jwt`: the ``Edge-Jwt-Assertion`` signing keys and JWKS;
- :mod:`edgeaccess.apps.sessions`: app sessions (app certificates), the app index;
- :mod:`edgeaccess.apps.api`: the routes ``edge apps`` uses;
- :mod:`edgeaccess.apps.cli`: ``edge apps``.
"""
