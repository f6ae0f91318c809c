"""Drift detection on the device: PSI per feature, Page-Hinkley and a drifting score (docs/architecture.md, a **contract**).

What the agent watches, every telemetry window, against the bundle's ``reference`` section (built on the
host by ``runtime_agent.reference.build_reference`` from the training inputs):

* **PSI per feature** (``psi``): each sample's summary features are binned with the reference's quantile
  edges (exactly as ``reference.bin_counts`` does) and the window's histogram is compared with the
  expected fractions. Convention: PSI < 0.1 stable, 0.1 - 0.25 moderate shift, >= 0.25 significant.
* **Prediction PSI**: the same index on the predicted-class histogram (a model whose answers collapse
  onto one class is drifting even when no single input feature is); for a model that is not a
  classifier, on the histogram of its per-sample output mean in the reference's quantile bins.
* **Page-Hinkley** (``PageHinkley``): a sequential two-sided CUSUM on the per-sample *monitored
  statistic* (the mean of the summary features, standardised with the reference's mean and std). It
  alarms within a dozen samples of a 1-sigma shift, with about 1 false alarm per 12,700 stable samples.
* **Drifting score** (``DriftingScore``): an exponentially weighted mean of the same standardised
  statistic, expressed as a z-score; a smooth level to plot and to threshold.

``DriftMonitor`` combines them for the agent: ``update(batch, predictions)`` per request (constant
cost per sample, vectorised over features) and ``window_report()`` per window.

Detector convention (river's): ``update(x)`` then read ``drift_detected``; it is True right after the
update that detected, and False again after the next update.

Only numpy and the standard library are used (device side).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from runtime_agent.reference import Features, Shapes, feature_names, summary_features

PSI_MODERATE = 0.1
"""PSI at or above this: a moderate shift (worth a look)."""
PSI_SIGNIFICANT = 0.25
"""PSI at or above this: a significant shift (``alarm`` fires)."""
PSI_EPSILON = 1e-4
"""Floor applied to every expected and actual fraction before the logarithm of ``psi``.

An empty bin would make ``ln(a / e)`` infinite; with the floor, one bin that held 10% of the reference
and is empty in the window contributes ``0.1 * ln(0.1 / 1e-4) = 0.69`` (already "significant"), and a bin
that the reference never saw but that now holds 10% contributes the same. 1e-4 is the usual choice and
is below the resolution of any window shorter than 10,000 samples.
"""
MIN_PSI_SAMPLES = 200
"""Fewest samples in a window for ``alarm`` to trust its PSI values.

