"""scikit-learn's bundled diabetes data (442 patients, 10 features; nothing is downloaded).

The target is a continuous measure of disease progression one year after baseline (25 to 346), so
the data loader sees float targets and `[model] task = "regression"` makes that explicit.
"""

from sklearn.datasets import load_diabetes


def load():
    x, y = load_diabetes(return_X_y=True)
    return x.astype("float32"), y.astype("float32")
