"""Per-user submit rate limits by tier, counted from the jobs table (works on any database).

A sliding window over the caller's own recent jobs, read through the (user_id, created_at)
index: no extra service, and the count is exact across API processes.
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


def blocking_params(user_id: str, limit: int) -> dict[str, Any]:
    return {"user_id": user_id, "since": utcnow() - WINDOW, "skip": limit - 1}


def check_rate_limit(session: Session, *, user: User, settings: Settings) -> None:
    limit = settings.rate_limit_per_minute.get(user.tier)
    if limit is None or limit <= 0:
        return
    blocking = session.scalar(BLOCKING_JOB, blocking_params(user.id, limit))
    if blocking is None:
        return
    retry_after = max(1, math.ceil((blocking + WINDOW - utcnow()).total_seconds()))
    raise RateLimited(
        f"At most {limit} submits a minute on the {user.tier!r} tier; retry in {retry_after} s.",
        headers={"Retry-After": str(retry_after)},
    )
