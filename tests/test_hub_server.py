"""Run the real huggingface_hub client, and peft through it, against the fake Hub in tests/hub_server.py."""

from __future__ import annotations

import types
from pathlib import Path

import httpx2
import pytest
import torch
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    RepoFile,
    RepoFolder,
    constants,
    file_download,
    get_hf_file_metadata,
    hf_api,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from peft import PeftModel, get_peft_model_state_dict

from tests.factories import make_adapter, tiny_llama
from tests.hub_server import (  # noqa: F401  (hub and hub_server are fixtures)
    CONFLICT_MESSAGE,
    READ_TOKEN,
    WRITE_TOKEN,
    ForeignHostError,
    git_blob_oid,
    hub,
    hub_server,
    use_hub,
)

README = b"---\nlicense: apache-2.0\ntags:\n  - lora\n---\n# Experts\n"
EXPERT_FILES = {
    "README.md": "card",
    "experts/alpha/config.json": "{}",
    "experts/alpha/weights.bin": "w",
    "experts/beta/config.json": "[]",
}


def add(path: str, content: bytes) -> CommitOperationAdd:
    return CommitOperationAdd(path_in_repo=path, path_or_fileobj=content)


def status_of(error: pytest.ExceptionInfo) -> int:
    return error.value.response.status_code


# Repos and commits


def test_create_repo_public_private_exist_ok(hub):
    api = hub.api()

    public = api.create_repo("tester/public")
    private = api.create_repo("tester/private", private=True)
    again = api.create_repo("tester/private", exist_ok=True)

    assert public == f"{hub.url}/tester/public"
    assert again == private
    assert api.model_info("tester/public").private is False
    assert api.model_info("tester/private").private is True
    assert hub.state.repos["tester/private"].private is True
    assert hub.state.files("tester/public") == {".gitattributes": hub.state.read_file("tester/public", ".gitattributes")}
    with pytest.raises(HfHubHTTPError) as error:
        api.create_repo("tester/public")
    assert status_of(error) == 409


def test_create_commit_several_files(hub):
    api = hub.api()
    api.create_repo("tester/experts")

    info = api.create_commit(
        "tester/experts",
        [add("README.md", README), add("experts/alpha/config.json", b"{}"), add("experts/beta/notes.txt", b"beta")],
        commit_message="Add experts",
        commit_description="two experts",
    )

    assert info.oid == hub.state.head("tester/experts")
    assert hub.state.read_file("tester/experts", "experts/alpha/config.json") == b"{}"
    assert hub.state.read_file("tester/experts", "README.md") == README
    assert len(hub.state.requests(method="POST", route="validate_yaml")) == 1
    assert api.model_info("tester/experts").card_data["license"] == "apache-2.0"
    latest = hub.state.commits("tester/experts")[0]
    assert (latest.title, latest.message, latest.author) == ("Add experts", "two experts", "tester")


def test_create_commit_deletes_file_and_folder(hub):
    api = hub.api()
    hub.state.create_repo("tester/experts", files={"a/one.txt": "1", "a/two.txt": "2", "b/three.txt": "3", "top.txt": "t"})

    api.create_commit(
        "tester/experts",
        [CommitOperationDelete("a/", is_folder=True), CommitOperationDelete("top.txt")],
        commit_message="Remove a and top",
    )

    assert sorted(hub.state.files("tester/experts")) == [".gitattributes", "b/three.txt"]


def test_create_commit_invalid_readme_yaml(hub):
    api = hub.api()
    api.create_repo("tester/experts")

    with pytest.raises(ValueError, match="Invalid metadata in README.md"):
        api.create_commit("tester/experts", [add("README.md", b"---\nlicense: [unclosed\n---\n")], commit_message="Bad card")

    assert len(hub.state.commits("tester/experts")) == 1


def test_unchanged_upload_makes_no_commit(hub):
    api = hub.api()
    head = hub.state.create_repo("tester/experts", files={"same.txt": "unchanged"})
    hub.state.clear_log()

    info = api.create_commit("tester/experts", [add("same.txt", b"unchanged")], commit_message="No change")

    assert info.oid == head
    assert hub.state.requests(route="commit") == []
    assert [entry.route for entry in hub.state.requests()] == ["preupload", "model_info"]


