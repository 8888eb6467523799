"""`evaluate`: generate with vLLM, score, and summarise; one model, an α sweep, checkpoints or LoRA adapters.

Every run writes one folder:
  samples.jsonl  one line per sample (id, index, prompt, response, token_ids, num_tokens, extracted,
                 gold, correct, finish_reason, think_end, thinking_tokens, answer_tokens,
                 thinking_finished), appended and flushed batch by batch;
  summary.json   accuracy, mean/median #tokens, #truncated, ACU (see `ACU_FORMULA`), thinking/answer
                 tokens and unfinished share (`tvtool.evaluation.thinking`), n > 1 statistics
                 (`tvtool.evaluation.sampled`), per subject and per difficulty level
                 (`tvtool.evaluation.difficulty`);
  run.json       model, α, sampling, dataset, versions, times, how answers were read.
A re-run skips the samples already written (keyed by id and sampling index, a torn last
line is dropped), so an interrupted run finishes into the same summary.

Each mode plans its runs, then `_Session.run` goes through them on one engine: a run
that is complete is only re-summarised; otherwise the engine is given the run's weights
(`Engine.load_alpha`/`hold_folder`: loaded only if not already held) and generates; run.json records
how the weights were loaded (`load`: path, seconds, bytes read), which is no part of the finished-work record.
Engines are made lazily, so a finished re-run starts none.
- α sweep: ONE engine (placeholder weights, its own shell-model folder with the merged
  config and tokenizer); θ1 + α·Δ is loaded in place for each α (`--include/--exclude`
  select the tensors α applies to): no checkpoint is written, no restart.
- checkpoint folders: one engine for consecutive folders whose config.json (dtype aside)
  and tokenizer files equal the first's, weights loaded in place; else a new engine.
- LoRA adapters: one engine with enable_lora serves them all, every adapter's requests in one
  generate call per batch (`tvtool.evaluation.batched`).
- α sweep with `apply="lora"` (Δ a PEFT adapter or a factored delta): one α-scaled adapter per α
  (`tvtool.lowrank.alpha_adapter`, cached) on an engine holding θ1, batched the same way.
With `prompt_budgets` (one model or an α sweep) each budget is one more run on the same engine,
`budget-<N>/<dataset>/`, with the paper's budget prompt (`tvtool.evaluation.budget`, Table 12).
vLLM's own logs go to `<output>/vllm.log` unless `verbose` (`tvtool.engine.logs`).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from tvtool.io.checkpoint import Checkpoint
from tvtool.evaluation.budget import budget_variants
from tvtool.evaluation.data import ProblemSet, load_problems
from tvtool.engine.engine import Engine, alpha_weights, folder_weights, shell_files, sweep_model
from tvtool.engine.options import EngineOptions, SamplingOptions, sampling_record
from tvtool.errors import OptionsError
from tvtool.io.finite import check_alphas
from tvtool.io.finished import read_record
from tvtool.io.layout import RUN, SETTINGS_FILE, alpha_name, dataset_dir, summary_table
from tvtool.io.lock import output_lock
from tvtool.engine.logs import vllm_logs
from tvtool.engine.options import check_engine_options, check_sampling
from tvtool.merge.config import MergeConfig
from tvtool.merge.options import MergeOptions, config_name
from tvtool.merge.stream import check_configs, check_finite_inputs
from tvtool.io.paths import check_output_apart, check_writable
from tvtool.engine.prompting import PromptOptions, uses_chat_template
from tvtool.evaluation.report import EvalResult, RunResult, table_row, write_table
from tvtool.evaluation.batched import run_batched
from tvtool.evaluation.runs import (EvalOptions, check_reading, check_settings, is_complete, open_run, run_one,
                                    run_params, run_record)
from tvtool.lowrank.alpha_adapter import alpha_adapters, open_valve
from tvtool.io.fingerprint import input_fingerprint
from tvtool.vectors.adapter import check_adapter, is_adapter
from tvtool.vectors.source import DeltaSource


# --- planned runs on one engine ------------------------------------------------------------


@dataclass(frozen=True)
class _Planned:
    """One run to do: where it goes, what it records, and the weights it needs."""

    label: str
    alpha: float | None
    folder: Path
    model: dict  # recorded in run.json settings
    params: tuple[float, str]  # (params_b, "nominal" | "counted")
    path: str | None = None  # weights: a model folder …
    source: DeltaSource | None = None  # … or θ1 + α·Δ
    config: MergeConfig | None = None
    lora: str | None = None
    budget: int | None = None  # a prompt-budget run: its own problems (templated questions) and prompt
    problems: ProblemSet | None = None
    prompt: PromptOptions | None = None

    def weights(self) -> dict:
        return (alpha_weights(source=self.source, config=self.config) if self.config is not None
                else folder_weights(self.path))

    def fingerprint(self, cache: dict) -> dict:
        """The content of this run's weights (cached per source/folder within one evaluation)."""
        if self.config is not None:
            if self.source not in cache:
                cache[self.source] = self.source.fingerprint_record()
            return {"source": cache[self.source], "merge": self.config.record()}
        if self.path not in cache:
            cache[self.path] = input_fingerprint(self.path)
        return {"folder": cache[self.path]}

    def hold(self, engine: Engine) -> dict | None:
        """Load this run's weights into `engine` unless it already holds them; the α load's record."""
        if self.config is not None:
            return engine.load_alpha(source=self.source, config=self.config)
        engine.hold_folder(path=self.path)
        return None


