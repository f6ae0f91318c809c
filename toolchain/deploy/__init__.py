"""Getting bundles onto devices: a managed mosquitto (`broker`), its TLS material (`tls`), provisioning
a device folder (`flash`), the operator's MQTT session setup (`mqtt`, shared with the fleet monitor) and
pushing bundles to devices (`push/`: transfer and staged rollout).

Speaks the device's protocol through `runtime_agent` (bundle format, `runtime_agent.protocol`'s topic
schema); imports nothing of the build or the fleet.
"""
