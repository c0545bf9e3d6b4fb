"""Users and API keys. Only a SHA-256 hash of a key is stored; the key is shown once."""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import bindparam, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, make_transient_to_detached

from db.fast import AsyncReads, DriverQuery
from db.models import TIERS, ApiKey, User
from db.types import utcnow
from posegen.catalog import is_uuid
from posegen.errors import InvalidRequest, NotFound, Unauthorized

KEY_PREFIX = "pg_live_"
RowT = TypeVar("RowT", bound=Sequence[Any])


def tier_rank(tier: str) -> int:
    return TIERS.index(tier)


def new_webhook_secret() -> str:
    # Standard Webhooks: "whsec_" + base64 of the raw key bytes.
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def hash_key(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode()).hexdigest()


def create_user(session: Session, *, email: str, tier: str = "free", credits: int = 0) -> User:
    from posegen.credits import grant

    if tier not in TIERS:
        raise InvalidRequest(f"Unknown tier {tier!r}; tiers are {', '.join(TIERS)}.")
    if credits < 0:
        raise InvalidRequest("Credits cannot be negative.")
    user = User(email=email.strip().lower(), tier=tier, credits=0)
    user.webhook_secret = new_webhook_secret()
    session.add(user)
    try:
        session.flush()
    except IntegrityError as exc:
        raise InvalidRequest(f"A user with email {email!r} exists already.") from exc
    if credits:
        grant(session, user_id=user.id, amount=credits, note="initial credits")
    return user


def user_by_email(session: Session, email: str) -> User:
    user = session.scalar(select(User).where(User.email == email.strip().lower()))
    if user is None:
        raise NotFound(f"No user with email {email!r}.")
    return user


def set_tier(session: Session, *, email: str, tier: str) -> User:
    if tier not in TIERS:
        raise InvalidRequest(f"Unknown tier {tier!r}; tiers are {', '.join(TIERS)}.")
    user = user_by_email(session, email)
    user.tier = tier
    session.flush()
    return user


def rotate_webhook_secret(session: Session, *, email: str) -> User:
    user = user_by_email(session, email)
    user.webhook_secret = new_webhook_secret()
    session.flush()
    return user


@dataclass(frozen=True)
class NewKey:
    key: ApiKey
    raw: str


def create_key(session: Session, *, email: str, name: str = "default") -> NewKey:
    user = user_by_email(session, email)
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(user_id=user.id, name=name, prefix=raw[:14], key_hash=hash_key(raw))
    session.add(key)
    session.flush()
    return NewKey(key=key, raw=raw)


def list_keys(session: Session, *, email: str) -> Sequence[ApiKey]:
    user = user_by_email(session, email)
    return session.scalars(
        select(ApiKey).where(ApiKey.user_id == user.id).order_by(ApiKey.created_at)
    ).all()


def revoke_key(session: Session, *, key_id_or_prefix: str) -> ApiKey:
    stmt = select(ApiKey).where(ApiKey.prefix == key_id_or_prefix)
    key = session.scalar(stmt)
    if key is None and is_uuid(key_id_or_prefix):
        key = session.get(ApiKey, key_id_or_prefix)
    if key is None:
        raise NotFound(f"No API key {key_id_or_prefix!r}.")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.flush()
    return key


def bearer_key_hash(authorization: str | None) -> str:
    """The stored hash of the key in an `Authorization: Bearer <key>` header, or 401."""
    if not authorization:
        raise Unauthorized("Missing API key: send `Authorization: Bearer <key>`.")
    scheme, _, raw = authorization.partition(" ")
    if scheme.lower() != "bearer" or not raw.strip():
        raise Unauthorized("Malformed Authorization header: expected `Bearer <key>`.")
    return hash_key(raw.strip())


def live_key(row: RowT | None) -> RowT:
    """The row of a key lookup whose first column is the key's `revoked_at`, or 401 when the
    key matched no row or was revoked."""
    if row is None:
        raise Unauthorized("Invalid API key.")
    if row[0] is not None:
        raise Unauthorized("This API key has been revoked.")
    return row


# The key check in front of every route but the poll: the key and its user in one row, run on
# the event loop (an async dependency: no thread hop) through `AsyncReads`.
_KEY_USER = DriverQuery(
    select(ApiKey.revoked_at, *User.__table__.c)
    .join(User, User.id == ApiKey.user_id)
    .where(ApiKey.key_hash == bindparam("key_hash"))
)


async def authenticate(reads: AsyncReads, authorization: str | None) -> User:
    """The user behind an `Authorization: Bearer <key>` header, or 401. The User comes back
    detached (as if loaded by a session that has closed), its columns set."""
    row = live_key(await reads.first(_KEY_USER, {"key_hash": bearer_key_hash(authorization)}))
    user = User(**{column.key: row[i] for i, column in enumerate(User.__table__.c, start=1)})
    make_transient_to_detached(user)
    return user