@dataclass
class _Session:
    problems: ProblemSet
    prompt: PromptOptions
    sampling: SamplingOptions
    options: EvalOptions
    engine_options: EngineOptions
    engine: Engine | None  # the caller's (reused, not closed), or None: each mode makes its own
    result: EvalResult = field(default_factory=EvalResult)

    @property
    def seed(self) -> int:
        return self.sampling.sample_seed or 0

    def run(self, planned: Sequence[_Planned], new_engine: Callable[[], Engine], *, batched: bool = False) -> None:
        """Do `planned` on one (lazily started) engine; results are appended in `planned` order.

        Complete runs are found before anything is loaded, so they start no engine; the run
        whose weights the engine already holds goes first (no reload). `batched`: the runs share the
        engine's weights and differ by LoRA adapter; every run's batch goes in one generate call."""
        engine = self.engine if self.engine is not None else new_engine()
        done: dict[int, dict] = {}
        fps: dict = {}
        checked: set[DeltaSource] = set()  # sources whose inputs were scanned for NaN/Inf
        try:
            self._check_prompts(engine, planned)  # before the (lazy) engine starts
            order = sorted(range(len(planned)), key=lambda i: planned[i].weights() != engine.weights)
            if batched:
                done, order = self._batched(planned, engine, fps), []
            for i in order:
                r = planned[i]
                problems = r.problems or self.problems
                kw = dict(problems=problems, model=r.model, prompt=r.prompt or self.prompt, sampling=self.sampling,
                          options=self.options, lora=r.lora, weights=r.fingerprint(fps))
                record = run_record(engine=engine, **kw)
                load = None
                if not is_complete(folder=r.folder, record=record, problems=problems, n=self.sampling.n):
                    check_settings(r.folder, record, self.options.overwrite)  # refuse (or discard) before loading
                    if r.config is not None and r.source not in checked:  # NaN/Inf before the engine loads them
                        check_finite_inputs(source=r.source, config=r.config)
                        checked.add(r.source)
                    load = r.hold(engine)  # the explicit load step: only what the engine does not hold
                done[i] = run_one(engine=engine, folder=r.folder, params_b=r.params[0], params_source=r.params[1],
                                  load=load, **kw)
        finally:
            if self.engine is None:
                self.result.engine_starts += engine.starts
                engine.close()
        self.result.runs += [RunResult(r.label, r.alpha, r.folder, done[i], r.budget) for i, r in enumerate(planned)]

    def _check_prompts(self, engine: Engine, planned: Sequence[_Planned]) -> None:
        """Every prompt of the planned runs fits the engine's context (`Engine.check_prompts`): checked with the
        tokenizer alone, so a too long prompt is refused before a ~30 s engine start, not after it."""
        seen = []
        for r in planned:
            problems, prompt = r.problems or self.problems, r.prompt or self.prompt
            if (problems, prompt) in seen:
                continue
            seen.append((problems, prompt))
            engine.check_prompts(prompts=engine.prompts(questions=[p.question for p in problems], options=prompt),
                                 add_special_tokens=not uses_chat_template(tokenizer=engine.tokenizer, options=prompt))
    def _batched(self, planned: Sequence[_Planned], engine: Engine, fps: dict) -> dict[int, dict]:
        """Every run opened (settings checked before anything loads), then `run_batched`: one generate call per
        batch for all runs, each request with its run's adapter (`tvtool.evaluation.batched`)."""
        kws = [dict(problems=self.problems, model=r.model, prompt=self.prompt, sampling=self.sampling,
                    options=self.options, lora=r.lora, weights=r.fingerprint(fps)) for r in planned]
        todo = [i for i, (r, kw) in enumerate(zip(planned, kws)) if not is_complete(
            folder=r.folder, record=run_record(engine=engine, **kw), problems=self.problems, n=self.sampling.n)]
        for i in todo:
            check_settings(planned[i].folder, run_record(engine=engine, **kws[i]), self.options.overwrite)
        if todo:
            first = planned[todo[0]]
            if first.config is not None:  # NaN/Inf before the engine loads them
                check_finite_inputs(source=first.source, config=first.config)
            first.hold(engine)  # the runs share the engine's weights (the base); adapters differ
        opened = [open_run(engine=engine, folder=r.folder, params_b=r.params[0], params_source=r.params[1], **kw)
                  for r, kw in zip(planned, kws)]
        return dict(enumerate(run_batched(engine=engine, runs=opened, prompt=self.prompt)))

    def with_budgets(self, out: Path, run: _Planned) -> list[_Planned]:
        """`run`, then one run per prompt budget on `run`'s weights (the Table 12 baseline, `tvtool.evaluation.budget`)."""
        if not self.options.prompt_budgets:
            return [run]
        o = self.options
        variants = budget_variants(problems=self.problems, prompt=self.prompt, budgets=o.prompt_budgets,
                                   template=o.budget_template)
        return [run] + [replace(run, label=f"budget-{b}", folder=out / f"budget-{b}" / dataset_dir(self.problems.name),
                                model={**run.model, **extra}, budget=b, problems=ps, prompt=po)
                        for b, ps, po, extra in variants]


