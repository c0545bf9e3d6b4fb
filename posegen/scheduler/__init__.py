"""Who runs next, and how much may wait.

The order: a higher model priority first; within a priority, users with queued jobs take
turns, the next job going to the user whose latest job started longest ago (never: first; ties
by the oldest queued job); FIFO within a user. The database decides: a generation message only
says "a job of model M is ready", and the worker that takes it claims the best queued job of
the models it serves (`pick.next_turn` and `pick.head_of`, then `lifecycle.claim`).

The state is `queue_turns` (one row per user and model with how many jobs are queued, since
when the oldest waits, and when the user's latest job started) and `user_turns` (that last
start per user). The claim reads the first turn in order from an index of the rows with
queued jobs, then that turn's oldest job: its cost stays flat with the queue's length and the
number of users waiting. Rows a concurrent claim holds are skipped (`SKIP LOCKED`), so
claimers take different users' turns.
`joined` and `left` keep the rows in step with the jobs; posegen.lifecycle calls them in the
transaction that changes a job's status, and the reconciler repairs a row that drifted
(`repair`).

Locks are taken in one order everywhere, the user's row (a charge, a refund) before a turn
row, and a claim never takes the user's row (`user_turns` is its own), so that a submit, a
claim and a cancel of the same user's jobs never wait for each other in a circle.
"""

from posegen.scheduler.batches import batch_key, images, next_member
from posegen.scheduler.limits import check_depth, check_user_queue, retry_after
from posegen.scheduler.pick import (
    HEAD,
    MOVED,
    NEXT_TURN,
    TURN_HEAD,
    Turn,
    claimable,
    head_of,
    next_turn,
    overdue,
    preferred,
    top_priority,
    turn_order,
)
from posegen.scheduler.position import POSITION, position_params
from posegen.scheduler.turns import drifted, joined, left, moved_to_back, repair

__all__ = [
    "HEAD",
    "MOVED",
    "NEXT_TURN",
    "POSITION",
    "TURN_HEAD",
    "Turn",
    "batch_key",
    "check_depth",
    "check_user_queue",
    "claimable",
    "drifted",
    "head_of",
    "images",
    "joined",
    "left",
    "moved_to_back",
    "next_member",
    "next_turn",
    "overdue",
    "position_params",
    "preferred",
    "repair",
    "retry_after",
    "top_priority",
    "turn_order",
]
