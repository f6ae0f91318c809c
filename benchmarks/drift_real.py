"""Drift alarms on real traffic orders, and the label-free accuracy estimate (issue 19).

Two real builds (quick budget, `host` profile): the embedded default (scikit-learn's 8x8 digits, 64 raw
features) and an image task (the benchmarks' synthetic gratings, 3x16x16, monitored by per-channel mean
and spread). Each bundle's own reference, model and calibration are used through the agent's code
(`runtime_agent.drift.DriftMonitor`, `runtime_agent.model.LoadedModel`). What is replayed: the digits'
**test split** (360 samples, 36 per class), and the digits whole in the data set's own order (the
writers' order, as issue 19 measured it); for the gratings, a held-out set of GRATINGS_TEST fresh images
from the same generator (its test split can be as large as we like).

Why the class-mix case also runs on larger pools: a window of the digits' test split restricted to three
classes resamples the same 108 images over and over, and their own sampling deviation from the training
split is a real (small) difference of what is served, which PSI sees (13% of windows); the rows say
which pool each number comes from, and the class-mix target is judged on the digits' whole set and the
fresh gratings.

Per data set, against today's detector (the previous rule, side by side on the same streams: Page-Hinkley
at threshold 8.3 on the raw statistic, PSI >= 0.25 on windows of >= 200 samples, no class conditioning):

* **False alarms per 10,000 samples** on stable replays of >= 100,000 samples in four orders: shuffled,
  the data's own order, sorted by class (each pass), bursts of 20 samples of one class. An alarm is a
  window (WINDOW samples, like a telemetry window) in covariate drift alarm. Target <= 0.5 in every order.
* **Detection delay** of a 1-sigma covariate shift: every input value moves by the amount that moves the
  monitored statistic by one reference standard deviation, after 2,000 stable shuffled samples; samples
  from the shift to the alarm (Page-Hinkley at its sample, PSI at its window's end), median of REPEATS
  positions. Target <= 50.
* **Class-mix change alone**: the traffic shows only three classes (their own unchanged samples): the
  share of windows reported as prediction drift, and as covariate drift (target 0).
* **Label-free accuracy estimate** vs the true accuracy per window, mean absolute error on the stable
  stream and in the 1-sigma shifted phase. Target <= 3 pp.

    python benchmarks/drift_real.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import print_table, target, write_results
from _gratings import data_py

from runtime_agent.bundle import read_bundle
from runtime_agent.drift import MIN_PSI_SAMPLES, PSI_SIGNIFICANT, DriftMonitor, PageHinkley
from runtime_agent.model import LoadedModel
from runtime_agent.reference import summary_features
from runtime_agent.signing import load_public_key, write_keypair
from toolchain.build.workflow import build
from toolchain.core.config import load_config
from toolchain.core.data import Dataset, load_dataset
from toolchain.targets.profiles import resolve_target

REPO = Path(__file__).resolve().parent.parent
WINDOW = 200
STREAM = 100_000
GRATINGS_TEST = 20_000
BURST = 20
WARM = 2_000
AFTER = 1_000
ORDERS = ("shuffled", "own order", "sorted by class", "bursts of 20")


def log(message: str) -> None:
    print(f"[drift-real {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Served:
    """A data set served by its bundle: inputs, labels, and per sample the model's class and calibrated
    confidence, computed once (a stream is a sequence of indices into them)."""

    def __init__(self, name: str, bundle_path: Path, pubkey: Path, x: np.ndarray, y: np.ndarray) -> None:
        self.name = name
        self.bundle = read_bundle(bundle_path, load_public_key(pubkey))
        self.model = LoadedModel.from_bundle(self.bundle)
        self.reference = self.bundle.manifest["reference"]
        self.x, self.y = x.astype(np.float32), y
        self.classes, self.expected = self.predict(self.x)
        monitored = self.reference["monitored"]
        slope = summary_features(self.x[:64] + 1.0).mean(axis=1) - summary_features(self.x[:64]).mean(axis=1)
        self.one_sigma = float(monitored["std"] / np.median(slope))
        """The input offset that moves the monitored statistic by one reference standard deviation."""

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        prediction = self.model.predict_batch(x)
        return prediction.classes, self.monitor().expected_correct(prediction.logits)

    def monitor(self) -> DriftMonitor:
        return DriftMonitor(self.reference, self.model.input_shapes)


class Legacy:
    """Today's detector (before issue 19), on the same window reports: Page-Hinkley at its defaults on the
    raw monitored statistic against the overall reference, and PSI >= 0.25 against the overall reference
    on windows of >= MIN_PSI_SAMPLES."""

    def __init__(self, served: Served) -> None:
        reference = {key: value for key, value in served.reference.items() if key != "by_class"}
        self.psi = DriftMonitor(reference, served.model.input_shapes)
        monitored = served.reference["monitored"]
        self.page_hinkley = PageHinkley(monitored["mean"], monitored["std"])

    def window(self, x: np.ndarray, classes: np.ndarray) -> bool:
        detected = self.page_hinkley.update_many(summary_features(x).mean(axis=1)) > 0
        self.psi.update(x, classes)
        report = self.psi.window_report()
        return detected or (report["n"] >= MIN_PSI_SAMPLES
                            and max(report["psi_max"], report["prediction_psi"]) >= PSI_SIGNIFICANT)


def orders(y: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Index streams of STREAM samples over a split of len(y) samples, in the four orders."""
    n = len(y)
    passes = STREAM // n + 1
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    bursts: list[np.ndarray] = []
    while sum(map(len, bursts)) < STREAM:
        bursts.append(rng.choice(by_class[rng.integers(len(by_class))], BURST))

    def sorted_pass() -> np.ndarray:
        shuffled = rng.permutation(n)
        return shuffled[np.argsort(y[shuffled], kind="stable")]
    return {"shuffled": np.concatenate([rng.permutation(n) for _ in range(passes)])[:STREAM],
            "own order": np.tile(np.arange(n), passes)[:STREAM],
            "sorted by class": np.concatenate([sorted_pass() for _ in range(passes)])[:STREAM],
            "bursts of 20": np.concatenate(bursts)[:STREAM]}


