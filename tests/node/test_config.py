"""`config`: agent.yaml loaded strictly (unknown keys with a hint, types, minimums, enums, YAML errors with
their line), defaults without a file, and the environment overriding the file."""

from __future__ import annotations

import textwrap

import pytest

from ckpt_agent.errors import EXIT_CONFIG, ConfigError
from ckpt_agent.node import config
from ckpt_agent.node.config import AgentConfig, load_agent_config, require_store

ENV = ("CKPT_CONFIG", "CKPT_STORE", "CKPT_RUNTIME_DIR", "AWS_EC2_METADATA_SERVICE_ENDPOINT")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", str(tmp_path / "no-such-agent.yaml"))


def write(tmp_path, text: str):
    path = tmp_path / "agent.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def load_error(tmp_path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_agent_config(path)
    assert exc.value.exit_code == EXIT_CONFIG
    message = str(exc.value)
    assert message.startswith(path), message
    return message


def test_defaults_without_a_file():
    cfg = load_agent_config()
    assert cfg.source == "<defaults>"
    assert cfg.store == ""
    assert cfg.runtime_dir == "/run/ckpt-agent"
    assert cfg.checkpoint.interval == 900
    assert cfg.checkpoint.keep == 2
    assert cfg.checkpoint.compression == "zstd"
    assert cfg.checkpoint.ghost_limit == "1G"
    assert cfg.checkpoint.tcp_close is True
    assert cfg.agent.imds_endpoint == "http://169.254.169.254"
    assert cfg.socket_path == "/run/ckpt-agent/agent.sock"


def test_missing_default_file_is_an_error_when_required():
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_agent_config(required=True)


@pytest.mark.parametrize("how", ["argument", "env"])
def test_explicit_missing_file_is_a_config_error(tmp_path, monkeypatch, how):
    missing = str(tmp_path / "nope.yaml")
    if how == "env":
        monkeypatch.setenv("CKPT_CONFIG", missing)
    with pytest.raises(ConfigError) as exc:
        load_agent_config(missing if how == "argument" else None)
    assert exc.value.exit_code == 78
    assert str(exc.value) == f"{missing}: configuration file not found"


def test_full_file_is_loaded(tmp_path):
    path = write(tmp_path, """\
        store: /fsx/ckpt
        runtime_dir: /run/x
        queue: sim
        checkpoint:
          interval: 600
          keep: 3
          compression: none
          extra_paths: [/scratch]
          tcp_close: false
        agent:
          poll_interval: 0.5
          rebalance_action: drain
          socket: /run/x/a.sock
        gc:
          high_watermark: 90
        """)
    cfg = load_agent_config(path)
    assert cfg.source == path
    assert (cfg.store, cfg.runtime_dir, cfg.queue) == ("/fsx/ckpt", "/run/x", "sim")
    assert (cfg.checkpoint.interval, cfg.checkpoint.keep, cfg.checkpoint.compression) == (600, 3, "none")
    assert cfg.checkpoint.extra_paths == ["/scratch"]
    assert cfg.checkpoint.tcp_close is False
    assert cfg.agent.poll_interval == 0.5 and cfg.agent.rebalance_action == "drain"
    assert cfg.socket_path == "/run/x/a.sock"
    assert cfg.gc.high_watermark == 90.0 and isinstance(cfg.gc.high_watermark, float)


def test_empty_file_means_defaults(tmp_path):
    cfg = load_agent_config(write(tmp_path, ""))
    assert cfg.checkpoint.interval == 900
    assert cfg.source.endswith("agent.yaml")


def test_malformed_yaml_names_file_and_line(tmp_path):
    message = load_error(tmp_path, """\
        store: /fsx
        checkpoint:
          interval: 600
         keep: [1
        """)
    path = str(tmp_path / "agent.yaml")
    assert message.startswith(f"{path}:4: malformed YAML") or message.startswith(f"{path}:5: malformed YAML"), message


@pytest.mark.parametrize(
    "text, where, hint",
    [
        pytest.param("stor: /fsx\n", "stor", "store", id="top-level"),
        pytest.param("checkpoint:\n  intervall: 60\n", "checkpoint.intervall", "interval", id="nested"),
        pytest.param("agent:\n  rebalance: drain\n", "agent.rebalance", "rebalance_action", id="prefix"),
    ],
)
def test_unknown_key_with_did_you_mean(tmp_path, text, where, hint):
    message = load_error(tmp_path, text)
    assert f": {where}: unknown key (did you mean '{hint}'?)" in message