# --- one function per mode: the runs, in groups that share an engine ---------------------------------


@dataclass(frozen=True)
class _Group:
    """Runs done on one engine: how to make it, and what it starts from (the sampling record's folder, or the
    shell model's source) with which options."""

    runs: list[_Planned]
    make: Callable[[], Engine]
    options: EngineOptions
    folder: str | None = None  # the model folder the engine starts from …
    shell: DeltaSource | None = None  # … or the shell model of θ1 + α·Δ (`Engine.for_source`)
    batched: bool = False  # the runs differ by LoRA adapter only: one generate call (`_Session.run`)

    def sampling_record(self, sampling: SamplingOptions) -> dict:
        """`Engine.sampling_record` of the engine this group would start, without starting it."""
        if self.shell is not None:
            return sampling_record(files=shell_files(source=self.shell), sampling=sampling)
        return sampling_record(model_dir=self.folder, sampling=sampling)


def _plan_model(s: _Session, out: Path, model) -> list[_Group]:
    r = _Planned(Path(model).name, None, out, {"path": str(model)}, run_params(s.options, model), path=str(model))
    return [_Group(s.with_budgets(out, r), lambda: Engine(model=model, options=s.engine_options, seed=s.seed,
                                                          lazy=True), s.engine_options, folder=str(model))]


