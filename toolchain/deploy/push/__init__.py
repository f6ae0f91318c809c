"""Model pushes, operator side: offer a signed bundle to devices, stream it in chunks, resume, roll out in waves.

The package owns the sender's half of docs/push-protocol.md (the device's half is
`runtime_agent.push_receiver`; topics and limits are `runtime_agent.protocol`), one module per concept:
  bundle     the bundle to push, verified with the operator's trusted key first (`PushBundle`)
  client     one MQTT connection shared by every transfer of a process (`PushClient`)
  discovery  a fleet's devices from their retained status (`discover_devices`, `find_fleet`, `fleet_of_devices`)
  transfer   one resumable, flow-controlled transfer to one device and its verdict (`PushSender`)
  rollout    canaries then waves, stopping at the first stage that fails (`rollout`, `RolloutSettings`)
"""

from toolchain.deploy.push.bundle import PushBundle, load_push_bundle
from toolchain.deploy.push.client import PushClient
from toolchain.deploy.push.discovery import device_statuses, discover_devices, find_fleet, fleet_of_devices
from toolchain.deploy.push.rollout import RolloutResult, RolloutSettings, plan_stages, rollout
from toolchain.deploy.push.transfer import PushResult, PushSender

__all__ = ["PushBundle", "PushClient", "PushResult", "PushSender", "RolloutResult", "RolloutSettings", "device_statuses",
           "discover_devices", "find_fleet", "fleet_of_devices", "load_push_bundle", "plan_stages", "rollout"]
