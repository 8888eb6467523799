"""One vLLM engine: explicit sampling, in-place weight loads (θ1 + α·Δ, model folders), LoRA adapters.

`Engine` wraps vLLM's offline `LLM`. Sampling is always explicit (`SamplingOptions`;
greedy by default) and the engine runs with `generation_config="vllm"`, so a
checkpoint's generation_config.json never changes the decoding silently; what was
used is recorded by `Engine.sampling_record`.

Weights are swapped in place, without restarting the engine: `load_alpha` sends a
`DeltaSource` and a `MergeConfig` (plain data) to each worker; no tensor crosses a process
boundary. Resident (`EngineOptions.resident`, `tvtool.engine.resident`): on the first α each
worker captures θ1 and θ2/M in the engine's own layout, and every later α is set from memory.
Streaming (`--resident off`, or what does not fit): each worker merges θ1 + α·Δ from the inputs
through the shared merge path (`tvtool.engine.worker`, `tvtool.merge.stream`). `load_alpha` and
`hold_folder` load only what the engine does not already hold. An α-sweep engine starts from its
own shell-model folder (`Engine.for_source`): the merged model's config and tokenizer, placeholder weights.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
import weakref
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, Sequence

from tvtool.errors import EngineError, OptionsError, TvtoolError
from tvtool.io.checkpoint import model_config
from tvtool.merge.config import MergeConfig
from tvtool.merge.plan import merged_config, output_plan
from tvtool.engine.options import (TESTED_VLLM, EngineOptions, Sample, SamplingOptions, check_engine_options,
                                   check_sampling, sampling_record, vllm_module)
from tvtool.engine.prompting import PromptOptions, build_prompt, load_tokenizer
from tvtool.engine.logs import engine_start
from tvtool.engine.reaper import interruptible_start, reap_on_death
from tvtool.engine.placement import choose
from tvtool.io.finished import say
from tvtool.vectors.source import DeltaSource

WORKER_EXTENSION = "tvtool.engine.worker.WorkerExtension"  # vLLM's worker_extension_cls


def folder_weights(path: str | os.PathLike) -> dict:
    """What an engine holds after loading a model folder (compare with `Engine.weights`)."""
    return {"kind": "folder", "path": str(path)}



def alpha_weights(*, source: DeltaSource, config: MergeConfig) -> dict:
    """What an engine holds after loading θ1 + α·Δ (compare with `Engine.weights`)."""
    return {"kind": "alpha", "source": source.to_dict(), "config": config.to_dict()}


# --- results ----------------------------------------------------------------------


def sweep_model(*, source: DeltaSource, config: MergeConfig) -> dict:
    """run.json's `settings.model` of one α-sweep run (also planned by tvtool.evaluation.units for a Ray pool)."""
    return {**source.describe(), **{k: v for k, v in config.to_dict().items() if v is not None}}


def shell_files(*, source: DeltaSource, config_from: Literal["reasoner", "base"] = "reasoner") -> dict[str, bytes]:
    """The merged model's config/tokenizer files by name (no weights): what an engine for θ1 + α·Δ starts
    from. The same files as a materialized α folder (`merged_config`)."""
    opened = source.open()
    base, tv = opened.base, opened.tv
    return merged_config(base=base, tv=tv, plan=output_plan(base, tv), config_from=config_from)


def write_shell_model(*, source: DeltaSource, folder: str | os.PathLike,
                      config_from: Literal["reasoner", "base"] = "reasoner") -> Path:
    """Write `shell_files` into `folder`."""
    files = shell_files(source=source, config_from=config_from)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out / name).write_bytes(data)
    return out


def load_record(reports: Sequence[dict], *, seconds: float) -> dict:
    """One in-place load as run.json records it (`load`; information, not part of the finished-work record):
    the path (resident: from memory, `captured` when inputs were read for it; streaming; held: nothing
    loaded), the engine's wall seconds, and the bytes every worker read during it (/proc/self/io: `bytes_read`
    through read calls, page cache included; `storage_bytes` from storage)."""
    paths = {r["path"] for r in reports}
    rec = {"path": paths.pop() if len(paths) == 1 else "mixed", "seconds": round(seconds, 3),
           "bytes_read": sum(r["bytes_read"] for r in reports),
           "storage_bytes": sum(r["storage_bytes"] for r in reports), "workers": len(reports)}
    if rec["path"] == "resident":
        rec.update(captured=any(r["captured"] for r in reports), placement=reports[0]["placement"],
                   resident_bytes=max(r["resident_bytes"] for r in reports),
                   processing_s=max(r.get("processing_s", 0.0) for r in reports))
    if any("digest" in r for r in reports):
        rec["digests"] = [r.get("digest") for r in reports]
    return rec


