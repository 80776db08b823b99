"""The --device, --arch and --cpu values `compile` accepts (no TVM imports: the CLI starts fast)."""

from __future__ import annotations

from pathlib import Path

DEVICES = ("cpu", "cuda")
CUDA_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
DEFAULT_CUDA_ARCH = "sm_90"

_V3 = ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe")
# x86-64 psABI levels a CPU library is built for -> the /proc/cpuinfo flags it needs
CPU_LEVELS = {"x86-64": (), "x86-64-v3": _V3,
              "x86-64-v4": (*_V3, "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")}
CPU_CHOICES = ("native", *CPU_LEVELS)
DEFAULT_CPU = "native"  # the best level this machine runs; libraries check it at load


def host_cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The feature flags of this machine's CPU (empty where /proc/cpuinfo has none)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def native_cpu_level(flags: set[str] | None = None) -> str:
    """The highest level of CPU_LEVELS whose flags this machine has."""
    flags = host_cpu_flags() if flags is None else flags
    return [level for level, need in CPU_LEVELS.items() if set(need) <= flags][-1]


def resolve_cpu(cpu: str | None) -> str:
    """A --cpu value (None = the default) as one of CPU_LEVELS."""
    cpu = cpu or DEFAULT_CPU
    return native_cpu_level() if cpu == "native" else cpu
