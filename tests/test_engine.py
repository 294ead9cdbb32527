"""`gpt_fn.sampling.engine`: the decoding engine's public names (what the decoders and the
benchmarks build on); its steps are tested through the decoders in test_decoding/test_ragged."""

import torch

import gpt_fn.model
from gpt_fn import sampling
from gpt_fn.nn import kv_cache
from gpt_fn.sampling import engine
from gpt_fn.sampling.engine import in_prompt_kind


def test_the_cache_is_one_class_importable_where_it_was_and_from_the_engine():
    assert gpt_fn.model.KVCache is sampling.KVCache is engine.KVCache is kv_cache.KVCache
    assert gpt_fn.model.empty_cache is sampling.empty_cache is engine.empty_cache
    assert all(not name.startswith("_") and hasattr(engine, name) for name in engine.__all__)


def test_results_come_back_in_the_prompts_kind_cut_at_each_rows_length():
    new = torch.tensor([[4, 5, 9], [6, 9, 9]])
    assert in_prompt_kind([[1, 2], [3]], new, [2, 1]) == [[1, 2, 4, 5], [3, 6]]
    prompt = torch.tensor([[1, 2], [0, 3]], dtype=torch.int32)
    out = in_prompt_kind(prompt, new, [2, 1])
    assert out.dtype == torch.long
    assert out.tolist() == [[1, 2, 4, 5], [0, 3, 6, 9]]
    assert in_prompt_kind([[1]], new, [3, 1], repeats=2) == [[1, 4, 5, 9], [1, 6]]
