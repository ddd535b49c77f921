"""The app `make mlflow-server` serves: MLflow's basic-auth app plus three rules it lacks.

    mlflow server --app-name tudui-auth ...   # tools/mlflow_server.py registers the name (an `mlflow.app`
                                              # entry point) and runs `python -m tools.mlflow_auth bootstrap`
                                              # first, as `mlflow server` does for basic-auth itself

create_app() wraps mlflow.server.auth.create_app (users, passwords, per-resource permissions unchanged)
and adds, after its authentication and permission checks:

1. Roles. MLflow gives every login the right to create experiments and registered models (and so MANAGE
   on them), whatever its grants. Members of the role `read-only` may create nothing: every create or
   register call (experiments, runs, registered models and their versions, datasets, ...) gets 403, even
   where an admin granted them EDIT. Their other writes stay with MLflow's grants: the default READ.
   Members of `promoter` may move aliases and write model-version tags on every registered model (see 2).
   The roles are MLflow's own RBAC roles (workspace `default`, no permissions of their own), made by
   `bootstrap` and assigned by `mlflow_server.py --add-user` through MLflow's client (assign_role): they
   live in the auth database next to the users, survive restarts, show in MLflow's role API, and can be
   set from another machine, which cannot reach the PostgreSQL socket. Deriving read-only from grants
   instead ("no EDIT anywhere") would flip the day an admin grants EDIT on one experiment.
2. Promotion. Moving or deleting an alias (`@champion`), setting or deleting a model-version tag and
   the old stage transitions choose what `make serve MODEL_URI=models:/NAME@champion` serves: they need
   MANAGE on the registered model (its creator, or a grant), the `promoter` role, or the admin. EDIT
   still registers new versions, with tags (the pipeline's test_accuracy).
3. Failed logins are throttled per user and per client address (ASGI middleware, outside everything, so
   FastAPI's own routes are covered too). After USER_FREE (per user) or ADDRESS_FREE (per address) failed
   logins within FORGET_S, that user or address is locked for FIRST_LOCK_S, doubling with each further
   failure up to MAX_LOCK_S. While locked, logins are answered 429 with Retry-After before any password
   check (scrypt, the CPU cost the guesses used to impose on everyone). A login this worker has verified
   within KNOWN_GOOD_S is exempt, so a teammate whose password an attacker guesses at keeps working; a
   fresh login as that user waits out the lock. A success resets the user's count; an address's count only expires.
   The counts live in a table of the auth database (THROTTLE_TABLE), shared by the server's workers.
   Behind a reverse proxy every client has the proxy's address: the per-address limit then covers all.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import re
import secrets
import sys
import time

APP_NAME = "tudui-auth"  # the `mlflow.app` entry point tools/mlflow_server.py registers
READ_ONLY_ROLE = "read-only"
PROMOTER_ROLE = "promoter"
ROLE_WORKSPACE = "default"  # MLflow's workspace when workspaces are off
ROLES = {READ_ONLY_ROLE: "tools/mlflow_auth.py: may read, may create nothing",
         PROMOTER_ROLE: "tools/mlflow_auth.py: may move aliases and set model-version tags"}

USER_FREE = 5
ADDRESS_FREE = 20
FIRST_LOCK_S = 10
MAX_LOCK_S = 300
FORGET_S = 900
KNOWN_GOOD_S = 3600
THROTTLE_TABLE = "tudui_login_failures"

_log = logging.getLogger("tools.mlflow_auth")
_API_ROUTE = re.compile(r"/(?:ajax-)?api/\d+\.\d+(/.*)$")
_CREATE_VERBS = {"create", "register", "get-or-create-user"}
_CREATE_COLLECTIONS = {"/mlflow/logged-models", "/mlflow/traces", "/mlflow/webhooks", "/mlflow/issues",
                       "/mlflow/workspaces", "/mlflow/prompt-optimization/jobs"}
_PROMOTIONS = {("/mlflow/registered-models/alias", "POST"), ("/mlflow/registered-models/alias", "DELETE"),
               ("/mlflow/model-versions/set-tag", "POST"), ("/mlflow/model-versions/delete-tag", "DELETE"),
               ("/mlflow/model-versions/transition-stage", "POST")}


def lock_seconds(failures: int, free: int) -> float:
    """How long a user or address with `failures` recent failures is locked (0: not at all)."""
    return 0.0 if failures < free else float(min(FIRST_LOCK_S * 2 ** (failures - free), MAX_LOCK_S))


# --- 1 and 2: roles and promotion, a before_request hook after basic-auth's --------------------------

def _user_roles(username: str) -> set[str]:
    from mlflow.server.auth import store

    return {role.name for role in store.list_user_roles(store.get_user(username).id)}


def _forbidden(message: str):
    from flask import make_response

    response = make_response(message, 403)
    response.mimetype = "text/plain"
    return response


def _check_roles():
    """Runs after basic-auth's _before_request, which has answered 401/403 already where it refuses."""
    from flask import request
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth import is_unprotected_route, sender_is_admin, validate_can_manage_registered_model

    if request.method in ("GET", "HEAD", "OPTIONS") or is_unprotected_route(request.path):
        return None
    match = _API_ROUTE.search(request.path)
    if match is None or request.authorization is None:
        return None
    route, method = match.group(1).rstrip("/"), request.method
    creates = method in ("POST", "PUT") and (route.rsplit("/", 1)[-1] in _CREATE_VERBS
                                             or route in _CREATE_COLLECTIONS)
    promotes = (route, method) in _PROMOTIONS
    if not (creates or promotes) or sender_is_admin():
        return None
    roles = _user_roles(request.authorization.username)
    if creates and READ_ONLY_ROLE in roles:
        return _forbidden(f"Permission denied: the {READ_ONLY_ROLE} role may create nothing")
    if promotes and PROMOTER_ROLE not in roles:
        try:
            may = validate_can_manage_registered_model()
        except MlflowException:  # no such model, no name: refuse, as basic-auth does
            may = False
        if not may:
            return _forbidden("Permission denied: moving an alias or writing a model-version tag needs MANAGE "
                              f"on the registered model or the {PROMOTER_ROLE} role")
    return None


