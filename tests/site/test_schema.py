"""The site file schema and `ckpt validate`."""

from __future__ import annotations

import pytest
from ckpt_helpers import DATA as TEST_DATA
from ckpt_helpers import REPO

from ckpt_agent import cli
from ckpt_agent.errors import EXIT_CONFIG, EXIT_USAGE, ConfigError
from ckpt_agent.site.schema import SiteInvalid, check_site_text, load_site

DATA = TEST_DATA / "site"
EXAMPLE = REPO / "cluster-configs" / "site.example.yaml"

MINIMAL = (DATA / "minimal.yaml").read_text()


def problems_of(text):
    return [f"{p.line}: {p.path}: {p.message}" for p in check_site_text(text, "s.yaml")[1]]


def test_example_is_valid_and_defaults_fill_in():
    site = load_site(str(EXAMPLE))
    names = [q["name"] for q in site["queues"]]
    assert names == ["sim-spot", "sim-spot-xl", "ondemand"]
    xl = site["queues"][1]
    assert xl["allocation_strategy"] == "price-capacity-optimized"  # the Spot default
    assert xl["checkpoint"]["interval"] == 600 and xl["checkpoint"]["keep"] == 3
    assert site["queues"][2]["checkpoint"]["enabled"] is False
    assert site["cleanup"]["max_age"] == 14 * 86400 and site["cleanup"]["grace"] == 3600


def test_minimal_site_gets_every_default():
    site = load_site(str(DATA / "minimal.yaml"))
    queue = site["queues"][0]
    assert queue["allocation_strategy"] == "price-capacity-optimized"
    assert queue["min_count"] == 0 and queue["max_count"] == 10
    assert queue["checkpoint"]["interval"] == 900 and queue["checkpoint"]["enabled"] is True
    assert site["bundle"]["prefix"] == "ckpt-agent"
    assert site["storage"]["mount_dir"] == "/fsx" and site["storage"]["new"] is None
    assert site["cleanup"]["schedule"] == "*/15 * * * *"