def _plan_sweep(s: _Session, out: Path, source: DeltaSource, configs: Sequence[MergeConfig]) -> list[_Group]:
    o, ds = s.options, dataset_dir(s.problems.name)
    params = run_params(o, source.base)
    runs = []
    for c in configs:  # the operator settings are recorded with the run
        name = config_name(c)
        runs.append(_Planned(name, c.alpha, out / name / ds, sweep_model(source=source, config=c),
                             params, source=source, config=c))
    if o.prompt_budgets:  # budget runs at --budget-alpha, after the α runs (no reload when that α came last)
        c = MergeConfig(float(o.budget_alpha), o.include, o.exclude)
        runs += s.with_budgets(out, _Planned(alpha_name(c.alpha), c.alpha, out, sweep_model(source=source, config=c),
                                             params, source=source, config=c))[1:]
    return [_Group(runs, lambda: Engine.for_source(source=source, options=s.engine_options, seed=s.seed, lazy=True),
                   s.engine_options, shell=source)]


def _plan_checkpoints(s: _Session, out: Path, checkpoints: Sequence) -> list[_Group]:
    ds, groups = dataset_dir(s.problems.name), []
    for ck in checkpoints:  # consecutive folders of the same model share an engine
        if groups and _same_model(groups[-1][0], ck):
            groups[-1].append(ck)
        else:
            groups.append([ck])
    return [_Group([_Planned(Path(ck).name, _alpha_of(ck), out / Path(ck).name / ds, {"path": str(ck)},
                             run_params(s.options, ck), path=str(ck)) for ck in group],
                   lambda first=group[0]: Engine(model=first, options=s.engine_options, seed=s.seed, lazy=True),
                   s.engine_options, folder=str(group[0])) for group in groups]


def _plan_loras(s: _Session, out: Path, model, loras: Sequence, alphas: Sequence[float]) -> list[_Group]:
    ds = dataset_dir(s.problems.name)
    rank = max([s.engine_options.max_lora_rank, *(_lora_rank(p) for p in loras)])
    eo = replace(s.engine_options, enable_lora=True, max_lora_rank=rank,
                 max_loras=s.engine_options.max_loras or len(set(loras)))
    labels = [alpha_name(a) for a in alphas] if alphas else [Path(p).name for p in loras]
    params = run_params(s.options, model)
    runs = [_Planned(lab, float(alphas[i]) if alphas else None, out / lab / ds, {"path": str(model), "label": lab},
                     params, path=str(model), lora=str(path)) for i, (lab, path) in enumerate(zip(labels, loras))]
    return [_Group(runs, lambda: Engine(model=model, options=eo, seed=s.seed, lazy=True), eo, folder=str(model),
                   batched=True)]


def _plan_lora_sweep(s: _Session, out: Path, source: DeltaSource, alphas: Sequence[float]) -> list[_Group]:
    """`apply="lora"`: θ1 + α·Δ with Δ a LoRA valve (PEFT adapter or factored delta), served as one α-scaled
    adapter per α (`tvtool.lowrank.alpha_adapter`, cached: written here) on an engine holding θ1; all α in one
    batch."""
    valve = open_valve(source.delta)
    if valve.not_carried > 0:
        warnings.warn(f"the LoRA adapters leave out {100 * valve.not_carried:.3f}% of ‖Δ‖² (tensors the factored "
                      f"delta keeps full): --apply lora evaluates θ1 + α·B·A on its linear layers only")
    adapters = alpha_adapters(valve, alphas)  # α = 0 too (B = 0): no request of the batch is without adapter
    eo = replace(s.engine_options, enable_lora=True, max_lora_rank=max(s.engine_options.max_lora_rank, valve.rank),
                 max_loras=s.engine_options.max_loras or len(adapters))
    ds, params = dataset_dir(s.problems.name), run_params(s.options, source.base)
    runs = [_Planned(alpha_name(a), a, out / alpha_name(a) / ds,
                     {**sweep_model(source=source, config=MergeConfig(a)), "apply": "lora"}, params,
                     path=source.base, lora=str(path)) for a, path in adapters.items()]
    return [_Group(runs, lambda: Engine(model=source.base, options=eo, seed=s.seed, lazy=True), eo,
                   folder=str(source.base), batched=True)]


