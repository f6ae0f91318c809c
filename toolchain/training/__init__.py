"""Training libraries: the one torch training loop and the build's training settings (`fit`), the
keep-or-reject rule of a fine-tuned compressed candidate (`trial`, for distillation and pruning), and the
Keras path (`keras`, TensorFlow as an optional extra).
"""
