"""Schedulers whose step never makes the host wait for the GPU (see unipc.py)."""

from diffserve.runtime.schedulers.unipc import HostUniPC, sync_free_scheduler

__all__ = ["HostUniPC", "sync_free_scheduler"]
