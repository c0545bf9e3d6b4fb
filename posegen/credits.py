"""Credits: every movement is a ledger row; balances change only by conditional updates.

A charge is one `UPDATE ... WHERE credits >= cost` (no read-then-write race); a refund is
guarded by the ledger's unique (generation_id, kind), so however often a failure path runs,
the money comes back once.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, func, insert, select, update
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
    return f"This model costs {amount} credits and your balance is lower."


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
    if amount > 0:
        result = session.execute(_DEBIT, params, execution_options=_NO_SYNC)
        if result.rowcount != 1:  # type: ignore[attr-defined]
            raise InsufficientCredits(_short(amount))


def refund(session: Session, *, user_id: str, generation_id: str, amount: int) -> bool:
    """Give a job's credits back once. Returns False when it was refunded already."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    inserted = session.execute(
        insert(CreditLedger)
        .values(
            user_id=user_id,
            generation_id=generation_id,
            kind="refund",
            amount=amount,
            note="job did not complete",
        )
        .on_conflict_do_nothing(index_elements=["generation_id", "kind"])
        .returning(CreditLedger.id)
    ).scalar_one_or_none()
    if inserted is None:
        return False
    if amount > 0:
        session.execute(
            update(User).where(User.id == user_id).values(credits=User.credits + amount)
        )
    session.flush()
    return True


def ledger_sum(session: Session, *, user_id: str) -> int:
    total = session.scalar(
        select(func.coalesce(func.sum(CreditLedger.amount), 0)).where(
            CreditLedger.user_id == user_id
        )
    )
    return int(total or 0)