def test_unknown_key_without_a_close_match_has_no_hint(tmp_path):
    message = load_error(tmp_path, "zzzzzz: 1\n")
    assert ": zzzzzz: unknown key (known keys: store, runtime_dir," in message and "did you mean" not in message


def test_source_is_not_a_settable_key(tmp_path):
    assert "source: unknown key" in load_error(tmp_path, "source: /etc/x\n")


@pytest.mark.parametrize(
    "text, expected",
    [
        pytest.param("checkpoint:\n  interval: soon\n",
                     "checkpoint.interval: must be a duration (seconds, or like 15m, 1h, 14d), got a string ('soon')",
                     id="string-for-number"),
        pytest.param("checkpoint:\n  interval: 60.5\n",
                     "checkpoint.interval: must be a duration (seconds, or like 15m, 1h, 14d), got float 60.5",
                     id="float-for-int"),
        pytest.param("checkpoint:\n  keep: true\n",
                     "checkpoint.keep: must be a whole number, got a boolean (true)", id="bool-for-int"),
        pytest.param("checkpoint:\n  tcp_close: 'yes'\n",
                     "checkpoint.tcp_close: must be true or false, got a string ('yes')",
                     id="string-for-bool"),
        pytest.param("store: 5\n", "store: must be a string, got int 5", id="int-for-string"),
        pytest.param("checkpoint:\n  extra_paths: /scratch\n",
                     "checkpoint.extra_paths: must be a list, got a string ('/scratch')",
                     id="string-for-list"),
        pytest.param("checkpoint:\n  extra_paths: [1]\n", "checkpoint.extra_paths[0]: must be a string, got int 1",
                     id="list-of-ints"),
        pytest.param("checkpoint: 5\n", "checkpoint: must be a mapping, got int", id="scalar-for-section"),
        pytest.param("prices: [1]\n", "prices: must be a mapping", id="list-for-mapping"),
        pytest.param("- a\n- b\n", "(top level): must be a mapping, got a list", id="top-level-list"),
    ],
)
def test_wrong_types_name_the_key(tmp_path, text, expected):
    assert expected in load_error(tmp_path, text)


@pytest.mark.parametrize(
    "text, expected",
    [
        pytest.param("checkpoint:\n  interval: 5\n", "checkpoint.interval: must be >= 10 s, got 5", id="interval"),
        pytest.param("checkpoint:\n  keep: 0\n", "checkpoint.keep: must be >= 1, got 0", id="keep"),
        pytest.param("agent:\n  poll_interval: 0.01\n", "agent.poll_interval: must be >= 0.1 s, got 0.01", id="poll"),
        pytest.param("agent:\n  max_parallel: 0\n", "agent.max_parallel: must be >= 1, got 0", id="parallel"),
        pytest.param("gc:\n  grace: -1\n", "gc.grace: must be >= 0 s, got -1", id="grace"),
    ],
)
def test_minimums(tmp_path, text, expected):
    assert expected in load_error(tmp_path, text)


def test_minimum_itself_is_accepted(tmp_path):
    cfg = load_agent_config(write(tmp_path, "checkpoint:\n  interval: 10\n  keep: 1\n"))
    assert (cfg.checkpoint.interval, cfg.checkpoint.keep) == (10, 1)


@pytest.mark.parametrize(
    "text, expected",
    [
        pytest.param("checkpoint:\n  compression: lz4\n",
                     "checkpoint.compression: must be one of zstd, none, got 'lz4'", id="compression"),
        pytest.param("checkpoint:\n  chunk_digest: md5\n",
                     "checkpoint.chunk_digest: must be one of blake3, sha256, got 'md5'", id="chunk_digest"),
        pytest.param("agent:\n  rebalance_action: reboot\n",
                     "agent.rebalance_action: must be one of checkpoint, drain, ignore, got 'reboot'", id="rebalance"),
    ],
)
def test_enum_values(tmp_path, text, expected):
    assert expected in load_error(tmp_path, text)


