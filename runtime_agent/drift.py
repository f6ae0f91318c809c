"""Drift on the device: what moved, by which statistic, past which threshold (docs/architecture.md, a **contract**).

What the agent watches, every telemetry window, against the bundle's ``reference`` section (built on the
host by ``runtime_agent.reference.build_reference`` from the training inputs):

* **Covariate drift** (the ``drift_alarm``): the input distribution moved.
  - *PSI per feature* (``psi``): each sample's summary features are binned with the reference's quantile
    edges and the window's histogram is compared with the expected fractions.
  - *Page-Hinkley* on the per-sample *monitored statistic* (the mean of the summary features).
* **Prediction drift**: the mix of the model's answers moved (PSI of the predicted-class histogram, or of
  the binned output mean for a model that is not a classifier). Its own kind: a line that makes one
  product for an hour, or a camera on one scene, changes the class mix and nothing else.

Why the alarm holds on real traffic (issue 19; numbers in ``benchmarks/drift_real.py``). Real traffic is
never shuffled, and the first design (PSI >= 0.25 on 200+ samples, Page-Hinkley on the raw statistic)
raised 5.6 false alarms per 10,000 samples on the digits in their own order and 8.7 in bursts of one
class. Three things fix it, each for one cause:

1. **Class-conditional reference.** A classifier's reference is kept per predicted class. Page-Hinkley
   standardises each sample with its *predicted class's* mean and std, and a window's expected
   histogram per feature is the mixture of the per-class histograms weighted by the window's own
   predicted class mix. A change of class mix alone then moves neither, while a shift of the inputs
   does (samples no longer look like the class they are predicted as). Classes the reference saw fewer
   than ``MIN_CLASS_SAMPLES`` times use the overall reference.
2. **An autocorrelation-aware allowance.** ``LongRunVariance`` measures, on the traffic itself, how much
   more block means vary than independent samples would (``vif``); Page-Hinkley's input is divided by
   ``sqrt(vif)`` (clipped to [1, 4]), so its allowance and threshold widen with the dependence. Its
   threshold is ``MONITOR_PH_THRESHOLD`` = 12 (not the detector's 8.3 for independent samples): 0
   alarms in 300,000 samples of an AR(1) stream with phi 0.5, median delay 19 samples on a 1-sigma shift.
3. **PSI thresholds that know the sample size, and a shift that lasts.** PSI of a window of ``n``
   samples from the reference itself is about ``chi2(B - 1) * (1/n + 1/n_ref)`` (with the window's
   fractions floored at half a sample, ``half_sample``); a feature is *over* when its PSI is at or above
   ``psi_threshold``: the larger of the convention's 0.25 and the chi-square quantile at a false-alarm
   rate of ``PSI_FALSE_ALARM`` per window (Bonferroni over the features). Small windows need more
   evidence; no window needs a fixed minimum count. A feature crosses when it is over in **two
   consecutive windows** (``psi_sustained``): dependent traffic (the digits writer by writer, a
   camera's few scenes) makes single windows stray on some feature now and then, a different one each
   time (127 of 500 windows of the digits in their own order, none twice in a row on the same feature),
   while a covariate shift stays. It costs a PSI-only detection one window; Page-Hinkley is immediate.

One rule: ``window_report`` lists every ``crossings`` entry ``{kind, statistic, value, threshold}``; the
window is in covariate ``alarm`` when one has kind ``covariate``, in ``prediction_drift`` when one has
kind ``prediction``; the dashboard colours a PSI cell by the same ``psi_threshold`` the window carries.

Also per window: ``estimated_accuracy``, the label-free accuracy estimate from calibrated confidences
(``runtime_agent.confidence``), when the bundle ships a calibration.

Detectors follow river's convention (``runtime_agent.detectors``, re-exported here). Only numpy and the
standard library are used (device side).
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any, Mapping, Sequence

import numpy as np

from runtime_agent.confidence import Calibration
from runtime_agent.detectors import (PH_BURN_IN, PH_DELTA, PH_THRESHOLD, SCORE_ALPHA, SCORE_THRESHOLD, DriftingScore,
                                     LongRunVariance, PageHinkley)
from runtime_agent.reference import Features, Shapes, feature_names, summary_features

__all__ = ["PH_BURN_IN", "PH_DELTA", "PH_THRESHOLD", "SCORE_ALPHA", "SCORE_THRESHOLD", "DriftingScore", "LongRunVariance",
           "PageHinkley", "DriftMonitor", "alarm", "crossings", "half_sample", "psi", "psi_threshold", "COVARIATE", "PREDICTION"]

COVARIATE, PREDICTION = "covariate", "prediction"
"""The two kinds of drift a crossing names."""

PSI_MODERATE = 0.1
"""PSI at or above this: a moderate shift (worth a look; the dashboard's amber)."""
PSI_SIGNIFICANT = 0.25
"""PSI at or above this: a significant shift by the usual convention; the floor of ``psi_threshold``."""
PSI_EPSILON = 1e-4
"""Floor applied to every expected and actual fraction before the logarithm of ``psi``.

An empty bin would make ``ln(a / e)`` infinite; with the floor, one bin that held 10% of the reference
and is empty in the window contributes ``0.1 * ln(0.1 / 1e-4) = 0.69`` (already "significant"), and a bin
that the reference never saw but that now holds 10% contributes the same. 1e-4 is the usual choice and
is below the resolution of any window shorter than 10,000 samples.
"""
PSI_FALSE_ALARM = 1e-3
"""Chance that a window of stable independent samples crosses ``psi_threshold`` on some feature (or on
the prediction PSI). At 100 samples per window that is 0.1 false alarms per 10,000 samples."""
MIN_PSI_SAMPLES = 200
"""Fewest samples for the *fleet's* PSI heat map to count a window (smaller windows' PSI is mostly noise,
see ``psi_threshold``), and for ``alarm``'s rule on a report of an older agent that carries no crossings."""
MONITOR_PH_THRESHOLD = 12.0
"""Page-Hinkley's threshold inside ``DriftMonitor`` (see the module's point 2)."""
MIN_CLASS_SAMPLES = 20
"""A predicted class with fewer reference samples is judged against the overall reference."""


def half_sample(n: int) -> float:
    """The floor of a window's fractions in the monitor's PSI: half a sample (``0.5 / n``), never below
    ``PSI_EPSILON``. Why: with the bare 1e-4 floor an empty bin that expected 1.2% of 100 samples adds
    ``0.012 * ln(0.012 / 1e-4) = 0.057`` (5.7 "samples" of chi-square where Pearson's statistic adds 1.2), so
    ``n * PSI`` of stable windows ran 20-60% above chi-square and its 99.9% quantile 1.6-2x (simulated,
    10 bins, n = 50-200); with half a sample both match chi-square (mean 8.7 and 99.9% 28-29 for df 9)."""
    return max(PSI_EPSILON, 0.5 / n) if n > 0 else PSI_EPSILON


def psi(expected_fractions: Sequence[float] | np.ndarray, actual_counts: Sequence[float] | np.ndarray,
        actual_floor: float = PSI_EPSILON) -> float:
    """Population Stability Index ``sum((a - e) * ln(a / e))`` of an observed histogram vs the expected one.

    ``expected_fractions``: the reference's fraction per bin (normalised here if it does not sum to 1,
    e.g. after rounding). ``actual_counts``: counts per bin in the window (fractions work too: they are
    normalised by their sum). Both are floored before the logarithm (expected at ``PSI_EPSILON``, actual at
    ``actual_floor``: the monitor passes ``half_sample(n)``), so empty bins give a finite value. Identical distributions give 0; the index is symmetric in its two distributions.
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
    a = np.maximum(actual / total, actual_floor)
    return float(np.sum((a - e) * np.log(a / e)))


def psi_threshold(n: int, n_reference: float, bins: int, tests: int = 1) -> float:
    """The PSI at or above which a window of ``n`` samples has moved from a reference of ``n_reference``.

    ``max(PSI_SIGNIFICANT, q * (1/n + 1/n_reference))`` with ``q`` the chi-square quantile with
    ``bins - 1`` degrees of freedom at ``1 - PSI_FALSE_ALARM / tests`` (Wilson-Hilferty's approximation,
    within 1% here): for small deviations ``PSI ~ sum((a - e)^2 / e)``, whose ``n_eff`` multiple is
    chi-square when both histograms are samples of one distribution. An empty window: infinity.
    """
    if n <= 0:
        return math.inf
    df = max(int(bins) - 1, 1)
    z = NormalDist().inv_cdf(1.0 - PSI_FALSE_ALARM / max(int(tests), 1))
    quantile = df * (1.0 - 2.0 / (9 * df) + z * math.sqrt(2.0 / (9 * df))) ** 3
    return max(PSI_SIGNIFICANT, quantile * (1.0 / n + 1.0 / max(float(n_reference), 1.0)))


def crossings(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The statistics of a window report at or past their thresholds, each ``{kind, statistic, value,
    threshold}``: Page-Hinkley (covariate), the sustained feature (``psi_sustained``: over
    ``psi_threshold`` in this window and the one before) with the highest PSI (covariate), the
    prediction PSI (prediction)."""
    found = []
    if report.get("ph_alarm"):
        found.append({"kind": COVARIATE, "statistic": "page_hinkley", "value": round(float(report.get("ph_peak", 0.0)), 4),
                      "threshold": float(report.get("ph_threshold", MONITOR_PH_THRESHOLD))})
    values = report.get("psi") or {}
    sustained = [feature for feature in report.get("psi_sustained") or [] if feature in values]
    if sustained:
        feature = max(sustained, key=values.get)
        found.append({"kind": COVARIATE, "statistic": f"psi:{feature}", "value": round(float(values[feature]), 4),
                      "threshold": round(float(report["psi_threshold"]), 4)})
    prediction_threshold = float(report.get("prediction_psi_threshold", math.inf))
    if float(report.get("prediction_psi", 0.0)) >= prediction_threshold:
        found.append({"kind": PREDICTION, "statistic": "prediction_psi", "value": round(float(report["prediction_psi"]), 4),
                      "threshold": round(prediction_threshold, 4)})
    return found


def alarm(report: Mapping[str, Any], *, min_samples: int = MIN_PSI_SAMPLES) -> bool:
    """Whether a window report is in covariate drift alarm (a ``drift_alarm`` event).

    A report with ``crossings`` (this agent's): one of kind covariate. A report without (an older agent's,
    which knew no thresholds per window): ``ph_alarm``, or ``psi_max`` / ``prediction_psi`` >= 0.25 on a
    window of at least ``min_samples`` samples."""
    if "crossings" in report:
        return any(c.get("kind") == COVARIATE for c in report["crossings"] or [])
    if report.get("ph_alarm"):
        return True
    if int(report.get("n", 0)) < min_samples:
        return False
    return (float(report.get("psi_max", 0.0)) >= PSI_SIGNIFICANT
            or float(report.get("prediction_psi", 0.0)) >= PSI_SIGNIFICANT)


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


class _ClassReference:
    """A classifier's per-predicted-class reference (``reference.by_class`` and each feature's
    ``class_counts``), folded into the arrays the monitor needs: per class the monitored statistic's mean
    and std, and per class x feature x bin the expected fractions (padded like the monitor's table).
    Classes seen fewer than ``MIN_CLASS_SAMPLES`` times take the overall reference's values."""

    def __init__(self, section: Mapping[str, Any], table: list[Mapping[str, Any]], overall: np.ndarray,
                 monitored: tuple[float, float], n_reference: int) -> None:
        counts = np.asarray(section["n"], dtype=np.float64)
        trusted = counts >= MIN_CLASS_SAMPLES
        std = np.asarray(section["std"], dtype=np.float64)
        trusted &= std > 0
        self.mean = np.where(trusted, np.asarray(section["mean"], dtype=np.float64), monitored[0])
        self.inv_std = 1.0 / np.where(trusted, std, max(monitored[1], 1e-12))
        self.n = np.where(trusted, counts, float(n_reference))
        """Reference samples behind each class's fractions (the overall count for the untrusted ones)."""
        classes, k, bins = len(counts), overall.shape[0], overall.shape[1]
        self.fractions = np.broadcast_to(overall, (classes, k, bins)).copy()
        for j, feature in enumerate(table):
            joint = np.asarray(feature["class_counts"], dtype=np.float64)
            if joint.shape != (classes, len(feature["edges"]) + 1):
                raise ValueError(f"reference feature {feature['name']!r}: class_counts must be {classes} rows of "
                                 f"{len(feature['edges']) + 1} bins, got {list(joint.shape)}")
            rows = np.flatnonzero(trusted)
            self.fractions[rows, j, :joint.shape[1]] = joint[rows] / counts[rows, None]

    def expected(self, mix: np.ndarray) -> tuple[np.ndarray, float]:
        """The expected fractions (features x bins) for a window whose predicted class shares are ``mix``,
        and the reference samples that expectation rests on (``1 / sum(w_c^2 / n_c)``)."""
        return np.einsum("c,ckb->kb", mix, self.fractions), 1.0 / float(np.sum(mix * mix / self.n))


class DriftMonitor:
    """Per-window drift statistics of what the device serves, against the bundle's ``reference``.

    ``reference``: the manifest's ``reference`` section (``features`` [{name, edges, fractions,
    class_counts?}], ``predictions`` {fractions} per class, or {name: "output_mean", edges, fractions} for
    a model that is not a classifier, ``monitored`` {name: "feature_mean", mean, std}, optionally
    ``by_class`` {n, mean, std} and ``confidence``). ``input_shape``: one sample's shape (without the
    batch axis), or one per input name (in the manifest's order) for a model with several inputs; it
    fixes the summary features (``reference.feature_names``, prefixed by input name).

    ``update(batch, predictions, expected_correct)``: ``batch`` is (n, *input_shape) or one sample, or a
    dict of those by input name; ``predictions`` the model's ``reference.prediction_values`` (classes);
    ``expected_correct`` each sample's calibrated confidence (``calibration.expected_correct``). Each
    sample's summary features are binned with ``np.searchsorted(edges, v, side="left")`` semantics
    (exactly ``reference.bin_counts``), vectorised over features and samples; the predictions are
    counted; the per-sample mean of the summary features, standardised by its predicted class's
    reference and divided by ``sqrt(vif)``, feeds a ``PageHinkley`` and a ``DriftingScore``. Cost per
    sample is constant: O(features x bins) vectorised, plus a few O(1) scalar updates.
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
        overall = np.zeros((k, self._n_bins))
        for j, f in enumerate(table):
            expected = np.asarray(f["fractions"], dtype=np.float64)
            if expected.size != self._n_edges[j] + 1:
                raise ValueError(f"reference feature {f['name']!r}: {self._n_edges[j]} edges need "
                                 f"{self._n_edges[j] + 1} fractions, got {expected.size}")
            if not expected.sum() > 0:
                raise ValueError(f"reference feature {f['name']!r}: expected fractions sum to {expected.sum()}")
            overall[j, :expected.size] = expected / expected.sum()
        self._overall = overall
        self._valid_bins = np.arange(self._n_bins)[None, :] <= self._n_edges[:, None]
        self._offsets = np.arange(k, dtype=np.int64) * self._n_bins
        self.n_reference = int(reference.get("n", 0)) or 1
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
            raise ValueError("reference has no 'monitored' mean and std; rebuild the bundle with this toolchain")
        self._mean, self._inv_std = float(mean), 1.0 / max(float(std), 1e-12)
        by_class = reference.get("by_class")
        self.by_class = None if by_class is None or self.prediction_edges is not None else _ClassReference(
            by_class, table, overall, (float(mean), float(std)), self.n_reference)
        """The per-class reference, or None (not a classifier, or a bundle built without it)."""
        self.calibration = Calibration(reference["confidence"]) if reference.get("confidence") else None
        """The confidence calibration of the label-free accuracy estimate, or None."""
        self.vif = LongRunVariance()
        ph = {"threshold": MONITOR_PH_THRESHOLD, **dict(ph_params or {})}
        self.page_hinkley = PageHinkley(0.0, 1.0, **ph)
        self.drifting_score = DriftingScore(0.0, 1.0, **dict(score_params or {}))
        self._over_before: set[str] = set()  # features over their PSI threshold in the previous window
        self._reset_window()

    def _reset_window(self) -> None:
        self._counts = np.zeros(self.n_features * self._n_bins, dtype=np.int64)
        self._prediction_counts = np.zeros(self.n_prediction_bins, dtype=np.int64)
        self._n = 0
        self._ph_alarm = False
        self._ph_peak = 0.0
        self._score_alarm = False
        self._correct_sum = 0.0
        self._correct_n = 0

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

    def _standardised(self, monitored: np.ndarray, classes: np.ndarray | None) -> list[float]:
        """The monitored statistic in reference standard deviations: of the sample's predicted class when
        the reference has them, else of the overall reference."""
        if self.by_class is not None and classes is not None:
            return ((monitored - self.by_class.mean[classes]) * self.by_class.inv_std[classes]).tolist()
        return ((monitored - self._mean) * self._inv_std).tolist()

    def update(self, batch: Features, predictions: np.ndarray | Sequence[float] | None = None,
               expected_correct: np.ndarray | None = None) -> None:
        """Account one request's (or a run of requests') samples, in arrival order."""
        features = self._features(batch)
        n = features.shape[0]
        if n == 0:
            return
        bins = None if predictions is None else self.prediction_bins(predictions)
        monitored = features.sum(axis=1) / self.n_features  # the per-sample feature mean
        has_nan = not bool(np.isfinite(monitored).all()) and bool(np.isnan(features).any())
        flat = (self._bins(features, has_nan) + self._offsets[None, :]).ravel()
        self._counts += np.bincount(flat, minlength=self._counts.size)
        if bins is not None:
            self._prediction_counts += np.bincount(bins, minlength=self.n_prediction_bins)
        if expected_correct is not None:
            self._correct_sum += float(np.sum(expected_correct))
            self._correct_n += int(np.size(expected_correct))
        self._n += n
        ph, score, vif = self.page_hinkley, self.drifting_score, self.vif
        for z in self._standardised(monitored, bins if self.prediction_edges is None else None):
            scaled = z * vif.scale
            if ph.update(scaled):
                self._ph_alarm = True
                self._ph_peak = max(self._ph_peak, ph.threshold)  # the sums restart at 0 on a detection
            else:
                self._ph_peak = max(self._ph_peak, ph.sum_up, ph.sum_down)
            if score.update(scaled):
                self._score_alarm = True
            vif.update(z)

    def counts(self) -> dict[str, np.ndarray]:
        """The current window's bin counts per feature (for inspection and tests)."""
        table = self._counts.reshape(self.n_features, self._n_bins)
        return {name: table[j, :n_edges + 1].copy()
                for j, (name, n_edges) in enumerate(zip(self.feature_names, self._n_edges))}

    def _expected(self) -> tuple[np.ndarray, float]:
        """The window's expected fractions per feature (padded bins 1, floored like ``psi``) and the
        reference samples behind them: the class mixture of the window when the reference has classes."""
        counts = self._prediction_counts
        if self.by_class is not None and counts.sum() > 0:
            expected, n_reference = self.by_class.expected(counts / counts.sum())
        else:
            expected, n_reference = self._overall, float(self.n_reference)
        return np.where(self._valid_bins, np.maximum(expected, PSI_EPSILON), 1.0), n_reference

    def _feature_psi(self, table: np.ndarray, expected: np.ndarray) -> list[float]:
        """`psi` of every feature's window histogram (rows of `table`) in one vectorised pass.

        Why: a report needs one PSI per feature (64 for an 8x8 input); called one by one they cost ~0.4 ms
        per window, which a fleet simulator running a thousand agents in one process pays a thousand times
        a second. Same formula and floors as `psi` with ``half_sample``; the padding (a = e = 1) adds exactly 0."""
        totals = table.sum(axis=1, keepdims=True)
        actual = np.where(self._valid_bins, np.maximum(table / np.maximum(totals, 1), half_sample(self._n)), 1.0)
        values = ((actual - expected) * np.log(actual / expected)).sum(axis=1)
        return np.where(totals[:, 0] > 0, values, 0.0).tolist()

    def window_report(self) -> dict[str, Any]:
        """This window's drift numbers; resets the window's counts (not the detectors' state).

        ``{"psi": {feature: value}, "psi_max", "psi_threshold", "psi_over" (features at or over it),
        "psi_sustained" (over in this window and the previous one), "prediction_psi", "prediction_psi_threshold",
        "ph_alarm" (a Page-Hinkley detection during the window), "ph_peak" (its highest sum), "ph_threshold",
        "vif", "drifting_score", "drifting_alarm", "n", "conditional" (judged per predicted class),
        "crossings", "alarm" (covariate), "prediction_drift", "estimated_accuracy" (or None)}``.
        """
        expected, n_reference = self._expected()
        values = dict(zip(self.feature_names, self._feature_psi(self._counts.reshape(self.n_features, self._n_bins), expected)))
        prediction_psi = (psi(self._expected_predictions, self._prediction_counts, half_sample(self._n))
                          if self.n_prediction_bins else 0.0)
        threshold = psi_threshold(self._n, n_reference, self._n_bins, self.n_features)
        over = {feature for feature, value in values.items() if value >= threshold}
        sustained, self._over_before = over & self._over_before, over
        report: dict[str, Any] = {
            "psi": values, "psi_max": max(values.values(), default=0.0),
            "psi_threshold": round(threshold, 4) if self._n else None,
            "psi_over": sorted(over), "psi_sustained": sorted(sustained),
            "prediction_psi": prediction_psi,
            "prediction_psi_threshold": (round(psi_threshold(self._n, self.n_reference, self.n_prediction_bins), 4)
                                         if self._n and self.n_prediction_bins else None),
            "ph_alarm": self._ph_alarm, "ph_peak": round(self._ph_peak, 4), "ph_threshold": self.page_hinkley.threshold,
            "vif": round(min(max(self.vif.vif, 1.0), self.vif.maximum), 3),
            "drifting_score": float(self.drifting_score.score), "drifting_alarm": self._score_alarm, "n": self._n,
            "conditional": self.by_class is not None,
            "estimated_accuracy": round(self._correct_sum / self._correct_n, 6) if self._correct_n else None}
        found = crossings({**report, "prediction_psi_threshold": report["prediction_psi_threshold"] or math.inf})
        report["crossings"] = found
        report["alarm"] = any(c["kind"] == COVARIATE for c in found)
        report["prediction_drift"] = any(c["kind"] == PREDICTION for c in found)
        self._reset_window()
        return report

    def expected_correct(self, first_output: np.ndarray) -> np.ndarray | None:
        """Each sample's calibrated confidence (None without a calibration in the bundle)."""
        return None if self.calibration is None else self.calibration.expected_correct(first_output)

    alarm = staticmethod(alarm)