def test_parent_commit_matches_head(hub):
    api = hub.api()
    head = hub.state.create_repo("tester/experts")

    info = api.create_commit("tester/experts", [add("a.txt", b"a")], commit_message="On head", parent_commit=head)

    assert hub.state.commits("tester/experts")[0].parent == head
    assert info.oid == hub.state.head("tester/experts")


def test_parent_commit_stale_raises_412(hub):
    api = hub.api()
    stale = hub.state.create_repo("tester/experts")
    current = hub.state.commit_files("tester/experts", {"other.txt": "moved"})

    with pytest.raises(HfHubHTTPError) as error:
        api.create_commit("tester/experts", [add("a.txt", b"a")], commit_message="Stale", parent_commit=stale)

    assert status_of(error) == 412
    assert CONFLICT_MESSAGE in str(error.value)
    assert hub.state.head("tester/experts") == current


def test_conflicting_commit_moves_head(hub):
    api = hub.api()
    head = hub.state.create_repo("tester/experts")
    hub.state.conflict_next_commit("tester/experts", {"theirs.txt": "from another replica"})

    with pytest.raises(HfHubHTTPError) as error:
        api.create_commit("tester/experts", [add("ours.txt", b"ours")], commit_message="Ours", parent_commit=head)
    moved = api.model_info("tester/experts").sha
    api.create_commit("tester/experts", [add("ours.txt", b"ours")], commit_message="Ours again", parent_commit=moved)

    assert status_of(error) == 412
    assert moved != head
    assert hub.state.commits("tester/experts")[1].author == "other-writer"
    assert sorted(hub.state.files("tester/experts")) == [".gitattributes", "ours.txt", "theirs.txt"]


# Reading repos


def test_model_info_revision_and_branch(hub):
    api = hub.api()
    first = hub.state.create_repo("tester/experts", files={"a.txt": "a"})
    api.create_branch("tester/experts", branch="dev")
    api.create_commit("tester/experts", [add("b.txt", b"b")], commit_message="Dev only", revision="dev")

    refs = api.list_repo_refs("tester/experts")
    dev_commits = api.list_repo_commits("tester/experts", revision="dev")

    assert api.model_info("tester/experts").sha == first
    assert api.model_info("tester/experts", revision="dev").sha == hub.state.head("tester/experts", "dev")
    assert api.model_info("tester/experts", revision=first).sha == first
    dev_files = [sibling.rfilename for sibling in api.model_info("tester/experts", revision="dev").siblings]
    assert dev_files == [".gitattributes", "a.txt", "b.txt"]
    branches = {branch.name: branch.target_commit for branch in refs.branches}
    assert branches == {"main": first, "dev": hub.state.head("tester/experts", "dev")}
    assert [commit.title for commit in dev_commits] == ["Dev only", "Add files", "initial commit"]
    with pytest.raises(HfHubHTTPError) as error:
        api.create_branch("tester/experts", branch="dev")
    assert status_of(error) == 409


def test_list_repo_tree_recursive(hub):
    api = hub.api()
    hub.state.create_repo("tester/experts", files=EXPERT_FILES)

    entries = {entry.path: entry for entry in api.list_repo_tree("tester/experts", recursive=True)}
    top = {entry.path for entry in api.list_repo_tree("tester/experts", path_in_repo="experts")}

    assert sorted(entries) == [
        ".gitattributes",
        "README.md",
        "experts",
        "experts/alpha",
        "experts/alpha/config.json",
        "experts/alpha/weights.bin",
        "experts/beta",
        "experts/beta/config.json",
    ]
    assert isinstance(entries["experts/alpha"], RepoFolder)
    assert isinstance(entries["README.md"], RepoFile)
    assert entries["experts/alpha/config.json"].blob_id == git_blob_oid(b"{}")
    assert entries["experts/alpha/config.json"].size == 2
    assert top == {"experts/alpha", "experts/beta"}


