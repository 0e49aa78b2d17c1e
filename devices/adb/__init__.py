"""Measuring on an Android phone over adb: the transport (the `adb` program), the phone's
facts and thermal state, the native runner (`runner/`, built by `runner_build`), and the
measurement that drives it (`Phone.measure`, the same `Measurement` as a local agent's).

The agent uses it with `lfm2-nas agent serve --adb SERIAL --adb-runner DIR`.
"""

from devices.adb.transport import AdbError, AdbTransport, DeviceUnavailable, Transport

__all__ = ["AdbError", "AdbTransport", "DeviceUnavailable", "Transport"]