def replay(served: Served, stream: np.ndarray, x: np.ndarray | None = None, classes: np.ndarray | None = None,
           expected: np.ndarray | None = None) -> dict[str, list]:
    """Window by window through a fresh monitor and today's detector: alarms, kinds, accuracy estimates."""
    x = served.x if x is None else x
    classes = served.classes if classes is None else classes
    expected = served.expected if expected is None else expected
    monitor, legacy = served.monitor(), Legacy(served)
    out: dict[str, list] = {"alarm": [], "prediction": [], "legacy": [], "estimated": [], "true": []}
    for start in range(0, len(stream) - WINDOW + 1, WINDOW):
        window = stream[start:start + WINDOW]
        monitor.update(x[window], classes[window], expected[window])
        report = monitor.window_report()
        out["alarm"].append(report["alarm"])
        out["prediction"].append(report["prediction_drift"])
        out["legacy"].append(legacy.window(x[window], classes[window]))
        out["estimated"].append(report["estimated_accuracy"])
        out["true"].append(float(np.mean(classes[window] == served.y[window])))
    return out


def per_10k(alarms: list[bool]) -> float:
    return sum(alarms) / (len(alarms) * WINDOW) * 10_000


def delays(served: Served, repeats: int, rng: np.random.Generator) -> dict[str, float]:
    """Median samples from a 1-sigma shift to the covariate alarm: the new monitor and today's detector."""
    shifted_x = served.x + np.float32(served.one_sigma)
    shifted_classes, _ = served.predict(shifted_x)
    found: dict[str, list[int]] = {"new": [], "legacy": []}
    for _ in range(repeats):
        stream = rng.integers(0, len(served.y), WARM + AFTER)
        x = np.where(np.arange(len(stream))[:, None, None, None] >= WARM, shifted_x[stream], served.x[stream]) \
            if served.x.ndim == 4 else np.where(np.arange(len(stream))[:, None] >= WARM, shifted_x[stream], served.x[stream])
        classes = np.where(np.arange(len(stream)) >= WARM, shifted_classes[stream], served.classes[stream])
        for name, alarm_at in (("new", _first_alarm_new), ("legacy", _first_alarm_legacy)):
            found[name].append(alarm_at(served, x, classes))
    return {name: float(np.median(values)) for name, values in found.items()}


