"""Chunk buffers reused within a pass (tvtool.io.buffers) and the multi-lane write-behind (tvtool.io.writer)."""

from __future__ import annotations

import gc
import threading

import torch

from tvtool.io import buffers
from tvtool.io.writer import WriteBehind
from tvtool.vectors.source import DeltaSource


def test_a_buffer_is_reused_only_after_every_view_of_it_is_gone():
    shape = (1024, 1024)  # 2 MiB of bf16: pooled
    with buffers.reuse():
        a = buffers.empty(shape, torch.bfloat16)
        a.fill_(1.0)
        ptr = a.data_ptr()
        row = a[3]  # a view keeps the buffer in use
        del a
        gc.collect()
        b = buffers.empty(shape, torch.bfloat16)
        assert b.data_ptr() != ptr and torch.all(row == 1.0)
        del row
        gc.collect()
        c = buffers.empty(shape, torch.bfloat16)  # now free: handed out again, no new pages
        assert c.data_ptr() == ptr
        d = buffers.empty((512, 1024), torch.float32)  # same byte size class, other dtype and shape
        assert d.shape == (512, 1024) and d.dtype == torch.float32 and d.data_ptr() not in (ptr, b.data_ptr())
        small = buffers.empty((4,), torch.float32)
        assert small.shape == (4,)
    del b, c, d
    e = buffers.empty(shape, torch.bfloat16)  # outside reuse(): plain torch.empty, nothing kept
    assert buffers._free is None and e.shape == shape


def test_a_buffer_freed_in_another_thread_comes_back():
    with buffers.reuse():
        a = buffers.empty((1 << 20,), torch.float32)
        ptr = a.data_ptr()
        box = [a]
        del a
        t = threading.Thread(target=box.clear)
        t.start()
        t.join()
        assert buffers.empty((1 << 20,), torch.float32).data_ptr() == ptr


class _Rec:
    def __init__(self, log, lock):
        self.log, self.lock = log, lock

    def write(self, name, chunk):
        with self.lock:
            self.log.append((id(self), name, int(chunk[0])))
        return chunk.numel()


def test_write_behind_keeps_each_writers_order_across_lanes_and_counts_bytes():
    log, lock, got = [], threading.Lock(), []
    writers = [_Rec(log, lock) for _ in range(5)]
    wb = WriteBehind(lanes=3, on_bytes=got.append)
    for k in range(50):
        for w in writers:
            wb.submit(w, f"t{k}", torch.full((7,), k))
    wb.flush()
    wb.close()
    for w in writers:
        assert [v for i, _, v in log if i == id(w)] == list(range(50))
    assert len(got) == 250 and sum(got) == 250 * 7


def test_materialize_with_every_buffer_pooled_writes_the_same_bytes(llama, tmp_path, monkeypatch):
    """Tiny tensors stay under the pooling threshold; with it at 0 every read, Δ and output chunk of a 3-α,
    chunked, TIES + plain run is a recycled buffer, and the bytes equal an unpooled run's (a buffer handed
    out again while a queued write still viewed it would change them)."""
    import tvtool
    import tvtool.merge.stream
    from helpers import assert_bit_equal
    from tiny import state_dict
    from tvtool.io.safetensors_io import row_chunks

    base, reasoner = llama
    configs = [tvtool.MergeConfig(a) for a in (0.3, 0.7, 1.4)] + [tvtool.MergeConfig(0.6, method="ties", density=0.3)]
    monkeypatch.setattr(tvtool.merge.stream, "row_chunks", lambda shape, max_elems=2048: row_chunks(shape, 2048))

    def run(out):
        return tvtool.materialize(source=DeltaSource(base=base, reasoner=reasoner), output=out, configs=configs,
                                  options=tvtool.MaterializeOptions(progress=False)).configs

    plain = run(tmp_path / "plain")
    ptrs = []  # the data pointer of every buffer handed out (not the tensor: holding it would block reuse)
    orig = buffers.empty

    def empty(shape, dtype):
        t = orig(shape, dtype)
        ptrs.append(t.data_ptr())
        return t

    monkeypatch.setattr(buffers, "_MIN", 0)
    monkeypatch.setattr(buffers, "_KEEP", 2)  # few idle buffers: the same ones come back often
    for mod in ("tvtool.io.safetensors_io", "tvtool.merge.kernels", "tvtool.merge.stream"):
        monkeypatch.setattr(f"{mod}.empty", empty)
    pooled = run(tmp_path / "pooled")
    assert len(ptrs) > 100 and len(set(ptrs)) < len(ptrs) / 4  # buffers were recycled, many times
    for c in configs:
        assert_bit_equal(state_dict(pooled[c]), state_dict(plain[c]))
