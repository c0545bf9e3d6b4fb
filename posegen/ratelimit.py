"""Per-user submit rate limits by tier, counted from the jobs table (works on any database).

A sliding window over the caller's own recent jobs, read through the (user_id, created_at)
index: no extra service, and the count is exact across API processes.
"""

from __future__ import annotations

import datetime as dt
import math

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Generation, User
from db.types import utcnow
from posegen.errors import RateLimited
from posegen.settings import Settings

WINDOW = dt.timedelta(seconds=60)


def check_rate_limit(session: Session, *, user: User, settings: Settings) -> None:
    limit = settings.rate_limit_per_minute.get(user.tier)
    if limit is None or limit <= 0:
        return
    since = utcnow() - WINDOW
    count, oldest = session.execute(
        select(func.count(), func.min(Generation.created_at)).where(
            Generation.user_id == user.id, Generation.created_at > since
        )
    ).one()
    if count < limit:
        return
    retry_after = max(1, math.ceil((oldest + WINDOW - utcnow()).total_seconds()))
    raise RateLimited(
        f"At most {limit} submits a minute on the {user.tier!r} tier; retry in {retry_after} s.",
        headers={"Retry-After": str(retry_after)},
    )
