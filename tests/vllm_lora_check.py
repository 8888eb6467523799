"""Greedy token ids from vLLM (CPU), optionally through LoRA adapters served side by side.

`python vllm_lora_check.py SPEC_JSON`, SPEC = {"model": folder, "prompts": [[ids]], "n": tokens,
"loras": {name: adapter folder}}. Prints one line "RESULT {name: [[ids] per prompt]}", where
name "" is the model without any adapter. Run as a subprocess by tests/test_lowrank.py
(vLLM needs a __main__ guard and its own process).
"""

import json
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    spec = json.loads(sys.argv[1])
    loras = spec.get("loras") or {}
    kw = {"enable_lora": True, "max_lora_rank": spec.get("max_lora_rank", 8), "max_loras": len(loras)} if loras else {}
    llm = LLM(model=spec["model"], enforce_eager=True, dtype="float32", max_model_len=128, seed=0,
              generation_config="vllm", **kw)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]]
    params = SamplingParams(temperature=0.0, max_tokens=spec["n"], ignore_eos=True)
    result = {}
    for i, (name, path) in enumerate([("", None), *loras.items()]):
        req = LoRARequest(name, i, path) if path else None
        outs = llm.generate(prompts, params, lora_request=req)
        result[name] = [list(o.outputs[0].token_ids) for o in outs]
    print("RESULT " + json.dumps(result))
