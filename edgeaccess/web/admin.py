"""Administration pages for ``editor``: users, roles, join tokens, locks.

Each action is checked against the session's roles with the same rules the
auth API applies to ``edgectl`` (resource ``user``/``role``/``token``/
``lock``, verb ``list``/``create``/``update``/``delete``), and goes through
the same auth service calls, so the validation is the same: role YAML is
read by :func:`edgeaccess.identity.resources.parse_documents` and checked
by ``parse_resource`` before anything is stored, as ``edgectl create`` does.
"""

from __future__ import annotations

from klein import Klein
from twisted.logger import Logger

from edgeaccess import errors, httpapi
from edgeaccess.identity import resources
from edgeaccess.web import render as r

_log = Logger()


class AdminPages:
    """The admin pages of one request (built with its session)."""

    app = Klein()

    def __init__(self, ui, session, context: dict) -> None:
        self.ui = ui
        self.auth = ui.auth
        self.session = session
        self.checker = context.pop("checker")
        self.context = context

    def _require(self, resource: str, verb: str) -> None:
        try:
            self.checker.check_action(resource, verb)
        except errors.AccessDenied:
            raise errors.AccessDenied(f"{self.session.user} may not {verb} {resource}s")

    def _page(self, request, template: str, tab: str, *, code: int = 200, **extra) -> bytes:
        extra.setdefault("error", None)
        extra.setdefault("link", None)
        return r.render(request, template, code=code, title=f"Admin: {tab}", tab=tab,
                        **self.context, **extra)

    @app.handle_errors(Exception)
    def _errors(self, request, failure):
        return self.ui._errors(request, failure)

    def _signup_link(self, user: str, token: str) -> dict:
        return {"user": user, "url": f"https://{self.ui._web_addr()}/web/signup/{token}"}

    # --- users --------------------------------------------------------------

    async def _users_page(self, request, **extra) -> bytes:
        self._require("user", "list")
        return self._page(request, "admin_users.html", "users",
                          users=await self.auth.list_users(), **extra)

    @app.route("/users", methods=["GET"])
    async def users(self, request):
        return await self._users_page(request)

    @app.route("/users/add", methods=["POST"])
    async def users_add(self, request):
        r.check_csrf(request, self.session)
        self._require("user", "create")
        name = r.form_value(request, "name", limit=128).strip()
        roles = [x.strip() for x in r.form_value(request, "roles", limit=512).split(",")]
        logins = [x.strip() for x in r.form_value(request, "logins", limit=512).split(",")
                  if x.strip()]
        try:
            token = await self.auth.create_user(name, roles, logins)
        except errors.EdgeError as e:
            return await self._users_page(request, error=str(e), code=e.http_status)
        _log.info("user {user} created by {admin} (web)", user=name, admin=self.session.user)
        return await self._users_page(request, link=self._signup_link(name, token))

    @app.route("/users/reset", methods=["POST"])
    async def users_reset(self, request):
        r.check_csrf(request, self.session)
        self._require("user", "update")
        name = r.form_value(request, "name", limit=128)
        try:
            token = await self.auth.reset_user(name)
        except errors.EdgeError as e:
            return await self._users_page(request, error=str(e), code=e.http_status)
        await self.ui.sessions.revoke_user(name, reason="the password was reset")
        return await self._users_page(request, link=self._signup_link(name, token))

    @app.route("/users/rm", methods=["POST"])
    async def users_rm(self, request):
        r.check_csrf(request, self.session)
        self._require("user", "delete")
        name = r.form_value(request, "name", limit=128)
        try:
            await self.auth.delete_user(name)
        except errors.EdgeError as e:
            return await self._users_page(request, error=str(e), code=e.http_status)
        await self.ui.sessions.revoke_user(name, reason="the user was removed")
        return r.redirect(request, "/web/admin/users", 303)

    # --- roles --------------------------------------------------------------

    async def _roles_page(self, request, *, yaml_text: str | None = None, **extra) -> bytes:
        self._require("role", "list")
        roles = await self.auth.get_resources("role")
        if yaml_text is None:
            yaml_text = ""
            edit = r.query_value(request, "edit", limit=128)
            for doc in roles:
                if doc["metadata"]["name"] == edit:
                    import yaml

                    yaml_text = yaml.safe_dump(doc, sort_keys=False)
        return self._page(request, "admin_roles.html", "roles", roles=roles,
                          yaml_text=yaml_text, **extra)

    @app.route("/roles", methods=["GET"])
    async def roles(self, request):
        return await self._roles_page(request)

    @app.route("/roles/save", methods=["POST"])
    async def roles_save(self, request):
        r.check_csrf(request, self.session)
        self._require("role", "create")
        self._require("role", "update")
        text = r.form_value(request, "yaml", limit=resources.MAX_DOCUMENT_BYTES)
        try:
            docs = resources.parse_documents(text)
            for doc in docs:
                if doc.get("kind") != "role":
                    raise errors.BadResource("only roles are edited here (use edgectl "
                                             "create -f for other kinds)")
                resources.parse_resource(doc)  # all checked before any is stored
            for doc in docs:
                await self.auth.upsert_resource(doc, force=True)
        except errors.EdgeError as e:
            return await self._roles_page(request, yaml_text=text, error=str(e),
                                          code=e.http_status)
        return r.redirect(request, "/web/admin/roles", 303)

    @app.route("/roles/rm", methods=["POST"])
    async def roles_rm(self, request):
        r.check_csrf(request, self.session)
        self._require("role", "delete")
        try:
            await self.auth.delete_resource("role", r.form_value(request, "name", limit=128))
        except errors.EdgeError as e:
            return await self._roles_page(request, error=str(e), code=e.http_status)
        return r.redirect(request, "/web/admin/roles", 303)

    # --- join tokens --------------------------------------------------------

    async def _tokens_page(self, request, **extra) -> bytes:
        self._require("token", "list")
        extra.setdefault("new_token", None)
        return self._page(request, "admin_tokens.html", "tokens",
                          tokens=await self.auth.list_tokens(), web_addr=self.ui._web_addr(),
                          ca_pin=self.auth.authority.pin, **extra)

    @app.route("/tokens", methods=["GET"])
    async def tokens(self, request):
        return await self._tokens_page(request)

    @app.route("/tokens/add", methods=["POST"])
    async def tokens_add(self, request):
        r.check_csrf(request, self.session)
        self._require("token", "create")
        try:
            ttl_text = r.form_value(request, "ttl", limit=20).strip()
            token = await self.auth.create_token(
                r.form_value(request, "type", limit=32),
                httpapi.parse_duration(ttl_text) if ttl_text else None)
        except errors.EdgeError as e:
            return await self._tokens_page(request, error=str(e), code=e.http_status)
        return await self._tokens_page(request, new_token=token)

    @app.route("/tokens/rm", methods=["POST"])
    async def tokens_rm(self, request):
        r.check_csrf(request, self.session)
        self._require("token", "delete")
        try:
            await self.auth.delete_token(r.form_value(request, "token", limit=64))
        except errors.EdgeError as e:
            return await self._tokens_page(request, error=str(e), code=e.http_status)
        return r.redirect(request, "/web/admin/tokens", 303)

    # --- locks (when the proxy has them) ------------------------------------

    async def _locks_page(self, request, **extra) -> bytes:
        self._require("lock", "list")
        source = self.ui.lock_source
        locks = None if source is None else await source.list_locks()
        return self._page(request, "admin_locks.html", "locks", locks=locks, **extra)

    @app.route("/locks", methods=["GET"])
    async def locks(self, request):
        return await self._locks_page(request)

    @app.route("/locks/add", methods=["POST"])
    async def locks_add(self, request):
        r.check_csrf(request, self.session)
        self._require("lock", "create")
        source = self.ui.lock_source
        if source is None:
            raise errors.NotFound("locks are not available on this proxy")
        kind = r.form_value(request, "kind", limit=8)
        if kind not in ("user", "node"):
            raise errors.BadRequest("a lock targets a user or a node")
        ttl_text = r.form_value(request, "ttl", limit=20).strip()
        try:
            await source.create_lock(
                target={kind: r.form_value(request, "name", limit=256)},
                ttl=httpapi.parse_duration(ttl_text) if ttl_text else None,
                message=r.form_value(request, "message", limit=256),
                created_by=self.session.user)
        except errors.EdgeError as e:
            return await self._locks_page(request, error=str(e), code=e.http_status)
        return r.redirect(request, "/web/admin/locks", 303)

    @app.route("/locks/rm", methods=["POST"])
    async def locks_rm(self, request):
        r.check_csrf(request, self.session)
        self._require("lock", "delete")
        source = self.ui.lock_source
        if source is None:
            raise errors.NotFound("locks are not available on this proxy")
        try:
            await source.delete_lock(r.form_value(request, "id", limit=64),
                                     deleted_by=self.session.user)
        except errors.EdgeError as e:
            return await self._locks_page(request, error=str(e), code=e.http_status)
        return r.redirect(request, "/web/admin/locks", 303)
