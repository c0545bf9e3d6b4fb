"""Credits: every movement is a ledger row; balances change only by conditional updates.

A charge is one `UPDATE ... WHERE credits >= cost` (no read-then-write race); a refund is
guarded by the ledger's unique (generation_id, kind), so however often a failure path runs,
the money comes back once.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, func, insert, literal, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.models import CreditLedger, User
from db.types import utcnow
from posegen.errors import InsufficientCredits, InvalidRequest


def grant(session: Session, *, user_id: str, amount: int, note: str = "grant") -> int:
    if amount <= 0:
        raise InvalidRequest("A grant must be a positive number of credits.")
    balance = session.execute(
        update(User)
        .where(User.id == user_id)
        .values(credits=User.credits + amount)
        .returning(User.credits)
    ).scalar_one()
    session.add(CreditLedger(user_id=user_id, kind="grant", amount=amount, note=note))
    session.flush()
    return int(balance)


def check_balance(user: User, amount: int) -> None:
    """402 when a balance read earlier is short; `charge` decides under concurrency."""
    if user.credits < amount:
        raise InsufficientCredits(_short(amount))


def _short(amount: int) -> str:
    return f"This job costs {amount} credits and your balance is lower."


# A charge runs on every submit: its two statements are built once, with bound parameters,
# and run without the ORM's unit of work (no object to track, no id to read back).
_CHARGE_ROW = insert(CreditLedger).values(
    user_id=bindparam("user_id"),
    generation_id=bindparam("generation_id"),
    kind="charge",
    amount=bindparam("debit"),
    note="",
    created_at=bindparam("now"),
)
_DEBIT = (
    update(User)
    .where(User.id == bindparam("user_id"), User.credits >= bindparam("amount"))
    .values(credits=User.credits - bindparam("amount"))
)
# The charged user's loaded balance is not updated in the session: read it again if needed.
_NO_SYNC: dict[str, Any] = {"synchronize_session": False}


def charge(session: Session, *, user_id: str, generation_id: str, amount: int) -> None:
    """Take `amount` credits for a job, in the caller's transaction, or raise 402.

    The ledger row goes first and the balance last: the UPDATE locks the user's row until the
    commit, and a user's concurrent submits queue on that lock, so the caller should commit
    right after this. The job must be in the session already (the ledger row refers to it)."""
    session.flush()
    params = {
        "user_id": user_id,
        "generation_id": generation_id,
        "debit": -amount,
        "amount": amount,
        "now": utcnow(),
    }
    session.execute(_CHARGE_ROW, params)
    # Also for a free job: the UPDATE takes the user's row lock, which the rate limit's
    # exact count relies on.
    result = session.execute(_DEBIT, params, execution_options=_NO_SYNC)
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise InsufficientCredits(_short(amount))


# A refund is the job's charge given back, in one statement: the refund row is copied from the
# charge row, so a job that was never charged has nothing to refund, and the amount is what was
# taken, not what the job says it costs. The ledger's unique (generation_id, kind) makes a
# second refund a no-op.
_LEDGER = CreditLedger.__table__
_REFUND_COLUMNS = ("user_id", "generation_id", "kind", "amount", "note", "created_at")
_CHARGE_GIVEN_BACK = select(
    CreditLedger.user_id,
    CreditLedger.generation_id,
    literal("refund"),
    -CreditLedger.amount,
    literal("job did not complete"),
    bindparam("now", type_=_LEDGER.c.created_at.type),
).where(CreditLedger.generation_id == bindparam("generation_id"), CreditLedger.kind == "charge")
_REFUND_ROW = {
    # The table, not the mapped class: an INSERT ... SELECT has no ORM objects to track.
    name: dialect.insert(_LEDGER)
    .from_select(_REFUND_COLUMNS, _CHARGE_GIVEN_BACK)
    .on_conflict_do_nothing(index_elements=["generation_id", "kind"])
    .returning(_LEDGER.c.user_id, _LEDGER.c.amount)
    for name, dialect in (("postgresql", postgresql), ("sqlite", sqlite))
}
_CREDIT = (
    update(User)
    .where(User.id == bindparam("user_id"))
    .values(credits=User.credits + bindparam("amount"))
)


def refund(session: Session, *, generation_id: str) -> int | None:
    """Give back what a job was charged, once: the amount refunded, or None when the job has
    no charge to give back or was refunded already."""
    statement = _REFUND_ROW[session.get_bind().dialect.name]
    row = session.execute(statement, {"generation_id": generation_id, "now": utcnow()}).first()
    if row is None:
        return None
    user_id, amount = row
    if amount > 0:
        session.execute(_CREDIT, {"user_id": user_id, "amount": amount}, execution_options=_NO_SYNC)
    return int(amount)


def ledger_sum(session: Session, *, user_id: str) -> int:
    total = session.scalar(
        select(func.coalesce(func.sum(CreditLedger.amount), 0)).where(
            CreditLedger.user_id == user_id
        )
    )
    return int(total or 0)
