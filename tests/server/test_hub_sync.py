"""Quiver servers kept in sync through a Hub repo, against a local Hub-compatible server.

Every test runs the real huggingface_hub client against the fake Hub of ``tests.hub_server`` and
real Quiver servers over HTTP, each with its own library folder.
"""

import contextlib
import time

import httpx
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from quiver.client import Client, ConflictError
from quiver.server import Settings, create_app
from quiver.server.engine import Engine
from tests.factories import make_adapter, tiny_llama, tiny_tokenizer
from tests.hub_server import WRITE_TOKEN, hub, hub_server  # noqa: F401 (fixtures)
from tests.live_server import serve

REPO = "tester/library"
SECRET = "webhook-secret"


@pytest.fixture
def token(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    return WRITE_TOKEN


@pytest.fixture
def start(hub, token, tmp_path):
    """Start Quiver replicas on the fake Hub's repo; each call returns a Client for a new replica."""
    with contextlib.ExitStack() as stack:

        def replica(name: str, *, repo: str = REPO, sync_interval: float = 0.0) -> Client:
            settings = Settings(
                cache_dir=tmp_path / name / "cache",
                library_dir=tmp_path / name / "library",
                hub_repo=repo,
                sync_interval=sync_interval,
                webhook_secret=SECRET,
                max_new_tokens=16,
            )
            engine = Engine(settings, model=tiny_llama(), tokenizer=tiny_tokenizer())
            url = stack.enter_context(serve(create_app(settings, engine=engine)))
            client = stack.enter_context(Client(base_url=url, timeout=60))
            client.engine = engine
            return client

        yield replica


def _adapter(tmp_path, name, seed):
    return make_adapter(tiny_llama(), tmp_path / "adapters" / name, seed=seed)


def _wait_for(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError("the condition did not hold within the timeout")


def _names(client):
    return [expert.name for expert in client.list_experts()]


def _webhook(client, secret=SECRET):
    return httpx.post(
        f"{client._http.base_url}/hub/webhook",
        json={"event": {"action": "update", "scope": "repo.content"}, "repo": {"type": "model", "name": REPO}},
        headers={"X-Webhook-Secret": secret},
    )


def test_upload_reaches_second_replica_after_webhook(start, hub, tmp_path):
    first, second = start("first"), start("second")

    created = first.upload_expert(_adapter(tmp_path, "one", 1), name="one", task="first task")

    files = hub.state.files(REPO)
    assert hub.state.repos[REPO].private  # created by the first replica, private
    assert created.hub == "pushed"
    assert {"one/adapter_config.json", "one/adapter_model.safetensors", "one/expert.json", "one/arrow.safetensors"} <= set(files)
    assert b"library_name: peft" in files["README.md"]
    assert b"| one | first task |" in files["README.md"]
    assert _webhook(second).status_code == 202
    _wait_for(lambda: _names(second) == ["one"])
    assert second.get_expert("one").task == "first task"
    assert second.generate("abc", max_new_tokens=3, routing={"experts": ["one"]}).details.routing == {"one": 1.0}

    first.delete_expert("one")
    assert "one/adapter_config.json" not in hub.state.files(REPO)
    assert _webhook(second).status_code == 202
    _wait_for(lambda: _names(second) == [])


def test_poll_propagates_add_and_delete(start, tmp_path):
    first, second = start("first"), start("second", sync_interval=0.3)

    first.upload_expert(_adapter(tmp_path, "one", 1), name="one")
    _wait_for(lambda: _names(second) == ["one"])
    first.delete_expert("one")
    _wait_for(lambda: _names(second) == [])


def test_wrong_webhook_secret_is_401(start):
    replica = start("first")

    response = _webhook(replica, secret="guess")

    assert response.status_code == 401
    assert "X-Webhook-Secret" in response.json()["detail"]


def test_unchanged_library_syncs_with_one_request(start, hub, tmp_path):
    first = start("first")
    first.upload_expert(_adapter(tmp_path, "one", 1), name="one")
    first.sync()
    hub.state.clear_log()

    report = first.sync()

    assert report["unchanged"] == 1
    assert len(hub.state.requests()) == 1


def test_one_changed_expert_transfers_only_its_files(start, hub, tmp_path):
    first, second = start("first"), start("second")
    for seed, name in enumerate(["one", "two", "three"], start=1):
        first.upload_expert(_adapter(tmp_path, name, seed), name=name)
    second.sync()
    first.replace_expert(_adapter(tmp_path, "two-new", 9), name="two")
    hub.state.clear_log()

    report = second.sync()

    downloads = {entry.path for entry in hub.state.requests(method="GET", path="/resolve/")}
    assert report["updated"] == ["two"]
    assert report["unchanged"] == 2
    assert downloads
    assert all("/two/" in path for path in downloads)
    stored = second.engine.library.path("two") / "adapter_model.safetensors"
    assert stored.read_bytes() == (tmp_path / "adapters" / "two-new" / "adapter_model.safetensors").read_bytes()


def test_pulled_prototypes_are_not_recomputed(start, tmp_path, monkeypatch):
    from quiver.library import store

    first, second = start("first"), start("second")
    first.upload_expert(_adapter(tmp_path, "one", 1), name="one")
    computed = []
    original = store.compute_prototypes
    monkeypatch.setattr(store, "compute_prototypes", lambda modules: computed.append(1) or original(modules))

    second.sync()

    assert _names(second) == ["one"]
    assert computed == []
    pushed = load_file(first.engine.library.path("one") / "arrow.safetensors")
    pulled = load_file(second.engine.library.path("one") / "arrow.safetensors")
    assert pulled.keys() == pushed.keys()
    assert all(torch.equal(pulled[key], pushed[key]) for key in pushed)


@pytest.mark.parametrize(
    ("status", "retry_after"), [(503, None), (500, None), (429, 1)], ids=["unavailable", "server-error", "rate-limited"]
)
def test_failed_push_is_queued_and_completes(start, hub, tmp_path, status, retry_after):
    replica = start("first")
    hub.state.fail_next(r"/commit/", status, method="POST", times=10, retry_after=retry_after)

    created = replica.upload_expert(_adapter(tmp_path, "one", 1), name="one")

    status_now = replica.library_status()["hub"]
    assert created.hub == "queued"
    assert _names(replica) == ["one"]
    assert status_now["queued"] == ["put one"]
    assert status_now["stale"]
    assert status_now["last_error"]
    assert "one/adapter_config.json" not in hub.state.files(REPO)
    hub.state.faults.clear()

    report = replica.sync()

    assert report["pushed"] == ["one"]
    assert "one/adapter_config.json" in hub.state.files(REPO)
    assert replica.library_status()["hub"]["queued"] == []


def test_dropped_download_leaves_no_partial_expert(start, hub, tmp_path):
    first, second = start("first"), start("second")
    first.upload_expert(_adapter(tmp_path, "one", 1), name="one")
    hub.state.drop_next_download(r"one/adapter_model\.safetensors", times=50)  # more than the client's retries

    report = second.sync()

    assert "one" in report["failed"]
    assert report["added"] == []
    assert _names(second) == []
    assert not (second.engine.library.root / "one").exists()
    hub.state.drops.clear()

    second.sync()
    assert _names(second) == ["one"]


def test_commit_by_another_writer_is_retried_on_top(start, hub, tmp_path):
    replica = start("first")
    replica.sync()
    hub.state.conflict_next_commit(REPO, {"notes.txt": "written elsewhere\n"})

    created = replica.upload_expert(_adapter(tmp_path, "one", 1), name="one")

    files = hub.state.files(REPO)
    assert created.hub == "pushed"
    assert "notes.txt" in files
    assert "one/adapter_model.safetensors" in files


def test_name_added_elsewhere_first_is_409(start, hub, tmp_path):
    first, second = start("first"), start("second")
    first.upload_expert(_adapter(tmp_path, "same", 1), name="same")
    theirs = first.get_expert("same").weights_sha256

    with pytest.raises(ConflictError, match="another replica"):
        second.upload_expert(_adapter(tmp_path, "mine", 2), name="same")

    assert second.get_expert("same").weights_sha256 == theirs
    assert second.library_status()["hub"]["queued"] == []


def test_pushed_expert_loads_in_peft_from_the_repo(start, hub, tmp_path):
    replica = start("first")
    adapter = _adapter(tmp_path, "one", 1)
    replica.upload_expert(adapter, name="one")

    loaded = PeftModel.from_pretrained(tiny_llama(), REPO, subfolder="one").eval()
    local = PeftModel.from_pretrained(tiny_llama(), adapter).eval()
    ids = torch.arange(10).reshape(1, 10)

    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, local(input_ids=ids).logits)


def test_repo_written_by_peft_is_pulled_and_served(start, hub, tmp_path):
    api = hub.api()
    api.create_repo("tester/peft-library")
    for seed, name in enumerate(["alpha", "beta"], start=1):
        folder = _adapter(tmp_path, name, seed)
        api.upload_folder(repo_id="tester/peft-library", folder_path=folder, path_in_repo=name)

    replica = start("reader", repo="tester/peft-library")

    assert _names(replica) == ["alpha", "beta"]
    answer = replica.generate("abc", max_new_tokens=3, routing={"experts": ["beta"]})
    assert answer.details.routing == {"beta": 1.0}
    stored = load_file(replica.engine.library.path("alpha") / "adapter_model.safetensors")
    original = load_file(tmp_path / "adapters" / "alpha" / "adapter_model.safetensors")
    assert all(torch.equal(stored[key], original[key]) for key in original)


def _publish(hub, repo, adapter, message):
    files = {f"adapter/{path.name}": path.read_bytes() for path in adapter.iterdir() if path.is_file()}
    return hub.state.commit_files(repo, files, message=message)


def test_imported_expert_follows_its_branch(start, hub, tmp_path):
    hub.state.create_repo("alice/adder")
    first_commit = _publish(hub, "alice/adder", _adapter(tmp_path, "v1", 1), "first version")
    replica = start("first")

    followed = replica.import_from_hub("alice/adder", "adder", subfolder="adapter")
    pinned = replica.import_from_hub("alice/adder", "pinned", subfolder="adapter", revision=first_commit)
    second_commit = _publish(hub, "alice/adder", _adapter(tmp_path, "v2", 2), "second version")
    report = replica.sync()

    assert followed.source_ref == "main"
    assert followed.source_revision == first_commit
    assert pinned.source_revision == first_commit
    assert report["updated"] == ["adder"]
    assert replica.get_expert("adder").source_revision == second_commit
    assert replica.get_expert("pinned").source_revision == first_commit
    assert replica.get_expert("adder").weights_sha256 != pinned.weights_sha256
    assert "adder/adapter_model.safetensors" in hub.state.files(REPO)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"repo_id": "nobody/missing"}, 404, "hub_repo_not_found"),
        ({"repo_id": "alice/adder", "revision": "no-such-branch"}, 404, "hub_revision_not_found"),
        ({"repo_id": "alice/adder", "subfolder": "elsewhere"}, 404, "hub_file_not_found"),
        ({"repo_id": "carol/secret"}, 404, "hub_repo_not_found"),
    ],
    ids=["unknown-repo", "unknown-revision", "unknown-subfolder", "private-of-another-user"],
)
def test_import_errors_are_named(start, hub, tmp_path, body, status, code):
    hub.state.create_repo("alice/adder")
    _publish(hub, "alice/adder", _adapter(tmp_path, "v1", 1), "first version")
    hub.state.create_repo("carol/secret", private=True)
    hub.state.add_token(WRITE_TOKEN, "tester", namespaces=["tester"])
    replica = start("first")

    response = httpx.post(f"{replica._http.base_url}/experts", json={"source": "hub", "name": "imported", "subfolder": "adapter", **body})

    assert response.status_code == status, response.json()
    assert response.json()["code"] == code
    assert _names(replica) == []


