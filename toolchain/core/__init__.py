"""The build's vocabulary, shared by every pass: the user's project (`config`, `data`, `models`, the
model `zoo`), what flows through a build (`artifact`), the pass contract (`contract`: `Pass`,
`BuildContext`, budgets), checkpoints, provenance and seeding.

Imports only `toolchain.targets` and `toolchain.errors`; never a pass, never the workflow.
"""
