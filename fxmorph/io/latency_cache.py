"""The on-disk cache of a runtime's measurements, so that a second shrink on a machine measures nothing.

One JSON file per runtime setting (:class:`CacheKey`: the runtime and its version, the thread count, the CPU model,
the file format), in ``$FXMORPH_CACHE_DIR`` or ``~/.cache/fxmorph/latency``. It holds the time of every measured
point (a kernel at some widths), so tables of different models share the points they have in common, and the
memory costs and FLOP rate. A file that cannot be read, or whose key is not this machine's (copied from another
machine, written by another version), is set aside with a warning and measured again: never used as it is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CacheKey", "LatencyCache", "cpu_model", "default_cache_dir"]

logger = logging.getLogger(__name__)

FORMAT = 6
"""The file format (and measuring method) version: a change measures everything again. 2: memory costs fitted
for relative error from 784 elements up, and the convolutions' channel block. 3: each kind of memory-bound op
timed three times over 60 rounds, and the median fitted. 4: every point timed in three passes over all of them,
and its median over the passes kept. 5: a point's time the 20th percentile of its runs, the least over the passes.
6: a point's time by wall clock, the difference of graphs of five copies of its op and of one, not the profiler's."""


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), with the machine's core count."""
    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name or platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def default_cache_dir() -> Path:
    """``$FXMORPH_CACHE_DIR``, or ``~/.cache/fxmorph/latency``."""
    root = os.environ.get("FXMORPH_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "fxmorph" / "latency"


@dataclass(frozen=True)
class CacheKey:
    """What a measurement depends on: a cache file serves only the same key."""

    runtime: str
    version: str
    threads: int
    cpu: str
    format: int = FORMAT

    def file_name(self) -> str:
        """A file name unique to the key."""
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]
        return f"{self.runtime}-{self.threads}t-{digest}.json"


@dataclass
class LatencyCache:
    """The measured points of one :class:`CacheKey`, loaded from and saved to ``directory``."""

    key: CacheKey
    directory: Path
    points: dict[str, float] = field(default_factory=dict)
    """Microseconds of each measured point, by ``"<kernel key>|<widths>"``."""
    extra: dict[str, Any] = field(default_factory=dict)
    """The memory costs and the FLOP rate, as the runtime stores them."""

    @property
    def path(self) -> Path:
        return self.directory / self.key.file_name()

    @classmethod
    def load(cls, key: CacheKey, directory: Path | None = None) -> LatencyCache:
        """The cache of ``key`` (empty where there is no usable file; an unusable one is set aside)."""
        cache = cls(key, directory or default_cache_dir())
        if not cache.path.exists():
            return cache
        try:
            data = json.loads(cache.path.read_text())
            if data.get("key") != asdict(key):  # caught below: the file is set aside and measured again
                raise ValueError(f"it was written for {data.get('key')}, not {asdict(key)}")
            cache.points = {str(k): float(v) for k, v in data["points"].items()}
            cache.extra = dict(data.get("extra", {}))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            aside = cache.path.with_suffix(".bad")
            logger.warning("latency cache %s is not usable (%s): measuring again (moved to %s)", cache.path, exc, aside)
            cache.path.replace(aside)
            cache.points, cache.extra = {}, {}
        return cache

    def save(self) -> None:
        """Write the cache (atomically: a reader never sees half a file)."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text(json.dumps({"key": asdict(self.key), "points": self.points, "extra": self.extra}))
            temporary.replace(self.path)
        except OSError as exc:  # a read-only home: measuring works, the next run measures again
            logger.warning("cannot write the latency cache %s (%s): the next shrink measures again", self.path, exc)
