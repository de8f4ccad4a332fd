"""Bounded by design: hostile numbers, config files, TF_CONFIG peers, signals, feature caches
and checkpoints each end in a typed one-line error (or a recomputed cache), never a hang,
a runaway allocation or a silent acceptance. Every case is generated at test time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from edgeclf import limits
from edgeclf.cli import main
from edgeclf.commands.common import parse_labels
from edgeclf.errors import InvalidInputError
from tests.conftest import HANG_S, run_cli


@pytest.mark.parametrize("kind, value", [
    ("duration", float("nan")), ("duration", float("inf")), ("duration", 1e9), ("duration", 0.0),
    ("warmup", float("nan")), ("warmup", -1.0), ("threads", 0), ("threads", -3), ("threads", 2.0),
    ("learning_rate", float("inf")), ("learning_rate", 0.0), ("epochs", -5), ("epochs", 10**9),
    ("batch", True), ("batch", 0), ("val_split", 1.0),
])
def test_a_number_out_of_its_range_is_named_with_the_range(kind, value):
    with pytest.raises(InvalidInputError) as info:
        limits.check(kind, value, "the option")
    assert f"Received: {value!r}" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("argv, fragment", [
    (["bench", "B", "--duration", "nan"], "--duration"), (["bench", "B", "--duration", "inf"], "--duration"),
    (["bench", "B", "--duration", "1e9"], "<= 3600"), (["bench", "B", "--warmup", "nan"], "--warmup"),
    (["bench", "B", "--threads", "0"], "--threads"), (["bench", "B", "--threads", "-3"], "--threads"),
    (["train", "D", "--labels", "0..99999999"], "at most 10000 labels"),
    (["train", "D", "--lr-frozen", "inf"], "--lr-frozen"), (["train", "D", "--epochs-frozen", "-5"], "--epochs"),
    (["predict", "M", "x.png", "--top-k", "0"], "--top-k"), (["serve", "B", "--max-request-mb", "nan"], "request"),
    (["export", "B", "--int8-min-agreement", "1.5"], "--int8-min-agreement"),
])
def test_numeric_options_are_refused_where_they_are_parsed(capsys, argv, fragment):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)  # the label range is sized, not expanded: test_a_label_range_is_sized_before_it_is_expanded
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and fragment in line and "Received:" in line


def test_a_label_range_is_sized_before_it_is_expanded():
    assert parse_labels("-2,3,10") == [-2, 3, 10] and parse_labels("3..5,9") == [3, 4, 5, 9]
    import tracemalloc

    tracemalloc.start()
    with pytest.raises(Exception, match="at most 10000 labels"):
        parse_labels("0..99999999,5")
    assert tracemalloc.get_traced_memory()[1] < 1 << 20
    tracemalloc.stop()


def test_a_batch_that_cannot_fit_in_memory_is_refused_with_the_estimate(tiny_exported):
    result = run_cli("bench", str(tiny_exported[0].path), "--batch", "65536", "--no-baselines")
    assert result.returncode == 1, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: batch size 65536") and "GiB" in line and "at most about" in line


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "train.toml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("text, fragment", [
    ('epochs-frozen = 5\nepochs_frozen = 6\n', "sets one option twice"),
    ('lr-frozen = inf\n', "'lr-frozen'"), ('lr-frozen = nan\n', "'lr-frozen'"),
    ('labels = "0..99999999"\n', "at most 10000 labels"), ('batch-size = 1000000\n', "'batch-size'"),
    ('image-size = [0, 75]\n', "height"), ('peer-timeout = -1\n', "'peer-timeout'"),
    ("labels = " + "[" * 50_000 + "]" * 50_000 + "\n", "nested too deeply"),
])
def test_config_values_are_checked_like_options(tmp_path, text, fragment):
    from edgeclf.train.options import read_config

    match = "keep one" if "twice" in fragment else "too deeply" if "deeply" in fragment else "Received"
    with pytest.raises(InvalidInputError, match=match) as info:
        read_config(_config(tmp_path, text))
    assert fragment in str(info.value)


@pytest.mark.parametrize("command", [["predict", "{long}/model", "x.png"], ["verify", "{long}"],
                                     ["predict", "{bundle}", "{long}.png"]])
def test_a_path_the_system_refuses_is_one_line(capsys, tmp_path, tiny_exported, command):
    long = str(tmp_path / ("a" * 300))  # ENAMETOOLONG: over the 255 bytes a file name may take
    argv = [part.format(long=long, bundle=tiny_exported[0].path) for part in command]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "Traceback" not in "\n".join(err) and len(err[-1]) < 600


def test_a_config_that_is_not_a_regular_file_is_refused_without_waiting(tmp_path):
    from edgeclf.train.options import read_config

    fifo = tmp_path / "config.fifo"
    os.mkfifo(fifo)
    with pytest.raises(InvalidInputError, match="regular file.*a FIFO"):
        read_config(fifo)  # opening a FIFO for reading would block until a writer comes
    with pytest.raises(InvalidInputError, match="a directory"):
        read_config(tmp_path)


@pytest.mark.parametrize("cluster, fragment", [
    ({"worker": ["localhost:abc"]}, "port in 1..65535"), ({"worker": ["localhost:70000"]}, "port in 1..65535"),
    ({"worker": [":2222"]}, "host:port"),
])
def test_tf_config_addresses_are_checked(cluster, fragment):
    from edgeclf.train.strategy import check_tf_config

    with pytest.raises(InvalidInputError, match=fragment):
        check_tf_config(json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 0}}))


def test_an_unreachable_peer_ends_the_wait_with_its_address():
    from edgeclf.serve.server import free_loopback_ports
    from edgeclf.train.strategy import check_tf_config, wait_for_peers

    own, peer = (f"127.0.0.1:{p}" for p in free_loopback_ports(2))
    config = check_tf_config(json.dumps({"cluster": {"worker": [own, peer]}, "task": {"type": "worker", "index": 0}}))
    started = time.perf_counter()
    with pytest.raises(InvalidInputError, match=f"could not reach {peer} within 1 s"):
        wait_for_peers(config, timeout=1.0, poll=0.2)
    assert time.perf_counter() - started < HANG_S  # a hang check only: the wait ends about 1 s in


def test_peers_that_start_together_find_each_other():
    import threading

    from edgeclf.serve.server import free_loopback_ports
    from edgeclf.train.strategy import wait_for_peers

    hosts = [f"127.0.0.1:{p}" for p in free_loopback_ports(2)]
    errors: list[Exception] = []

    def worker(index: int) -> None:
        try:
            # Each keeps listening until the other has reached it, however late that one runs; the peer timeout
            # only catches a hang.
            wait_for_peers({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}, HANG_S, 0.1)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_S)
    assert not errors and not any(t.is_alive() for t in threads)


def test_a_peer_that_runs_late_still_finds_the_one_that_found_it():
    """A worker that has reached its peer keeps listening until that peer has reached it, however late it runs
    (a peer not scheduled for a while is not left waiting on a listener that closed)."""
    import socket
    import threading

    from edgeclf.serve.server import free_loopback_ports
    from edgeclf.train.strategy import _reachable, wait_for_peers

    hosts = [f"127.0.0.1:{p}" for p in free_loopback_ports(2)]
    errors: list[Exception] = []

    def first() -> None:
        try:
            wait_for_peers({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": 0}}, HANG_S, 0.1)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    port = int(hosts[1].rsplit(":", 1)[1])
    with socket.create_server(("127.0.0.1", port)) as late:  # worker 1: up, but not yet running its own wait
        late.settimeout(HANG_S)
        thread = threading.Thread(target=first, daemon=True)
        thread.start()
        connection, _ = late.accept()
        with connection, connection.makefile("rb") as said:
            assert said.readline() == f"{hosts[0]}\n".encode()  # worker 0 found it, and said who it is
    time.sleep(1.5)  # longer than the 1.2 s an earlier version kept listening after finding its peer
    assert thread.is_alive() and not errors  # still listening for worker 1
    assert _reachable(hosts[0], hosts[1], HANG_S)  # worker 1, late, reaches it
    thread.join(HANG_S)
    assert not thread.is_alive() and not errors


_CHILD = """
import signal, sys, time
if sys.argv[1] == "blocked":  # as a process stuck in C++: it never acts on SIGINT
    signal.signal(signal.SIGINT, signal.SIG_IGN)
