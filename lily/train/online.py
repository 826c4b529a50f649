"""Whether the Hugging Face Hub can be reached: found out once per process, within `PROBE_TIMEOUT_S` seconds.

A model or dataset that is neither bundled nor a local path then fails at once when there is no network,
instead of after a minute of the Hub client's retries. `HF_HUB_OFFLINE=1` says so without probing.
"""

from __future__ import annotations

import functools
import os
import threading
import urllib.error
import urllib.request

PROBE_TIMEOUT_S = 2.0
"""The longest the reachability probe may take, name resolution included."""
TRUE = ("1", "ON", "YES", "TRUE")
"""Values of HF_HUB_OFFLINE that mean offline, as huggingface_hub reads them."""


def offline_flag() -> bool:
    """Whether HF_HUB_OFFLINE asks for the local Hub cache only."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in TRUE


@functools.cache
def offline_reason() -> str | None:
    """Why the Hub cannot be used (HF_HUB_OFFLINE, or no answer from $HF_ENDPOINT in time), or None when it answers.

    The probe is one HEAD request in a daemon thread that is given `PROBE_TIMEOUT_S`, since a name lookup can
    block far longer than any socket timeout.
    """
    if offline_flag():
        return "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    answer: list[str | None] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=PROBE_TIMEOUT_S).close()
            answer.append(None)
        except urllib.error.HTTPError:  # an HTTP status, even an error, is an answer
            answer.append(None)
        except Exception as exc:  # no route, no name resolution, refused, reset, malformed reply
            answer.append(f"no connection to {endpoint}: {getattr(exc, 'reason', exc)}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S)
    return answer[0] if answer else f"no answer from {endpoint} within {PROBE_TIMEOUT_S:g} s"