def _first_alarm_new(served: Served, x: np.ndarray, classes: np.ndarray) -> int:
    monitor = served.monitor()
    for i in range(len(x)):
        monitor.update(x[i:i + 1], classes[i:i + 1])
        if i >= WARM and monitor.page_hinkley.drift_detected:
            return i - WARM
        if (i + 1) % WINDOW == 0 and monitor.window_report()["alarm"] and i >= WARM:
            return i - WARM
    return AFTER


def _first_alarm_legacy(served: Served, x: np.ndarray, classes: np.ndarray) -> int:
    legacy = Legacy(served)
    for start in range(0, len(x), WINDOW):
        values = summary_features(x[start:start + WINDOW]).mean(axis=1)
        for j, value in enumerate(values):
            if legacy.page_hinkley.update(value) and start + j >= WARM:
                return start + j - WARM
        legacy.psi.update(x[start:start + WINDOW], classes[start:start + WINDOW])
        report = legacy.psi.window_report()
        if start + WINDOW > WARM and max(report["psi_max"], report["prediction_psi"]) >= PSI_SIGNIFICANT:
            return start + WINDOW - WARM
    return AFTER


def class_mix(served: Served, pool: str, rng: np.random.Generator) -> dict:
    """Only the first three classes, their own unchanged samples: prediction drift, not covariate drift."""
    three = np.isin(served.y, np.unique(served.y)[:3])
    result = replay(served, rng.choice(np.flatnonzero(three), 20_000))
    return {"data": served.name, "case": f"class mix: 3 classes only ({pool})", "samples": 20_000,
            "covariate_alarm_windows": float(np.mean(result["alarm"])),
            "prediction_drift_windows": float(np.mean(result["prediction"])),
            "legacy_alarm_windows": float(np.mean(result["legacy"]))}


def evaluate(served: Served, streams: dict[str, np.ndarray], repeats: int, rng: np.random.Generator) -> list[dict]:
    rows = []
    stable_errors: list[float] = []
    for order, stream in streams.items():
        result = replay(served, stream)
        stable_errors += [abs(e - t) for e, t in zip(result["estimated"], result["true"]) if e is not None]
        rows.append({"data": served.name, "case": f"stable, {order}", "samples": len(stream),
                     "false_alarms_per_10k": per_10k(result["alarm"]), "legacy_per_10k": per_10k(result["legacy"]),
                     "prediction_drift_windows": float(np.mean(result["prediction"]))})
    delay = delays(served, repeats, rng)
    rows.append({"data": served.name, "case": "1-sigma covariate shift", "samples": repeats,
                 "median_delay": delay["new"], "legacy_median_delay": delay["legacy"]})
    rows.append(class_mix(served, f"{len(served.y)} samples", rng))
    shifted_x = served.x + np.float32(served.one_sigma)
    shifted_classes, shifted_expected = served.predict(shifted_x)
    drifted = replay(served, streams["shuffled"][:20_000], shifted_x, shifted_classes, shifted_expected)
    drifted_errors = [abs(e - t) for e, t in zip(drifted["estimated"], drifted["true"]) if e is not None]
    rows.append({"data": served.name, "case": "accuracy estimate", "samples": len(stable_errors) * WINDOW,
                 "stable_mae_pp": 100 * float(np.mean(stable_errors)), "drifted_mae_pp": 100 * float(np.mean(drifted_errors)),
                 "true_accuracy_stable": float(np.mean(served.classes == served.y)),
                 "true_accuracy_drifted": float(np.mean(shifted_classes == served.y))})
    return rows


def build_project(config_path: Path, out: Path, key: Path, seed: int = 0) -> tuple[Path, Dataset]:
    """The bundle of a quick `host` build, and the build's data splits (same seed, same split)."""
    config = load_config(config_path)
    artifact, _ = build(config, resolve_target("host"), out, seed=seed, budget="quick", key_path=key)
    return artifact.outputs["bundle"], load_dataset(config, seed)


def fresh_gratings() -> tuple[np.ndarray, np.ndarray]:
    """GRATINGS_TEST images the build never saw (another seed of the same generator)."""
    namespace: dict = {}
    exec(data_py(16, GRATINGS_TEST), namespace)
    return namespace["load"](seed=12345)