# --- 3: the login throttle -----------------------------------------------------------------------------

class FailureStore:
    """Failed-login counts per key ("user:NAME", "addr:IP"), in THROTTLE_TABLE of the auth database."""

    def __init__(self, engine):
        self.engine = engine

    def create_table(self) -> None:
        import sqlalchemy as sa

        sa.Table(THROTTLE_TABLE, sa.MetaData(), sa.Column("key", sa.String(320), primary_key=True),
                 sa.Column("failures", sa.Integer, nullable=False),
                 sa.Column("last_failure", sa.Float, nullable=False),
                 sa.Column("locked_until", sa.Float, nullable=False)).create(self.engine, checkfirst=True)

    def locked_for(self, keys: list[str], now: float) -> float:
        import sqlalchemy as sa

        with self.engine.connect() as conn:
            until = conn.execute(sa.text(f"SELECT max(locked_until) FROM {THROTTLE_TABLE} WHERE key IN :keys")
                                 .bindparams(sa.bindparam("keys", expanding=True)), {"keys": keys}).scalar()
        return max(0.0, (until or 0.0) - now)

    def failed(self, keys: dict[str, int], now: float) -> None:
        """One more failure for each key (key: its number of free failures); locks the keys past it."""
        import sqlalchemy as sa

        with self.engine.begin() as conn:
            for key, free in keys.items():
                failures = conn.execute(sa.text(
                    f"INSERT INTO {THROTTLE_TABLE} (key, failures, last_failure, locked_until) "
                    "VALUES (:key, 1, :now, 0) ON CONFLICT (key) DO UPDATE SET "
                    f"failures = CASE WHEN {THROTTLE_TABLE}.last_failure < :stale THEN 1 "
                    f"ELSE {THROTTLE_TABLE}.failures + 1 END, last_failure = :now RETURNING failures"),
                    {"key": key, "now": now, "stale": now - FORGET_S}).scalar()
                if lock := lock_seconds(failures, free):
                    conn.execute(sa.text(f"UPDATE {THROTTLE_TABLE} SET locked_until = :until WHERE key = :key"),
                                 {"key": key, "until": now + lock})
            if secrets.randbelow(100) == 0:  # forget old entries now and then
                conn.execute(sa.text(f"DELETE FROM {THROTTLE_TABLE} WHERE last_failure < :stale "
                                     "AND locked_until < :now"), {"stale": now - FORGET_S, "now": now})

    def succeeded(self, key: str) -> None:
        import sqlalchemy as sa

        with self.engine.begin() as conn:
            conn.execute(sa.text(f"DELETE FROM {THROTTLE_TABLE} WHERE key = :key"), {"key": key})


