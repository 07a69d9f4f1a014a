"""Transitional shim: the worker API the server uses (replaced by the runtime's worker)."""

from kad.scheduler import DecodeParams, Job, JobDone, JobFailed, RowDelta
from kad.scheduler import Scheduler as Worker

__all__ = ["DecodeParams", "Job", "JobDone", "JobFailed", "RowDelta", "Worker"]