def test_private_repo_without_token_is_named(start, hub, tmp_path, monkeypatch):
    hub.state.create_repo("carol/secret", private=True)
    replica = start("first")
    monkeypatch.delenv("HF_TOKEN")

    response = httpx.post(f"{replica._http.base_url}/experts", json={"source": "hub", "name": "imported", "repo_id": "carol/secret"})

    assert response.status_code == 403
    assert response.json()["code"] == "hub_unauthorized"
    assert "set HF_TOKEN" in response.json()["detail"]


def test_unreachable_hub_serves_local_copy(start, hub, tmp_path):
    first = start("first")
    first.upload_expert(_adapter(tmp_path, "one", 1), name="one")
    library_dir = tmp_path / "first" / "library"
    hub.state.fail_next(r".*", 503, times=1000)

    settings = Settings(cache_dir=tmp_path / "again", library_dir=library_dir, hub_repo=REPO, sync_interval=0)
    engine = Engine(settings, model=tiny_llama(), tokenizer=tiny_tokenizer())
    with serve(create_app(settings, engine=engine)) as url, Client(base_url=url) as again:
        status = again.library_status()["hub"]
        names = _names(again)

    assert names == ["one"]
    assert status["stale"] is True
    assert status["stale_since"]


def test_sync_cli_reports_and_pulls(start, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    quiver = str(Path(sys.executable).parent / "quiver")
    first, second = start("first"), start("second")
    first.upload_expert(_adapter(tmp_path, "one", 1), name="one")
    url = str(second._http.base_url)

    pulled = subprocess.run([quiver, "sync", "pull", "--url", url], capture_output=True, text=True, timeout=120)
    status = subprocess.run([quiver, "sync", "status", "--json", "--url", url], capture_output=True, text=True, timeout=120)

    assert pulled.returncode == 0, pulled.stderr
    assert "1 added" in pulled.stdout
    assert json.loads(status.stdout)["hub"]["repo_id"] == REPO
    assert _names(second) == ["one"]


def test_local_sync_cli_shows_progress(start, hub, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    quiver = str(Path(sys.executable).parent / "quiver")
    model_dir = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    first = start("first")
    first.upload_expert(_adapter(tmp_path, "one", 1), name="one")
    env = {**__import__("os").environ, "HF_TOKEN": WRITE_TOKEN}

    result = subprocess.run(
        [quiver, "sync", "pull", "--library-dir", str(tmp_path / "local"), "--hub-repo", REPO, "--base-model", str(model_dir)],
        capture_output=True, text=True, timeout=300, env=env,
    )

    assert result.returncode == 0, result.stderr
    assert "1 added" in result.stdout
    assert "100%" in result.stderr  # a progress bar per downloaded file
    assert (tmp_path / "local" / "one" / "adapter_model.safetensors").is_file()


def test_offline_mode_serves_local_copy(start, hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    start("first").upload_expert(_adapter(tmp_path, "one", 1), name="one")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.state.clear_log()

    settings = Settings(cache_dir=tmp_path / "again", library_dir=tmp_path / "first" / "library", hub_repo=REPO, sync_interval=0)
    engine = Engine(settings, model=tiny_llama(), tokenizer=tiny_tokenizer())
    with serve(create_app(settings, engine=engine)) as url, Client(base_url=url) as offline:
        status = offline.library_status()["hub"]
        names = _names(offline)

    assert names == ["one"]
    assert status["stale"] is True
    assert "HF_HUB_OFFLINE" in status["last_error"]
    assert hub.state.requests() == []


def test_cli_imports_from_the_hub(start, hub, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    hub.state.create_repo("alice/adder")
    commit = _publish(hub, "alice/adder", _adapter(tmp_path, "v1", 1), "first version")
    replica = start("first")
    quiver = str(Path(sys.executable).parent / "quiver")
    url = str(replica._http.base_url).rstrip("/")

    text = subprocess.run([quiver, "experts", "import", "alice/adder", "--subfolder", "adapter", "--name", "adder", "--url", url], capture_output=True, text=True, timeout=120)
    as_json = subprocess.run(
        [quiver, "experts", "import", "alice/adder", "--subfolder", "adapter", "--name", "pinned", "--revision", commit, "--url", url, "--json"],
        capture_output=True, text=True, timeout=120,
    )
    missing = subprocess.run([quiver, "experts", "import", "alice/ghost", "--name", "ghost", "--url", url], capture_output=True, text=True, timeout=120)

    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith(f"imported expert adder from alice/adder@{commit[:12]}")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["source_revision"] == commit
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1
    assert "hub_repo_not_found" in missing.stderr