def _basic_credentials(scope) -> tuple[str, str] | None:
    for name, value in scope.get("headers") or ():
        if name == b"authorization":
            kind, _, token = value.partition(b" ")
            if kind.lower() != b"basic":
                return None
            try:
                username, sep, password = base64.b64decode(token.strip(), validate=True).decode().partition(":")
            except ValueError:
                return None
            return (username, password) if sep else None
    return None


class LoginThrottle:
    """ASGI middleware: 429 for locked users and addresses, counts 401s (see the module docstring)."""

    def __init__(self, app, failures: FailureStore):
        self.app, self.failures = app, failures
        self.known_good: dict[bytes, float] = {}  # digest of (user, password) -> until when
        self.key = secrets.token_bytes(32)

    async def _store(self, method, *args):
        try:
            return await asyncio.to_thread(method, *args)
        except Exception as exc:  # the database is MLflow's too: it will answer for itself
            _log.warning("login throttle: %s", " ".join(str(exc).split())[:300])
            return None

    async def __call__(self, scope, receive, send):
        from mlflow.server.auth import is_unprotected_route

        credentials = _basic_credentials(scope) if scope["type"] == "http" else None
        if credentials is None or is_unprotected_route(scope.get("path", "")):
            return await self.app(scope, receive, send)
        username, password = credentials
        address = (scope.get("client") or ("unknown",))[0]
        keys = {f"user:{username[:200]}": USER_FREE, f"addr:{address}": ADDRESS_FREE}
        digest = hmac.new(self.key, f"{username}\0{password}".encode(), hashlib.sha256).digest()
        now = time.time()
        known = self.known_good.get(digest, 0) > now
        if not known:
            wait = await self._store(self.failures.locked_for, list(keys), now)
            if wait:
                return await self._refuse(send, wait)

        async def watch(message):
            if message["type"] == "http.response.start":
                status = message["status"]
                if status == 401:
                    self.known_good.pop(digest, None)
                    await self._store(self.failures.failed, keys, time.time())  # before the client hears
                elif 200 <= status < 500 and status != 429 and not known:
                    if len(self.known_good) > 10_000:
                        self.known_good.clear()
                    self.known_good[digest] = time.time() + KNOWN_GOOD_S
                    await self._store(self.failures.succeeded, f"user:{username[:200]}")
            await send(message)

        await self.app(scope, receive, watch)

    @staticmethod
    async def _refuse(send, wait: float) -> None:
        seconds = max(1, int(wait + 0.999))
        body = (f"Too many failed logins for this user or from this address: try again in {seconds} s.\n").encode()
        await send({"type": "http.response.start", "status": 429,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"retry-after", str(seconds).encode()),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


# --- the app -------------------------------------------------------------------------------------------

def create_app():
    """The `mlflow.app` entry point: MLflow's basic-auth app with the rules above."""
    from mlflow.server import app as flask_app
    from mlflow.server.auth import create_app as basic_auth_app, store

    app = basic_auth_app(flask_app)
    flask_app.before_request(_check_roles)  # after basic-auth's own: the caller is authenticated by then
    if hasattr(app, "add_middleware"):  # FastAPI under uvicorn, the way mlflow server runs by default
        return LoginThrottle(app, FailureStore(store.engine))
    _log.warning("login throttle off: it needs the uvicorn server (no --gunicorn-opts/--waitress-opts)")
    return app


def bootstrap() -> None:
    """Before the workers start: the auth database, the admin user, THROTTLE_TABLE and the roles."""
    from mlflow.server.auth import bootstrap_admin_user, get_flask_server_secret_key, store

    get_flask_server_secret_key()
    bootstrap_admin_user()
    FailureStore(store.engine).create_table()
    existing = {role.name for role in store.list_roles([ROLE_WORKSPACE])}
    for name, description in ROLES.items():
        if name not in existing:
            store.create_role(name, ROLE_WORKSPACE, description)


if __name__ == "__main__":
    if sys.argv[1:] != ["bootstrap"]:
        sys.exit("usage: python -m tools.mlflow_auth bootstrap")
    bootstrap()