def test_validate_lists_every_problem_exactly(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    rc = cli.main(["validate", "tests/data/site/invalid.yaml"])
    out, err = capsys.readouterr()
    assert rc == EXIT_USAGE
    assert out == (DATA / "invalid.expected").read_text()
    assert "Traceback" not in err


def test_validate_valid_file_exits_zero(capsys):
    assert cli.main(["validate", str(EXAMPLE)]) == 0
    assert "valid: cluster eda-spot, 3 queues (2 on Spot)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("cluster: [\n", "bad.yaml:2: malformed YAML"),
        ("a: 1\na: 2\n", "bad.yaml:2: a: duplicate key"),
    ],
    ids=["malformed", "duplicate-key"],
)
def test_unparsable_files_are_problems_validate_lists(tmp_path, capsys, text, fragment):
    """`ckpt validate` exits 2 for every problem in the site file, YAML syntax included (render and upload, which
    cannot go on, call the same file a configuration error: 78)."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert cli.main(["validate", str(path)]) == EXIT_USAGE
    out = capsys.readouterr().out
    assert fragment in out and "Traceback" not in out and len(out.strip().splitlines()) == 1
    assert cli.main(["render", str(path), "--out", str(tmp_path / "out")]) == EXIT_CONFIG
    assert fragment in capsys.readouterr().err


def test_missing_file(tmp_path, capsys):
    assert cli.main(["validate", str(tmp_path / "nope.yaml")]) == EXIT_USAGE
    assert "site file not found" in capsys.readouterr().out


def test_load_site_raises_with_all_problems(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(MINIMAL.replace("capacity: spot", "capacity: spto").replace("name: tiny", "name: 9"))
    with pytest.raises(SiteInvalid) as e:
        load_site(str(path))
    assert len(e.value.problems) == 2
    assert e.value.exit_code == EXIT_USAGE


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ("existing_file_system_id: fs-0123456789abcdef0",
         "new: {deployment_type: SCRATCH_1, storage_capacity_gib: 4800}",
         "10: storage.new.storage_capacity_gib: SCRATCH_1 needs 1200, 2400 or a multiple of 3600 GiB, got 4800"),
        ("existing_file_system_id: fs-0123456789abcdef0",
         "new: {deployment_type: PERSISTENT_2, storage_capacity_gib: 4800}",
         "10: storage.new: PERSISTENT_2 needs throughput_mb_s_per_tib (one of 125, 250, 500, 1000)"),
        ("existing_file_system_id: fs-0123456789abcdef0",
         "new: {deployment_type: PERSISTENT_1, storage_capacity_gib: 2400, throughput_mb_s_per_tib: 125}",
         "10: storage.new.throughput_mb_s_per_tib: PERSISTENT_1 allows 50, 100, 200 MB/s/TiB, got 125"),
        ("existing_file_system_id: fs-0123456789abcdef0", "existing_file_system_id: fs-123",
         "10: storage.existing_file_system_id: must be an FSx id like fs-0123456789abcdef0, got 'fs-123'"),
        ("  - name: spot", "  - name: spot-queue-with-a-much-too-long-name",
         "14: queues[0].name: must be at most 25 characters, got 36"),
        ("  - name: spot", "  - name: head", "14: queues[0].name: 'head' names the head node's files in the bundle; "
                                               "choose another name"),
        ("criu:\n  preinstalled: true", "criu:\n  version: 4.3.0\n  source: ./criu.tar.xz",
         "12: criu: sha256 is required when version is not 4.2.1 (install-criu.sh verifies it)"),
        ("key_name: admin", "key_name: admin\n  tags: {'parallelcluster:x': y}",
         "7: cluster.tags.parallelcluster:x: the 'parallelcluster:' tag prefix is reserved by ParallelCluster"),
        ("queues:", "cleanup: {schedule: '*/15 * * *'}\nqueues:",
         "13: cleanup.schedule: must be a 5-field cron schedule like '*/15 * * * *', got '*/15 * * *'"),
        ("queues:", "cleanup: {schedule: '* * * * * ; rm'}\nqueues:",
         "13: cleanup.schedule: must be a 5-field cron schedule like '*/15 * * * *', got '* * * * * ; rm'"),
        ("queues:", "slurm: {settings: {epilog: /x}}\nqueues:",
         "13: slurm.settings.epilog: ParallelCluster does not allow this setting in CustomSlurmSettings"),
        ("queues:", "storage2: {}\nqueues:", "13: storage2: unknown key (did you mean 'storage'?)"),
    ],
    ids=["scratch1-steps", "persistent-needs-throughput", "persistent1-throughput", "fsx-id", "queue-name-length",
         "queue-named-head", "criu-sha", "reserved-tag", "cron-fields", "cron-injection", "deny-listed-slurm",
         "unknown-top-key"],
)
def test_rules(old, new, expected):
    text = MINIMAL.replace(old, new, 1)
    assert text != MINIMAL
    assert problems_of(text) == [expected]


@pytest.mark.parametrize("setting, expected", [
    ("stream: fast", "queues[0].checkpoint.stream: must be one of auto, always, off, got 'fast'"),
    ("chunk_digest: sha1", "queues[0].checkpoint.chunk_digest: must be one of blake3, sha256, got 'sha1' (did you "
                           "mean 'sha256'?)"),
    ("dirty_tracking: sometimes", "queues[0].checkpoint.dirty_tracking: must be true or false, got a string "
                                  "('sometimes')"),
    ("recent_periodic: -5", "queues[0].checkpoint.recent_periodic: must be >= 0 s, got -5"),
    ("recent_periodic: soon", "queues[0].checkpoint.recent_periodic: must be a duration (seconds, or like 15m, 1h, "
                              "14d), got a string ('soon')"),
])
def test_stream_and_recent_periodic_are_checked(setting, expected):
    text = MINIMAL + f"    checkpoint: {{{setting}}}\n"
    problems = problems_of(text)
    assert len(problems) == 1 and problems[0].split(": ", 1)[1] == expected, problems


def test_ondemand_cannot_drain_on_rebalance():
    text = MINIMAL.replace("capacity: spot", "capacity: ondemand") + "    checkpoint: {rebalance_action: drain}\n"
    assert problems_of(text) == [
        "17: queues[0].checkpoint.rebalance_action: On-Demand nodes get no rebalance recommendations"
    ]


def test_read_errors_are_config_errors(tmp_path):
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="UTF-16"):  # \xff\xfe: a UTF-16 byte order mark
        load_site(str(path))


def test_one_compute_resource_per_instance_family_stays_within_parallelclusters_limit():
    types = ", ".join(f"r{i}x.large" for i in range(51))  # 51 instance families: 51 compute resources
    text = "\n".join(line if not line.strip().startswith("instance_types:") else
                     line.split("instance_types:")[0] + f"instance_types: [{types}]" for line in MINIMAL.splitlines())
    problems = problems_of(text)
    assert any("51 compute resources (one per queue and instance family); ParallelCluster allows at most 50" in p
               for p in problems), problems


def test_issue_12_keys_are_checked():
    prefix = "  prefix: ckpt-agent/eda-spot\n"
    text = EXAMPLE.read_text().replace(prefix, prefix + "  pythons: ['2.7']\n  architectures: [ppc64le]\n")
    text = text.replace("  instance_type: m6i.xlarge", "  instance_type: m6i.xlarge\n  custom_actions:\n"
                        "    on_node_configured: {before: [{script: /local/file.sh}]}\n"
                        "  iam: {additional_policies: [not-an-arn]}")
    found = "\n".join(problems_of(text))
    assert "bundle.pythons[0]: must be one of 3.9, 3.10, 3.11, 3.12, 3.13, got '2.7'" in found, found
    assert "bundle.architectures[0]" in found
    assert "head_node.custom_actions.on_node_configured.before[0].script" in found
    assert "head_node.iam.additional_policies[0]" in found
