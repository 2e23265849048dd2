"""Where torch computes: one resolution of --device for every stage (torch imported only here), and
how many CPUs a process may use."""
import math
import os
from pathlib import Path
from typing import Mapping

from .errors import InputError


def resolve_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; 'cuda' without a GPU is refused."""
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA GPU is visible to PyTorch here; use --device cpu (or auto), "
                         "or install the CUDA build of torch")
    if device not in ("cpu", "cuda"):
        raise InputError(f"--device {device}: choose auto, cpu or cuda")
    return device


def resolve_precision(precision: str, device: str) -> str:
    """The arithmetic of the networks on `device`: 'fp32', or 'bf16' (bfloat16 matrix products under
    torch.autocast, float32 weights, losses and element-wise outputs). 'auto' takes bf16 where the
    hardware has bf16 matrix units: a CUDA GPU that supports it, or a CPU with AMX tiles (Xeon 4th
    generation on, where a 128 x 1000 output layer ran 6-12 x its float32 speed) or AVX512-BF16 dot
    products (AMD Zen 4 on: training 1.25 x, inference 1.6 x, a ViT-L 2.1 x); else fp32."""
    import torch
    if precision not in ("auto", "fp32", "bf16"):
        raise InputError(f"--precision {precision}: choose auto, fp32 or bf16")
    if precision != "auto":
        return precision
    if str(device).startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16_units() else "fp32"


def cpu_has_bf16_units() -> bool:
    """Whether this CPU computes bfloat16 products natively: AMX tiles or AVX512-BF16 (torch's probes)."""
    import torch
    probes = (getattr(torch.cpu, name, lambda: False) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return any(probe() for probe in probes)


def autocast(device: str, precision: str):
    """torch.autocast to bfloat16 on `device` when precision is 'bf16'; a no-op context otherwise."""
    import torch
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


def available_cpus(*, root: Path = Path("/"), environ: Mapping = os.environ) -> int:
    """How many CPUs this process should compute on: OMP_NUM_THREADS when it is a positive integer
    (the user's explicit choice, even above the cgroup quota; at most the CPUs of its affinity mask),
    else the fewer of the CPUs in its affinity mask (taskset, SLURM's --cpus-per-task) and its cgroup
    CPU quota rounded up (docker --cpus, Kubernetes limits), at least 1. Not the machine's core count: torch's default of every core made training 10-20 x
    slower on a node shared with other jobs.

    Parameters
    ----------
    root : Path
        Where /proc and /sys are found (tests point it at fake files).
    environ : Mapping
        The environment read for OMP_NUM_THREADS.
    """
    cpus = _affinity_cpus()
    omp = _omp_threads(environ.get("OMP_NUM_THREADS", ""))
    if omp:
        return min(omp, cpus)   # more threads than the CPUs it may run on only contend for them
    quota = cgroup_cpu_quota(root=root)
    return max(1, min(cpus, math.ceil(quota)) if quota else cpus)


def _omp_threads(text: str) -> int:
    """The (first-level) thread count of an OMP_NUM_THREADS value such as "4" or "4,2"; 0 if malformed."""
    first = text.split(",")[0].strip()
    return int(first) if first.isdigit() and int(first) > 0 else 0


def _affinity_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def cgroup_cpu_quota(*, root: Path = Path("/")) -> float | None:
    """CPUs' worth of time the cgroup CPU quota allows per period (e.g. 1.5), None without a quota.

    The tightest quota of this process's cgroup and its ancestors counts (a limit set on a parent
    slice binds its children), for cgroup v2 (cpu.max: "QUOTA PERIOD" or "max PERIOD") and v1
    (cpu.cfs_quota_us, -1 for none, over cpu.cfs_period_us)."""
    quotas = []
    for version, rel in _cgroup_memberships(Path(root)):
        mounts = [Path(root, "sys/fs/cgroup")] if version == 2 else \
            [Path(root, "sys/fs/cgroup", name) for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu")]
        for mount in mounts:
            for d in _self_and_ancestors(mount, rel):
                q = _quota_v2(d) if version == 2 else _quota_v1(d)
                if q:
                    quotas.append(q)
    return min(quotas) if quotas else None


def _cgroup_memberships(root: Path) -> list[tuple[int, str]]:
    """[(cgroup version, path of this process's cgroup)] from /proc/self/cgroup: "0::/path" is v2,
    "N:cpu,cpuacct:/path" a v1 CPU controller. Unreadable: the mount roots only (a container's
    own cgroup is mounted there)."""
    try:
        lines = Path(root, "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return [(2, "/"), (1, "/")]
    out = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            out.append((2, parts[2]))
        elif "cpu" in parts[1].split(","):
            out.append((1, parts[2]))
    return out


def _self_and_ancestors(mount: Path, rel: str):
    """mount/rel, then each parent up to the mount itself. In a container /proc/self/cgroup may
    name a host path that is not mounted: those folders just do not exist."""
    d = mount / rel.strip("/")
    while True:
        yield d
        if d == mount or mount not in d.parents:
            return
        d = d.parent


def _quota_v2(d: Path) -> float | None:
    try:
        quota, period = (d / "cpu.max").read_text().split()[:2]
        return int(quota) / int(period) if quota != "max" and int(period) > 0 else None
    except (OSError, ValueError):
        return None


def _quota_v1(d: Path) -> float | None:
    try:
        quota = int((d / "cpu.cfs_quota_us").read_text())
        period = int((d / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None
