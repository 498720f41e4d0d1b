"""Federated adaptation on Flower with a tiny BERT: partitions, local training, the simulation engine, faults,
checkpoints and resume, differential privacy, and the apps as separate Flower processes."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("flwr_datasets")

from peftkit.errors import PeftkitError  # noqa: E402
from peftkit.federated import local, rounds  # noqa: E402
from peftkit.federated.partition import label_counts, parse_partition, partition_examples  # noqa: E402
from peftkit.federated.settings import FederationSettings, parse_fault  # noqa: E402
from peftkit.train.data import Example  # noqa: E402

WORDS = {0: "bad awful poor dull", 1: "good great fine superb", 2: "what when where who"}


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    """A 3-class task folder with train and validation files."""
    folder = tmp_path_factory.mktemp("task3")
    for split, count in (("train", 240), ("validation", 30)):
        rows = [{"text": f"{WORDS[i % 3]} item {i}", "label": i % 3} for i in range(count)]
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (folder / "meta.json").write_text(json.dumps({"labels": ["neg", "pos", "question"]}))
    return folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny 3-label BERT with minilm's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from peftkit import zoo

    folder = tmp_path_factory.mktemp("tiny-bert-3")
    tokenizer = AutoTokenizer.from_pretrained(zoo.resolve_model("minilm"))
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=3))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def settings_for(tiny_folder, tiny_task, output_dir, **changes):
    values = dict(model=str(tiny_folder), task=str(tiny_task), method="lora",
                  method_options={"r": 2, "target_modules": ["query", "value"]}, clients=3, rounds=2, fraction=0.67,
                  partition="iid", aggregate="delta", local_steps=3, batch_size=8, learning_rate=0.01,
                  max_length=16, server_eval_examples=30, output_dir=str(output_dir), round_timeout_s=60)
    values.update(changes)
    return FederationSettings(**values).validate()


# --------------------------------------------------------------------------- partitions and settings


def examples(count, classes=3):
    return [Example(text=f"text {i}", label=i % classes) for i in range(count)]


def test_iid_partitions_are_disjoint_even_and_hold_out_a_part():
    parts = partition_examples(examples(300), 5, "iid", seed=0, held_out_fraction=0.2)
    texts = [e.text for p in parts for e in p.train + p.held_out]
    assert len(texts) == len(set(texts)) == 300  # every example with exactly one owner
    assert all(len(p.train) == 48 and len(p.held_out) == 12 for p in parts)


def test_dirichlet_partitions_skew_the_label_mix():
    parts = partition_examples(examples(600), 6, "dirichlet:0.1", seed=0)
    mixes = [label_counts(p.train + p.held_out, 3) for p in parts]
    assert sum(sum(m) for m in mixes) == 600
    # with alpha 0.1 most clients are dominated by one class; IID ones are not
    assert sum(max(m) / sum(m) > 0.6 for m in mixes) >= 4
    iid = [label_counts(p.train + p.held_out, 3) for p in partition_examples(examples(600), 6, "iid")]
    assert all(max(m) / sum(m) < 0.45 for m in iid)


def test_partition_errors_name_the_problem():
    assert parse_partition("dirichlet:0.5") == ("dirichlet", 0.5)
    for bad in ("dirichlet", "dirichlet:-1", "pathological"):
        with pytest.raises(PeftkitError, match="--partition must be"):
            parse_partition(bad)
    with pytest.raises(PeftkitError, match="too few for 10 clients"):
        partition_examples(examples(12), 10, "iid")


def test_settings_travel_as_a_flower_run_config():
    settings = FederationSettings(method_options={"r": 4}, dp_noise_multiplier=0.5, resume=True)
    config = settings.to_run_config()
    assert all(isinstance(v, (str, int, float, bool)) for v in config.values())
    assert FederationSettings.from_run_config(config) == settings
    assert parse_fault("raise:1:2,hang:0:3") == [("raise", 1, 2), ("hang", 0, 3)]
    with pytest.raises(PeftkitError, match="--inject-fault takes"):
        FederationSettings(inject_fault="explode:1").validate()
    with pytest.raises(PeftkitError, match="frozen-a freezes LoRA's A"):
        FederationSettings(method="bitfit", aggregate="frozen-a").validate()


# --------------------------------------------------------------------------- local training, without Flower


def test_a_client_round_trains_only_what_travels(tiny_folder, tiny_task, tmp_path):
    settings = settings_for(tiny_folder, tiny_task, tmp_path, aggregate="frozen-a")
    adapted = local.build_adapted_model(settings)
    start = adapted.shared_state()
    frozen_a = {k: v for k, v in adapted.adapter_state().items() if k.endswith("lora_A.weight")}
    assert frozen_a and not set(frozen_a) & set(start)
    sent, metrics = local.client_train_round(settings, 0, 1, start)
    assert list(sent) == list(start) and metrics["num-examples"] > 0 and metrics["bytes-sent"] == local.state_bytes(start)
    assert any(not torch.equal(sent[k], start[k]) for k in start if "lora_B" in k)  # B trained
    after = local.adapted_model(settings).adapter_state()
    for key, tensor in frozen_a.items():
        assert torch.equal(after[key], tensor)  # A frozen, identical on every machine (same seed)
    whole = adapted.whole_model_bytes()
    assert local.state_bytes(start) < 0.05 * whole


def test_checkpoints_are_written_whole_and_resume_checks_settings(tmp_path):
    history = [rounds.RoundRecord(round=1, sampled=2, trained=2), rounds.RoundRecord(round=2, sampled=2, trained=1, failures=1)]
    adapter = {"base_model.model.x.lora_A.weight": torch.ones(2, 3)}
    rounds.write_checkpoint(tmp_path, 1, adapter, history[:1], {"task": "sst2"})
    rounds.write_checkpoint(tmp_path, 2, {k: 2 * v for k, v in adapter.items()}, history, {"task": "sst2"})
    files = sorted(p.name for p in rounds.checkpoint_dir(tmp_path).iterdir())
    assert files == ["federation.json", "round-0002.safetensors"]  # the older round's file is gone, no temporaries
    number, tensors, saved_history, saved = rounds.read_checkpoint(tmp_path)
    assert number == 2 and torch.equal(tensors["base_model.model.x.lora_A.weight"], 2 * torch.ones(2, 3))
    assert saved_history == history
    with pytest.raises(PeftkitError, match="ran with task='sst2'"):
        rounds.check_resumable(saved, {"task": "trec"}, tmp_path)
    assert rounds.read_checkpoint(tmp_path / "nothing") is None


# --------------------------------------------------------------------------- Flower's simulation engine


def report_of(output_dir):
    return json.loads((output_dir / "federation.json").read_text())


@pytest.mark.slow
def test_simulation_with_crashing_clients_and_privacy_gives_an_adapter_peftkit_eval_loads(tiny_folder, tiny_task, tmp_path):
    from peftkit.cli import main
    from peftkit.federated.simulation import simulate

    output = tmp_path / "fed"
    settings = settings_for(tiny_folder, tiny_task, output, inject_fault="raise:1:1,raise:0:1,raise:2:1",
                            dp_noise_multiplier=0.5, dp_clipping_norm=0.1)
    report = simulate(settings)  # every client crashes in round 1: the round keeps the adapter, round 2 trains
    first, second = report["rounds"]
    assert (first["round"], first["sampled"], first["trained"], first["failures"], first["aggregated"]) == (1, 2, 0, 2, False)
    assert all("injected fault" in reason for reason in first["failure_reasons"])
    assert (second["sampled"], second["trained"], second["failures"], second["aggregated"]) == (2, 2, 0, True)
    assert second["factorization_error"] is not None and 0 <= second["factorization_error"] < 1
    assert set(second["client_accuracies"]) == {"0", "1", "2"}  # every client scores on its own held-out part
    assert second["server_accuracy"] is not None
    assert second["dp_noise_multiplier"] == 0.5  # Flower's client-side clipping and server noise were on
    privacy = report["privacy"]  # two rounds released a noised aggregate of 2 of the 3 clients each
    assert (privacy["rounds"], privacy["noise_multiplier"], privacy["delta"]) == (2, 0.5, 1e-5)
    assert privacy["sampling_rate"] == pytest.approx(2 / 3) and 0 < privacy["epsilon"] < float("inf")
    per_message = report["adapter_bytes_per_message"]
    assert second["bytes_down"] == second["bytes_up"] == 2 * per_message and second["bytes_eval"] == 3 * per_message
    assert 0 < report["share_of_whole_model"] < 0.05
    assert main(["eval", str(output / "adapter"), "--split", "validation"]) == 0


@pytest.mark.slow
def test_a_hanging_client_is_dropped_at_the_timeout_and_a_dead_server_resumes(tiny_folder, tiny_task, tmp_path, monkeypatch):
    from peftkit.federated import simulation

    output = tmp_path / "fed"
    settings = settings_for(tiny_folder, tiny_task, output, rounds=3, fraction=1.0, round_timeout_s=60,
                            server_eval_examples=0, aggregate="frozen-a", inject_fault="hang:2:2")
    original = rounds.write_checkpoint

    def write_then_die(output_dir, round_number, *args):
        path = original(output_dir, round_number, *args)
        if round_number == 2:  # the server dies right after checkpointing round 2
            raise RuntimeError("the server died")
        return path

    monkeypatch.setattr(rounds, "write_checkpoint", write_then_die)
    with pytest.raises(RuntimeError):
        simulation.simulate(settings)
    number, _, history, _ = rounds.read_checkpoint(output)
    assert number == 2 and [r.round for r in history] == [1, 2]
    assert history[0].sampled == 3  # (round 1 warms the simulation's workers up; on a busy machine a cold start
    # can take longer than the timeout, so the hang is in round 2)
    # The hanging client is dropped at the timeout and the round goes on without it: (2 trained, 1 failed) on a quiet
    # machine; on a very busy one a slow client may be dropped with it, never waited for.
    assert history[1].failures >= 1 and history[1].trained + history[1].failures == 3
    assert history[1].aggregated == (history[1].trained > 0)
    assert not (output / "federation.json").exists()
    monkeypatch.setattr(rounds, "write_checkpoint", original)
    with pytest.raises(PeftkitError, match="pass --resume"):
        simulation.simulate(settings)
    # The restart starts the simulation's workers cold: a generous timeout, so that a busy machine does not drop them.
    resumed = simulation.simulate(FederationSettings(**{**settings.__dict__, "resume": True, "inject_fault": "",
                                                        "round_timeout_s": 600}))
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3]
    assert resumed["rounds"][1] == history[1].to_dict()  # the history from before is kept, round 3 ran after the restart
    assert resumed["rounds"][2]["aggregated"] and resumed["rounds"][2]["trained"] == 3


# --------------------------------------------------------------------------- separate Flower processes


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_the_apps_run_as_flower_superlink_and_supernode_processes(tiny_folder, tiny_task, tmp_path):
    """flower-superlink, two flower-supernodes and `flwr run` of peftkit's app folder, over loopback, insecure."""
    binaries = os.path.dirname(sys.executable)
    if not all(os.path.exists(os.path.join(binaries, name)) for name in ("flower-superlink", "flower-supernode", "flwr")):
        pytest.skip("Flower's command-line programs are not installed beside this Python")
    from peftkit.federated.simulation import write_flower_app

    output = tmp_path / "fed"
    settings = settings_for(tiny_folder, tiny_task, output, clients=2, rounds=2, fraction=1.0, server_eval_examples=0)
    app = write_flower_app(tmp_path / "app", settings)
    link, *nodes = free_ports(3)
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{link}"\n'
                                      "insecure = true\n")
    environment = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_HOME": str(home),
                   "PATH": binaries + os.pathsep + os.environ.get("PATH", "")}
    logs = tmp_path / "logs"
    logs.mkdir()
    processes = []

    def start(name, *args):
        with open(logs / f"{name}.log", "w") as log:
            processes.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=tmp_path))

    def all_logs():
        return "\n".join(f"--- {p.name}\n" + p.read_text()[-2000:] for p in sorted(logs.iterdir()))

    try:
        start("superlink", "flower-superlink", "--insecure", "--port", str(link), "--disable-runtime-dependency-installation")
        for node, port in enumerate(nodes):
            start(f"supernode-{node}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}", "--port", str(port),
                  "--node-config", f"partition-id={node} num-partitions=2")
        deadline = time.time() + 300
        while True:  # the SuperLink may still be starting
            submitted = subprocess.run(["flwr", "run", str(app), "local"], capture_output=True, text=True, env=environment,
                                       cwd=tmp_path, timeout=120)
            if "Successfully started run" in submitted.stdout or time.time() > deadline:
                break
            time.sleep(3)
        assert "Successfully started run" in submitted.stdout, submitted.stdout + submitted.stderr + all_logs()
        while time.time() < deadline and not (output / "federation.json").exists():
            time.sleep(2)
        assert (output / "federation.json").exists(), all_logs()
        report = report_of(output)
        assert [r["trained"] for r in report["rounds"]] == [2, 2]
        assert set(report["rounds"][-1]["client_accuracies"]) == {"0", "1"}
        assert (output / "adapter" / "adapter_model.safetensors").exists()
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def test_the_command_checks_its_options_and_writes_the_flower_app(tiny_folder, tiny_task, tmp_path, capsys):
    from peftkit.cli import main

    assert main(["federate", "--partition", "pathological", "--output-dir", str(tmp_path / "x")]) == 2
    assert "--partition must be 'iid' or 'dirichlet:ALPHA'" in capsys.readouterr().err
    assert main(["federate", "--method", "bitfit", "--aggregate", "frozen-a"]) == 2
    assert "frozen-a freezes LoRA's A" in capsys.readouterr().err
    app = tmp_path / "app"
    assert main(["federate", "--model", str(tiny_folder), "--task", str(tiny_task), "--set", "r=2", "--clients", "2",
                 "--dp-noise", "0.3", "--write-app", str(app)]) == 0
    text = (app / "pyproject.toml").read_text()
    assert 'clientapp = "peftkit.federated.apps:client_app"' in text and "dp-noise-multiplier = 0.3" in text
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads(text)["tool"]["flwr"]["app"]["config"]
    settings = FederationSettings.from_run_config(config)
    assert settings.clients == 2 and settings.method_options == {"r": 2} and settings.dp_noise_multiplier == 0.3


