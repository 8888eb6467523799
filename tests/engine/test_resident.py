"""The resident α swap puts exactly the streaming path's bytes into every parameter, without vLLM.

The layout is built here: a 2-rank tensor-parallel sharding with fused q/k/v and gate/up parameters and
row-/vocab-parallel shards (as vLLM's loaders place them), plus the unsharded layout. The reference is
what the worker streams today (`merged_tensors`, whole tensors) placed into the same parameters; the
resident path captures θ1 and θ2/M once per source and then produces every α from memory. Compared bit
for bit per parameter (a digest of each rank's parameters) for each source kind, include/exclude, α rules
and layer schedules, several vectors, every operator, vocab intersect, and the α = 0 / α = 1 endpoints,
for float32, bfloat16 and float16 engines. The capture through vLLM's own loaders is tested in
test_resident_vllm.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from helpers import bits
from tiny import edited_copy, finetune_like, state_dict
from tvtool.engine.placement import Choice, choose
from tvtool.engine.resident import Region, Resident, finish, tensor_rules
from tvtool.merge.config import MergeConfig
from tvtool.merge.plan import output_plan
from tvtool.merge.stream import merged_tensors
from tvtool.vectors.source import DeltaSource

FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
         "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
ROW_PARALLEL = ("o_proj", "down_proj")
ALPHAS = (0.0, 1.0, 0.5, -0.7, 2.5)


def shard_layout(source: DeltaSource, *, tp: int, rank: int) -> tuple[list[Region], dict[str, tuple]]:
    """Regions of rank `rank` of `tp` and the parameter shapes: q/k/v and gate/up fused along rows (each
    rank holding its slice of each), o/down sharded along columns, embeddings/lm_head along vocab rows,
    norms whole."""
    base, tvs = source.open()
    plan = output_plan(base, tvs[0])
    params: dict[str, list] = {}  # param → [(slot, tensor name, shape)]
    for p in plan:
        module, _, pname = p.name.rpartition(".")
        parent, _, leaf = module.rpartition(".")
        slot = 0
        if leaf in FUSED:
            module, slot = f"{parent}.{FUSED[leaf][0]}", FUSED[leaf][1]
        params.setdefault(f"{module}.{pname}", []).append((slot, p.name, tuple(p.shape), leaf))
    regions, shapes = [], {}
    for key, parts in params.items():
        module, _, pname = key.rpartition(".")
        parts.sort()
        shape0 = parts[0][2]
        if len(shape0) == 2 and parts[0][3] in ROW_PARALLEL:  # columns
            size = shape0[1] // tp
            shapes[key] = (shape0[0], size)
            regions.append(Region(module, pname, parts[0][1], (("narrow", (1, rank * size, size), ()),), 0,
                                  (shape0[0], size), (size, 1)))
            continue
        if len(parts) == 1 and parts[0][3] not in ("embed_tokens", "lm_head") and len(shape0) == 1 \
                and "norm" in parts[0][3]:
            shapes[key] = shape0
            regions.append(Region(module, pname, parts[0][1], (), 0, shape0, (1,)))
            continue
        rows = [s[0] // tp for _, _, s, _ in parts]
        inner = shape0[1:]
        row = 1
        for d in inner:
            row *= d
        shapes[key] = (sum(rows), *inner)
        stride = tuple(int(x) for x in torch.empty(shapes[key]).stride())
        off = 0
        for (_, name, s, _), n in zip(parts, rows):
            regions.append(Region(module, pname, name, (("narrow", (0, rank * n, n), ()),), off * row,
                                  (n, *inner), stride))
            off += n
    return regions, shapes


def place(values, shapes, dtype) -> dict[str, torch.Tensor]:
    """Parameters of `dtype` filled from (region, value) pairs, as vLLM's loaders copy (NaN where unwritten)."""
    params = {k: torch.full(s, float("nan"), dtype=dtype) for k, s in shapes.items()}
    for r, v in values:
        r.target(params[f"{r.module}.{r.param}"]).copy_(v)
    return params


