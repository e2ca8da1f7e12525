"""A gated hub repo (Llama-3.1) gets one sentence saying what to do: accept the licence, then `hf auth login`
(loki.models). The loader is monkeypatched to raise what huggingface_hub and transformers raise; no network."""

from __future__ import annotations

import pytest
from huggingface_hub.errors import GatedRepoError

import loki.models as models
from loki.errors import LokiError

NAME = "meta-llama/Llama-3.1-8B-Instruct"


def _gated_error() -> GatedRepoError:
    # GatedRepoError wants an HTTP response; the message is all the loader reads, so none is built.
    err = GatedRepoError.__new__(GatedRepoError)
    Exception.__init__(err, f"403 Client Error. Cannot access gated repo for url https://huggingface.co/{NAME}/resolve/main/config.json.")
    return err


def _raise_as_transformers_does(*args, **kwargs):
    # transformers.utils.hub.cached_files re-raises a GatedRepoError as an OSError "from" it
    try:
        raise _gated_error()
    except GatedRepoError as err:
        raise OSError(f"You are trying to access a gated repo.\nMake sure to have access to it at https://huggingface.co/{NAME}.") from err


def _raise_bare(*args, **kwargs):
    raise _gated_error()


@pytest.mark.parametrize("raiser", [_raise_as_transformers_does, _raise_bare], ids=["wrapped", "bare"])
def test_a_gated_repo_says_accept_the_licence_then_log_in(monkeypatch, raiser):
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", raiser)
    with pytest.raises(LokiError) as caught:
        models.load_model_and_tokenizer({"source": "pretrained", "pretrained": NAME, "dtype": "bfloat16"})
    message = str(caught.value)
    assert f"https://huggingface.co/{NAME}" in message and "licence" in message and "`hf auth login`" in message
    assert "no hub access" not in message and "\n" not in message and message.endswith(".")


def test_an_unreachable_repo_keeps_the_offline_sentence(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in the cached files.")

    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(LokiError, match="no hub access and no local copy") as caught:
        models.load_model_and_tokenizer({"source": "pretrained", "pretrained": NAME, "dtype": "float32"})
    assert "hf auth login" not in str(caught.value)
