"""The fleet simulator: many real agents (the device code, not a model of it) in a few worker
processes, on one shared network loop, against a real broker; scripted drift and fresh data for the
closed loop.
"""