PSI of a window of ``n`` samples drawn from the reference itself is not 0: with ``B`` bins it is about
``chi2(B - 1) / n`` (mean ``(B - 1) / n``). With 10 bins and 64 features, a 50-sample window of stable
data exceeds 0.25 on some feature most of the time; from 200 samples on it practically never does. The
PSI values are always reported; only the alarm waits for enough evidence. Page-Hinkley, which is
sequential and needs no window, alarms at any ``n``.
"""

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


def psi(expected_fractions: Sequence[float] | np.ndarray, actual_counts: Sequence[float] | np.ndarray) -> float:
    """Population Stability Index ``sum((a - e) * ln(a / e))`` of an observed histogram vs the expected one.

    ``expected_fractions``: the reference's fraction per bin (normalised here if it does not sum to 1,
    e.g. after rounding). ``actual_counts``: counts per bin in the window (fractions work too: they are
    normalised by their sum). Both are floored at ``PSI_EPSILON`` before the logarithm, so empty bins give
    a finite value. Identical distributions give 0; the index is symmetric in its two distributions.
    An empty window (all counts 0) gives 0.0: no evidence of drift.
    """
    expected = np.asarray(expected_fractions, dtype=np.float64).ravel()
    actual = np.asarray(actual_counts, dtype=np.float64).ravel()
    if expected.shape != actual.shape:
        raise ValueError(f"psi: {expected.size} expected fractions but {actual.size} actual counts")
    total = actual.sum()
    if total <= 0:
        return 0.0
    expected_total = expected.sum()
    if expected_total <= 0:
        raise ValueError("psi: expected fractions sum to 0")
    e = np.maximum(expected / expected_total, PSI_EPSILON)
    a = np.maximum(actual / total, PSI_EPSILON)
    return float(np.sum((a - e) * np.log(a / e)))


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


def _shape_text(shape: tuple[int, ...] | dict[str, tuple[int, ...]]) -> str:
    if isinstance(shape, dict):
        return "{" + ", ".join(f"{name}: {list(s)}" for name, s in shape.items()) + "}"
    return str(list(shape))


def _as_batch(array: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    """`array` as a batch of `shape`: one sample gets a batch axis; anything else is a ValueError."""
    if array.shape == shape:
        return array[None]
    if array.shape[1:] != shape:
        raise ValueError(f"drift monitor: {what} shape {list(array.shape)} does not match the input shape "
                         f"{list(shape)} (or a batch of it)")
    return array


def alarm(report: Mapping[str, Any], *, min_samples: int = MIN_PSI_SAMPLES) -> bool:
    """Whether a ``DriftMonitor.window_report`` calls for a ``drift_alarm`` event.

    ``ph_alarm``, or ``psi_max >= 0.25`` or ``prediction_psi >= 0.25`` on a window of at least
    ``min_samples`` samples (see ``MIN_PSI_SAMPLES``; pass 0 for the bare PSI rule).
    """
    if report.get("ph_alarm"):
        return True
    if int(report.get("n", 0)) < min_samples:
        return False
    return (float(report.get("psi_max", 0.0)) >= PSI_SIGNIFICANT
            or float(report.get("prediction_psi", 0.0)) >= PSI_SIGNIFICANT)


class DriftMonitor:
    """Per-window drift statistics of what the device serves, against the bundle's ``reference``.

    ``reference``: the manifest's ``reference`` section (``features`` [{name, edges, fractions}],
    ``predictions`` {fractions} per class, or {name: "output_mean", edges, fractions} for a model that is
    not a classifier, ``monitored`` {name: "feature_mean", mean, std}). ``input_shape``: one sample's shape
    (without the batch axis), or one per input name (in the manifest's order) for a model with several
    inputs; it fixes the summary features (``reference.feature_names``, prefixed by input name).

    ``update(batch, predictions)``: ``batch`` is (n, *input_shape) or one sample (*input_shape), or a dict
    of those by input name. Each sample's summary features are binned with
    ``np.searchsorted(edges, v, side="left")`` semantics (bin i holds ``edges[i-1] < v <= edges[i]``,
    exactly ``reference.bin_counts``), vectorised over features and samples by comparing against a padded
    edge matrix; the predictions (``reference.prediction_values``: classes, or per-sample output means
    binned with the reference's edges) are counted; the per-sample mean of the summary features feeds a
    ``PageHinkley`` and a ``DriftingScore`` built with the reference's mean and std (estimated online if
    the reference has no ``monitored`` section). Cost per sample is constant: O(features x bins)
    vectorised, plus two O(1) scalar updates.
    """

    def __init__(self, reference: Mapping[str, Any], input_shape: Shapes, *,
                 ph_params: Mapping[str, Any] | None = None, score_params: Mapping[str, Any] | None = None) -> None:
        self.input_shape: tuple[int, ...] | dict[str, tuple[int, ...]] = (
            {name: tuple(int(d) for d in shape) for name, shape in input_shape.items()}
            if isinstance(input_shape, Mapping) else tuple(int(d) for d in input_shape))
        names = feature_names(self.input_shape)
        table = list(reference.get("features", []))
        ref_names = [f.get("name") for f in table]
        if ref_names != names:
            raise ValueError(f"reference features {ref_names[:4]}{'...' if len(ref_names) > 4 else ''} "
                             f"({len(ref_names)}) do not match input shape {_shape_text(self.input_shape)} "
                             f"({len(names)} features: {names[:4]}{'...' if len(names) > 4 else ''})")
        self.feature_names = names
        self.n_features = k = len(names)
        self._n_edges = np.array([len(f["edges"]) for f in table], dtype=np.int64)
        width = int(self._n_edges.max(initial=0))
        self._n_bins = width + 1
        self._edges = np.full((k, max(width, 1)), np.inf)
        for j, f in enumerate(table):
            self._edges[j, :len(f["edges"])] = np.asarray(f["edges"], dtype=np.float64)
        self._expected = [np.asarray(f["fractions"], dtype=np.float64) for f in table]
        for f, expected, n_edges in zip(table, self._expected, self._n_edges):
            if expected.size != n_edges + 1:
                raise ValueError(f"reference feature {f['name']!r}: {n_edges} edges need {n_edges + 1} fractions, "
                                 f"got {expected.size}")
            if not expected.sum() > 0:
                raise ValueError(f"reference feature {f['name']!r}: expected fractions sum to {expected.sum()}")
        # `psi`'s floored expected fractions of every feature, padded to one table: the padding (a = e = 1)
        # adds exactly 0, so one vectorised pass gives every feature's PSI (`_feature_psi`).
        self._expected_table = np.ones((k, self._n_bins))
        for j, expected in enumerate(self._expected):
            self._expected_table[j, :expected.size] = np.maximum(expected / expected.sum(), PSI_EPSILON)
        self._valid_bins = np.arange(self._n_bins)[None, :] <= self._n_edges[:, None]
        self._offsets = np.arange(k, dtype=np.int64) * self._n_bins
        predictions = reference.get("predictions", {})
        self._expected_predictions = np.asarray(predictions.get("fractions", []), dtype=np.float64)
        edges = predictions.get("edges")
        self.prediction_edges: tuple[float, ...] | None = None if edges is None else tuple(float(e) for e in edges)
        """The bin edges of continuous predictions (None for a classifier: its bins are its classes)."""
        if edges is not None and self._expected_predictions.size != len(edges) + 1:
            raise ValueError(f"reference predictions: {len(edges)} edges need {len(edges) + 1} fractions, "
                             f"got {self._expected_predictions.size}")
        self.n_prediction_bins = int(self._expected_predictions.size)
        """Classes of a classifier, or bins of the continuous prediction values."""
        monitored = reference.get("monitored") or {}
        mean, std = monitored.get("mean"), monitored.get("std")
        if mean is None or std is None:
            mean = std = None
        self.page_hinkley = PageHinkley(mean, std, **dict(ph_params or {}))
        self.drifting_score = DriftingScore(mean, std, **dict(score_params or {}))
        self._reset_window()

    def _reset_window(self) -> None:
        self._counts = np.zeros(self.n_features * self._n_bins, dtype=np.int64)
        self._prediction_counts = np.zeros(self.n_prediction_bins, dtype=np.int64)
        self._n = 0
        self._ph_alarm = False
        self._score_alarm = False

    def _features(self, batch: Features) -> np.ndarray:
        if isinstance(self.input_shape, dict):
            if not isinstance(batch, Mapping) or list(batch) != list(self.input_shape):
                given = list(batch) if isinstance(batch, Mapping) else type(batch).__name__
                raise ValueError(f"drift monitor: inputs {given} do not match the model's {list(self.input_shape)}")
            return summary_features({name: _as_batch(np.asarray(batch[name]), shape, f"input {name!r}")
                                     for name, shape in self.input_shape.items()})
        return summary_features(_as_batch(np.asarray(batch), self.input_shape, "batch"))

    def bins(self, features: np.ndarray) -> np.ndarray:
        """(n, k) summary features -> (n, k) bin indices, identical to ``np.searchsorted(edges_j, v, "left")``."""
        return self._bins(features, bool(np.isnan(features).any()))

    def _bins(self, features: np.ndarray, has_nan: bool) -> np.ndarray:
        index = (features[:, :, None] > self._edges[None, :, :]).sum(axis=2)  # edges < v, padding +inf never
        if has_nan:  # searchsorted sorts NaN after every edge; a comparison with NaN is False
            index = np.where(np.isnan(features), self._n_edges[None, :], index)
        return index

    def prediction_bins(self, predictions: np.ndarray | Sequence[float]) -> np.ndarray:
        """Each sample's prediction bin: its class (checked to lie in range), or the reference bin of its
        continuous value (``reference.bin_counts``'s semantics)."""
        if self.prediction_edges is not None:
            values = np.asarray(predictions, dtype=np.float64).ravel()
            return np.searchsorted(self.prediction_edges, values, side="left")
        classes = np.asarray(predictions, dtype=np.int64).ravel()
        if classes.size and (classes.min() < 0 or classes.max() >= self.n_prediction_bins):
            raise ValueError(f"predicted classes must lie in [0, {self.n_prediction_bins}), "
                             f"got {int(classes.min())}..{int(classes.max())}")
        return classes

    def update(self, batch: Features, predictions: np.ndarray | Sequence[float] | None = None) -> None:
        """Account one request's samples (and the model's ``reference.prediction_values`` for them, if given)."""
        features = self._features(batch)
        n = features.shape[0]
        if n == 0:
            return
        counted = None if predictions is None else np.bincount(self.prediction_bins(predictions),
                                                               minlength=self.n_prediction_bins)
        monitored = (features.sum(axis=1) / self.n_features).tolist()  # the per-sample feature mean
        has_nan = not all(map(math.isfinite, monitored)) and bool(np.isnan(features).any())
        flat = (self._bins(features, has_nan) + self._offsets[None, :]).ravel()
        self._counts += np.bincount(flat, minlength=self._counts.size)
        if counted is not None:
            self._prediction_counts += counted
        self._n += n
        if self.page_hinkley.update_many(monitored):
            self._ph_alarm = True
        if self.drifting_score.update_many(monitored):
            self._score_alarm = True

    def counts(self) -> dict[str, np.ndarray]:
        """The current window's bin counts per feature (for inspection and tests)."""
        table = self._counts.reshape(self.n_features, self._n_bins)
        return {name: table[j, :n_edges + 1].copy()
                for j, (name, n_edges) in enumerate(zip(self.feature_names, self._n_edges))}

    def _feature_psi(self, table: np.ndarray) -> list[float]:
        """`psi` of every feature's window histogram (rows of `table`) in one vectorised pass.

        Why: a report needs one PSI per feature (64 for an 8x8 input); called one by one they cost ~0.4 ms
        per window, which a fleet simulator running a thousand agents in one process pays a thousand times
        a second. Same formula and floors as `psi`; only the order of the additions may differ (last bit)."""
        totals = table.sum(axis=1, keepdims=True)
        actual = np.where(self._valid_bins, np.maximum(table / np.maximum(totals, 1), PSI_EPSILON), 1.0)
        expected = self._expected_table
        values = ((actual - expected) * np.log(actual / expected)).sum(axis=1)
        return np.where(totals[:, 0] > 0, values, 0.0).tolist()

    def window_report(self) -> dict[str, Any]:
        """This window's drift numbers; resets the window's counts (not the detectors' state).

        ``{"psi": {feature: value}, "psi_max", "prediction_psi", "ph_alarm" (a Page-Hinkley detection
        during the window), "drifting_score" (its value now), "drifting_alarm" (a DriftingScore
        detection during the window), "n" (samples in the window)}``. Empty window: every PSI is 0.0.
        """
        values = dict(zip(self.feature_names, self._feature_psi(self._counts.reshape(self.n_features, self._n_bins))))
        prediction_psi = psi(self._expected_predictions, self._prediction_counts) if self.n_prediction_bins else 0.0
        report = {"psi": values, "psi_max": max(values.values(), default=0.0), "prediction_psi": prediction_psi,
                  "ph_alarm": self._ph_alarm, "drifting_score": float(self.drifting_score.score),
                  "drifting_alarm": self._score_alarm, "n": self._n}
        self._reset_window()
        return report

    alarm = staticmethod(alarm)
