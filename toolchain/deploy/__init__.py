"""Getting bundles onto devices: a managed mosquitto (`broker`), its TLS material (`tls`), provisioning
a device folder (`flash`) and pushing bundles to devices (`push`: transfer and staged rollout).

Speaks the device's protocol through `runtime_agent` (bundle format, topic schema); imports nothing of
the build.
"""
