"""Multi-worker training for real: two worker processes on 127.0.0.1 with TF_CONFIG, and the
TF_CONFIG mistakes that are refused before TensorFlow waits on a cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from edgeclf.errors import InvalidInputError
from edgeclf.serve.server import free_loopback_ports
from edgeclf.train.strategy import check_tf_config


@pytest.mark.parametrize("config,match", [
    ("{not json", "TF_CONFIG is not valid JSON"),
    ('{"task": {"type": "worker", "index": 0}}', "needs a cluster of role -> list of host:port"),
    ('{"cluster": {"worker": ["127.0.0.1:2000"]}, "task": {"type": "worker", "index": 1}}',
     "task must name a role and an index in its cluster"),
    ('{"cluster": {"worker": ["127.0.0.1:2000"]}, "task": {"type": "chief", "index": 0}}',
     "task must name a role and an index in its cluster"),
    ('{"cluster": {"chief": ["h:2000"], "worker": ["h:2000", "h:2001"]}, "task": {"type": "worker", "index": 0}}',
     "lists h:2000 more than once"),
])
def test_a_bad_tf_config_is_refused_with_what_is_wrong(config, match):
    with pytest.raises(InvalidInputError, match=match):
        check_tf_config(config)


def test_a_bad_tf_config_is_one_line_from_the_cli(tmp_path):
    from tests.conftest import run_cli

    config = '{"cluster": {"worker": ["127.0.0.1:2000", "127.0.0.1:2000"]}, "task": {"type": "worker", "index": 0}}'
    run = run_cli("train", "digits", "--out", str(tmp_path / "o"), "--strategy", "multiworker",
                  env={"TF_CONFIG": config})
    assert run.returncode == 1 and run.stderr.strip().splitlines()[-1].startswith("error: TF_CONFIG lists")
    assert "Traceback" not in run.stderr


@pytest.mark.slow  # two training processes
def test_two_worker_processes_train_together_and_only_the_chief_writes(noncontiguous_dir, tmp_path):
    ports = free_loopback_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    workers = []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
        workers.append(subprocess.Popen(
            [sys.executable, "-m", "edgeclf", "train", str(noncontiguous_dir), "--out", str(tmp_path / f"out{index}"),
             "--strategy", "multiworker", "--backbone", "mobilenet_v3_small", "--image-size", "32",
             "--weights", "none", "--epochs-frozen", "1", "--epochs-finetune", "1"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for worker in workers:
        try:
            results.append(worker.communicate(timeout=600))
        finally:
            worker.kill()
    for index, (worker, (_, err)) in enumerate(zip(workers, results, strict=True)):
        assert worker.returncode == 0, f"worker {index}: {err[-3000:]}"
    digests = [[line for line in err.splitlines() if "final weights sha256" in line] for _, err in results]
    assert len(digests[0]) == 1 and digests[0] == digests[1]  # synchronous: the same weights on both
    chief = json.loads(results[0][0].strip().splitlines()[-1])
    assert chief["bundle"] == str(tmp_path / "out0") and json.loads(results[1][0].strip().splitlines()[-1]) == {
        "bundle": None, "chief": False}
    assert not (tmp_path / "out1").exists()  # worker 1 wrote nothing
    meta = json.loads((tmp_path / "out0" / "bundle.json").read_text())
    assert meta["training"]["replicas"] == 2
    assert digests[0][0].endswith(meta["model"]["weights_sha256"])


def test_an_unreachable_peer_is_one_line_from_the_cli_after_the_peer_timeout(tmp_path):
    from tests.conftest import run_cli

    own, peer = (f"127.0.0.1:{port}" for port in free_loopback_ports(2))
    config = json.dumps({"cluster": {"worker": [own, peer]}, "task": {"type": "worker", "index": 0}})
    run = run_cli("train", "digits", "--out", str(tmp_path / "o"), "--strategy", "multiworker", "--image-size", "32",
                  "--backbone", "mobilenet_v3_small", "--weights", "none", "--peer-timeout", "2",
                  env={"TF_CONFIG": config})
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 1 and last.startswith(f"error: multi-worker training could not reach {peer} within 2 s")
    assert "Traceback" not in run.stderr and not (tmp_path / "o").exists()