def digest(params: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(params):
        h.update(k.encode())
        h.update(bits(params[k]).numpy().tobytes())
    return h.hexdigest()


def check(source: DeltaSource, configs, *, tp: int = 2, dtypes=(torch.float32, torch.bfloat16), ranks=None):
    """Every rank (or `ranks`), every configuration in order on ONE resident capture per rank: equal digests of the
    parameters, and the parameters really change between configurations (the test can fail)."""
    layouts = [shard_layout(source, tp=tp, rank=rank) for rank in (ranks or range(tp))]
    held = [Resident(source=source, regions=regions, device=torch.device("cpu")) for regions, _ in layouts]
    seen = set()
    for config in configs:
        base, tvs = source.open()
        whole = dict(merged_tensors(base=base, tv=tvs, config=config))  # the streaming load, once per config
        for rank, ((regions, shapes), res) in enumerate(zip(layouts, held)):
            want_v = [(r, r.source_view(whole[r.tensor])) for r in regions]
            got_v = list(res.values(config))
            for dtype in dtypes:
                want, got = place(want_v, shapes, dtype), place(got_v, shapes, dtype)
                for k in want:
                    assert torch.equal(bits(want[k]), bits(got[k])), (rank, config, dtype, k)
                assert digest(want) == digest(got)
                seen.add((rank, digest(want)))
    assert len(seen) > len(layouts) * len(dtypes)


def plain(alphas=ALPHAS, **kw):
    return [MergeConfig(a, **kw) for a in alphas]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "tied"])
def test_a_pair_every_alpha_and_endpoint(pairs, arch):
    base, reasoner = pairs[arch]
    check(DeltaSource(base=str(base), reasoner=str(reasoner)), plain())


def test_a_pair_unsharded_and_in_float16(pairs):
    base, reasoner = pairs["qwen2"]
    check(DeltaSource(base=str(base), reasoner=str(reasoner)), plain(), tp=1, dtypes=(torch.float16,))


def test_delta_files_float32_and_bfloat16(pairs, f32_deltas, tmp_path):
    import tvtool

    base, reasoner = pairs["qwen2"]
    check(DeltaSource(base=str(base), delta=str(f32_deltas["qwen2"])), plain())
    d = tvtool.delta(base=base, reasoner=reasoner, output=tmp_path / "d.safetensors",
                     options=tvtool.DeltaOptions(progress=False)).output
    res = Resident(source=DeltaSource(base=str(base), delta=str(d)),
                   regions=shard_layout(DeltaSource(base=str(base), delta=str(d)), tp=1, rank=0)[0],
                   device=torch.device("cpu"))
    res.capture(MergeConfig(0.5))
    assert {h.m.dtype for h in res.held.values() if h.m is not None} == {torch.bfloat16}  # exact: kept in bf16
    check(DeltaSource(base=str(base), delta=str(d)), plain())


def test_a_factored_delta(llama, tmp_path):
    from tvtool.lowrank.svd import LowRankOptions, svd_rank

    base, reasoner = llama
    f = svd_rank(source=DeltaSource(base=base, reasoner=reasoner), output=tmp_path / "f.safetensors",
                 options=LowRankOptions(rank=4, method="exact", dtype="float32", progress=False)).output
    check(DeltaSource(base=str(base), delta=str(f)), plain((0.0, 1.0, 0.6)))


def test_a_peft_adapter(lora_pair, llama):
    check(DeltaSource(base=str(llama[0]), delta=str(lora_pair.adapters[0])), plain((0.0, 1.0, 0.6, -1.5)))


def test_include_exclude_rules_and_schedules(pairs):
    base, reasoner = pairs["qwen2"]
    configs = [*plain((1.0, 0.5), include="mlp"), *plain((1.0, 0.4), exclude="embed|lm_head|norm"),
               MergeConfig(1.0, rules=(("q_proj", 0.0), ("mlp", 0.5))),  # α_eff 0, 0.5 and 1 (no θ2 rule)
               MergeConfig(0.7, rules=(("k_proj", 2.0),), schedule=(0.2, 1.0)),
               MergeConfig(0.9, schedule=(1.0, 0.0), include="layers")]
    check(DeltaSource(base=str(base), reasoner=str(reasoner)), configs)


