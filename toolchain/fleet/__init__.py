"""Fleet operations on the host: the monitor that listens to every device's MQTT reports and the SQLite
store it keeps them in (device states, telemetry windows, events), queried by `toolchain fleet status`.

`store.FleetStore` owns the database; `monitor.FleetMonitor` owns the MQTT session that fills it.
"""
