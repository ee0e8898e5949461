"""Task names and payloads: the contract between producer and workers (enqueue by name)."""

from __future__ import annotations

TRANSCRIBE_SHARD = "ichigo.transcribe_shard"
#: request/reply tasks of the interactive endpoints (results through the result backend)
S2R = "ichigo.s2r"
R2T = "ichigo.r2t"
BULK_QUEUE = "bulk"
INTERACTIVE_QUEUE = "interactive"


def shard_payload(job_id: str, file_ids: list[int]) -> dict:
    """Keyword arguments of TRANSCRIBE_SHARD: plain JSON (ids only, never paths)."""
    return {"job_id": job_id, "file_ids": [int(i) for i in file_ids]}
