"""Fleet operations on the host: the monitor that listens to every device's MQTT reports (`monitor`),
the database it keeps them in (`store`: device states, telemetry windows, events), the dashboard
(`dashboard`, `snapshot`), re-fitting a profile's predictor from fleet telemetry (`calibrate`), and
the fleet simulator (`sim/`).

`store.FleetStore` owns the database; `monitor.FleetMonitor` owns the MQTT session that fills it. May
import `toolchain.deploy` (the simulator flashes devices) and the libraries; never `toolchain.build`.
"""
