"""Errors the agent reports instead of crashing: each message says what is wrong and how to fix it."""


class AgentError(Exception):
    """A problem with input, configuration or a bundle; the agent keeps serving what it had."""


class BundleError(AgentError):
    """A bundle failed verification (format, signature, hashes) and must not be installed."""


class InputError(AgentError):
    """An inference request does not match the model's declared input."""