def test_list_repo_tree_follows_pages(hub):
    api = hub.api()
    hub.state.create_repo("tester/experts", files={f"file{index}.txt": str(index) for index in range(5)})
    hub.state.page_size = 2
    hub.state.clear_log()

    paths = [entry.path for entry in api.list_repo_tree("tester/experts", recursive=True)]

    assert paths == [".gitattributes"] + [f"file{index}.txt" for index in range(5)]
    assert len(hub.state.requests(route="tree")) == 3


def test_list_repo_tree_expand_last_commit(hub):
    api = hub.api()
    first = hub.state.create_repo("tester/experts", files={"old/a.txt": "a"})
    second = hub.state.commit_files("tester/experts", {"new/b.txt": "b"}, message="Add new")

    entries = {entry.path: entry for entry in api.list_repo_tree("tester/experts", expand=True)}

    assert entries["old"].last_commit.oid == first
    assert entries["new"].last_commit.oid == second
    assert entries["new"].last_commit.title == "Add new"


# Downloads


def test_hf_hub_download_subfolder(hub, tmp_path):
    head = hub.state.create_repo("tester/experts", files={"experts/alpha/config.json": '{"r": 4}'})

    path = Path(hf_hub_download("tester/experts", "config.json", subfolder="experts/alpha"))

    assert path.read_text() == '{"r": 4}'
    assert path == tmp_path / "hf_home/hub/models--tester--experts/snapshots" / head / "experts/alpha/config.json"


def test_head_metadata_headers(hub):
    content = b"adapter weights"
    head = hub.state.create_repo("tester/experts", files={"weights.bin": content})

    metadata = get_hf_file_metadata(hf_hub_url("tester/experts", "weights.bin"))

    assert metadata.etag == git_blob_oid(content)
    assert metadata.commit_hash == head
    assert metadata.size == len(content)


def test_range_request(hub):
    hub.state.create_repo("tester/experts", files={"digits.txt": "0123456789"})
    url = hf_hub_url("tester/experts", "digits.txt")

    with httpx2.Client() as client:
        middle = client.get(url, headers={"Range": "bytes=2-5"})
        tail = client.get(url, headers={"Range": "bytes=-3"})
        outside = client.get(url, headers={"Range": "bytes=20-"})

    assert (middle.status_code, middle.content, middle.headers["Content-Range"]) == (206, b"2345", "bytes 2-5/10")
    assert (tail.status_code, tail.content) == (206, b"789")
    assert outside.status_code == 416


def test_snapshot_download_allow_patterns(hub):
    head = hub.state.create_repo("tester/experts", files=EXPERT_FILES)

    folder = Path(snapshot_download("tester/experts", allow_patterns=["experts/alpha/*"]))

    downloaded = sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())
    assert downloaded == ["experts/alpha/config.json", "experts/alpha/weights.bin"]
    assert folder.name == head
    assert (folder / "experts/alpha/weights.bin").read_bytes() == b"w"


# Error mapping


