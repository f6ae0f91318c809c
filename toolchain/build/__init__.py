"""Orchestration: which passes a build runs for a profile and in what order (`workflow`), and the
autopilot that rebuilds and redeploys when a fleet drifts (`autopilot`, beside the build it drives).

May import every package below it (fleet, deploy, passes and the libraries); nothing imports it but
`toolchain.commands`.
"""