OPERATORS = [MergeConfig(0.8, weights=(0.7, -0.4)),
             MergeConfig(1.0, method="trim", density=0.3, weights=(1.0, 1.0)),
             MergeConfig(0.9, method="ties", density=0.3, weights=(0.7, 0.5)),
             MergeConfig(0.6, method="dare_linear", p=0.3, seed=4, weights=(1.0, 1.0)),
             MergeConfig(0.6, method="dare_ties", p=0.2, density=1.0, weights=(1.0, 0.5)),
             MergeConfig(0.5, method="breadcrumbs", beta=0.05, gamma=0.1, weights=(1.0, 1.0)),
             MergeConfig(0.5, method="breadcrumbs_ties", beta=0.05, gamma=0.1, weights=(1.0, 1.0))]


def test_several_vectors_and_every_operator_switching_on_one_capture(trio):
    """Operators in a row on one capture per rank (M recaptured per operator setting), then a plain α."""
    base, r1, r2 = trio
    source = DeltaSource(base=str(base), reasoner=str(r1), more=(str(r2),))
    configs = []
    for c in OPERATORS:
        configs += [c, MergeConfig(-0.4, **{k: v for k, v in c.to_dict().items() if k != "alpha"})]
    check(source, configs + plain((0.3, 1.0), weights=(1.0, 1.0)), dtypes=(torch.float32,), ranks=(1,))


def test_an_operator_over_one_pair_and_back_to_plain(pairs):
    base, reasoner = pairs["llama"]
    check(DeltaSource(base=str(base), reasoner=str(reasoner)),
          [MergeConfig(0.5), MergeConfig(0.9, method="ties", density=0.2), MergeConfig(1.0, method="dare_linear",
                                                                                        p=0.5), MergeConfig(1.0)])


def test_vocab_intersect(pairs, tmp_path):
    """A reasoner with fewer vocabulary rows: Δ over the shared rows, the others stay θ1 (in every shard)."""
    base, r1 = pairs["llama"]
    sd = finetune_like(state_dict(base), seed=11, scale=0.08)
    vocab = {n for n in sd if "embed_tokens" in n or "lm_head" in n}
    r2 = edited_copy(r1, tmp_path / "r2", lambda _: {k: (v[:248] if k in vocab else v).contiguous()
                                                     for k, v in sd.items()})
    cfg = json.loads((r2 / "config.json").read_text())
    (r2 / "config.json").write_text(json.dumps({**cfg, "vocab_size": 248}))
    check(DeltaSource(base=str(base), reasoner=str(r2), vocab="intersect"), plain((1.0, 0.5, 0.0)))
    check(DeltaSource(base=str(base), reasoner=str(r1), more=(str(r2),), vocab="intersect"),
          [MergeConfig(a, method="ties", density=0.5, weights=(1.0, 1.0)) for a in (0.7, 1.0)],
          dtypes=(torch.float32,))


def test_rules_follow_the_merge_path_table(pairs):
    base, reasoner = pairs["llama"]
    b, tvs = DeltaSource(base=str(base), reasoner=str(reasoner)).open()
    plan = output_plan(b, tvs[0])
    r = tensor_rules(plan=plan, tvs=tvs, config=MergeConfig(1.0, include="mlp"))
    assert {x.kind for n, x in r.items() if "mlp" in n} == {"end"}
    assert {x.kind for n, x in r.items() if "mlp" not in n} == {"base"}
    r = tensor_rules(plan=plan, tvs=tvs, config=MergeConfig(1.0, rules=(("mlp", 1.0),)))  # not plain: no θ2 rule
    assert {x.kind for x in r.values()} == {"merge"}


# --- where the copies go ------------------------------------------------------------------------------

G = 1 << 30


