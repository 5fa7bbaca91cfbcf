"""A virtual sound card for the device and browser tests, on machines with no sound hardware.

A PulseAudio daemon of our own (user mode; it also runs as root) holds 24 kHz mono null sinks:

- `virtual_speaker` (default sink): what programs play; its `virtual_speaker.monitor` source
  records exactly that;
- `virtual_mic_feed`: play a WAV here (`paplay --device=virtual_mic_feed`) and it comes out of
  `virtual_mic` (default source), the microphone.

PortAudio (hence sounddevice) reaches it through ALSA's `pulse` plugin: with `PULSE_SERVER`
set to `server_address()`, ALSA's `default` and `pulse` devices are this card. PortAudio lists
devices when it initialises, so start the card before (or re-initialise PortAudio after).

    python tests/virtual_audio.py install   # apt-get what is missing (root)
    python tests/virtual_audio.py start     # idempotent; prints `export PULSE_SERVER=...`
    python tests/virtual_audio.py stop      # stops the daemon `start` launched
    python tests/virtual_audio.py status
"""

from __future__ import annotations

import ctypes.util
import glob
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

RATE = 24000
# Null sinks render 2 s at a time unless a client asks for low latency, so a new stream could
# wait that long for its first callback; a loopback from each monitor keeps them rendering in
# small blocks (first callback after ~80 ms).
KEEPALIVE_MS = 60
START_TIMEOUT_S = 5.0

_daemon: subprocess.Popen | None = None  # the one this process started (kept: reaped on stop)


class VirtualAudioError(RuntimeError):
    """The card cannot be installed or started (the message says why, on one line)."""


@dataclass(frozen=True)
class Requirement:
    what: str
    package: str  # the Debian / Ubuntu package that provides it

    def present(self) -> bool:
        kind, _, name = self.what.partition(" ")
        if kind == "program":
            return shutil.which(name) is not None
        if kind == "library":
            return ctypes.util.find_library(name) is not None
        # the ALSA plugin that routes ALSA's (and so PortAudio's) devices to PulseAudio
        return any(glob.glob(pattern) for pattern in (
            "/usr/lib/*/alsa-lib/libasound_module_pcm_pulse.so",
            "/usr/lib*/alsa-lib/libasound_module_pcm_pulse.so",
        ))


REQUIREMENTS = (
    Requirement("program pulseaudio", "pulseaudio"),
    Requirement("program pactl", "pulseaudio-utils"),
    Requirement("program paplay", "pulseaudio-utils"),
    Requirement("program parec", "pulseaudio-utils"),
    Requirement("library portaudio", "libportaudio2"),
    Requirement("plugin ALSA-pulse", "libasound2-plugins"),
)


def missing() -> list[Requirement]:
    return [r for r in REQUIREMENTS if not r.present()]


def missing_packages() -> list[str]:
    return sorted({r.package for r in missing()})


def install() -> list[str]:
    """apt-get install the packages of whatever is missing (needs root and apt-get); returns
    the packages installed."""
    packages = missing_packages()
    if not packages:
        return []
    if os.geteuid() != 0:
        raise VirtualAudioError(f"installing {' '.join(packages)} needs root")
    if shutil.which("apt-get") is None:
        raise VirtualAudioError(f"no apt-get to install {' '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=300"]
    for command in (
        ["apt-get", "update", "-qq", *lock],
        ["apt-get", "install", "-y", "-qq", *lock, "--no-install-recommends", *packages],
    ):
        run = subprocess.run(command, env=env, capture_output=True, text=True)
        if run.returncode != 0:
            last = (run.stderr.strip() or run.stdout.strip() or "?").splitlines()[-1]
            raise VirtualAudioError(f"`{' '.join(command[:2])}` failed: {last}")
    still = missing_packages()
    if still:
        raise VirtualAudioError(f"still missing after apt-get install: {' '.join(still)}")
    return packages


def state_dir() -> Path:
    """Where the daemon's socket, config, pid and log live (one card per user)."""
    default = Path("/tmp") / f"moshi-mlx-virtual-audio-{os.getuid()}"
    return Path(os.environ.get("MOSHI_VIRTUAL_AUDIO_DIR", default))


def server_address() -> str:
    """The card's address, for PULSE_SERVER (libpulse clients: the ALSA plugin, paplay...)."""
    return f"unix:{state_dir() / 'native'}"


def is_running() -> bool:
    if shutil.which("pactl") is None:
        return False
    # An explicit server: libpulse then never autospawns a daemon of its own.
    try:
        probe = subprocess.run(["pactl", f"--server={server_address()}", "info"],
                               capture_output=True, timeout=5)
    except subprocess.TimeoutExpired:
        return False
    return probe.returncode == 0


