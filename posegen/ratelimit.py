"""Per-user submit rate limits by tier, counted from the jobs table (works on any database).

A sliding window over the caller's own recent jobs, read through the (user_id, created_at)
index: no extra service. A submit checks twice: first as a cheap refusal before any expensive
work, then again once its charge holds the caller's row lock, with its own job counted. The
lock makes one user's concurrent submits take turns at the second check, each seeing the jobs
the ones before it committed, so the count is exact across threads and API processes; other
users' submits do not wait for it.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from sqlalchemy import Integer, Select, bindparam, select
from sqlalchemy.orm import Session

from db.models import Generation, User
from db.types import utcnow
from posegen.errors import RateLimited
from posegen.settings import Settings

WINDOW = dt.timedelta(seconds=60)


# The creation time of the caller's limit-th newest job in the window, if there is one: the
# caller may submit again once it leaves. Reads at most `limit` index entries, however busy
# the caller is. Built once (it runs on every submit): bind user_id, since and skip.
BLOCKING_JOB: Select[dt.datetime] = (
    select(Generation.created_at)
    .where(Generation.user_id == bindparam("user_id"), Generation.created_at > bindparam("since"))
    .order_by(Generation.created_at.desc())
    .offset(bindparam("skip", type_=Integer))
    .limit(1)
)


def blocking_params(user_id: str, limit: int, *, own: int = 0) -> dict[str, Any]:
    return {"user_id": user_id, "since": utcnow() - WINDOW, "skip": limit - 1 + own}


def check_rate_limit(session: Session, *, user: User, settings: Settings, own: int = 0) -> None:
    """429 when the caller has used the tier's submits in the last minute. `own`: how many
    jobs of this very submit are in the window already (inserted, not yet committed)."""
    limit = settings.rate_limit_per_minute.get(user.tier)
    if limit is None or limit <= 0:
        return
    blocking = session.scalar(BLOCKING_JOB, blocking_params(user.id, limit, own=own))
    if blocking is None:
        return
    retry_after = max(1, math.ceil((blocking + WINDOW - utcnow()).total_seconds()))
    raise RateLimited(
        f"At most {limit} submits a minute on the {user.tier!r} tier; retry in {retry_after} s.",
        headers={"Retry-After": str(retry_after)},
    )