def _plan(s: _Session, out: Path, mode: str, source: DeltaSource | None, *, model, alphas, configs, checkpoints,
          loras) -> list[_Group]:
    if mode == "model":
        return _plan_model(s, out, model)
    if mode == "sweep":
        return _plan_sweep(s, out, source, configs)
    if mode == "lora-sweep":
        return _plan_lora_sweep(s, out, source, alphas)
    if mode == "checkpoints":
        return _plan_checkpoints(s, out, checkpoints)
    return _plan_loras(s, out, model, loras, alphas)


# --- the public verb ----------------------------------------------------------------------


def evaluate(*, output: str | os.PathLike, model: str | os.PathLike | None = None,
             source: DeltaSource | None = None, alphas: Sequence[float] = (),
             checkpoints: Sequence[str | os.PathLike] = (), loras: Sequence[str | os.PathLike] = (),
             options: EvalOptions = EvalOptions(), merge: MergeOptions = MergeOptions(),
             configs: Sequence[MergeConfig] | None = None, prompt: PromptOptions = PromptOptions(),
             sampling: SamplingOptions = SamplingOptions(), engine_options: EngineOptions = EngineOptions(),
             engine: Engine | None = None) -> EvalResult:
    """Evaluate one model, an α sweep, a list of checkpoints, or a list of LoRA adapters.

    - `model`: one checkpoint → `output/` (with `loras`: one run per adapter on that model);
    - `source` (θ1 and Δ: `DeltaSource.build` from the source flags) + `alphas`: θ1 + α·Δ (or an
      operator's `merge`/`configs`) loaded in place → `output/<alpha-a|operator-alpha-a>/<dataset>/`;
    - `checkpoints`: model folders → `output/<folder name>/<dataset>/`;
    - `model` + `loras` (+ `alphas` as labels, one per adapter) → `output/<alpha-a|adapter>/<dataset>/`.
    Pass `engine` to reuse a running one (it must suit the mode; it is not closed).
    """
    operators = replace(merge, weights=()) != MergeOptions() or configs is not None
    if configs is not None:
        alphas = alphas or tuple(c.alpha for c in configs)
    mode = _mode(model, source, alphas, checkpoints, loras, options, operators)
    out = Path(output)
    inputs = [model, *checkpoints, *loras,
              *((source.base, source.delta, source.reasoner, *source.more) if source else ())]
    _precheck(out, options, sampling, alphas, inputs)
    check_engine_options(engine_options)
    if options.apply == "lora" and mode != "lora-sweep":
        raise OptionsError("--apply lora applies to an α sweep", where="--apply lora",
                           fix="pass --base with --delta VALVE and --alpha")
    if mode == "sweep":  # the α sweep's merge configs (operators included), checked before the engine starts
        configs = list(configs) if configs is not None else \
            merge.configs(alphas, include=options.include, exclude=options.exclude)
        check_configs(source=source, configs=configs)  # operator settings, selection, α rules: before any engine
    with output_lock(out):
        return _evaluate(out, mode, source, model=model, alphas=alphas, configs=configs, checkpoints=checkpoints,
                         loras=loras, options=options, prompt=prompt, sampling=sampling,
                         engine_options=engine_options, engine=engine)