def test_environment_overrides_the_file(tmp_path, monkeypatch):
    path = write(tmp_path, "store: /from/file\nruntime_dir: /from/file/run\nagent:\n  imds_endpoint: http://file\n")
    monkeypatch.setenv("CKPT_CONFIG", path)
    monkeypatch.setenv("CKPT_STORE", "/from/env")
    monkeypatch.setenv("CKPT_RUNTIME_DIR", "/env/run")
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:1338")
    cfg = load_agent_config()
    assert cfg.source == path
    assert cfg.store == "/from/env"
    assert cfg.runtime_dir == "/env/run"
    assert cfg.socket_path == "/env/run/agent.sock"
    assert cfg.agent.imds_endpoint == "http://127.0.0.1:1338"


def test_empty_environment_values_do_not_override(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPT_STORE", "")
    cfg = load_agent_config(write(tmp_path, "store: /from/file\n"))
    assert cfg.store == "/from/file"


def test_require_store_prefers_the_flag_then_config():
    cfg = AgentConfig(store="/from/config")
    assert require_store(cfg, "/from/flag") == "/from/flag"
    assert require_store(cfg, None) == "/from/config"


def test_require_store_message_says_how_to_set_one(tmp_path):
    cfg = load_agent_config(write(tmp_path, "queue: sim\n"))
    with pytest.raises(ConfigError) as exc:
        require_store(cfg, None)
    message = str(exc.value)
    assert exc.value.exit_code == EXIT_CONFIG
    assert "no checkpoint store configured" in message
    assert "--store" in message and "$CKPT_STORE" in message and str(tmp_path / "agent.yaml") in message


def test_every_problem_is_reported_together(tmp_path):
    message = load_error(tmp_path, "stor: /fsx\ncheckpoint:\n  interval: 5\n  compression: lz4\n")
    assert "stor" in message and "checkpoint.interval" in message and "checkpoint.compression" in message
    assert "agent.yaml:1: stor: unknown key (did you mean 'store'?)" in message
    assert "agent.yaml:3: checkpoint.interval: must be >= 10" in message
    assert "agent.yaml:4: checkpoint.compression: must be one of zstd, none" in message


def test_rules_shared_with_the_site_file_apply_to_agent_yaml(tmp_path):
    message = load_error(tmp_path, "checkpoint:\n  extra_paths: [rel/dir]\ngc:\n  high_watermark: 70\n"
                                   "  low_watermark: 80\n")
    assert "agent.yaml:2: checkpoint.extra_paths[0]: must be a normalized absolute path, got 'rel/dir'" in message
    assert "agent.yaml:5: gc.low_watermark: must be below high_watermark (70), got 80" in message


def test_a_misspelt_choice_gets_a_hint(tmp_path):
    assert ("agent.rebalance_action: must be one of checkpoint, drain, ignore, got 'drian' (did you mean 'drain'?)"
            in load_error(tmp_path, "agent:\n  rebalance_action: drian\n"))


def test_durations_are_accepted_as_in_the_site_file(tmp_path):
    cfg = load_agent_config(write(tmp_path, "checkpoint:\n  interval: 15m\ngc:\n  max_age: 14d\n"))
    assert (cfg.checkpoint.interval, cfg.gc.max_age) == (900, 14 * 86400)


def test_the_limits_are_the_site_files():
    """One definition (node/fields.py): agent.yaml and the site file check the shared settings with one spec."""
    from ckpt_agent.node import config
    from ckpt_agent.site import schema

    pairs = [(schema.CHECKPOINT, config.CHECKPOINT, k) for k in ("interval", "keep", "compression", "extra_paths",
                                                                 "staging_dir", "ghost_limit")]
    pairs += [(schema.CHECKPOINT, config.AGENT, k) for k in ("poll_interval", "deadline_margin", "rebalance_action")]
    cleanup = schema.SITE.fields["cleanup"].spec
    pairs += [(cleanup, config.GC, k) for k in ("grace", "max_age", "high_watermark", "low_watermark")]
    pairs += [(schema.MONITORING, config.MONITORING, k) for k in ("namespace", "sns_topic_arn", "event_bus",
                                                                  "dedupe_window")]
    for site_map, node_map, key in pairs:
        assert site_map.fields[key].spec is node_map.fields[key].spec, key