HELD = {"path": "held", "seconds": 0.0, "bytes_read": 0, "storage_bytes": 0}


class Engine:
    """One vLLM `LLM`; weights can be replaced in place (`load_alpha`, `load_weights`).

    `model` is the folder the engine starts from (config, tokenizer and, unless
    `dummy_weights`, weights). With `dummy_weights=True` the engine starts with random
    weights and `load_alpha`/`load_weights` must be called before generating.
    """

    def __init__(self, *, model: str | os.PathLike, options: EngineOptions = EngineOptions(),
                 dummy_weights: bool = False, seed: int = 0, lazy: bool = False):
        vllm_module()
        o = options
        check_engine_options(o)
        self.options, self.model_dir = o, Path(model)
        if o.cpu_kv_cache_gb is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(o.cpu_kv_cache_gb)
        kw: dict[str, Any] = dict(
            model=str(model), dtype=o.dtype, tensor_parallel_size=o.tensor_parallel_size,
            pipeline_parallel_size=o.pipeline_parallel_size, gpu_memory_utilization=o.gpu_memory_utilization,
            enforce_eager=o.enforce_eager, enable_lora=o.enable_lora, seed=seed, generation_config="vllm",
            trust_remote_code=o.trust_remote_code, worker_extension_cls=WORKER_EXTENSION)
        if o.enable_lora:
            kw["max_lora_rank"] = o.max_lora_rank
            if o.max_loras is not None:
                kw["max_loras"] = o.max_loras
        for k in ("max_model_len", "distributed_executor_backend", "max_num_seqs"):
            if getattr(o, k) is not None:
                kw[k] = getattr(o, k)
        if dummy_weights:
            kw["load_format"] = "dummy"
        self._kw, self._llm, self.starts = kw, None, 0
        self._cleanup: weakref.finalize | None = None  # removes a shell-model folder this engine owns
        if not lazy:
            self._start()
        self.weights: dict[str, Any] = {"kind": "dummy" if dummy_weights else "folder", "path": str(model)}
        self.last_load: dict = dict(HELD)
        self._resident_mode = o.resident
        self._resident_missing: list[str] = []  # what this vLLM lacks for the resident swap (checked at start)
        self._placed: tuple | None = None  # ((source, M key), placement) decided for the engine's copies
        self._said: set[str] = set()
        self._lora_ids: dict[str, int] = {}
        self.tokenizer = load_tokenizer(model)

    @classmethod
    def for_source(cls, *, source: DeltaSource, options: EngineOptions = EngineOptions(), seed: int = 0,
                   lazy: bool = False, config_from: Literal["reasoner", "base"] = "reasoner") -> "Engine":
        """An engine for θ1 + α·Δ sweeps: placeholder weights, in its own shell-model folder.

        The folder holds the merged model's config/tokenizer files (`tvtool.merge.plan.merged_config`,
        as `materialize` writes them) and is removed when the engine is closed."""
        folder = Path(tempfile.mkdtemp(prefix="tvtool-engine-"))
        try:
            write_shell_model(source=source, folder=folder, config_from=config_from)
            engine = cls(model=folder, options=options, dummy_weights=True, seed=seed, lazy=lazy)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        engine._cleanup = weakref.finalize(engine, shutil.rmtree, folder, True)
        return engine

    def _start(self) -> None:
        self._reaper = reap_on_death()  # the engine's processes die with this one, even on SIGKILL
        self._reaper.__enter__()
        try:
            # engine processes print into the run's vllm.log (tvtool.engine.logs); a Ctrl-C stops the start at once
            with engine_start(), interruptible_start():
                self._llm = vllm_module().LLM(**self._kw)
        except KeyboardInterrupt:
            self._stop()  # an engine the interrupted start made anyway (its processes are already killed)
            self._end_reaper()
            raise
        except TvtoolError:  # ours, already one line (the log's disk is full)
            self._end_reaper()
            raise
        except Exception as e:  # vLLM raises many types at start-up
            self._end_reaper()
            raise EngineError(f"vLLM could not start: {type(e).__name__}: {str(e)[:300]}", where=self._kw["model"],
                              fix="check the model folder and the engine options (dtype, max_model_len, "
                                  "memory)") from e
        self.starts += 1
        try:
            self._check_swap()
        except BaseException:
            self._stop()
            raise

    @property
    def llm(self):
        """The vLLM `LLM`, started on first use when the engine was made with `lazy=True`."""
        if self._llm is None:
            self._start()
        return self._llm

    def _check_swap(self) -> None:
        """What the in-place swaps need from this vLLM, at engine start rather than mid-sweep."""
        info = self._llm.collective_rpc("tvtool_check")[0]
        version, missing = info["vllm"], info["missing"]
        tested = any(str(version).startswith(v + ".") or version == v for v in TESTED_VLLM)
        if "worker.reload_weights" in missing:
            raise EngineError(f"vLLM {version} has no in-place weight reload (worker.reload_weights)",
                              fix=f"install vLLM {' or '.join(TESTED_VLLM)} (what tvtool's worker is tested with)")
        if missing and self._resident_mode in ("gpu", "cpu"):
            raise EngineError(f"vLLM {version} lacks what the resident α swap needs: {', '.join(missing[:3])}",
                              where=f"--resident {self._resident_mode}",
                              fix=f"use --resident off (streaming), or vLLM {' or '.join(TESTED_VLLM)}")
        self._resident_missing = list(missing)
        if missing and self._resident_mode == "auto":
            self._say(f"resident α swap off: vLLM {version} lacks {', '.join(missing[:2])} (tested with "
                      f"{', '.join(TESTED_VLLM)}); every α streams from the checkpoints")
        elif not tested and self._resident_mode != "off":
            self._say(f"note: vLLM {version} is not a version the in-place swap is tested with "
                      f"({', '.join(TESTED_VLLM)})")

    def _say(self, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            say(message)

    # -- weights ---------------------------------------------------------------------
    def load_alpha(self, *, source: DeltaSource, config: MergeConfig, force: bool = False,
                   resident: Literal["auto", "gpu", "cpu", "off"] | None = None) -> dict:
        """Put θ1 + α·M into the running engine unless it already holds it (`force`: load anyway); returns
        the load's record (`load_record`: path, seconds, bytes read). `resident` overrides the engine's
        option for this load (e.g. "off" to compare with the streaming path).

        Resident (`EngineOptions.resident`): each worker sets every region of its parameters from its
        captured θ1 and θ2/M (captured on the first α). Streaming: each worker streams
        `tvtool.merge.stream.merged_tensors` from the inputs. The same bytes either way; only the
        source and the configuration, as plain data, cross processes."""
        want = alpha_weights(source=source, config=config)
        if self.weights == want and not force:
            self.last_load = dict(HELD)
            return self.last_load
        t0 = time.perf_counter()
        placement = self._placement(source, config, resident)
        reports = self._rpc("tvtool_load_alpha", {"source": want["source"], "config": want["config"],
                                                 "placement": placement})
        self.weights = want
        self.last_load = load_record(reports, seconds=time.perf_counter() - t0)
        return self.last_load

    def _placement(self, source: DeltaSource, config: MergeConfig, mode: str | None = None) -> str | None:
        """Where the workers keep the resident copies for `config` ("gpu", "cpu"), or None (stream): decided
        per source from what they need and what is free, and checked again for each new operator setting."""
        mode = self._resident_mode if mode is None else mode
        if mode == "off" or (mode == "auto" and self._resident_missing):
            return None
        if self._resident_missing:
            raise EngineError("this vLLM lacks what the resident α swap needs: "
                              + ", ".join(self._resident_missing[:3]), where=f"--resident {mode}",
                              fix="use --resident off (streaming)")
        key = (source, replace(config, alpha=1.0, include=None, exclude=None, rules=(), schedule=None))  # M's
        if self._placed is not None and self._placed[0] == key:
            return self._placed[1]
        same = self._placed is not None and self._placed[0][0] == source
        if same and self._placed[1] is None:
            return None
        needs = self._rpc("tvtool_resident_need", {"source": source.to_dict(), "config": config.to_dict()},
                          loads=False)
        per_host = max(Counter(n["host"] for n in needs).values())
        gpus = [n["free_gpu"] for n in needs if n["free_gpu"] is not None]
        ask = self._placed[1] if same else mode
        choice = choose(mode=ask, need=max(n["need"] for n in needs), free_gpu=min(gpus) if gpus else None,
                        free_cpu=min(n["free_cpu"] for n in needs), workers_per_host=per_host)
        if choice.refused and (mode != "auto" or not same):
            raise OptionsError(choice.message, where=f"--resident {mode}",
                               fix="free memory, or use --resident auto (which streams what does not fit) or off")
        if choice.refused:
            self._say(f"{choice.message}: every α streams from now on")
            self._rpc("tvtool_release", {}, loads=False)
        elif choice.message:
            self._say(choice.message)
        if needs[0].get("notice"):
            self._say(needs[0]["notice"])
        self._placed = (key, None if choice.refused else choice.placement)
        return self._placed[1]

    def record_digests(self, *, source: DeltaSource) -> None:
        """From now on every load's record holds `digests`: per worker, a sha256 of the bytes written into
        each region of its parameters before vLLM's processing (to compare load paths bit for bit)."""
        self._rpc("tvtool_watch_digests", {"source": source.to_dict()}, loads=False)

    def load_weights(self, *, path: str | os.PathLike) -> None:
        """Put a model folder's weights (same architecture) into the running engine."""
        self._rpc("tvtool_load_folder", {"path": str(path)})
        self.weights = folder_weights(path)

    def hold_folder(self, *, path: str | os.PathLike) -> bool:
        """Load a model folder's weights unless the engine already holds them; True when it loaded."""
        if self.weights == folder_weights(path):
            return False
        self.load_weights(path=path)
        return True

    def _rpc(self, method: str, kwargs: dict, *, loads: bool = True) -> list:
        try:
            out = self.llm.collective_rpc(method, kwargs=kwargs)
        except Exception as e:  # errors come back from the worker processes
            raise EngineError(f"in-place weight load failed: {type(e).__name__}: {str(e)[:300]}",
                              where=str(kwargs), fix="check that the weights match the engine's model "
                                                     "(same architecture and tensor names)") from e
        if loads:
            self.llm.reset_prefix_cache()  # cached KV was computed with the old weights
        return out

    # -- generation ------------------------------------------------------------------
    def sampling_params(self, sampling: SamplingOptions):
        s = check_sampling(sampling)
        return vllm_module().SamplingParams(n=s.n, max_tokens=s.max_tokens, temperature=s.temperature,
                                            top_p=s.top_p, top_k=0, min_p=0.0, repetition_penalty=1.0,
                                            seed=s.sample_seed)

    def sampling_record(self, sampling: SamplingOptions) -> dict:
        """What decoding used, and the checkpoint generation_config.json that was NOT applied."""
        return sampling_record(model_dir=self.model_dir, sampling=sampling)

    def lora_request(self, path: str | os.PathLike):
        """A LoRARequest for an adapter folder; the same path keeps the same id."""
        if not self.options.enable_lora:
            raise OptionsError("LoRA adapters need an engine started with enable_lora",
                               where=str(path), fix="pass --enable-lora")
        key = str(Path(path).resolve())
        if not (Path(key) / "adapter_config.json").is_file():
            raise EngineError("not a PEFT LoRA adapter folder (no adapter_config.json)", where=str(path),
                              fix="save the adapter with peft's save_pretrained")
        i = self._lora_ids.setdefault(key, len(self._lora_ids) + 1)
        from vllm.lora.request import LoRARequest  # vLLM is optional: imported only with an engine

        return LoRARequest(lora_name=f"adapter-{i}", lora_int_id=i, lora_path=key)

    def reserve_loras(self, n: int) -> None:
        """Before the engine starts, let one batch hold `n` adapters (vLLM's `max_loras`); a started engine
        keeps its setting (requests of more adapters still run, in turns)."""
        if self._llm is None and self.options.enable_lora and n > self._kw.get("max_loras", 1):
            self._kw["max_loras"] = n

    def prompts(self, *, questions: Sequence[str], options: PromptOptions) -> list[str]:
        return [build_prompt(question=q, tokenizer=self.tokenizer, options=options) for q in questions]

    @property
    def context(self) -> int | None:
        """Tokens of context (prompt + generation): --max-model-len, else the model's max_position_embeddings."""
        return self.options.max_model_len or self._model_context()

    def _model_context(self) -> int | None:
        cfg = model_config(self.model_dir) if (self.model_dir / "config.json").is_file() else {}
        n = cfg.get("max_position_embeddings") or cfg.get("text_config", {}).get("max_position_embeddings")
        return int(n) if n else None

    def check_prompts(self, *, prompts: Sequence[str], add_special_tokens: bool = True) -> None:
        """Refuse, in one line and before vLLM does (or starts), prompts that leave no room in the context:
        vLLM takes a prompt only when it is shorter than max_model_len."""
        context = self.context
        if context is None or not prompts:
            return
        lengths = [len(x) for x in self.tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]]
        long = [n for n in lengths if n >= context]
        if not long:
            return
        limit, need = self._model_context(), max(long) + 1
        if limit is not None and need > limit:
            fix = f"shorten the prompts (the model's own context is {limit} tokens)"
        else:
            fix = f"raise --max-model-len to at least {need}{f' (the model allows {limit})' if limit else ''}, or " \
                  "shorten the prompts"
        raise EngineError(f"{len(long)} of {len(lengths)} prompts do not fit the engine's context of {context} "
                          f"tokens (the longest has {max(long)} tokens; a prompt must leave room for one generated "
                          "token)",
                          where=f"--max-model-len {context}" if self.options.max_model_len else
                          f"max_position_embeddings in {self.model_dir / 'config.json'}",
                          fix=f"{fix}: --instruction, --system-prompt, or the dataset's questions")

    def generate(self, *, prompts: Sequence[str], sampling: SamplingOptions, lora: str | os.PathLike | None = None,
                 loras: Sequence[str | os.PathLike | None] | None = None,
                 add_special_tokens: bool = True) -> list[list[Sample]]:
        """Per prompt, its n samples (token ids, text, finish reason), in prompt order.

        `lora`: one adapter for every prompt; `loras`: one per prompt (None: the engine's weights), so
        requests through different adapters are batched together in one call."""
        if self.weights["kind"] == "dummy":
            raise EngineError("the engine holds placeholder weights", where=str(self.model_dir),
                              fix="call load_alpha or load_weights first")
        params = self.sampling_params(sampling)
        if loras is not None:
            if lora is not None or len(loras) != len(prompts):
                raise OptionsError(f"{len(loras)} adapters for {len(prompts)} prompts", where="loras",
                                   fix="give one adapter (or None) per prompt, and no `lora`")
            if any(loras) and not all(loras):  # never mixed: vLLM's CPU build reads "no adapter" (index -1)
                # as its last adapter slot (torch LoRA ops), so prompts without one go in a call of their own
                plain = [i for i, p in enumerate(loras) if not p]
                lora_ix = [i for i, p in enumerate(loras) if p]
                outs = dict(zip(plain, self.generate(prompts=[prompts[i] for i in plain], sampling=sampling,
                                                     add_special_tokens=add_special_tokens)))
                outs.update(zip(lora_ix, self.generate(prompts=[prompts[i] for i in lora_ix], sampling=sampling,
                                                       loras=[loras[i] for i in lora_ix],
                                                       add_special_tokens=add_special_tokens)))
                return [outs[i] for i in range(len(prompts))]
            req = [self.lora_request(p) if p else None for p in loras]
        else:
            req = self.lora_request(lora) if lora else None
        self.check_prompts(prompts=prompts, add_special_tokens=add_special_tokens)
        try:  # vLLM is optional: imported only with an engine (older vLLM raised ValueError)
            from vllm.exceptions import VLLMValidationError
        except ImportError:
            VLLMValidationError = ValueError
        try:
            outs = self.llm.generate(list(prompts), params, use_tqdm=False, lora_request=req,
                                     tokenization_kwargs={"add_special_tokens": add_special_tokens})
        except (VLLMValidationError, ValueError) as e:  # vLLM's request validation (the class, or older ValueError)
            raise EngineError(f"vLLM refused the request: {str(e)[:300]}", where=str(self.model_dir),
                              fix="raise --max-model-len (within the model's limit) or shorten the prompts") from e
        result = []
        for out in outs:
            samples = sorted(out.outputs, key=lambda c: c.index)
            result.append([Sample(index=c.index, token_ids=tuple(c.token_ids), text=c.text,
                                  finish_reason=str(c.finish_reason)) for c in samples])
        return result

    def _stop(self) -> None:
        llm = getattr(self, "_llm", None)
        if llm is None:
            return
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            # vLLM's default grace (5 s). Measured on the CPU build: a 1 s grace closes 4 s sooner (its EngineCore
            # is killed at the end of the grace either way) but kills the worker before it unlinks its shared-
            # memory queue (one /dev/shm object per close, and Python's "leaked shared_memory" warning at exit).
            core.shutdown()
        self._llm = None
        del llm
        gc.collect()
        self._end_reaper()

    def _end_reaper(self) -> None:
        reaper, self._reaper = getattr(self, "_reaper", None), None
        if reaper is not None:
            reaper.__exit__(None, None, None)

    def close(self) -> None:
        """Stop the engine's processes, free its memory, remove its shell-model folder."""
        self._stop()
        if self._cleanup is not None:
            self._cleanup()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