def gratings_project(work: Path, quick: bool) -> Path:
    folder = work / "gratings"
    folder.mkdir()
    (folder / "data.py").write_text(data_py(16, 1500 if quick else 3000))
    (folder / "model.py").write_text((REPO / "examples" / "digits" / "model.py").read_text())
    (folder / "toolchain.toml").write_text(
        '[project]\nname = "gratings"\nversion = 1\n\n[model]\nentry = "model.py:build_model"\ninput_shape = [3, 16, 16]\n'
        'labels = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]\nkwargs = { width = 16 }\n\n'
        '[data]\nsource = "python:data.py:load"\nvalidation = 0.2\ntest = 0.2\n\n'
        '[train]\nbatch_size = 64\nlr = 0.003\n\n[compress]\nquantize = []\n')
    return folder / "toolchain.toml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shift repeats and a smaller image set")
    args = parser.parse_args()
    started = time.perf_counter()
    repeats = 20 if args.quick else 60
    rng = np.random.default_rng(0)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="drift-real-") as folder:
        work = Path(folder)
        key, pubkey = write_keypair(work / "keys")
        for name, config_path in (("digits", REPO / "examples" / "digits" / "toolchain.toml"),
                                  ("gratings 3x16x16", gratings_project(work, args.quick))):
            log(f"building {name}")
            bundle, dataset = build_project(config_path, work / name.split()[0], key)
            x_test, y_test = dataset.x_test, dataset.y_test
            if name.startswith("gratings"):
                x_test, y_test = fresh_gratings()
            served = Served(name, bundle, pubkey, x_test, y_test)
            log(f"{name}: {len(served.y)} test samples, accuracy {np.mean(served.classes == served.y):.3f}; replaying")
            streams = orders(served.y, rng)
            rows += evaluate(served, streams, repeats, rng)
            if name == "digits":
                from sklearn.datasets import load_digits
                x_all, y_all = load_digits(return_X_y=True)
                whole = Served("digits (whole set)", bundle, pubkey, x_all.reshape(-1, 1, 8, 8), y_all)
                result = replay(whole, np.tile(np.arange(len(y_all)), STREAM // len(y_all) + 1)[:STREAM])
                rows.append({"data": whole.name, "case": "stable, own order", "samples": STREAM,
                             "false_alarms_per_10k": per_10k(result["alarm"]), "legacy_per_10k": per_10k(result["legacy"]),
                             "prediction_drift_windows": float(np.mean(result["prediction"]))})
                rows.append(class_mix(whole, f"{len(y_all)} samples", rng))
    print_table(rows, ["data", "case", "samples", "false_alarms_per_10k", "legacy_per_10k", "median_delay",
                       "legacy_median_delay", "prediction_drift_windows", "covariate_alarm_windows",
                       "legacy_alarm_windows", "stable_mae_pp", "drifted_mae_pp", "true_accuracy_drifted"])
    stable = [row for row in rows if row["case"].startswith("stable")]
    shift = [row for row in rows if row["case"] == "1-sigma covariate shift"]
    mix = [row for row in rows if row["case"].startswith("class mix") and row["data"] != "digits"]  # see the docstring
    estimate = [row for row in rows if row["case"] == "accuracy estimate"]
    targets = {"worst_false_alarms_per_10k": target(max(r["false_alarms_per_10k"] for r in stable), "<=", 0.5),
               "worst_median_delay_samples": target(max(r["median_delay"] for r in shift), "<=", 50),
               "class_mix_covariate_alarm_windows": target(max(r["covariate_alarm_windows"] for r in mix), "<=", 0.0),
               "class_mix_prediction_drift_windows": target(min(r["prediction_drift_windows"] for r in mix), ">=", 0.9),
               "worst_accuracy_estimate_mae_pp": target(max(max(r["stable_mae_pp"], r["drifted_mae_pp"]) for r in estimate),
                                                        "<=", 3.0)}
    write_results("drift_real", rows, targets, quick=args.quick, window=WINDOW,
                  seconds=round(time.perf_counter() - started, 1))


if __name__ == "__main__":
    main()
