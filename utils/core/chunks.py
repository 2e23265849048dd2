"""Row chunks for the passes over (super-pixels, genes) maps."""

# 16 MB per float32 (rows, genes) temporary: below glibc's largest mmap threshold (32 MiB), so a pass's
# temporaries reuse heap pages instead of fresh zeroed ones per chunk. Scaling her2st C2's 117k x 1,000
# map by 65,536-row chunks (262 MB each) took 0.7-6.4 s, nearly all system time; by 4,096 rows 0.25 s
CHUNK_BYTES = 16 << 20


def row_chunks(n_rows: int, n_cols: int, rows: int | None = None, *, itemsize: int = 4) -> list[slice]:
    """Slices of `rows` rows covering n_rows (default: as many rows of n_cols values of `itemsize`
    bytes as CHUNK_BYTES hold)."""
    rows = rows or max(1, CHUNK_BYTES // (itemsize * max(1, n_cols)))
    return [slice(s, min(n_rows, s + rows)) for s in range(0, n_rows, rows)]
