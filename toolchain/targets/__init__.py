"""Device profiles: `profiles` loads the board TOML files shipped with the package (and a user's own
file), `hostprobe` measures this machine for the `host` profile and fingerprints it for calibrations.
"""
