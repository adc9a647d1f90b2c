"""Channels with ``async def`` listeners (and a sync one sharing a channel with an async one).

Nothing registers the listeners on import: tests/test_tasks.py registers them for the tests that
need them and removes them after, so that other tests' Runtimes do not listen to these channels.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import ClassVar

from pgpubsub.channel import Channel
from tests.testapp.models import Effect


@dataclass
class AsyncJob(Channel):
    lock_notifications: ClassVar[bool] = True
    key: str
    fail: bool = False


@dataclass
class AsyncNews(Channel):
    key: str


async def run_async_job(key: str, fail: bool) -> None:
    await Effect.objects.acreate(
        key=key, channel="AsyncJob", value=threading.current_thread().name, pid=os.getpid()
    )
    if fail:
        raise RuntimeError(f"{key} fails after its write")


async def news_async(key: str) -> None:
    await Effect.objects.acreate(
        key=f"async:{key}", channel="AsyncNews", value=threading.current_thread().name
    )


def news_sync(key: str) -> None:
    Effect.objects.create(
        key=f"sync:{key}", channel="AsyncNews", value=threading.current_thread().name
    )


LISTENERS = [(AsyncJob, run_async_job), (AsyncNews, news_async), (AsyncNews, news_sync)]
