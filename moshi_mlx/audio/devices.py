"""Sound devices: listing, and opening 24 kHz mono streams with fallbacks.

A device that cannot run at 24 kHz (or refuses 1920-sample blocks, a known PortAudio pain on
macOS) is opened at its own default rate and block size; the loop then resamples both ways.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moshi_mlx.audio.rates import FRAME_SIZE, SAMPLE_RATE
from moshi_mlx.errors import AudioError


def sounddevice() -> Any:
    """Import sounddevice with a clear error when PortAudio itself is missing."""
    try:
        import sounddevice as sd
    except OSError as exc:  # the Linux wheel needs the system libportaudio2
        raise AudioError(f"PortAudio is not available ({exc}); install libportaudio2") from None
    return sd


def refresh_devices() -> None:
    """Enumerate devices again (PortAudio lists only what existed when it initialised)."""
    sd = sounddevice()
    sd._terminate()
    sd._initialize()


def parse_device(spec: str | int | None) -> str | int | None:
    if spec is None or isinstance(spec, int):
        return spec
    spec = spec.strip()
    return int(spec) if spec.isdigit() else spec


def list_devices() -> str:
    sd = sounddevice()
    devices = sd.query_devices()
    if len(devices) == 0:
        return "no audio devices found"
    return str(devices)


@dataclass
class OpenedStream:
    stream: Any
    sample_rate: int
    channels: int
    blocksize: int
    name: str


def check_devices(input_device: str | int | None, output_device: str | int | None) -> None:
    """Fail early (before loading a model) when a named or default device does not exist."""
    sd = sounddevice()
    _device_info(sd, input_device, "input")
    _device_info(sd, output_device, "output")


def check_input_device(device: str | int | None) -> None:
    """Fail early when the named or default microphone does not exist (capture only)."""
    _device_info(sounddevice(), device, "input")


def check_output_device(device: str | int | None) -> None:
    """Fail early when the named or default speaker does not exist (playback only)."""
    _device_info(sounddevice(), device, "output")


def _device_info(sd: Any, device: str | int | None, kind: str) -> dict:
    try:
        return sd.query_devices(device, kind)
    except (ValueError, sd.PortAudioError) as exc:
        if device is None:
            raise AudioError(f"no {kind} device found (see --list-devices)") from None
        raise AudioError(
            f"{kind} device {device!r} not found ({exc}); see --list-devices"
        ) from None


def open_stream(
    kind: str,
    device: str | int | None,
    callback: Callable[..., None],
    sample_rate: int | None = None,
    blocksize: int = FRAME_SIZE,
) -> OpenedStream:
    """Open (not start) an `sd.InputStream` or `sd.OutputStream` of float32 samples.

    Tries `sample_rate` (24 kHz unless told otherwise) with `blocksize`, then the device's default
    rate with PortAudio's choice of block size, mono then stereo; raises AudioError with one line
    if nothing opens.
    """
    sd = sounddevice()
    info = _device_info(sd, device, kind)
    name = info["name"]
    max_channels = int(info[f"max_{kind}_channels"])
    if max_channels < 1:
        raise AudioError(f"device {name!r} has no {kind} channels")
    native = int(round(info["default_samplerate"]))
    wanted = sample_rate or SAMPLE_RATE
    check = sd.check_input_settings if kind == "input" else sd.check_output_settings

    attempts: list[tuple[int, int, int]] = []
    try:
        check(device=device, samplerate=wanted, channels=1, dtype="float32")
        # one 80 ms frame per callback at the device rate
        attempts.append((wanted, blocksize * wanted // SAMPLE_RATE, 1))
    except (ValueError, sd.PortAudioError):
        pass
    for rate in dict.fromkeys((wanted, native)):
        for channels in dict.fromkeys((1, min(2, max_channels))):
            attempt = (rate, 0, channels)
            if attempt not in attempts:
                attempts.append(attempt)

    cls = sd.InputStream if kind == "input" else sd.OutputStream
    last_error: Exception | None = None
    for rate, block, channels in attempts:
        try:
            stream = cls(device=device, samplerate=rate, blocksize=block, channels=channels,
                         dtype="float32", callback=callback)
            return OpenedStream(stream, rate, channels, block, name)
        except (ValueError, sd.PortAudioError) as exc:
            last_error = exc
    message = str(last_error).splitlines()[0] if last_error else "unknown error"
    lowered = message.lower()
    if "unavailable" in lowered or "busy" in lowered:
        raise AudioError(f"{kind} device {name!r} is busy or unavailable ({message})")
    raise AudioError(
        f"cannot open {kind} device {name!r} at {wanted} Hz or at its own {native} Hz: {message}"
    )