try:
    print("ready", flush=True)
    while True:
        time.sleep(0.01)
except KeyboardInterrupt:
    print("stopped cleanly", file=sys.stderr, flush=True)
    sys.exit(130)
"""
_SUPERVISOR = """
import sys
from edgeclf.interrupts import run_supervised
sys.exit(run_supervised([sys.argv[2]], grace_s=float(sys.argv[3]), program=[sys.executable, sys.argv[1]]))
"""
@pytest.mark.parametrize("argv,options", [
    (["python", "-m", "edgeclf", "train", "-X"], []),
    (["python", "-I", "-X", "dev", "-Wdefault", "-m", "edgeclf"], ["-I", "-X", "dev", "-W", "default"]),
    (["python", "-Im", "edgeclf"], ["-I"]),  # a cluster that ends in -m
    (["python", "-bbXutf8", "-c", "pass"], ["-bb", "-X", "utf8"]),
    (["python", "--check-hash-based-pycs", "always", "-O", "script.py", "-I"],
     ["--check-hash-based-pycs", "always", "-O"]),
])
def test_the_supervised_child_gets_the_interpreters_own_options(argv, options):
    from edgeclf.interrupts import interpreter_options

    assert interpreter_options(argv) == options


def test_the_supervised_child_runs_as_this_interpreter_was_started():
    probe = "import sys; from edgeclf.interrupts import interpreter_options; print(interpreter_options())"
    out = subprocess.run([sys.executable, "-X", "utf8", "-W", "error", "-c", probe], capture_output=True,
                         text=True, timeout=HANG_S, check=True).stdout
    assert out.strip() == "['-X', 'utf8', '-W', 'error']"


def _supervise(tmp_path: Path, where: str, grace_s: float) -> subprocess.Popen:
    """The supervisor over a child that is ready (its SIGINT handling set up, the supervisor's handlers too)."""
    (tmp_path / "child.py").write_text(_CHILD)
    (tmp_path / "supervisor.py").write_text(_SUPERVISOR)
    process = subprocess.Popen([sys.executable, str(tmp_path / "supervisor.py"), str(tmp_path / "child.py"), where,
                                str(grace_s)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    return process


# A child that acts on SIGINT gets a grace period it cannot use up however busy the machine (HANG_S), so
# the test sees which way it stopped, not how fast; one that never acts on it is killed after a second
# whatever the load, since waiting longer would not change what it does.
@pytest.mark.parametrize("where, grace_s", [("python", HANG_S), ("blocked", 1.0)])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_stop_training_wherever_it_is(tmp_path, where, grace_s, signum):
    """train runs under a supervisor: a child that acts on SIGINT stops cleanly, one that cannot is
    killed after the grace period, and either way the command ends with status 130 and one line."""
    process = _supervise(tmp_path, where, grace_s)
    process.send_signal(signum)
    _, err = process.communicate(timeout=HANG_S)
    last = err.strip().splitlines()[-1]
    assert process.returncode == 130
    if where == "python":
        assert last == "stopped cleanly"
    else:
        assert last.startswith("error: interrupted (training did not stop within 1 s")


def test_a_second_signal_kills_a_child_that_has_not_stopped(tmp_path):
    """The grace period is long (the supervisor would wait HANG_S); a second signal ends it at once."""
    process = _supervise(tmp_path, "blocked", HANG_S)
    process.send_signal(signal.SIGTERM)
    # Two signals sent back to back can merge into one pending signal: the second follows the first's line.
    assert process.stderr.readline().startswith("[edgeclf] SIGTERM: stopping training")
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=HANG_S)
    assert process.returncode == 130
    assert err.strip().splitlines()[-1].startswith("error: interrupted (a second signal")


def _cache(tmp_path: Path, rows: tuple[int, int] = (28, 7), width: int = 16):
    from edgeclf.train.feature_cache import FeatureCache

    description = {"format": 1, "backbone": "test", "feature_width": width, "train_images": [rows[0], "a"],
                   "val_images": [rows[1], "b"]}
    cache = FeatureCache(tmp_path, description)
    cache.path.mkdir(parents=True)
    (cache.path / "meta.json").write_text(json.dumps({"description": description}))
    for split, n in zip(("train", "val"), rows, strict=True):
        np.save(cache.path / f"{split}.npy", np.ones((n, width), np.float32))
    return cache


@pytest.mark.parametrize("damage, fragment", [
    (lambda p: np.save(p, np.ones((5, 16), np.float32)), "expected float32 (28, 16)"),
    (lambda p: np.save(p, np.ones((28, 15), np.float32)), "expected float32 (28, 16)"),
    (lambda p: np.save(p, np.ones((28, 16), np.float64)), "expected float32 (28, 16)"),
    (lambda p: np.save(p, np.full((28, 16), np.nan, np.float32)), "NaN or infinite"),
    (lambda p: p.write_bytes(p.read_bytes()[:100]), "unreadable"),
    (lambda p: (p.unlink(), os.mkfifo(p)), "not a regular file"),  # np.load would block on it
])
def test_a_damaged_feature_cache_is_a_miss_said_once(tmp_path, capsys, damage, fragment):
    cache = _cache(tmp_path)
    assert cache.load() is not None
    damage(cache.path / "train.npy")
    assert cache.load() is None
    said = capsys.readouterr().err
    assert said.count("is damaged") == 1 and fragment in said and "computing it again" in said


def _checkpoint(tmp_path: Path, state_change=None, arrays=None):
    from edgeclf.train.checkpoint import CHECKPOINT_FORMAT, RunCheckpoint

    checkpoint = RunCheckpoint(tmp_path / "out", {"epochs_frozen": 3, "epochs_finetune": 2})
    checkpoint.dir.mkdir()
    np.savez(checkpoint.dir / "epoch-0-frozen-1.npz", **(arrays or {"model/0": np.ones(3, np.float32)}))
    state = {"format": CHECKPOINT_FORMAT, "fingerprint": checkpoint.fingerprint, "arrays": "epoch-0-frozen-1.npz",
             "finished_phases": [], "current": {"phase": "frozen", "epochs_done": 1, "history": {"loss": [0.5]},
                                                "early_stopping": {}, "stopped": False}}
    if state_change:
        state_change(state)
    (checkpoint.dir / "state.json").write_text(json.dumps(state))
    return checkpoint


@pytest.mark.parametrize("change, arrays, fragment", [
    (lambda s: s.update(arrays="/etc/passwd"), None, "expected a file name"),
    (lambda s: s.update(arrays="../outside.npz"), None, "expected a file name"),
    (lambda s: s["current"].update(epochs_done=10**9), None, "epochs_done is 1000000000"),
    (lambda s: s["current"].update(epochs_done=-5), None, "epochs_done is -5"),
    (lambda s: s["current"].update(phase="other"), None, "current phase"),
    (lambda s: s.update(finished_phases=[{"name": "frozen"}, {"name": "frozen"}]), None, "distinct phases"),
    (None, {"model/0": np.array([1.0, np.nan], np.float32)}, "NaN or infinite"),
])
def test_a_checkpoint_is_checked_before_resume_uses_it(tmp_path, change, arrays, fragment):
    from edgeclf.errors import CheckpointError

    (tmp_path / "outside.npz").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="start over with --overwrite") as info:
        _checkpoint(tmp_path, change, arrays).load()
    assert fragment in str(info.value)


@pytest.mark.parametrize("text, fragment", [("[" * 100_000 + "]" * 100_000, "nested too deeply"),
                                            (" " * (17 << 20), "over the")])
def test_a_state_json_too_deep_or_too_large_is_refused_before_it_is_parsed(tmp_path, text, fragment):
    from edgeclf.errors import CheckpointError

    checkpoint = _checkpoint(tmp_path)
    (checkpoint.dir / "state.json").write_text(text)
    with pytest.raises(CheckpointError, match=fragment):
        checkpoint.load()


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, "[1, 2]", '{"description": 3}'])
def test_a_feature_cache_meta_too_deep_or_not_one_is_a_miss_said_once(tmp_path, capsys, text):
    cache = _cache(tmp_path)
    (cache.path / "meta.json").write_text(text)
    assert cache.load() is None and capsys.readouterr().err.count("is damaged (meta.json") == 1


def test_a_sound_checkpoint_loads(tmp_path):
    state = _checkpoint(tmp_path).load()
    assert state["current"]["epochs_done"] == 1 and state["arrays"]["model/0"].tolist() == [1, 1, 1]


def test_a_diverging_loss_stops_training_with_one_line():
    from edgeclf.errors import TrainingDivergedError
    from edgeclf.train.trainer import TrainConfig, _StopOnNonFinite

    stop = _StopOnNonFinite("frozen", TrainConfig("digits", "out", lr_frozen=5.0))
    stop.on_train_batch_end(0, {"loss": 0.7})
    with pytest.raises(TrainingDivergedError, match="loss became nan in phase frozen at batch 3.*it was 5"):
        stop.on_train_batch_end(2, {"loss": float("nan")})
    with pytest.raises(TrainingDivergedError, match="val_loss became inf"):
        stop.on_epoch_end(0, {"loss": 0.5, "val_loss": float("inf")})
