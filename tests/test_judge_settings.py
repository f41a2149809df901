"""The judge's path rule (models.pretrained.resolve, run before anything is written): a local
judge is a causal LM directory or a `.gguf` file; a missing local path is refused in one line
naming the key, never taken for a hub id."""

from __future__ import annotations

import pytest

from conftest import bad_run

SAMPLE = ("mode=sample_eval", "algo.T=2", "eval.checkpoint_path=/nonexistent.ckpt")


@pytest.mark.parametrize(
    "judge,why",
    [("/no/such/judge", "no such directory"), ("./no/such/model.gguf", "no such GGUF file")],
)
def test_a_missing_local_judge_is_refused(tmp_path, data_cache, judge, why):
    message = bad_run(tmp_path, *SAMPLE, f"eval.gen_ppl_eval_model_name_or_path={judge}")
    assert message.startswith(f"eval.gen_ppl_eval_model_name_or_path={judge}: {why}"), message


def test_an_existing_gguf_file_passes_the_path_rule(tmp_path, data_cache):
    """A .gguf file is taken (the loader reads it when judging); the run then fails on the
    next missing input, the checkpoint."""
    gguf = tmp_path / "judge.gguf"
    gguf.write_bytes(b"GGUF")
    message = bad_run(tmp_path, *SAMPLE, f"eval.gen_ppl_eval_model_name_or_path={gguf}")
    assert message.startswith("eval.checkpoint_path=/nonexistent.ckpt"), message
