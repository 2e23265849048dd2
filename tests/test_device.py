"""available_cpus(): affinity, cgroup CPU quota (v1 and v2, own cgroup and ancestors) and
OMP_NUM_THREADS, read from fake /proc and /sys trees under tmp_path."""
import pytest

from utils.core import device


def fake_root(tmp_path, cgroup: str, files: dict):
    """A root with proc/self/cgroup = `cgroup` and each sys/fs/cgroup/<rel> file of `files`."""
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/cgroup").write_text(cgroup)
    for rel, text in files.items():
        p = tmp_path / "sys/fs/cgroup" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


@pytest.fixture
def eight_cpus(monkeypatch):
    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: set(range(8)))


@pytest.mark.parametrize("cpu_max, expected", [("150000 100000\n", 2), ("50000 100000", 1),
                                               ("400000 100000", 4), ("max 100000", 8),
                                               ("2000000 100000", 8), ("garbage", 8)])
def test_cgroup_v2_quota_rounds_up_and_never_exceeds_affinity(tmp_path, eight_cpus, cpu_max, expected):
    root = fake_root(tmp_path, "0::/\n", {"cpu.max": cpu_max})
    assert device.available_cpus(root=root, environ={}) == expected


def test_cgroup_v2_tightest_of_own_cgroup_and_ancestors(tmp_path, eight_cpus):
    root = fake_root(tmp_path, "0::/batch.slice/job-7.scope\n",
                     {"batch.slice/cpu.max": "300000 100000", "batch.slice/job-7.scope/cpu.max": "max 100000"})
    assert device.cgroup_cpu_quota(root=root) == pytest.approx(3.0)
    assert device.available_cpus(root=root, environ={}) == 3


def test_cgroup_v1_quota(tmp_path, eight_cpus):
    cgroup = "4:memory:/x\n3:cpu,cpuacct:/docker/abc\n0::/\n"
    root = fake_root(tmp_path, cgroup, {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "250000\n",
                                        "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"})
    assert device.available_cpus(root=root, environ={}) == 3


def test_cgroup_v1_no_quota_and_no_cgroup_files(tmp_path, eight_cpus):
    root = fake_root(tmp_path, "1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"})
    assert device.cgroup_cpu_quota(root=root) is None
    assert device.available_cpus(root=root, environ={}) == 8
    assert device.available_cpus(root=tmp_path / "nothing-here", environ={}) == 8


def test_affinity_smaller_than_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: {0, 1})
    root = fake_root(tmp_path, "0::/\n", {"cpu.max": "600000 100000"})
    assert device.available_cpus(root=root, environ={}) == 2


@pytest.mark.parametrize("omp, expected", [("3", 3), ("6", 6), ("16", 8), ("999", 8), (" 4 ", 4), ("4,2", 4),
                                           ("0", 2), ("-2", 2), ("four", 2), ("", 2), ("2.5", 2)])
def test_omp_num_threads_wins_when_a_positive_integer(tmp_path, eight_cpus, omp, expected):
    root = fake_root(tmp_path, "0::/\n", {"cpu.max": "200000 100000"})
    assert device.available_cpus(root=root, environ={"OMP_NUM_THREADS": omp}) == expected


def test_this_machine_gives_at_least_one():
    assert device.available_cpus() >= 1


def test_precision_auto_follows_the_cpus_bf16_units(monkeypatch):
    """--precision auto is bf16 exactly where the CPU has AMX tiles or AVX512-BF16; explicit choices
    are kept and anything else is one user error."""
    import torch

    from utils.core.errors import InputError
    for amx, avx512_bf16, want in ((True, False, "bf16"), (False, True, "bf16"), (True, True, "bf16"),
                                   (False, False, "fp32")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        assert device.resolve_precision("auto", "cpu") == want
    assert device.resolve_precision("fp32", "cpu") == "fp32" and device.resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(InputError, match="--precision fp16"):
        device.resolve_precision("fp16", "cpu")
    with device.autocast("cpu", "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


MALLOC_PROBE = """
import ctypes, sys
sys.path.insert(0, {repo!r})
from utils.core.malloc import keep_freed_memory
libc = ctypes.CDLL(None)
libc.sbrk.restype, libc.malloc.restype = ctypes.c_void_p, ctypes.c_void_p
libc.malloc.argtypes, libc.free.argtypes = (ctypes.c_size_t,), (ctypes.c_void_p,)
if {fixed}:
    assert keep_freed_memory()
top = libc.sbrk(0)
block = libc.malloc(24 << 20)
grown = libc.sbrk(0) - top
libc.free(block)
kept = libc.sbrk(0) - top
print(grown >= 24 << 20, kept >= 24 << 20)
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's mallopt only")
@pytest.mark.parametrize("fixed, expected", [(False, "False False"), (True, "True True")])
def test_keep_freed_memory_serves_big_blocks_from_the_heap_and_keeps_them(fixed, expected):
    """A fresh process maps a 24 MB block with mmap and unmaps it when freed (each step's temporaries
    faulted in again); with the thresholds fixed it comes from the heap, which keeps it once freed."""
    import subprocess
    import sys
    from pathlib import Path
    code = MALLOC_PROBE.format(repo=str(Path(__file__).resolve().parent.parent), fixed=fixed)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[0] == expected


def test_casts_round_to_nearest_even_as_numpy_and_write_into_memmap_rows(tmp_path):
    import numpy as np

    from utils.core.atomic import npy_memmap
    from utils.core.casts import as_float32, cast_into
    rng = np.random.default_rng(0)
    a = (rng.gamma(0.3, 2.0, (300, 50)) * rng.choice([1e-7, 1e-3, 1.0, 1e3, 1e5], (300, 1))).astype(np.float32)
    a[0, :8] = [0.0, 65519.99, 65520.0, 7e4, 2.98e-8, 3e-8, np.inf, -1.5e-5]   # overflow, subnormals, ties
    with np.errstate(over="ignore"):
        ref = a.astype(np.float16)
    mm = npy_memmap(tmp_path / "h.npy", np.float16, a.shape)
    cast_into(mm[100:], a[100:])
    cast_into(mm[:100], a[:100])
    assert np.array_equal(np.asarray(mm).view(np.uint16), ref.view(np.uint16))
    back = as_float32(mm[5:9])
    assert back.dtype == np.float32 and np.array_equal(back, ref[5:9].astype(np.float32))


def test_thread_map_keeps_the_order_and_raises_a_calls_exception():
    from utils.core.workers import thread_map
    assert thread_map(lambda v: v * v, range(7), threads=3) == [v * v for v in range(7)]
    assert thread_map(abs, []) == []

    def fails_at_three(v):
        if v == 3:
            raise ValueError("three")
        return v
    with pytest.raises(ValueError, match="three"):
        thread_map(fails_at_three, range(5), threads=2)
