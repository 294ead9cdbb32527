"""Corpora -> GPT-2 token shards -> batches (gpt_fn.data.preparation holds it all for now)."""

from gpt_fn.data.preparation import *  # noqa: F403