@pytest.mark.slow
def test_a_server_killed_with_sigkill_resumes_from_its_last_checkpoint(tiny_folder, tiny_task, tmp_path):
    """`peftkit federate` killed (SIGKILL, the whole process group: the server and Flower's workers) after a
    round's checkpoint; `--resume` goes on from that round and keeps the history from before the kill."""
    import signal

    output = tmp_path / "fed"
    command = [sys.executable, "-m", "peftkit.cli", "federate",
               "--model", str(tiny_folder), "--task", str(tiny_task), "--set", "r=2", "--set", 'target_modules=["query","value"]',
               "--clients", "3", "--rounds", "6", "--fraction", "1.0", "--local-steps", "3", "--batch-size", "8",
               "--learning-rate", "0.01", "--max-length", "16", "--round-timeout", "120", "--output-dir", str(output)]
    log = open(tmp_path / "first.log", "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    killed_after = None
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            state = rounds.read_checkpoint(output) if (output / rounds.CHECKPOINT_DIRNAME).is_dir() else None
            if state is not None and state[0] >= 1:
                killed_after = state[0]
                os.killpg(process.pid, signal.SIGKILL)
                break
            time.sleep(0.2)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
        log.close()
    assert killed_after is not None, (tmp_path / "first.log").read_text()[-3000:]
    assert process.returncode == -signal.SIGKILL
    number, _, history, _ = rounds.read_checkpoint(output)  # the checkpoint survived the kill whole
    assert killed_after <= number < 6 and [r.round for r in history] == list(range(1, number + 1))
    assert not (output / "federation.json").exists()
    before = [r.to_dict() for r in history]
    resumed = subprocess.run([*command, "--resume", "--json"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = json.loads((output / "federation.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3, 4, 5, 6]
    assert report["rounds"][:number] == before


def test_the_privacy_budget_grows_with_rounds_and_sampling_and_shrinks_with_noise():
    import math

    from peftkit.federated.privacy import privacy_budget

    pytest.importorskip("dp_accounting")

    def epsilon(**changes):
        return privacy_budget(**{"noise_multiplier": 1.0, "clients_per_round": 4, "clients": 10, "rounds": 8, **changes})["epsilon"]

    assert epsilon(rounds=16) > epsilon() > epsilon(noise_multiplier=2.0) > 0
    assert epsilon(clients_per_round=1, clients=100) < epsilon()  # a client is rarely sampled: less is spent
    assert privacy_budget(0.0, 4, 10, 8)["epsilon"] == math.inf
    # Every client every round: T Gaussian mechanisms, RDP T * alpha / (2 sigma^2) at order alpha. The classic
    # conversion min over alpha of RDP + log(1/delta) / (alpha - 1) bounds the accountant's (tighter) figure from above.
    sigma, steps, delta = 3.0, 10, 1e-5
    classic = min(steps * a / (2 * sigma**2) + math.log(1 / delta) / (a - 1) for a in (1 + i / 100 for i in range(1, 10000)))
    assert 0.8 * classic < privacy_budget(sigma, 10, 10, steps, delta)["epsilon"] <= classic
    with pytest.raises(PeftkitError, match="clients_per_round <= clients"):
        privacy_budget(1.0, 11, 10, 8)