def test_auto_takes_the_gpu_then_cpu_then_streams_and_says_so():
    assert choose(mode="auto", need=G, free_gpu=4 * G, free_cpu=8 * G) == Choice(
        "gpu", "resident α swap: θ1 and Δ kept in GPU memory (1.00 GiB per worker, 4.0 GiB free on its GPU)")
    assert choose(mode="auto", need=G, free_gpu=G, free_cpu=8 * G) == Choice(
        "cpu", "resident α swap: θ1 and Δ kept in pinned CPU memory (1.00 GiB per worker, 8.0 GiB free in "
               "CPU memory for 1 worker(s))")
    assert choose(mode="auto", need=G, free_gpu=None, free_cpu=8 * G, workers_per_host=2).placement == "cpu"
    assert choose(mode="auto", need=3 * G, free_gpu=None, free_cpu=8 * G, workers_per_host=3) == Choice(
        None, "resident α swap does not fit (3.00 GiB per worker; no GPU, 8.0 GiB free in CPU memory for 3 "
              "worker(s)): every α streams from the checkpoints")
    assert choose(mode="off", need=G, free_gpu=4 * G, free_cpu=8 * G) == Choice(None, None)


def test_an_explicit_placement_that_does_not_fit_is_refused_in_one_line():
    c = choose(mode="gpu", need=2 * G, free_gpu=G, free_cpu=8 * G)
    assert c.refused and c.message == "--resident gpu needs 2.00 GiB per worker, 1.0 GiB free on its GPU"
    c = choose(mode="gpu", need=G, free_gpu=None, free_cpu=8 * G)
    assert c.refused and c.message == "--resident gpu needs a GPU engine; this engine runs on the CPU"
    c = choose(mode="cpu", need=5 * G, free_gpu=None, free_cpu=8 * G, workers_per_host=2)
    assert c.refused and c.message == ("--resident cpu needs 5.00 GiB per worker, 8.0 GiB free in CPU memory "
                                       "for 2 worker(s)")
    assert choose(mode="cpu", need=G, free_gpu=None, free_cpu=8 * G) == Choice("cpu", None)


def test_a_capture_reads_each_input_once_and_no_file_afterwards(pairs, monkeypatch):
    """θ1 and θ2 are read once (each tensor once) at the first α; later α read nothing."""
    from tvtool.io import checkpoint

    base, reasoner = pairs["llama"]
    source = DeltaSource(base=str(base), reasoner=str(reasoner))
    regions, _ = shard_layout(source, tp=2, rank=1)
    res = Resident(source=source, regions=regions, device=torch.device("cpu"))
    reads = []
    real = checkpoint.Checkpoint.read
    monkeypatch.setattr(checkpoint.Checkpoint, "read", lambda self, n, *a, **k: reads.append(n) or real(self, n, *a,
                                                                                                         **k))
    list(res.values(MergeConfig(0.5)))
    assert sorted(reads) == sorted(2 * [r for r in {x.tensor for x in regions}])
    reads.clear()
    for a in (0.0, 0.25, 1.0, 1.5):
        list(res.values(MergeConfig(a)))
    assert reads == []
    assert Path(base).is_dir()


# --- the GPU arithmetic, checked here on CPU (scripts/check_gpu_alpha.py checks it on a GPU) ---------------


def _body(fn) -> str:
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0]
    if isinstance(tree.body[0], ast.Expr) and isinstance(tree.body[0].value, ast.Constant):
        tree.body = tree.body[1:]  # the docstring
    return ast.dump(ast.Module(tree.body, []))