def finished_runs(*, output: str | os.PathLike, model: str | os.PathLike | None = None,
                  source: DeltaSource | None = None, alphas: Sequence[float] = (),
                  checkpoints: Sequence[str | os.PathLike] = (), loras: Sequence[str | os.PathLike] = (),
                  options: EvalOptions = EvalOptions(), configs: Sequence[MergeConfig] | None = None,
                  prompt: PromptOptions = PromptOptions(), sampling: SamplingOptions = SamplingOptions(),
                  engine_options: EngineOptions = EngineOptions(),
                  shared: DeltaSource | None = None) -> list[tuple[Path, str]]:
    """(run folder, state) for every run `evaluate` would do with these arguments: "finished" when its run.json
    holds the record `evaluate` checks and samples.jsonl every sample, "resumes" (same record, samples left),
    "changed" (another record: redone) or "absent". No engine starts and nothing is written (`sweep --plan`);
    records are computed only for folders that hold a run.json. `shared`: the runs go to a shared engine made
    by `Engine.for_source(source=shared)` (a sweep's valve engine), whose shell model gives the sampling record."""
    if configs is not None:
        alphas = alphas or tuple(c.alpha for c in configs)
    mode = _mode(model, source, alphas, checkpoints, loras, options, configs is not None)
    if mode == "lora-sweep":  # its α adapters are written (cached) when planned: not a read-only question
        raise OptionsError("the runs of --apply lora are not planned without writing their adapters",
                           where="--apply lora", fix="ask evaluate itself (it skips finished runs)")
    if mode == "sweep" and configs is None:
        configs = MergeOptions().configs(alphas, include=options.include, exclude=options.exclude)
    problems = load_problems(dataset=options.dataset, split=options.split, limit=options.limit,
                             seed=options.seed, kind=options.kind)
    s = _Session(problems, prompt, sampling, options, engine_options, None)
    out, fps, states = Path(output), {}, []
    for g in _plan(s, out, mode, source, model=model, alphas=alphas, configs=configs, checkpoints=checkpoints,
                   loras=loras):
        if shared is not None:
            g = replace(g, shell=shared, folder=None, options=engine_options)
        srec = None
        for r in g.runs:
            if not (r.folder / RUN).is_file():
                states.append((r.folder, "absent"))
                continue
            srec = srec or g.sampling_record(sampling)
            ps = r.problems or problems
            record = run_record(engine=None, problems=ps, model=r.model, prompt=r.prompt or prompt, sampling=sampling,
                                options=options, lora=r.lora, weights=r.fingerprint(fps), sampling_record=srec,
                                engine_options=g.options)
            state = "finished" if is_complete(folder=r.folder, record=record, problems=ps, n=sampling.n) else \
                "resumes" if (read_record(r.folder / RUN) or {}).get("fingerprint") == record["fingerprint"] else \
                "changed"
            states.append((r.folder, state))
    return states


def _precheck(out: Path, options: EvalOptions, sampling: SamplingOptions, alphas, inputs) -> None:
    """What can fail before the ~30 s engine start: options, α, and where the results go."""
    if options.batch_size < 1:
        raise OptionsError(f"--batch-size must be at least 1, got {options.batch_size}", where="--batch-size")
    check_sampling(sampling)
    check_alphas(alphas)
    check_output_apart(out, inputs)
    check_writable(out)


def _evaluate(out: Path, mode: str, source: DeltaSource | None, *, model, alphas, configs, checkpoints, loras,
              options: EvalOptions, prompt: PromptOptions, sampling: SamplingOptions,
              engine_options: EngineOptions, engine: Engine | None) -> EvalResult:
    problems = load_problems(dataset=options.dataset, split=options.split, limit=options.limit,
                             seed=options.seed, kind=options.kind)
    check_reading(options, problems)
    s = _Session(problems, prompt, sampling, options, engine_options, engine)
    with vllm_logs(folder=out, verbose=options.verbose):  # vLLM's own lines go to out/vllm.log
        for group in _plan(s, out, mode, source, model=model, alphas=alphas, configs=configs,
                           checkpoints=checkpoints, loras=loras):
            s.run(group.runs, group.make, batched=group.batched)
    res = s.result
    res.answer_rule = options.answer_rule if options.score else None
    if len(res.runs) > 1:
        res.table = write_table(rows=[table_row(r) for r in res.runs], folder=out, name=summary_table(problems.name))
    return res