def _script() -> str:
    """The daemon's whole configuration (it is started with -n: no system default.pa)."""
    sink = f"rate={RATE} channels=1 norewinds=1"
    keep = f"sink=virtual_keepalive latency_msec={KEEPALIVE_MS} source_dont_move=true " \
           "sink_dont_move=true"
    return "\n".join([
        f"load-module module-native-protocol-unix auth-anonymous=1 socket={state_dir() / 'native'}",
        f"load-module module-null-sink sink_name=virtual_speaker {sink} "
        "sink_properties=device.description=Virtual_Speaker",
        f"load-module module-null-sink sink_name=virtual_mic_feed {sink} "
        "sink_properties=device.description=Virtual_Mic_Feed",
        f"load-module module-remap-source source_name=virtual_mic master=virtual_mic_feed.monitor "
        f"rate={RATE} channels=1 source_properties=device.description=Virtual_Microphone",
        f"load-module module-null-sink sink_name=virtual_keepalive rate={RATE} channels=1",
        f"load-module module-loopback source=virtual_speaker.monitor {keep}",
        f"load-module module-loopback source=virtual_mic_feed.monitor {keep}",
        "set-default-sink virtual_speaker",
        "set-default-source virtual_mic",
        "",
    ])


def _our_pid() -> int | None:
    """The pid `start` wrote, if that process is still a live pulseaudio."""
    try:
        pid = int((state_dir() / "pulseaudio.pid").read_text())
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError):
        return None
    return pid if comm == "pulseaudio" else None


def _log_tail(lines: int = 3) -> str:
    try:
        text = (state_dir() / "pulseaudio.log").read_text(errors="replace").strip()
    except OSError:
        return "no log"
    return " | ".join(text.splitlines()[-lines:]) or "empty log"


def start() -> bool:
    """Start the card unless it runs already; True when this call started it."""
    if is_running():
        return False
    absent = missing()
    if absent:
        names = ", ".join(r.what for r in absent)
        raise VirtualAudioError(f"{names} missing (packages: {' '.join(missing_packages())})")
    directory = state_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    stale = directory / "native"
    if stale.exists():  # a socket left by a daemon that died
        stale.unlink()
    script = directory / "virtual-audio.pa"
    script.write_text(_script())
    log = directory / "pulseaudio.log"
    command = [
        "pulseaudio", "--daemonize=no", "--exit-idle-time=-1", "--realtime=no",
        "--high-priority=no", "--disable-shm=yes", "--use-pid-file=no",
        "--log-target=stderr", "-n", "-F", str(script),
    ]
    global _daemon
    with open(log, "wb") as log_file:
        daemon = _daemon = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
            start_new_session=True,
        )
    (directory / "pulseaudio.pid").write_text(str(daemon.pid))
    deadline = time.monotonic() + START_TIMEOUT_S
    while not is_running():
        if daemon.poll() is not None:
            raise VirtualAudioError(f"pulseaudio exited ({daemon.returncode}): {_log_tail()}")
        if time.monotonic() > deadline:
            stop()
            raise VirtualAudioError(f"pulseaudio not up after {START_TIMEOUT_S:.0f} s: "
                                    f"{_log_tail()}")
        time.sleep(0.05)
    return True


def stop() -> bool:
    """Stop the daemon `start` launched (no other); True when one was stopped."""
    pid = _our_pid()
    (state_dir() / "pulseaudio.pid").unlink(missing_ok=True)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 3.0
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
    return True


def _alive(pid: int) -> bool:
    if _daemon is not None and _daemon.pid == pid:
        return _daemon.poll() is None  # our child: poll() also reaps it
    return Path(f"/proc/{pid}").exists()


def main(argv: list[str]) -> int:
    command = argv[0] if len(argv) == 1 else ""
    try:
        if command == "install":
            installed = install()
            print("installed: " + " ".join(installed) if installed else "all present")
        elif command == "start":
            print("started" if start() else "already running", file=sys.stderr)
            print(f"export PULSE_SERVER={server_address()}")
        elif command == "stop":
            print("stopped" if stop() else "not running (not started here)", file=sys.stderr)
        elif command == "status":
            running = is_running()
            print(f"{'running' if running else 'not running'} at {server_address()}; "
                  f"missing packages: {' '.join(missing_packages()) or 'none'}")
            return 0 if running else 1
        else:
            print("usage: python tests/virtual_audio.py install|start|stop|status",
                  file=sys.stderr)
            return 2
    except VirtualAudioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
