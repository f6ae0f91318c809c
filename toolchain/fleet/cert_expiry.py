"""How long each device's TLS credentials have left, from what its birth reported (`runtime_agent.certificates`).

Why the earliest of the two: a device stops connecting when EITHER its client certificate or the CA it
trusts expires, so the one number worth showing is the nearer date, with which file it is. Under
`WARN_DAYS` the device is `expiring` (re-flash it with `toolchain flash --force` to renew), past it
`expired` (it can no longer connect; only someone at the device can fix it).
"""

from __future__ import annotations

from typing import Any, Mapping

WARN_DAYS = 30
DAY_S = 86400.0


def certificate_expiry(device: Mapping[str, Any], now: float) -> dict[str, Any] | None:
    """``{which, not_after, days_left, state}`` for a device row of the store (None: reported nothing)."""
    known = [(when, which) for when, which in ((device.get("cert_not_after"), "client"), (device.get("ca_not_after"), "ca"))
             if when is not None]
    if not known:
        return None
    when, which = min(known)
    days = (when - now) / DAY_S
    state = "expired" if days <= 0 else "expiring" if days < WARN_DAYS else "ok"
    return {"which": which, "not_after": when, "days_left": round(days, 1), "state": state}
