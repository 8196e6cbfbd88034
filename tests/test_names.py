"""One name per thing: `--registry`/`--token` (then LORADOCK_REGISTRY/LORADOCK_TOKEN, then the
stored login) for the registry on every command, the HF_* variables kept for the Hub they are about,
`--base-url`/`--api-key` for an OpenAI-compatible endpoint, underscore spellings, the old names
still accepted with a warning, and `serve --vllm.KEY VALUE`."""

import yaml

import pytest

from tests.conftest import adapter_folder


@pytest.fixture
def config_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LORADOCK_CONFIG_DIR", str(tmp_path / "config"))
    for name in ("HF_ENDPOINT", "HF_TOKEN", "LORADOCK_REGISTRY", "LORADOCK_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "config"


def test_the_registry_url_comes_from_the_flag_then_loradock_registry_then_hf_endpoint(config_dir, monkeypatch):
    from hub.client import DEFAULT_ENDPOINT, endpoint_url

    assert endpoint_url() == DEFAULT_ENDPOINT
    monkeypatch.setenv("HF_ENDPOINT", "http://hf.example:1/")
    assert endpoint_url() == "http://hf.example:1"
    monkeypatch.setenv("LORADOCK_REGISTRY", "http://ours.example:2/")
    assert endpoint_url() == "http://ours.example:2"
    assert endpoint_url("http://flag.example:3") == "http://flag.example:3"


def test_hf_token_goes_only_to_the_hub_the_hf_variables_are_about(config_dir, monkeypatch):
    from hub.client import save_token, token_for

    ours, company = "http://127.0.0.1:8090", "https://hub.company.example"
    monkeypatch.setenv("HF_TOKEN", "hf_users_own")
    assert token_for(ours) is None  # a Hugging Face user's token never reaches loradock's registry
    assert token_for("https://huggingface.co") == "hf_users_own"
    monkeypatch.setenv("HF_ENDPOINT", company)
    assert token_for(company) == "hf_users_own"  # the Hub HF_ENDPOINT names is the one HF_TOKEN is for
    assert token_for(ours) is None
    save_token(company, "stored-for-company")
    assert token_for(company) == "stored-for-company"  # `loradock hub login` wins over HF_TOKEN
    monkeypatch.setenv("LORADOCK_TOKEN", "ours-from-env")
    assert token_for(ours) == token_for(company) == "ours-from-env"
    assert token_for(ours, "from-the-flag") == "from-the-flag"


def test_a_stored_login_is_used_with_hf_token_set_and_the_bad_token_is_never_sent(run_cli, registry, config_dir,
                                                                                   monkeypatch, tmp_path):
    """With HF_TOKEN set (as every Hugging Face user has it), push reaches loradock's registry with
    the token `hub login` stored for it, not with HF_TOKEN."""
    monkeypatch.setenv("HF_TOKEN", "hf_not_for_this_registry")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    login = run_cli("hub", "login", "--registry", registry.url, "--token", registry.write_token)
    assert login.code == 0, login.text
    folder = adapter_folder(tmp_path / "adapter")
    pushed = run_cli("push", folder, "alice/names-stored-login", "--registry", registry.url)
    assert pushed.code == 0, pushed.text
    assert "hf_not_for_this_registry" not in (registry.root.parent / "server.log").read_text()
    listed = run_cli("list", "--registry", registry.url, "--search", "names-stored-login")
    assert listed.code == 0 and "alice/names-stored-login" in listed.out, listed.text


def test_loradock_registry_and_token_reach_the_registry_without_flags(run_cli, registry, config_dir, monkeypatch,
                                                                     tmp_path):
    monkeypatch.setenv("LORADOCK_REGISTRY", registry.url)
    monkeypatch.setenv("LORADOCK_TOKEN", registry.write_token)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    pushed = run_cli("push", adapter_folder(tmp_path / "adapter"), "alice/names-from-env", "--tag", "v1")
    assert pushed.code == 0, pushed.text
    pulled = run_cli("pull", "alice/names-from-env@v1", "--to", tmp_path / "pulled")
    assert pulled.code == 0, pulled.text
    assert (tmp_path / "pulled" / "adapter_model.safetensors").exists()


def test_the_old_endpoint_flag_still_works_for_one_release_and_says_so(run_cli, registry, config_dir, monkeypatch,
                                                                      tmp_path):
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    pushed = run_cli("push", adapter_folder(tmp_path / "adapter"), "alice/names-old-flag", "--endpoint", registry.url,
                     "--token", registry.write_token)
    assert pushed.code == 0, pushed.text
    assert "--endpoint is deprecated" in pushed.err and "use --registry" in pushed.err


@pytest.mark.parametrize("command, args, key, value", [
    (("eval",), ["--data", "h.jsonl", "--model", "a/b", "--endpoint", "http://x/v1"], "base_url", "http://x/v1"),
    (("merge",), ["adapters/a", "--endpoint", "http://registry.example:8090"], "registry", "http://registry.example:8090"),
])
def test_renamed_settings_keep_their_old_flag_with_a_warning(run_cli, command, args, key, value):
    result = run_cli(*command, *args, "--print-config")
    assert result.code == 0, result.text
    assert yaml.safe_load(result.out)[key] == value
    assert "--endpoint is deprecated" in result.err


def test_a_renamed_key_in_a_config_file_is_read_with_a_warning(run_cli, tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text("data: h.jsonl\nendpoint: http://x/v1\nmodel: [a/b]\n")
    result = run_cli("eval", "--config", config, "--print-config")
    assert result.code == 0, result.text
    assert yaml.safe_load(result.out)["base_url"] == "http://x/v1"
    assert "deprecated" in result.err and "'base_url'" in result.err


def test_flags_take_their_underscore_spelling_too(run_cli):
    result = run_cli("serve", "--max_lora_rank", "32", "--max-loras", "2", "--print-config")
    assert result.code == 0, result.text
    printed = yaml.safe_load(result.out)
    assert printed["max_lora_rank"] == 32 and printed["max_loras"] == 2


def test_serve_passes_vllm_engine_arguments_from_the_command_line(run_cli):
    result = run_cli("serve", "--vllm.max_num_seqs", "16", "--vllm.enable-prefix-caching", "false", "--print-config")
    assert result.code == 0, result.text
    vllm = yaml.safe_load(result.out)["vllm"]
    assert vllm["max_num_seqs"] == 16 and vllm["enable_prefix_caching"] is False


def test_serve_refuses_an_unknown_vllm_argument_naming_it(run_cli):
    result = run_cli("serve", "--vllm.max_num_seqz", "16", "--print-config")
    assert result.code == 2
    assert "max_num_seqz" in result.err and "max_num_seqs" in result.err


def test_a_word_that_is_no_flag_is_refused_naming_how_serve_spells_vllm_arguments(run_cli):
    result = run_cli("serve", "--max-num-seqs", "16")
    assert result.code == 2
    assert "--max-num-seqs" in result.err and "--vllm.KEY VALUE" in result.err


def test_serve_honours_vllm_api_key(monkeypatch):
    from serve.config import ServeConfig, serving_key

    monkeypatch.delenv("LORADOCK_API_KEY", raising=False)
    monkeypatch.setenv("VLLM_API_KEY", "from-vllm-variable")
    assert serving_key(ServeConfig()) == "from-vllm-variable"
    monkeypatch.setenv("LORADOCK_API_KEY", "from-loradock-variable")
    assert serving_key(ServeConfig()) == "from-loradock-variable"
    assert serving_key(ServeConfig(api_key="from-the-flag")) == "from-the-flag"


def test_train_records_no_registry_or_token_in_its_recipe(run_cli):
    result = run_cli("train", "--data", "d.jsonl", "--output", "o", "--registry", "http://registry.example:8090",
                     "--token", "secret-token", "--print-config")
    assert result.code == 0, result.text
    assert "secret-token" not in result.out and "registry.example" not in result.out
