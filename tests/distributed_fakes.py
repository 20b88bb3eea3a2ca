"""A measure function for worker processes in tests: logs each call, takes a set time, invents no figures it can't.

Workers import it by name (`tests.distributed_fakes:logged_measure`), as they would import `measure`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from attn_tune.measurement.measure import Measurement

LOG_ENV = "ATTN_TUNE_TEST_MEASURE_LOG"
SECONDS_ENV = "ATTN_TUNE_TEST_MEASURE_SECONDS"


def _log(event: str, variant: str, params: dict[str, Any]) -> None:
    with open(os.environ[LOG_ENV], "a") as f:
        f.write(json.dumps({"event": event, "pid": os.getpid(), "variant": variant, "params": params}) + "\n")
        f.flush()


def logged_measure(variant, problem, params=None, **kwargs) -> Measurement:
    """Log 'start', sleep, log 'done'; latency grows with the chunk so that the choice is predictable."""
    params = dict(params or {})
    _log("start", variant.name, params)
    time.sleep(float(os.environ.get(SECONDS_ENV, "0.2")))
    latency = {"sdpa": 1.0, "dense": 3.0}.get(variant.name, 2.0 + params.get("chunk", 0) / 1e4)
    _log("done", variant.name, params)
    return Measurement(latency_ms=latency, latency_iqr_ms=0.0, peak_bytes=1000, rel_error=1e-7, repeats=1)
