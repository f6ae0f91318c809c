"""Sequential drift detectors on one scalar stream, river's convention (docs/architecture.md, a **contract**).

A detector is a small class with ``update(x)`` and a ``drift_detected`` attribute: True right after the
update that detected, False again after the next update.

* ``PageHinkley``: a two-sided CUSUM for a shift of the mean (fast, with a known false-alarm rate on
  independent samples).
* ``DriftingScore``: an exponentially weighted mean as a z-score (a smooth level to plot).
* ``LongRunVariance``: how much more the mean of a block of samples varies than independent samples
  would (the variance inflation of autocorrelated traffic), so a detector's allowance can widen by it.

``runtime_agent.drift`` re-exports them; ``DriftMonitor`` there wires them to the bundle's reference.
Only numpy and the standard library are used (device side).
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

PH_DELTA = 0.5
"""Default ``PageHinkley.delta``: allowance per sample, in reference standard deviations."""
PH_THRESHOLD = 8.3
"""Default ``PageHinkley.threshold`` (lambda): alarm level of the cumulative sums, in standard deviations."""
PH_BURN_IN = 300
"""Default samples used to estimate mean and std when none are given (then frozen)."""
SCORE_ALPHA = 0.05
"""Default ``DriftingScore.alpha``: EWMA weight of the newest sample (effective window ~ 2/alpha - 1 = 39)."""
SCORE_THRESHOLD = 4.5
"""Default ``DriftingScore.threshold`` on the z-like score."""

_STD_FLOOR = 1e-12


class _Standardiser:
    """Turns x into (x - mean) / std, with mean/std given or estimated from the first ``burn_in`` samples."""

    __slots__ = ("given", "mean", "std", "burn_in", "_inv_std", "_count", "_m", "_s")

    def __init__(self, mean: float | None, std: float | None, burn_in: int) -> None:
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std (the reference), or neither (estimate them online)")
        if burn_in < 2:
            raise ValueError(f"burn_in must be at least 2 samples, got {burn_in}")
        self.burn_in = int(burn_in)
        self.given = mean is not None
        if self.given:
            mean, std = float(mean), float(std)  # type: ignore[arg-type]
            if not (math.isfinite(mean) and math.isfinite(std)) or std < 0:
                raise ValueError(f"reference mean/std must be finite with std >= 0, got {mean}/{std}")
        self._freeze(mean, std)
        self.relearn()

    def _freeze(self, mean: float | None, std: float | None) -> None:
        self.mean, self.std = mean, std
        self._inv_std = 1.0 / max(std, _STD_FLOOR) if std is not None else 0.0

    def relearn(self) -> None:
        """Online mode: forget the estimate and burn in again (given mean/std are kept)."""
        self._count, self._m, self._s = 0, 0.0, 0.0
        if not self.given:
            self._freeze(None, None)

    @property
    def ready(self) -> bool:
        return self.mean is not None

    def standardise(self, x: float) -> float | None:
        """`(x - mean) / std`, or None while burning in (the sample is learnt instead) or for non-finite x."""
        if not math.isfinite(x):
            return None
        if self.mean is None:
            self.learn(x)
            return None
        return (x - self.mean) * self._inv_std

    def learn(self, x: float) -> None:
        """One burn-in sample (Welford); freezes mean and population std after ``burn_in`` of them."""
        self._count += 1
        d = x - self._m
        self._m += d / self._count
        self._s += d * (x - self._m)
        if self._count >= self.burn_in:
            self._freeze(self._m, math.sqrt(self._s / self._count))


class _StandardisedDetector:
    """What both detectors do first with a sample: count it and standardise it (or learn from it)."""

    n: int
    drift_detected: bool
    _ref: _Standardiser

    def _start_update(self, x: float) -> float | None:
        self.drift_detected = False
        x = float(x)
        if math.isfinite(x):
            self.n += 1
        return self._ref.standardise(x)


class PageHinkley(_StandardisedDetector):
    """Two-sided Page-Hinkley / CUSUM test for a shift of the mean, on the standardised stream.

    Every sample is standardised, ``z = (x - mean) / std``, and two cumulative sums are kept::

        up   = max(0, up   + z - delta)      # evidence of an increase
        down = max(0, down - z - delta)      # evidence of a decrease

    Drift is detected when ``up > threshold`` or ``down > threshold`` (``mode`` "both", or only one of
    them with "up"/"down"). This is Page's CUSUM, the ``max(0, .)`` form of the Page-Hinkley statistic
    ``m_T - min_t m_t``; ``delta`` is its allowance (reference value ``k``) and ``threshold`` its
    ``lambda``, both in units of the reference standard deviation. Cost: O(1) time and memory per update.

    ``mean`` / ``std`` given (the bundle's ``reference.monitored``): the test is against them; after a
    detection the sums restart at 0, so a drift that persists is detected again (every ~15 samples for a
    1-sigma shift). Not given: the first ``burn_in`` samples estimate them (then frozen; no detection
    during burn-in), and after a detection the detector burns in again on the new regime, as river's
    detectors adapt to the new concept.

    Defaults, tuned by simulation (N(0,1) stream, 1-sigma shift after 1000 samples, 40,000 runs; false
    alarms on 4e7 stable samples, two-sided, restarting after each alarm):

    * ``delta = 0.5``: half the shift to detect fastest (1 sigma), Page/Lorden's optimal allowance for
      that shift; 0.45 and 0.55 trade the same way within a fraction of a sample.
    * ``threshold = 8.3``: 0.79 false alarms per 10,000 stable samples (average run length ~12,700),
      i.e. "about 1 per 10,000" with margin; median delay 14 samples (mean 15.1; 90% within 26), counting
      the delay as ``index of the detecting sample - index of the first shifted sample``.
      (8.0 gives a median of 13 but 1.05 false alarms per 10,000.)

    Non-finite ``x`` is ignored (no update, ``drift_detected`` False).
    """

    def __init__(self, mean: float | None = None, std: float | None = None, delta: float = PH_DELTA,
                 threshold: float = PH_THRESHOLD, burn_in: int = PH_BURN_IN, mode: str = "both") -> None:
        if mode not in ("both", "up", "down"):
            raise ValueError(f"mode must be 'both', 'up' or 'down', got {mode!r}")
        if delta < 0 or threshold <= 0:
            raise ValueError(f"need delta >= 0 and threshold > 0, got delta={delta}, threshold={threshold}")
        self.delta = float(delta)
        self.threshold = float(threshold)
        self.mode = mode
        self._ref = _Standardiser(mean, std, burn_in)
        self.n = 0
        """Finite samples seen."""
        self.n_detections = 0
        """Detections since construction."""
        self.drift_detected = False
        self.sum_up = 0.0
        self.sum_down = 0.0

    @property
    def mean(self) -> float | None:
        """The mean tested against (None while burning in)."""
        return self._ref.mean

    @property
    def std(self) -> float | None:
        return self._ref.std

    def reset(self) -> None:
        """Zero the sums (and, without a given reference, burn in again)."""
        self.sum_up = self.sum_down = 0.0
        self.drift_detected = False
        self._ref.relearn()

    def update(self, x: float) -> bool:
        """Feed one sample; returns ``drift_detected``."""
        z = self._start_update(x)
        if z is None:
            return False
        ref = self._ref
        up = self.sum_up + z - self.delta
        down = self.sum_down - z - self.delta
        self.sum_up = up = up if up > 0.0 else 0.0
        self.sum_down = down = down if down > 0.0 else 0.0
        mode = self.mode
        if (up > self.threshold and mode != "down") or (down > self.threshold and mode != "up"):
            self.drift_detected = True
            self.n_detections += 1
            self.sum_up = self.sum_down = 0.0
            if not ref.given:
                ref.relearn()
        return self.drift_detected

    def update_many(self, values: Iterable[float] | np.ndarray) -> int:
        """``update`` each value in order (same result); returns how many detections happened.

        ``drift_detected`` afterwards is that of the last value.
        """
        if isinstance(values, np.ndarray):
            values = values.ravel().tolist()
        update = self.update
        return sum(1 for x in values if update(x))


class DriftingScore(_StandardisedDetector):
    """A z-like "drifting score": how many standard errors the recent mean is away from the reference.

    Definition. With ``z_t = (x_t - mean) / std`` (reference, or burn-in estimate as in ``PageHinkley``),
    an exponentially weighted mean ``m_t = (1 - alpha) * m_{t-1} + alpha * z_t`` (``m_0 = 0``) has, on a
    stable stream, variance ``v_t = alpha / (2 - alpha) * (1 - (1 - alpha) ** (2 t))``. The attributes:

    * ``z = m_t / sqrt(v_t)``: signed; N(0, 1) on a stable Gaussian stream, ``+-`` the shift times
      ``sqrt((2 - alpha) / alpha)`` (~6.2 per sigma at alpha=0.05) once a shift has filled the window.
    * ``score = |z|`` (>= 0): the drifting score reported in telemetry.
    * ``drifting``: ``score >= threshold`` now (a level).
    * ``drift_detected``: True right after the update on which ``score`` crossed ``threshold`` from below
      (river's convention). It re-arms when the score falls below ``rearm * threshold`` (hysteresis, so
      a score hovering at the threshold does not fire every sample). The EWMA itself never resets: the
      score keeps describing the current level.

    Defaults ``alpha = 0.05`` (effective window ~39 samples) and ``threshold = 4.5``: on N(0, 1) about 3%
    of 10,000-sample stable streams ever cross (once), and a 1-sigma shift crosses after a median 22
    samples (simulation, 4000 runs). Constant cost per update.
    """

    def __init__(self, mean: float | None = None, std: float | None = None, alpha: float = SCORE_ALPHA,
                 threshold: float = SCORE_THRESHOLD, burn_in: int = PH_BURN_IN, rearm: float = 0.75) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if threshold <= 0 or not 0 < rearm <= 1:
            raise ValueError(f"need threshold > 0 and 0 < rearm <= 1, got {threshold}, {rearm}")
        self.alpha = float(alpha)
        self.threshold = float(threshold)
        self.rearm = float(rearm)
        self._ref = _Standardiser(mean, std, burn_in)
        self._v_inf = self.alpha / (2.0 - self.alpha)
        self._decay = 1.0  # (1 - alpha) ** (2 t)
        self._m = 0.0
        self._armed = True
        self.n = 0
        self.z = 0.0
        self.score = 0.0
        self.drifting = False
        self.drift_detected = False
        self.n_detections = 0

    def update(self, x: float) -> bool:
        """Feed one sample; returns ``drift_detected``."""
        z = self._start_update(x)
        if z is None:
            return False
        keep = 1.0 - self.alpha
        self._m = keep * self._m + self.alpha * z
        self._decay *= keep * keep
        self.z = self._m / math.sqrt(self._v_inf * (1.0 - self._decay))
        self.score = score = abs(self.z)
        self.drifting = score >= self.threshold
        if self.drifting and self._armed:
            self.drift_detected = True
            self.n_detections += 1
            self._armed = False
        elif not self._armed and score < self.rearm * self.threshold:
            self._armed = True
        return self.drift_detected

    def update_many(self, values: Iterable[float] | np.ndarray) -> int:
        """``update`` each value in order; returns how many detections happened."""
        if isinstance(values, np.ndarray):
            values = values.ravel().tolist()
        update = self.update
        return sum(1 for x in values if update(x))


LRV_BLOCK = 50
"""Samples per block of ``LongRunVariance``: the horizon over which it measures the inflation (the median
delay of a 1-sigma detection is about 20-30 samples, so dependence at that scale is what fakes a shift)."""
LRV_LEVEL_ALPHA = 0.1
"""EWMA weight of the newest block mean in the slow level (about 10 blocks, 500 samples)."""
LRV_ALPHA = 0.02
"""EWMA weight of the newest squared block deviation in the inflation estimate (about 50 blocks)."""
LRV_MAX = 4.0
"""The inflation is clipped to [1, LRV_MAX]: never more sensitive than for independent samples, and a
drift that slips into the estimate can at most halve the detector's view of a shift."""


class LongRunVariance:
    """Online estimate of the variance inflation factor of a standardised stream (batch means).

    Real traffic is not independent: a camera sees one scene for minutes, digits arrive writer by writer.
    The mean of ``block`` consecutive samples then varies ``vif`` times more than ``1 / block``, and a
    CUSUM calibrated for independent samples raises false alarms (the data set's own order of the digits
    has ``vif`` about 2 at 50 samples; an AR(1) stream with phi = 0.5 has 3). ``update(z)`` takes the
    standardised samples (``(x - mean) / std`` of the reference); after every block, the block mean's
    squared deviation from a slow level (an EWMA of block means, so a lasting shift is not counted as
    variance for long) times ``block`` is averaged into ``vif`` by a slower EWMA. ``scale`` =
    ``1 / sqrt(clip(vif, 1, LRV_MAX))`` is what a detector multiplies its input by: its allowance and
    threshold, in reference standard deviations, widen by ``sqrt(vif)``.

    It starts at ``vif = 1`` (no inflation assumed) and learns from the traffic itself (a plain average
    over the first ``1 / alpha`` blocks, so it is usable after a few hundred samples); a shift that
    appears suddenly reaches the detector long before it reaches the estimate (one block adds at most
    ``LRV_ALPHA x block x shift^2``), so detection delay stays that of the independent case.
    Non-finite values are ignored. O(1) per sample.
    """

    def __init__(self, block: int = LRV_BLOCK, level_alpha: float = LRV_LEVEL_ALPHA, alpha: float = LRV_ALPHA,
                 maximum: float = LRV_MAX) -> None:
        if block < 2 or not (0 < level_alpha <= 1 and 0 < alpha <= 1) or maximum < 1:
            raise ValueError(f"need block >= 2, alphas in (0, 1] and maximum >= 1, got {block}, {level_alpha}, "
                             f"{alpha}, {maximum}")
        self.block, self.level_alpha, self.alpha, self.maximum = int(block), float(level_alpha), float(alpha), float(maximum)
        self.vif = 1.0
        """The current estimate (unclipped)."""
        self.scale = 1.0
        """``1 / sqrt(clip(vif, 1, maximum))``."""
        self._level: float | None = None
        self._sum = 0.0
        self._count = 0
        self._blocks = 0

    def update(self, z: float) -> None:
        if not math.isfinite(z):
            return
        self._sum += z
        self._count += 1
        if self._count < self.block:
            return
        mean = self._sum / self._count
        self._sum, self._count = 0.0, 0
        if self._level is None:
            self._level = mean
            return
        self._blocks += 1  # a plain average over the first 1/alpha blocks, then the EWMA: a quick start
        self.vif += max(self.alpha, 1.0 / self._blocks) * (self.block * (mean - self._level) ** 2 - self.vif)
        self._level += self.level_alpha * (mean - self._level)
        self.scale = 1.0 / math.sqrt(min(max(self.vif, 1.0), self.maximum))
