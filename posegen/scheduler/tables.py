"""What the scheduler's modules share: the tables and the turns' index predicate."""

from __future__ import annotations

from sqlalchemy import Integer, literal_column

from db.models import Generation, QueueTurn

TURNS = QueueTurn.__table__
JOBS = Generation.__table__
# The turns with queued jobs, the predicate of the partial indexes on `queue_turns`: written
# into the SQL, not bound, so that a prepared statement's plan can use them (db.models.status_is).
WAITING = QueueTurn.queued > literal_column("0", Integer)