def test_the_gpu_check_script_holds_the_code_it_checks():
    import importlib.util

    from tvtool.engine.resident import finish_torch
    from tvtool.merge.kernels import merge_rows

    spec = importlib.util.spec_from_file_location("check_gpu_alpha", Path(__file__).parents[2] / "scripts" /
                                                  "check_gpu_alpha.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert _body(script.gpu) == _body(finish_torch) and _body(script.cpu) == _body(merge_rows)
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for pair in (False, True):
            t1 = script.edge_values(dtype, 50_000, g)
            x = script.edge_values(dtype if pair else torch.float32, 50_000, g)
            for a in (0.5, -1.0, 1 / 3, 1e-30):
                want = merge_rows(t1, x.float() - t1.float() if pair else x, a, dtype)
                got = finish_torch(t1, x, pair, a, dtype)
                assert torch.equal(bits(got), bits(want)), (dtype, pair, a)
                cpu = finish(theta1=t1, x=x, pair=pair, alpha=a, dtype=dtype, device=torch.device("cpu"))
                ok = torch.isfinite(want.float())
                assert torch.equal(bits(cpu[ok]), bits(want[ok])), (dtype, pair, a)


def test_an_alpha_that_overflows_is_the_streaming_path_s_error(pairs):
    from tvtool.errors import TvtoolError

    base, reasoner = pairs["llama"]
    source = DeltaSource(base=str(base), reasoner=str(reasoner))
    b, tvs = source.open()
    with pytest.raises(TvtoolError) as streaming:
        list(merged_tensors(base=b, tv=tvs, config=MergeConfig(1e39)))
    res = Resident(source=source, regions=shard_layout(source, tp=2, rank=0)[0], device=torch.device("cpu"))
    list(res.values(MergeConfig(0.5)))
    with pytest.raises(TvtoolError) as resident:
        list(res.values(MergeConfig(1e39)))
    assert type(resident.value) is type(streaming.value) and "θ1 + α·Δ in bfloat16 at α=1e+39 overflows in tensor" in str(resident.value)


def test_a_nan_in_the_base_is_the_streaming_path_s_error_and_leaves_nothing_held(pairs, tmp_path):
    from tvtool.errors import TvtoolError

    base, reasoner = pairs["llama"]
    sd = state_dict(base)
    name = next(n for n in sd if "up_proj" in n)
    bad = edited_copy(base, tmp_path / "nan", lambda d: {**d, name: d[name].clone().index_put_(
        (torch.tensor([3]), torch.tensor([5])), torch.tensor(float("nan"), dtype=d[name].dtype))})
    source = DeltaSource(base=str(bad), reasoner=str(reasoner))
    b, tvs = source.open()
    with pytest.raises(TvtoolError) as streaming:
        list(merged_tensors(base=b, tv=tvs, config=MergeConfig(0.5)))
    res = Resident(source=source, regions=shard_layout(source, tp=1, rank=0)[0], device=torch.device("cpu"))
    with pytest.raises(TvtoolError) as resident:
        res.capture(MergeConfig(0.5))
    assert type(resident.value) is type(streaming.value) and f"{name!r} at index (3, 5)" in str(resident.value)
    assert res.held == {} and res.m_key is None


_ENDPOINT_FIRST = """
import sys
sys.path[:0] = [{tests!r}, {here!r}]
import torch
from test_resident import shard_layout
from tvtool.engine.resident import Resident
from tvtool.engine.vllm_layout import io_counters
from tvtool.merge.config import MergeConfig
from tvtool.toy import ASSET_DIR
from tvtool.vectors.source import DeltaSource

src = DeltaSource(base=str(ASSET_DIR / "base"), reasoner=str(ASSET_DIR / "reasoner"))
res = Resident(source=src, regions=shard_layout(src, tp=1, rank=0)[0], device=torch.device("cpu"))
for a in (1.0, 0.5, 0.25):
    io0 = io_counters()
    list(res.values(MergeConfig(a)))
    io1 = io_counters()
    print(io1["rchar"] - io0["rchar"] - io0["own"])
"""


def test_after_the_capture_no_alpha_reads_even_code(tmp_path):
    """A fresh process (as an engine worker) whose first α is an endpoint (α = 1: θ2 copied, no kernel runs):
    the next α must not read either, not even the compiled kernels numba loads from its cache on first call."""
    import subprocess
    import sys

    here = Path(__file__).resolve()
    code = _ENDPOINT_FIRST.format(tests=str(here.parents[1]), here=str(here.parent))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=here.parents[2])
    assert out.returncode == 0, out.stderr
    first, *later = map(int, out.stdout.split())
    assert first > 10_000_000 and later == [0, 0]  # the capture read θ1 and θ2 (15 MB); later α nothing
