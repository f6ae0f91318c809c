"""Training libraries: the one torch training loop and the build's training settings (`fit`), and the
Keras path (`keras`, TensorFlow as an optional extra).
"""