def _mode(model, source: DeltaSource | None, alphas, checkpoints, loras, options: EvalOptions,
          operators: bool = False) -> str:
    sweep = source is not None
    if options.prompt_budgets and (checkpoints or loras or (model is None and not sweep)):
        raise OptionsError("prompt budgets need one model or an α sweep", where="--prompt-budget",
                           fix="pass --model, or --base with --alpha (budget runs use --budget-alpha)")
    if (options.include or options.exclude) and (checkpoints or model is not None or not sweep):
        raise OptionsError("--include/--exclude select the tensors an α sweep applies α to",
                           fix="use them with --base and --alpha (materialize them for other modes)")
    if operators and (checkpoints or model is not None or loras or not sweep):
        raise OptionsError("merge operators (--method, --vector, --alpha-rule, …) apply to an α sweep",
                           fix="use them with --base and --alpha (materialize them for other modes)")
    if checkpoints:
        if model or sweep or loras:
            raise OptionsError("checkpoints are evaluated on their own", fix="pass only the checkpoint folders")
        return "checkpoints"
    if loras:
        if model is None:
            raise OptionsError("LoRA adapters need the model they were trained on", fix="pass --model")
        if alphas and len(alphas) != len(loras):
            raise OptionsError(f"{len(alphas)} α labels for {len(loras)} adapters", where="--alpha",
                               fix="give one α per --lora, or none")
        return "loras"
    if model is not None:
        if sweep or alphas:
            raise OptionsError("a model and a sweep were both given", fix="pass --model, or --base with --alpha")
        return "model"
    if not sweep or not alphas:
        raise OptionsError("nothing to evaluate", fix="pass a model, or --base with --delta|--reasoner and "
                                                     "--alpha, or checkpoint folders")
    if source.base is None:
        raise OptionsError("an α sweep needs the base model", where="--base", fix="pass --base")
    if options.apply == "lora":
        if source.delta is None or source.more or operators or options.include or options.exclude \
                or options.prompt_budgets:
            raise OptionsError("--apply lora serves one LoRA valve (a PEFT adapter or a factored delta) per α",
                               where="--apply lora", fix="pass --delta VALVE (no --reasoner, --include/--exclude, "
                                                        "operators or --prompt-budget), or use --apply swap")
        return "lora-sweep"
    return "sweep"


def _lora_rank(path) -> int:
    """The largest rank vLLM will serve for the adapter at `path`, once its config agrees with its tensors
    (`check_adapter`, before the engine starts: vLLM would trust the config's r and scale by it)."""
    if not is_adapter(path):
        raise OptionsError("not a PEFT LoRA adapter folder (no adapter_config.json)", where=str(path),
                           fix="save the adapter with peft's save_pretrained")
    c = check_adapter(path)
    return max([c["r"], *(c.get("rank_pattern") or {}).values()])


def _same_model(a, b) -> bool:
    """Same config.json (dtype and name aside) and tokenizer/chat-template files: swap in place."""
    pa, pb = Checkpoint.open(a), Checkpoint.open(b)
    fa, fb = pa.side_files(), pb.side_files()
    ca, cb = pa.config(), pb.config()
    for c in (ca, cb):
        for k in ("torch_dtype", "dtype", "_name_or_path", "transformers_version"):
            c.pop(k, None)
    keep = [k for k in set(fa) | set(fb) if k.startswith(("tokenizer", "special_tokens", "chat_template", "vocab",
                                                             "merges", "added_tokens"))]
    return ca == cb and all(fa.get(k) == fb.get(k) for k in keep)


def _alpha_of(path) -> float | None:
    f = Path(path) / SETTINGS_FILE
    try:
        return float(json.loads(f.read_text())["settings"]["alpha"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


__all__ = ["evaluate", "finished_runs"]
