"""The one check of generation parameters: the Python API, the CLI commands and
the server (tests/test_serve.py) refuse the same bad values with the same words."""

import math

import pytest

from mlx_vlm_native.params import GenerationParameterError, check_generation_params

BAD = [
    (dict(temperature=float("nan")), "temperature", "finite number >= 0 and <= 2"),
    (dict(temperature=-0.1), "temperature", "finite number >= 0"),
    (dict(temperature=math.inf), "temperature", "finite number"),
    (dict(temperature="hot"), "temperature", "finite number"),
    (dict(top_p=float("nan")), "top_p", "finite number >= 0 and <= 1"),
    (dict(top_p=5), "top_p", "<= 1"),
    (dict(max_tokens=-1), "max_tokens", "integer >= 1"),
    (dict(max_tokens=0), "max_tokens", "integer >= 1"),
    (dict(max_tokens=3.0), "max_tokens", "integer"),
    (dict(max_tokens=True), "max_tokens", "integer"),
    (dict(seed=-1), "seed", "integer >= 0 and <= 18446744073709551615"),
    (dict(seed=2**70), "seed", "<= 18446744073709551615"),
    (dict(seed=1.5), "seed", "integer"),
    (dict(temperature=10**400), "temperature", "finite number"),  # too large for a float
    (dict(repetition_penalty=0.0), "repetition_penalty", "> 0"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty", "> 0"),
    (dict(repetition_context_size=0), "repetition_context_size", "integer >= 1"),
]


@pytest.mark.parametrize("kwargs, param, words", BAD)
def test_bad_values_are_refused_by_name(kwargs, param, words):
    with pytest.raises(GenerationParameterError, match=words) as e:
        check_generation_params(**kwargs)
    assert e.value.param == param and str(e.value).startswith(param)


def test_good_values_pass_unchanged():
    assert check_generation_params(max_tokens=10**30, temperature=2, top_p=0, seed=2**64 - 1,
                                   repetition_penalty=1.3) == dict(
        max_tokens=10**30, temperature=2.0, top_p=0.0, seed=2**64 - 1, repetition_penalty=1.3,
        repetition_context_size=20)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from mlx_vlm_native import load
    from convert.write_hf_release import write_checkpoint

    return load(str(write_checkpoint(tmp_path_factory.mktemp("params_model"), "tiny-56")))


@pytest.mark.parametrize("kwargs, param, words", BAD[:3] + BAD[6:7] + BAD[10:11])
def test_python_api_refuses_before_processing_images(tiny, kwargs, param, words):
    from mlx_vlm_native import batch_generate, chat_generate, generate

    model, processor = tiny
    missing = "/no/such/image.png"  # a bad value is reported before the image is looked at
    with pytest.raises(GenerationParameterError, match=param):
        generate(model, processor, "hi", images=[missing], **kwargs)
    with pytest.raises(GenerationParameterError, match=param):
        chat_generate(model, processor, [{"role": "user", "content": "hi"}], **kwargs)
    with pytest.raises(GenerationParameterError, match=param):
        batch_generate(model, processor, ["hi"], [[missing]], **kwargs)


def test_negative_max_tokens_no_longer_runs_past_the_context(tiny, monkeypatch):
    from mlx_vlm_native import generate

    model, processor = tiny
    with pytest.raises(GenerationParameterError):
        generate(model, processor, "hi", max_tokens=-1)
    # a short context, so that running up to it takes a moment rather than minutes
    monkeypatch.setattr(model.args.text_config, "max_position_embeddings", 96)
    result = generate(model, processor, "hi", max_tokens=10**9)  # bounded by the context instead
    # the random model never says end-of-sequence: it runs to exactly the context's end
    assert result.prompt_tokens + result.generation_tokens == 96 and result.finish_reason == "length"


def test_repetition_penalty_changes_sampling(tiny):
    from mlx_vlm_native import stream_generate

    model, processor = tiny

    def tokens(**kwargs):
        return [r.token for r in stream_generate(model, processor, "hi", max_tokens=24, **kwargs) if r.token is not None]

    plain, penalised = tokens(), tokens(repetition_penalty=50.0, repetition_context_size=64)
    assert penalised != plain and len(set(penalised)) >= len(set(plain))
    assert tokens(repetition_penalty=1.0) == plain  # 1: no penalty


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("flags, words", [
    (["--temperature", "nan"], "temperature must be a finite number"),
    (["--top-p", "5"], "top_p must be a finite number"),
    (["--max-tokens", "-1"], "max_tokens must be an integer >= 1"),
    (["--seed", "-1"], "seed must be an integer >= 0"),
])
def test_cli_refuses_before_loading_the_model(command, flags, words, capsys):
    import importlib

    main = importlib.import_module(f"mlx_vlm_native.{command}").main
    with pytest.raises(SystemExit) as e:  # --model points nowhere: the check comes first
        main(["--model", "/no/such/model"] + flags)
    assert words in str(e.value.code)
