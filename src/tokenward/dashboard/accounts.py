"""Admin users of the dashboard: roles, memberships, password + TOTP sign-in, sessions.

A user has one role:

* ``owner``: everything, in every project, including users and roles;
* ``admin``: changes tokens in the projects they are a member of, and creates projects;
* ``viewer``: sees the projects they are a member of, changes nothing.

Sign-in is two steps, each its own state of the server-side session: the password opens a
session whose ``mfa_at`` is empty (only the second-factor pages accept it); a TOTP code (or a
recovery code) sets ``mfa_at`` and the session id is replaced, so an id seen before MFA is
worthless after it. ``mfa_at`` is also the step-up clock: sensitive actions want it recent.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy import and_, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from tokenward.dashboard import security
from tokenward.dashboard.security import DashboardKeys
from tokenward.dashboard.tables import (
    admin_memberships,
    admin_recovery_codes,
    admin_sessions,
    admin_users,
)
from tokenward.errors import Conflict, Invalid, NotFound, TooManyRequests
from tokenward.events import AdminEvent, EventBus, current_request
from tokenward.limits import RateLimiter
from tokenward.tokens.format import new_public_id
from tokenward.tokens.model import TokenRecord
from tokenward.verify import utcnow

LOGIN_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._@-]{0,63}$")
MIN_PASSWORD_LENGTH = 12


class Role(StrEnum):
    OWNER = "owner"
    ADMIN = "admin"
    VIEWER = "viewer"


@dataclass(slots=True)
class User:
    id: str
    login: str
    role: Role
    mfa_enrolled: bool
    created_at: datetime
    project_ids: list[str] = field(default_factory=list)

    @property
    def is_owner(self) -> bool:
        return self.role == Role.OWNER

    @property
    def can_write(self) -> bool:
        return self.role in (Role.OWNER, Role.ADMIN)

    def sees(self, project_id: str | None) -> bool:
        return self.is_owner or (project_id is not None and project_id in self.project_ids)


@dataclass(slots=True)
class Session:
    id_hash: str
    user: User
    created_at: datetime
    last_seen_at: datetime
    mfa_at: datetime | None
    pending_totp: str | None

    @property
    def signed_in(self) -> bool:
        return self.mfa_at is not None


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    idle: timedelta = timedelta(minutes=30)
    absolute: timedelta = timedelta(hours=12)
    step_up: timedelta = timedelta(minutes=5)
    login_rate_account: str = "5/minute;30/hour"
    login_rate_ip: str = "20/minute;200/hour"


def actor_for(user: User, project_id: str | None) -> TokenRecord:
    """The principal the token service sees when ``user`` acts in ``project_id``.

    It has the same shape as an admin credential, so every rule of the service (tenant
    isolation, scopes only narrow) applies to the dashboard exactly as to the API. The
    dashboard itself checks role and membership before it builds one.
    """
    return TokenRecord(
        id=user.id,
        project_id=project_id,
        project=None,
        environment="live",
        name=f"dashboard user {user.login}",
        kind="dashboard",
        principal=user.login,
        scopes=["*"] if user.can_write else [],
        created_at=user.created_at,
    )


def check_login(login: str) -> str:
    login = login.strip().lower()
    if not LOGIN_PATTERN.match(login):
        raise Invalid(
            "invalid_login",
            "a login is 1-64 characters: lower-case letters, digits, '.', '_', '@' or '-'",
        )
    return login


def check_new_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH or len(password) > 256:
        raise Invalid("weak_password", f"a password needs {MIN_PASSWORD_LENGTH} to 256 characters")
    return password


class Accounts:
    """Users, sessions and second factors, in the tokenward database."""

    def __init__(
        self,
        engine: AsyncEngine,
        keys: DashboardKeys,
        events: EventBus | None = None,
        *,
        policy: SessionPolicy | None = None,
        limiter: RateLimiter | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.engine = engine
        self.keys = keys
        self.events = events or EventBus()
        self.policy = policy or SessionPolicy()
        self.limiter = limiter or RateLimiter(None, namespace="tokenward-login")
        self.clock = clock

    # -- users ----------------------------------------------------------------------------
    async def _users(self, where: object | None = None) -> list[User]:
        query = select(admin_users).order_by(admin_users.c.login)
        if where is not None:
            query = query.where(where)  # type: ignore[arg-type]
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
            ids = [r._mapping["id"] for r in rows]
            members: dict[str, list[str]] = {i: [] for i in ids}
            if ids:
                found = await conn.execute(
                    select(admin_memberships).where(admin_memberships.c.user_id.in_(ids))
                )
                for m in found.all():
                    members[m.user_id].append(m.project_id)
        return [
            User(
                id=r._mapping["id"],
                login=r._mapping["login"],
                role=Role(r._mapping["role"]),
                mfa_enrolled=r._mapping["totp_secret"] is not None,
                created_at=r._mapping["created_at"],
                project_ids=sorted(members[r._mapping["id"]]),
            )
            for r in rows
        ]

    async def list_users(self) -> list[User]:
        return await self._users()

    async def get_user(self, login_or_id: str) -> User:
        users = await self._users(
            or_(admin_users.c.login == login_or_id.lower(), admin_users.c.id == login_or_id)
        )
        if not users:
            raise NotFound("user_not_found", f"no user {login_or_id!r}")
        return users[0]

    async def count_owners(self) -> int:
        query = select(func.count()).where(admin_users.c.role == Role.OWNER.value)
        async with self.engine.connect() as conn:
            return int((await conn.execute(query)).scalar_one())

    async def create_user(
        self,
        login: str,
        role: Role | str,
        *,
        password: str | None = None,
        project_ids: Sequence[str] = (),
        actor: User | None = None,
    ) -> tuple[User, str]:
        """Create a user; returns it with its password (generated when none is given)."""
        login = check_login(login)
        role = Role(role)
        password = check_new_password(password) if password else security.generate_password()
        now = self.clock()
        user_id = new_public_id("usr")
        try:
            async with self.engine.begin() as conn:
                await conn.execute(
                    insert(admin_users).values(
                        id=user_id,
                        login=login,
                        password_hash=security.hash_password(password),
                        role=role.value,
                        created_at=now,
                        password_changed_at=now,
                    )
                )
                for project_id in dict.fromkeys(project_ids):
                    await conn.execute(
                        insert(admin_memberships).values(user_id=user_id, project_id=project_id)
                    )
        except IntegrityError:
            raise Conflict("user_exists", f"a user {login!r} already exists") from None
        await self._event("user.create", actor, {"user": login, "role": role.value})
        return await self.get_user(user_id), password

    async def remove_user(self, login_or_id: str, *, actor: User | None = None) -> None:
        user = await self.get_user(login_or_id)
        if user.is_owner and await self.count_owners() <= 1:
            raise Conflict("last_owner", "the last owner cannot be removed")
        async with self.engine.begin() as conn:
            for table in (admin_sessions, admin_recovery_codes, admin_memberships):
                await conn.execute(delete(table).where(table.c.user_id == user.id))
            await conn.execute(delete(admin_users).where(admin_users.c.id == user.id))
        await self._event("user.remove", actor, {"user": user.login})

    async def set_role(
        self,
        login_or_id: str,
        role: Role | str,
        project_ids: Sequence[str] | None = None,
        *,
        actor: User | None = None,
    ) -> User:
        user = await self.get_user(login_or_id)
        role = Role(role)
        if user.is_owner and role != Role.OWNER and await self.count_owners() <= 1:
            raise Conflict("last_owner", "the last owner cannot lose the owner role")
        async with self.engine.begin() as conn:
            await conn.execute(
                update(admin_users).where(admin_users.c.id == user.id).values(role=role.value)
            )
            if project_ids is not None:
                await conn.execute(
                    delete(admin_memberships).where(admin_memberships.c.user_id == user.id)
                )
                for project_id in dict.fromkeys(project_ids):
                    await conn.execute(
                        insert(admin_memberships).values(user_id=user.id, project_id=project_id)
                    )
        await self._event(
            "user.role",
            actor,
            {"user": user.login, "role": role.value, "projects": list(project_ids or [])},
        )
        return await self.get_user(user.id)

    async def add_membership(self, user: User, project_id: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                insert(admin_memberships).values(user_id=user.id, project_id=project_id)
            )

    async def reset_mfa(self, login_or_id: str, *, actor: User | None = None) -> User:
        """Forget a user's TOTP secret and recovery codes and end their sessions."""
        user = await self.get_user(login_or_id)
        async with self.engine.begin() as conn:
            await conn.execute(
                update(admin_users)
                .where(admin_users.c.id == user.id)
                .values(totp_secret=None, totp_last_step=None)
            )
            await conn.execute(
                delete(admin_recovery_codes).where(admin_recovery_codes.c.user_id == user.id)
            )
            await conn.execute(delete(admin_sessions).where(admin_sessions.c.user_id == user.id))
        await self._event("user.mfa_reset", actor, {"user": user.login})
        return await self.get_user(user.id)

    async def set_password(
        self, login_or_id: str, password: str | None = None, *, actor: User | None = None
    ) -> str:
        """Set (or generate) a new password and end the user's sessions."""
        user = await self.get_user(login_or_id)
        password = check_new_password(password) if password else security.generate_password()
        async with self.engine.begin() as conn:
            await conn.execute(
                update(admin_users)
                .where(admin_users.c.id == user.id)
                .values(
                    password_hash=security.hash_password(password),
                    password_changed_at=self.clock(),
                )
            )
            await conn.execute(delete(admin_sessions).where(admin_sessions.c.user_id == user.id))
        await self._event("user.password", actor, {"user": user.login})
        return password

    # -- sign-in --------------------------------------------------------------------------
    async def _limit(self, login: str, ip: str | None) -> None:
        checks = [(f"acct:{login}", self.policy.login_rate_account)]
        if ip:
            checks.append((f"ip:{ip}", self.policy.login_rate_ip))
        for key, rates in checks:
            result = await self.limiter.hit(key, tuple(rates.split(";")))
            if not result.allowed:
                raise TooManyRequests(
                    "too_many_attempts",
                    f"too many sign-in attempts; try again in {max(result.reset, 1)} s",
                    retry_after=max(result.reset, 1),
                )

    async def check_password(self, login: str, password: str, ip: str | None) -> User | None:
        """The user if the password is right; ``None`` otherwise (same time either way)."""
        login = login.strip().lower()[:64]
        await self._limit(login, ip)
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(admin_users.c.id, admin_users.c.password_hash).where(
                        admin_users.c.login == login
                    )
                )
            ).first()
        stored = row.password_hash if row else None
        if not security.check_password(stored, password) or row is None:
            await self._event("login.failed", None, {"login": login, "step": "password"})
            return None
        if security.password_needs_rehash(row.password_hash):
            async with self.engine.begin() as conn:
                await conn.execute(
                    update(admin_users)
                    .where(admin_users.c.id == row.id)
                    .values(password_hash=security.hash_password(password))
                )
        return await self.get_user(row.id)

    async def verify_second_factor(self, user: User, code: str, ip: str | None) -> bool:
        """A fresh TOTP code (never one already used) or an unused recovery code."""
        await self._limit(user.login, ip)
        code = code.strip()
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(admin_users.c.totp_secret, admin_users.c.totp_last_step).where(
                        admin_users.c.id == user.id
                    )
                )
            ).first()
        if row is None or row.totp_secret is None:
            return False
        if code.replace(" ", "").isascii() and code.replace(" ", "").isdigit():
            ok = await self._spend_totp(user, self.keys.decrypt(row.totp_secret), code)
        else:
            ok = await self._spend_recovery(user, code)
        if not ok:
            await self._event("login.failed", user, {"login": user.login, "step": "second_factor"})
        return ok

    async def _spend_totp(self, user: User, secret: str, code: str) -> bool:
        step = security.totp_step(secret, code, self.clock().timestamp())
        if step is None:
            return False
        # One conditional update: a code (its time step) is accepted once, even when two
        # requests race, and no older code is accepted after a newer one.
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(admin_users)
                .where(
                    admin_users.c.id == user.id,
                    or_(
                        admin_users.c.totp_last_step.is_(None),
                        admin_users.c.totp_last_step < step,
                    ),
                )
                .values(totp_last_step=step)
            )
        return result.rowcount == 1

    async def _spend_recovery(self, user: User, code: str) -> bool:
        code_hash = self.keys.recovery_hash(user.id, code)
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(admin_recovery_codes)
                .where(
                    admin_recovery_codes.c.user_id == user.id,
                    admin_recovery_codes.c.code_hash == code_hash,
                    admin_recovery_codes.c.used_at.is_(None),
                )
                .values(used_at=self.clock())
            )
        if result.rowcount == 1:
            await self._event("login.recovery_code_used", user, {"login": user.login})
            return True
        return False

    async def recovery_codes_left(self, user: User) -> int:
        query = select(func.count()).where(
            admin_recovery_codes.c.user_id == user.id, admin_recovery_codes.c.used_at.is_(None)
        )
        async with self.engine.connect() as conn:
            return int((await conn.execute(query)).scalar_one())

    # -- enrolment ------------------------------------------------------------------------
    async def begin_enrolment(self, session: Session) -> str:
        """A new TOTP secret for ``session``'s user, kept sealed in the session until confirmed."""
        if session.pending_totp is not None:
            return self.keys.decrypt(session.pending_totp)
        secret = security.new_totp_secret()
        async with self.engine.begin() as conn:
            await conn.execute(
                update(admin_sessions)
                .where(admin_sessions.c.id_hash == session.id_hash)
                .values(pending_totp=self.keys.encrypt(secret))
            )
        return secret

    async def finish_enrolment(self, session: Session, code: str) -> list[str] | None:
        """Confirm the pending secret with a code from the app; the new recovery codes."""
        if session.pending_totp is None:
            return None
        secret = self.keys.decrypt(session.pending_totp)
        step = security.totp_step(secret, code, self.clock().timestamp())
        if step is None:
            return None
        user = session.user
        codes = [security.generate_recovery_code() for _ in range(security.RECOVERY_CODE_COUNT)]
        async with self.engine.begin() as conn:
            await conn.execute(
                update(admin_users)
                .where(admin_users.c.id == user.id)
                .values(totp_secret=session.pending_totp, totp_last_step=step)
            )
            await conn.execute(
                delete(admin_recovery_codes).where(admin_recovery_codes.c.user_id == user.id)
            )
            await conn.execute(
                insert(admin_recovery_codes),
                [
                    {"user_id": user.id, "code_hash": self.keys.recovery_hash(user.id, c)}
                    for c in codes
                ],
            )
            await conn.execute(
                update(admin_sessions)
                .where(admin_sessions.c.id_hash == session.id_hash)
                .values(pending_totp=None)
            )
        await self._event("user.mfa_enrolled", user, {"user": user.login})
        return codes

    async def new_recovery_codes(self, user: User) -> list[str]:
        codes = [security.generate_recovery_code() for _ in range(security.RECOVERY_CODE_COUNT)]
        async with self.engine.begin() as conn:
            await conn.execute(
                delete(admin_recovery_codes).where(admin_recovery_codes.c.user_id == user.id)
            )
            await conn.execute(
                insert(admin_recovery_codes),
                [
                    {"user_id": user.id, "code_hash": self.keys.recovery_hash(user.id, c)}
                    for c in codes
                ],
            )
        await self._event("user.recovery_codes", user, {"user": user.login})
        return codes

    # -- sessions -------------------------------------------------------------------------
    async def open_session(self, user: User, ip: str | None, user_agent: str | None) -> str:
        """A new password-only session; its id (for the cookie)."""
        session_id = security.new_session_id()
        now = self.clock()
        async with self.engine.begin() as conn:
            await conn.execute(
                insert(admin_sessions).values(
                    id_hash=self.keys.session_hash(session_id),
                    user_id=user.id,
                    created_at=now,
                    last_seen_at=now,
                    client_ip=ip,
                    user_agent=(user_agent or "")[:256] or None,
                )
            )
            # Housekeeping: sessions past their absolute lifetime are gone for good.
            await conn.execute(
                delete(admin_sessions).where(
                    admin_sessions.c.created_at < now - self.policy.absolute
                )
            )
        return session_id

    async def load_session(self, session_id: str | None) -> Session | None:
        """The live session for a cookie value, touched; ``None`` if unknown or timed out."""
        if not session_id or len(session_id) > 128:
            return None
        id_hash = self.keys.session_hash(session_id)
        now = self.clock()
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(admin_sessions).where(admin_sessions.c.id_hash == id_hash)
                )
            ).first()
        if row is None:
            return None
        m = row._mapping
        if (
            now - m["last_seen_at"] > self.policy.idle
            or now - m["created_at"] > self.policy.absolute
        ):
            await self._drop(id_hash)
            return None
        # Touch at most every few seconds: a page's burst of requests writes once.
        if now - m["last_seen_at"] > timedelta(seconds=5):
            async with self.engine.begin() as conn:
                await conn.execute(
                    update(admin_sessions)
                    .where(admin_sessions.c.id_hash == id_hash)
                    .values(last_seen_at=now)
                )
        try:
            user = await self.get_user(m["user_id"])
        except NotFound:
            return None
        return Session(id_hash, user, m["created_at"], now, m["mfa_at"], m["pending_totp"])

    async def complete_mfa(self, session: Session) -> str:
        """Mark the second factor done and replace the session id (no fixation)."""
        new_id = security.new_session_id()
        now = self.clock()
        async with self.engine.begin() as conn:
            await conn.execute(
                update(admin_sessions)
                .where(admin_sessions.c.id_hash == session.id_hash)
                .values(id_hash=self.keys.session_hash(new_id), mfa_at=now, last_seen_at=now)
            )
        await self._event("login", session.user, {"login": session.user.login})
        return new_id

    async def step_up(self, session: Session) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                update(admin_sessions)
                .where(admin_sessions.c.id_hash == session.id_hash)
                .values(mfa_at=self.clock())
            )
        session.mfa_at = self.clock()
        await self._event("step_up", session.user, {"login": session.user.login})

    def stepped_up(self, session: Session) -> bool:
        return session.mfa_at is not None and self.clock() - session.mfa_at <= self.policy.step_up

    async def close_session(self, session: Session) -> None:
        await self._drop(session.id_hash)
        await self._event("logout", session.user, {"login": session.user.login})

    async def _drop(self, id_hash: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(delete(admin_sessions).where(admin_sessions.c.id_hash == id_hash))

    async def count_sessions(self, user: User) -> int:
        now = self.clock()
        query = select(func.count()).where(
            and_(
                admin_sessions.c.user_id == user.id,
                admin_sessions.c.last_seen_at > now - self.policy.idle,
            )
        )
        async with self.engine.connect() as conn:
            return int((await conn.execute(query)).scalar_one())

    async def _event(self, action: str, actor: User | None, detail: dict[str, object]) -> None:
        ctx = current_request.get()
        await self.events.admin(
            AdminEvent(
                at=self.clock(),
                action="dashboard." + action,
                actor_id=actor.id if actor else None,
                request_id=ctx.request_id if ctx else None,
                client_ip=ctx.client_ip if ctx else None,
                detail=dict(detail),
            )
        )


FIRST_OWNER_LOGIN = "owner"


async def create_first_owner(engine: AsyncEngine, keys: DashboardKeys) -> tuple[str, str] | None:
    """The first owner's login and password, when the database has no user yet."""
    accounts = Accounts(engine, keys)
    if await accounts.list_users():
        return None
    user, password = await accounts.create_user(FIRST_OWNER_LOGIN, Role.OWNER)
    return user.login, password