def test_missing_repo_raises_repository_not_found(hub):
    with pytest.raises(RepositoryNotFoundError) as authenticated:
        hub.api().model_info("tester/missing")
    with pytest.raises(RepositoryNotFoundError) as anonymous:
        hub.api(token=False).model_info("tester/missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("tester/missing", "config.json")

    assert status_of(authenticated) == 404
    assert status_of(anonymous) == 401


def test_unknown_revision_raises_revision_not_found(hub):
    hub.state.create_repo("tester/experts", files={"a.txt": "a"})

    with pytest.raises(RevisionNotFoundError):
        hub.api().model_info("tester/experts", revision="nope")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("tester/experts", "a.txt", revision="nope")
    with pytest.raises(RevisionNotFoundError):
        list(hub.api().list_repo_tree("tester/experts", revision="nope"))


def test_missing_file_raises_entry_not_found(hub):
    hub.state.create_repo("tester/experts", files={"a.txt": "a"})

    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("tester/experts", "missing.txt")
    with pytest.raises(RemoteEntryNotFoundError):
        list(hub.api().list_repo_tree("tester/experts", path_in_repo="missing"))

    assert hub.api().file_exists("tester/experts", "missing.txt") is False
    assert hub.api().file_exists("tester/experts", "a.txt") is True


def test_private_repo_without_token_raises_401(hub):
    hub.state.create_repo("tester/private", private=True, files={"a.txt": "secret"})

    with pytest.raises(RepositoryNotFoundError) as info_error:
        hub.api(token=False).model_info("tester/private")
    with pytest.raises(RepositoryNotFoundError) as download_error:
        hf_hub_download("tester/private", "a.txt", token=False)

    assert status_of(info_error) == 401
    assert status_of(download_error) == 401


def test_private_repo_read_only_token(hub):
    hub.state.create_repo("tester/private", private=True, files={"a.txt": "secret"})
    reader = hub.api(token=READ_TOKEN)

    path = hf_hub_download("tester/private", "a.txt", token=READ_TOKEN)
    with pytest.raises(HfHubHTTPError) as error:
        reader.create_commit("tester/private", [add("b.txt", b"b")], commit_message="Read-only")

    assert reader.model_info("tester/private").private is True
    assert Path(path).read_text() == "secret"
    assert status_of(error) == 403
    assert not isinstance(error.value, RepositoryNotFoundError)


def test_token_without_access_or_unknown(hub):
    hub.state.create_repo("tester/private", private=True)
    hub.state.add_token("hf_other_user", "mallory", namespaces=())

    with pytest.raises(RepositoryNotFoundError) as other_user:
        hub.api(token="hf_other_user").model_info("tester/private")
    with pytest.raises(HfHubHTTPError) as unknown:
        hub.api(token="hf_not_issued").model_info("tester/private")

    assert status_of(other_user) == 404
    assert status_of(unknown) == 401
    assert not isinstance(unknown.value, RepositoryNotFoundError)


# Injected faults


def test_injected_500_retried_by_tree_listing(hub):
    hub.state.create_repo("tester/experts", files={"a.txt": "a"})
    fault = hub.state.fail_next(r"/tree/", 500, method="GET")

    paths = [entry.path for entry in hub.api().list_repo_tree("tester/experts")]

    assert paths == [".gitattributes", "a.txt"]
    assert fault.remaining == 0
    assert [entry.status for entry in hub.state.requests(path="/tree/")] == [500, 200]


def test_injected_500_retried_by_download_head(hub):
    hub.state.create_repo("tester/experts", files={"a.txt": "a"})
    hub.state.fail_next(r"/resolve/", 500, method="HEAD")

    path = hf_hub_download("tester/experts", "a.txt")

    assert Path(path).read_text() == "a"
    assert [(entry.method, entry.status) for entry in hub.state.requests(path="/resolve/")] == [
        ("HEAD", 500),
        ("HEAD", 200),
        ("GET", 200),
    ]


def test_injected_500_not_retried_by_model_info(hub):
    hub.state.create_repo("tester/experts")
    hub.state.fail_next(r"^/api/models/tester/experts", 500)

    with pytest.raises(HfHubHTTPError) as error:
        hub.api().model_info("tester/experts")

    assert status_of(error) == 500
    assert hub.api().model_info("tester/experts").sha == hub.state.head("tester/experts")


def test_injected_429_exposes_retry_after(hub):
    hub.state.create_repo("tester/experts")
    hub.state.fail_next(r"^/api/models/tester/experts$", 429, retry_after=7)

    with pytest.raises(HfHubHTTPError) as error:
        hub.api().model_info("tester/experts")

    assert status_of(error) == 429
    assert error.value.response.headers["Retry-After"] == "7"


def test_dropped_download_restarts(hub):
    content = bytes(range(256)) * 40
    hub.state.create_repo("tester/experts", files={"weights.bin": content})
    hub.state.drop_next_download(r"weights\.bin")

    path = hf_hub_download("tester/experts", "weights.bin")

    assert Path(path).read_bytes() == content
    assert [entry.dropped for entry in hub.state.requests(method="GET", route="resolve")] == [True, False]


def test_dropped_download_leaves_no_file(hub, monkeypatch):
    content = bytes(range(256)) * 40
    hub.state.create_repo("tester/experts", files={"weights.bin": content})
    drop = hub.state.drop_next_download(r"weights\.bin", times=100)
    # The client waits 1 s before each of its retries of a cut-off download; skip the waits.
    monkeypatch.setattr(file_download, "time", types.SimpleNamespace(sleep=lambda seconds: None))

    with pytest.raises(httpx2.RemoteProtocolError):
        hf_hub_download("tester/experts", "weights.bin")
    storage = Path(constants.HF_HUB_CACHE) / "models--tester--experts"
    blobs = [path for path in storage.glob("blobs/**/*") if path.is_file()]
    snapshot_files = [path for path in storage.glob("snapshots/**/*") if path.is_file()]
    attempts = hub.state.requests(method="GET", route="resolve")
    drop.remaining = 0
    path = hf_hub_download("tester/experts", "weights.bin")

    assert blobs == []
    assert snapshot_files == []
    assert len(attempts) > 1
    assert all(entry.dropped for entry in attempts)
    assert Path(path).read_bytes() == content


def test_request_log_counts_one_info_call(hub):
    hub.state.create_repo("tester/experts")
    hub.state.clear_log()

    hub.api().model_info("tester/experts")

    assert [(entry.method, entry.path, entry.status) for entry in hub.state.requests()] == [
        ("GET", "/api/models/tester/experts", 200)
    ]


def test_use_hub_restores_client(hub_server, tmp_path):
    endpoint, cache, module_api = constants.ENDPOINT, constants.HF_HUB_CACHE, hf_api.api.endpoint

    with use_hub(hub_server.url, tmp_path / "home"):
        inside = (constants.ENDPOINT, constants.HF_HUB_CACHE, hf_api.api.endpoint, HfApi().endpoint)

    assert inside == (hub_server.url, str(tmp_path / "home/hub"), hub_server.url, hub_server.url)
    assert (constants.ENDPOINT, constants.HF_HUB_CACHE, hf_api.api.endpoint) == (endpoint, cache, module_api)


def test_foreign_endpoint_rejected(hub):
    other = HfApi(endpoint="http://127.0.0.1:1", token=False)

    with pytest.raises(ForeignHostError):
        other.model_info("tester/experts")


# PEFT through the fake Hub


def test_peft_adapter_from_subfolder(hub, tmp_path, monkeypatch):
    folder = make_adapter(tiny_llama(), tmp_path / "adapter", seed=3)
    api = hub.api()
    api.create_repo("tester/adapters", private=True)
    api.upload_folder(repo_id="tester/adapters", folder_path=folder, path_in_repo="experts/alpha")
    monkeypatch.setenv("HF_TOKEN", READ_TOKEN)

    remote = PeftModel.from_pretrained(tiny_llama(), "tester/adapters", subfolder="experts/alpha")
    local = PeftModel.from_pretrained(tiny_llama(), folder)

    remote_weights, local_weights = get_peft_model_state_dict(remote), get_peft_model_state_dict(local)
    assert sorted(remote_weights) == sorted(local_weights)
    for name, tensor in local_weights.items():
        assert torch.equal(remote_weights[name], tensor), name
    assert "experts/alpha/adapter_model.safetensors" in hub.state.files("tester/adapters")


def test_peft_push_to_hub_round_trip(hub, tmp_path):
    folder = make_adapter(tiny_llama(), tmp_path / "adapter", seed=5)
    local = PeftModel.from_pretrained(tiny_llama(), folder)

    local.push_to_hub("tester/pushed", token=WRITE_TOKEN)
    remote = PeftModel.from_pretrained(tiny_llama(), "tester/pushed")

    remote_weights = get_peft_model_state_dict(remote)
    for name, tensor in get_peft_model_state_dict(local).items():
        assert torch.equal(remote_weights[name], tensor), name
    assert "README.md" in hub.state.files("tester/pushed")
