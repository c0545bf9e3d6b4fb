"""Where a job's images are kept besides its inputs and outputs (whose keys its row holds):
the skeleton it was conditioned on, and the latest step preview while it runs. Derived from
the job's id, so the worker writes them and the API and the storage sweeps find them without
a column of their own."""

from __future__ import annotations


def pose_key(job_id: str) -> str:
    """Kept as long as the job's outputs, and removed with them."""
    return f"poses/{job_id}.png"


def preview_key(job_id: str) -> str:
    """Overwritten at each preview; removed once the job ends."""
    return f"previews/{job_id}.png"
