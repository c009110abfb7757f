"""The engine store under attack: prune deletes only what fastsd made, nothing tampered
or unverified runs, a bad manifest never crashes, and builds never lose an entry."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

import fastsd
from fastsd import Pipeline, hashing
from fastsd.checkpoint import load_checkpoint
from fastsd.cli import main
from fastsd.engines import (
    ENGINE_FORMAT,
    ENTRY_MARKER,
    Profile,
    Staging,
    default_engine_dir,
    list_entries,
    manifest_problem,
    prune,
)
from fastsd.hashing import DigestCache

FP = "0123456789abcdef"
PROFILE = asdict(Profile(1, 1, 4, 16, 32, 64, False, 32))


def fake_entry(root: Path, fp: str = FP, kind: str = "onnxruntime-fp32", payload: bytes = b"graph") -> Path:
    """A committed entry as fastsd writes one (marker, hashed file, manifest), no real graph."""
    backend, precision = kind.split("-")
    with Staging(root / fp / kind) as stage:
        (stage.dir / "unet.onnx").write_bytes(payload)
        stage.add("unet", ["unet.onnx"])
        return stage.commit({"format": ENGINE_FORMAT, "fastsd": fastsd.__version__, "backend": backend,
                             "precision": precision, "checkpoint": fp, "profile": PROFILE})


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def rewrite_in_place(path: Path, offset: int) -> None:
    """Flip one byte without changing the size, then put the mtime back."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)


# ---- 1. prune ---------------------------------------------------------------------------


def test_prune_leaves_an_unrelated_engines_folder_alone(tmp_path, monkeypatch, capsys):
    store = tmp_path / "engines"  # the default store, but somebody else's folder
    monkeypatch.setenv("FASTSD_ENGINE_DIR", str(store))
    for f in ("physics/src/solver.py", "render/shaders/sky.glsl", f"{FP}/onnxruntime-fp32/notes.txt",
              f"{FP}/.staging-onnxruntime-fp32-1234/keep.txt"):
        (store / f).parent.mkdir(parents=True, exist_ok=True)
        (store / f).write_text("precious")
    (store / "empty").mkdir()
    before = files_under(store)
    assert prune(store, everything=True, dry_run=True) == []
    assert main(["engines", "prune"]) == 0 and main(["engines", "prune", "--all"]) == 0
    assert main(["engines", "list"]) == 0
    assert files_under(store) == before and (store / "empty").is_dir()
    assert "removed 0 item(s)" in capsys.readouterr().out


def test_default_store_does_not_depend_on_the_working_directory(tmp_path, monkeypatch, ckpts):
    """Engines exported with the default store are found from any other folder (the default
    used to be engines/ under the working directory: elsewhere, everything ran eager)."""
    from fastsd.export import export_checkpoint

    monkeypatch.delenv("FASTSD_ENGINE_DIR", raising=False)
    monkeypatch.setenv("FASTSD_CACHE", str(tmp_path / "cache"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    default = default_engine_dir()
    assert default == tmp_path / "cache" / "engines" and default.is_absolute()
    export_checkpoint(str(ckpts["eps"]), networks=("text_encoder",))
    monkeypatch.chdir(tmp_path / "b")
    assert default_engine_dir() == default
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]))
    assert pipe.backend.backends["text_encoder"] == "onnxruntime"
    assert not (tmp_path / "a" / "engines").exists()
    monkeypatch.setenv("FASTSD_ENGINE_DIR", str(tmp_path / "mine"))  # the variable, then engine_dir=, override it
    assert default_engine_dir() == tmp_path / "mine"
    assert Pipeline.from_pretrained(str(ckpts["eps"])).backend.backends["text_encoder"] == "eager"
    again = Pipeline.from_pretrained(str(ckpts["eps"]), engine_dir=str(default))
    assert again.backend.backends["text_encoder"] == "onnxruntime"


def test_prune_never_follows_symlinks(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    outside_entry = fake_entry(elsewhere)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    store = tmp_path / "store"
    store.mkdir()
    (store / FP).symlink_to(elsewhere / FP)  # a fingerprint folder that is a link
    (store / "fedcba9876543210").mkdir()
    (store / "fedcba9876543210" / "onnxruntime-fp32").symlink_to(outside_entry)  # an entry that is a link
    assert prune(store, everything=True) == []
    assert (outside_entry / "unet.onnx").read_bytes() == b"graph"
    ours = fake_entry(store, fp="1111111111111111")
    (ours / "link.txt").symlink_to(victim)  # a link inside an entry of ours
    assert prune(store, everything=True) == [ours]
    assert not ours.exists() and victim.read_text() == "precious"
    assert (outside_entry / "unet.onnx").is_file()


def test_prune_of_a_source_tree_finds_nothing():
    repo = Path(fastsd.__file__).resolve().parent.parent
    assert prune(repo, everything=True, dry_run=True) == []
    assert prune(repo / "fastsd", everything=True, dry_run=True) == []


def test_prune_removes_what_fastsd_made_and_cannot_use(tmp_path):
    store = tmp_path / "store"
    good = fake_entry(store)
    tampered = fake_entry(store, fp="2222222222222222")
    (tampered / "unet.onnx").write_bytes(b"other")
    broken = fake_entry(store, fp="3333333333333333")
    (broken / "manifest.json").write_text("[]")
    leftover = store / FP / ".staging-onnxruntime-fp16-deadbeef"
    leftover.mkdir()
    (leftover / ENTRY_MARKER).write_text("")
    (leftover / "unet.onnx").write_bytes(b"half")
    empty = store / FP / ".staging-compiled-fp32-0badf00d"
    empty.mkdir()
    (store / "unrelated").mkdir()
    assert sorted(prune(store, dry_run=True)) == sorted([tampered, broken, leftover, empty])
    prune(store)
    assert good.is_dir() and not tampered.parent.exists() and not broken.exists() and not leftover.exists()
    assert (store / "unrelated").is_dir()
    assert prune(store, everything=True) == [good] and not (store / FP).exists()


# ---- 2. digests ---------------------------------------------------------------------------


def test_digest_cache_sees_an_in_place_rewrite(tmp_path, monkeypatch):
    monkeypatch.setattr(hashing, "SETTLED", -1.0)  # record files written just now (the test's)
    f = tmp_path / "weights.bin"
    f.write_bytes(bytes(range(256)) * 64)
    cache = DigestCache("sha256")
    first = cache.digest(f)
    cache.save()
    assert hashing._key(f) in DigestCache("sha256").table  # recorded for the next load
    rewrite_in_place(f, 100)
    assert DigestCache("sha256").digest(f) == hashlib.sha256(f.read_bytes()).hexdigest() != first


def test_digest_record_follows_the_file_through_a_rename(tmp_path, monkeypatch):
    """A digest belongs to the file (device, inode, size, mtime, ctime), not to its path: an
    entry's files hashed in its staging folder are not read again once it is committed."""
    monkeypatch.setattr(hashing, "SETTLED", -1.0)
    (tmp_path / "staging").mkdir()
    f = tmp_path / "staging" / "a.bin"
    f.write_bytes(b"x" * 4096)
    cache = DigestCache("sha256")
    want = cache.digest(f)
    cache.save()
    moved = (tmp_path / "staging").rename(tmp_path / "entry") / "a.bin"  # (renaming the file itself moves its ctime)
    monkeypatch.setattr(hashing, "digest_file", lambda *a: pytest.fail("a recorded file was read again"))
    assert DigestCache("sha256").digest(moved) == want


def test_digest_record_follows_a_hard_link_fastsd_makes(tmp_path, monkeypatch):
    """A refit hard-links the donor entry's files: the link moves the inode's ctime, and the
    digest recorded just before it carries over (no second read of gigabytes); a file whose
    bytes changed since its record gets none (read and hashed as any unknown file)."""
    monkeypatch.setattr(hashing, "SETTLED", -1.0)
    donor, changed = tmp_path / "a.bin", tmp_path / "b.bin"
    donor.write_bytes(b"x" * 4096)
    changed.write_bytes(b"z" * 4096)
    cache = DigestCache("sha256")
    want = cache.digest(donor)
    cache.digest(changed)
    cache.save()
    rewrite_in_place(changed, 10)
    cache = DigestCache("sha256")
    hashing.link_or_copy(donor, tmp_path / "linked.bin", cache)
    hashing.link_or_copy(changed, tmp_path / "linked-changed.bin", cache)
    cache.save()
    assert (tmp_path / "linked.bin").stat().st_ino == donor.stat().st_ino
    read = []
    real = hashing.digest_file
    monkeypatch.setattr(hashing, "digest_file", lambda path, algo: read.append(Path(path).name) or real(path, algo))
    fresh = DigestCache("sha256")
    assert fresh.digest(tmp_path / "linked.bin") == fresh.digest(donor) == want and read == []
    assert fresh.digest(tmp_path / "linked-changed.bin") == hashlib.sha256(changed.read_bytes()).hexdigest()
    assert read == ["linked-changed.bin"]


def test_digest_record_survives_fastsd_removing_another_link(tmp_path, monkeypatch):
    """Removing an entry that shares files (a refit pruned or replaced) unlinks them, which
    moves the shared inode's ctime: the other links' records carry over (the donor is not
    read again at its next load); a file that is not shared, or unrecorded, just goes."""
    monkeypatch.setattr(hashing, "SETTLED", -1.0)
    donor, doomed = tmp_path / "donor", tmp_path / "doomed"
    donor.mkdir()
    doomed.mkdir()
    (donor / "a.bin").write_bytes(b"x" * 4096)
    cache = DigestCache("sha256")
    want = cache.digest(donor / "a.bin")
    cache.save()
    cache = DigestCache("sha256")
    hashing.link_or_copy(donor / "a.bin", doomed / "a.bin", cache)
    cache.save()
    (doomed / "own.bin").write_bytes(b"y")
    (doomed / "link").symlink_to(donor / "a.bin")
    before = os.stat(donor / "a.bin").st_ctime_ns
    hashing.remove_tree(doomed)
    assert not doomed.exists() and (donor / "a.bin").read_bytes() == b"x" * 4096
    assert os.stat(donor / "a.bin").st_nlink == 1 and os.stat(donor / "a.bin").st_ctime_ns >= before
    monkeypatch.setattr(hashing, "digest_file", lambda *a: pytest.fail("a recorded file was read again"))
    assert DigestCache("sha256").digest(donor / "a.bin") == want


def test_a_prefetched_digest_is_read_once_in_the_background(tmp_path, monkeypatch):
    """A checkpoint seen for the first time is hashed on a background thread while the
    libraries import (prefetch); the digest asked for later is that result, recorded as a read
    of its own would be, and a file changed since then is read again."""
    import threading

    monkeypatch.setattr(hashing, "SETTLED", -1.0)
    f = tmp_path / "weights.bin"
    f.write_bytes(b"w" * 8192)
    readers = []
    real = hashing.digest_file
    monkeypatch.setattr(hashing, "digest_file",
                        lambda path, algo: readers.append(threading.current_thread().name) or real(path, algo))
    hashing.prefetch([f, tmp_path / "missing.bin"], "sha256")  # a path it cannot stat is left to digest()
    cache = DigestCache("sha256")
    assert cache.digest(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    assert readers == ["fastsd-digests"] and hashing._key(f) in cache.table
    rewrite_in_place(f, 10)
    hashing.prefetch([f], "sha256")
    assert DigestCache("sha256").digest(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    assert len(readers) == 2
    f.unlink()
    with pytest.raises(FileNotFoundError):
        DigestCache("sha256").digest(f)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_hashes_on_a_digest_thread_of_its_own(tmp_path):
    """A child forked while the parent's digest thread exists (a server's worker, say) gets
    its own: a prefetch there finishes instead of waiting on a thread the child does not have."""
    f, g = tmp_path / "a.bin", tmp_path / "b.bin"
    f.write_bytes(b"a" * (1 << 20))
    g.write_bytes(b"b" * 4096)
    hashing.prefetch([f], "sha256")
    pid = os.fork()
    if pid == 0:  # the child: exit code 0 when both digests are right
        hashing.prefetch([f, g], "sha256")
        ok = all(DigestCache("sha256").digest(x) == hashlib.sha256(x.read_bytes()).hexdigest() for x in (f, g))
        os._exit(0 if ok else 1)
    assert os.waitpid(pid, 0)[1] == 0
    assert DigestCache("sha256").digest(f) == hashlib.sha256(f.read_bytes()).hexdigest()


def test_a_file_changed_just_now_gets_no_record(tmp_path):
    """On file systems with whole-second timestamps a second rewrite in the same second keeps
    the ctime: a file changed within SETTLED seconds is hashed, never recorded."""
    f = tmp_path / "fresh.bin"
    f.write_bytes(b"y" * 4096)
    cache = DigestCache("sha256")
    assert cache.digest(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    assert hashing._key(f) not in cache.table and not cache.dirty


def test_engine_files_checked_once_per_file(ckpts, eps_onnx, tmp_path, monkeypatch, caplog):
    """Loading engines checks each file against its manifest hash by its identity-bound
    record: a second load reads nothing, and a file rewritten in place is still refused."""
    from conftest import copy_entries

    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(hashing, "SETTLED", -1.0)
    copy_entries(eps_onnx, tmp_path, "onnxruntime-fp32")
    kw = dict(backend="onnxruntime", engine_dir=str(tmp_path))
    assert Pipeline.from_pretrained(str(ckpts["eps"]), **kw).backend.backends["unet"] == "onnxruntime"
    read = []
    real = hashing.digest_file
    monkeypatch.setattr(hashing, "digest_file", lambda path, algo: read.append(Path(path).name) or real(path, algo))
    assert Pipeline.from_pretrained(str(ckpts["eps"]), **kw).backend.backends["unet"] == "onnxruntime"
    assert read == []
    rewrite_in_place(next(tmp_path.glob("*/onnxruntime-fp32/unet.onnx.data")), 1000)
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), **kw)
    assert "unet.onnx.data" in read and pipe.backend.backends["unet"] == "eager"
    assert "unet.onnx.data does not match its manifest hash" in caplog.text


def test_checkpoint_edited_in_place_gets_a_new_fingerprint(ckpts, tmp_path):
    copy = shutil.copytree(ckpts["eps"], tmp_path / "copy")
    before = load_checkpoint(str(copy)).info.fingerprint
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    rewrite_in_place(weights, weights.stat().st_size - 3)
    assert load_checkpoint(str(copy)).info.fingerprint != before


# ---- 3. manifests -------------------------------------------------------------------------


def test_manifest_names_are_confined_to_the_entry(tmp_path):
    entry = fake_entry(tmp_path)
    manifest = json.loads((entry / "manifest.json").read_text())
    digest = manifest["networks"]["unet"]["sha256"]["unet.onnx"]
    for name in ("../../../outside/unet.onnx", "/etc/unet.onnx", "unet/../unet.onnx", "text_encoder.onnx"):
        bad = {**manifest, "networks": {"unet": {"sha256": {name: digest}}}}
        assert "not one of this network's files" in manifest_problem(bad, entry), name
    assert manifest_problem(manifest, entry) is None
    for flag, ok in ((True, True), (False, True), ("yes", False), (1, False)):  # weights given at load: a bool
        record = {**manifest["networks"]["unet"], "weights_at_load": flag}
        why = manifest_problem({**manifest, "networks": {"unet": record}}, entry)
        assert (why is None) if ok else "weights_at_load is not true or false" in why
    for made, ok in (({"file": "unet.onnx", "for": "onnxruntime 1, x86_64 0"}, True), ({"file": "unet.cpu.onnx",
                     "for": "x"}, False), ({"file": "unet.onnx"}, False), ("unet.onnx", False)):  # an ORT CPU graph
        record = {**manifest["networks"]["unet"], "cpu_graph": made}
        why = manifest_problem({**manifest, "networks": {"unet": record}}, entry)
        assert (why is None) if ok else "cpu_graph does not name one of its files" in why
    (entry / "unet.onnx.data").write_bytes(b"weights nobody hashed")
    assert "unet.onnx.data is in the entry but not hashed" in manifest_problem(manifest, entry)


# ---- with real ONNX graphs -------------------------------------------------------------------

onnx_only = pytest.mark.skipif(
    not all(__import__("importlib").util.find_spec(m) for m in ("onnxruntime", "onnxslim")),
    reason="needs onnxruntime and onnxslim")


@pytest.fixture(scope="module")
def exported(ckpts, tmp_path_factory):
    from fastsd.export import export_checkpoint

    root = tmp_path_factory.mktemp("store")
    return export_checkpoint(str(ckpts["eps"]), engine_dir=root, networks=("text_encoder", "unet"))


def _copy_store(entry: Path, tmp_path: Path) -> tuple[Path, Path]:
    store = tmp_path / "engines"
    shutil.copytree(entry.parent.parent, store)
    return store, store / entry.parent.name / entry.name


def _external_data(manifest: dict, entry: Path) -> dict:
    """unet.onnx re-saved with its weights in unet.onnx.data; only the graph is hashed."""
    import onnx

    model = onnx.load(str(entry / "unet.onnx"))
    onnx.save(model, str(entry / "unet.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="unet.onnx.data", size_threshold=0)
    graph = hashlib.sha256((entry / "unet.onnx").read_bytes()).hexdigest()
    manifest["networks"]["unet"]["sha256"] = {"unet.onnx": graph}
    return manifest


def _set(path: list, value):
    def change(m, entry):
        target = m
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return m
    return change


BAD_MANIFESTS = {
    "a list": lambda m, e: [],
    "a string": lambda m, e: "manifest",
    "networks as a list": _set(["networks"], ["unet"]),
    "empty sha256": _set(["networks", "unet", "sha256"], {}),
    "profile field of the wrong type": _set(["profile", "max_size"], "64"),
    "profile missing a field": lambda m, e: {**m, "profile": {"static": False}},
    "unet points at the text encoder's file": lambda m, e: _set(
        ["networks", "unet", "sha256"], dict(m["networks"]["text_encoder"]["sha256"]))(m, e),
    "a path outside the entry": lambda m, e: _set(
        ["networks", "unet", "sha256"], {"../../../outside/unet.onnx": "0" * 64})(m, e),
    "an absolute path": lambda m, e: _set(["networks", "unet", "sha256"], {"/tmp/unet.onnx": "0" * 64})(m, e),
    "external data not hashed": _external_data,
}


@onnx_only
@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_bad_manifest_falls_back_with_one_warning(exported, ckpts, tmp_path, caplog, capsys, case):
    store, entry = _copy_store(exported, tmp_path)
    manifest = json.loads((entry / "manifest.json").read_text())
    (entry / "manifest.json").write_text(json.dumps(BAD_MANIFESTS[case](manifest, entry)))
    with caplog.at_level(logging.WARNING):
        pipe = Pipeline.from_pretrained(str(ckpts["eps"]), engine_dir=str(store))  # auto
    assert set(pipe.backend.backends.values()) == {"eager"}
    warnings = [r.getMessage() for r in caplog.records if "invalid manifest" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    assert pipe("a", num_inference_steps=1, output_type="np").images.shape == (1, 32, 32, 3)
    assert main(["engines", "list", "--engine-dir", str(store)]) == 0
    assert "UNUSABLE: invalid manifest" in capsys.readouterr().out
    assert prune(store, dry_run=True) == [entry]


@onnx_only
def test_tampered_engine_with_same_size_and_mtime_is_refused(exported, ckpts, tmp_path, caplog):
    store, entry = _copy_store(exported, tmp_path)
    first = Pipeline.from_pretrained(str(ckpts["eps"]), backend="onnxruntime", engine_dir=str(store))
    assert first.backend.backends["unet"] == "onnxruntime"  # digests are now cached
    graph = entry / "unet.onnx"
    rewrite_in_place(graph, graph.stat().st_size - 100)  # a weight byte
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="onnxruntime", engine_dir=str(store))
    assert pipe.backend.backends["unet"] == "eager" and pipe.backend.backends["text_encoder"] == "onnxruntime"
    assert "unet.onnx does not match its manifest hash" in caplog.text


# ---- 5. odd latent sizes ---------------------------------------------------------------------


@onnx_only
def test_odd_latent_sizes_run_on_the_onnx_unet(exported, ckpts, pipes, caplog):
    store = exported.parent.parent
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), engine_dir=str(store))  # auto
    kw = dict(num_inference_steps=2, output_type="np", seed=3)
    for h, w in ((34, 34), (38, 26)):  # latents 17x17 and 19x13: the up block's 2x would not fit the skip
        out = pipe("a lighthouse", height=h, width=w, **kw)
        assert out.backends["unet"] == "onnxruntime"
        want = pipes("eps")("a lighthouse", height=h, width=w, **kw).images
        assert np.abs(out.images - want).max() <= 1e-3
    assert "refused" not in caplog.text


# ---- 12. export arguments and merging ---------------------------------------------------------


@onnx_only
def test_export_store_errors_are_one_line(ckpts, tmp_path, capsys):
    model = str(ckpts["eps"])
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    for store, message in ((a_file, "is not a folder"), (a_file / "sub", "cannot write to the engine store"),
                           (Path("/proc/fastsd-engines"), "cannot write to the engine store")):
        assert main(["export", "--model", model, "--engine-dir", str(store), "--networks", "unet"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert main(["export", "--model", model, "--engine-dir", str(tmp_path / "s"), "--networks", ","]) == 2
    assert "no networks to build" in capsys.readouterr().err
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").rglob("manifest.json"))


@onnx_only
def test_exporting_a_subset_keeps_the_rest_of_the_entry(exported, ckpts, tmp_path, caplog):
    from fastsd.export import export_checkpoint

    store, entry = _copy_store(exported, tmp_path)
    again = export_checkpoint(str(ckpts["eps"]), engine_dir=store, networks=("text_encoder",))
    assert again == entry
    assert list_entries(store)[0]["networks"] == ["text_encoder", "unet"] and not list_entries(store)[0]["problems"]
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="onnxruntime", engine_dir=str(store))
    assert pipe.backend.backends["text_encoder"] == pipe.backend.backends["unet"] == "onnxruntime"
    static = export_checkpoint(str(ckpts["eps"]), engine_dir=store, networks=("unet",), static="24x40")
    # another profile is another entry: the dynamic one stays as it was
    assert static != entry and static.name.endswith("-24x40")
    rows = {row["path"]: row for row in list_entries(store)}
    assert rows[entry]["networks"] == ["text_encoder", "unet"] and rows[static]["networks"] == ["unet"]
    assert not rows[entry]["problems"] and not rows[static]["problems"]


def test_auto_says_once_which_networks_run_eager(ckpts, tmp_path, caplog):
    """No engine at all: one note (-v) naming the networks; engines for some networks only:
    one warning naming the rest. Loading again says nothing more."""
    from fastsd.export import export_checkpoint

    with caplog.at_level(logging.INFO, logger="fastsd"):
        for _ in range(2):
            Pipeline.from_pretrained(str(ckpts["eps"]), engine_dir=str(tmp_path / "empty"))
    said = [r for r in caplog.records if "no engine in" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO
    assert "text_encoder, unet, vae_encoder, vae_decoder" in said[0].getMessage()
    caplog.clear()
    export_checkpoint(str(ckpts["eps"]), engine_dir=tmp_path / "some", networks=("text_encoder",))
    with caplog.at_level(logging.INFO, logger="fastsd"):
        for _ in range(2):
            Pipeline.from_pretrained(str(ckpts["eps"]), engine_dir=str(tmp_path / "some"))
    said = [r for r in caplog.records if "no engine in" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    assert "unet, vae_encoder, vae_decoder" in said[0].getMessage() and "text_encoder" not in said[0].getMessage()


# ---- prune beside builds ------------------------------------------------------------------------


def test_prune_leaves_a_build_in_progress_alone(tmp_path, caplog):
    """A staging folder being written (even one that is still empty) is locked by its
    writer: prune skips its checkpoint folder with a warning, and removes it once the
    writer is gone without committing."""
    root = tmp_path / "store"
    with caplog.at_level(logging.WARNING, logger="fastsd"):
        with Staging(root / FP / "onnxruntime-fp32") as stage:
            assert prune(root) == [] and stage.dir.is_dir()
            (stage.dir / "unet.onnx").write_bytes(b"graph")
            assert prune(root, everything=True) == [] and stage.dir.is_dir()
            stage.add("unet", ["unet.onnx"])
            entry = stage.commit({"format": ENGINE_FORMAT, "fastsd": fastsd.__version__, "backend": "onnxruntime",
                                  "precision": "fp32", "checkpoint": FP, "profile": PROFILE})
    assert "a build is writing there now" in caplog.text
    assert prune(root) == [] and list_entries(root)[0]["path"] == entry
    left = root / FP / ".staging-onnxruntime-fp32-deadbeef"  # a build killed before it wrote its marker
    left.mkdir()
    assert prune(root) == [left] and entry.is_dir()


@onnx_only
def test_a_prune_loop_beside_three_exports_loses_nothing(ckpts, tmp_path):
    """`engines prune` in a loop while three exports run one after another (each adding a
    network to the entry): every export finishes, the entry holds all three networks
    intact, and no staging or retired folder is left (prune deleted a running export's
    staging folder, killing it)."""
    import threading

    from fastsd.export import export_checkpoint

    store = tmp_path / "store"
    stop, errors, rounds = threading.Event(), [], [0]

    def pruning():
        while not stop.is_set():
            try:
                prune(store)
                rounds[0] += 1
            except Exception as e:  # noqa: BLE001 - the test reports it
                errors.append(e)

    thread = threading.Thread(target=pruning)
    thread.start()
    try:
        for network in ("vae_decoder", "text_encoder", "vae_encoder"):
            entry = export_checkpoint(str(ckpts["eps"]), engine_dir=store, networks=(network,))
            row = next(r for r in list_entries(store) if r["path"] == entry)
            assert network in row["networks"] and not row["problems"]
    finally:
        stop.set()
        thread.join(30)
    assert not errors and rounds[0] > 3
    rows = list_entries(store)
    assert len(rows) == 1 and rows[0]["networks"] == ["text_encoder", "vae_decoder", "vae_encoder"]
    assert not rows[0]["problems"]
    assert not [p for p in store.rglob(".*") if p.name.startswith((".staging-", ".retired-"))]


@onnx_only
def test_disk_full_during_export_is_one_line_and_leaves_the_store_clean(ckpts, tmp_path, capsys, monkeypatch):
    """The disk filling up mid-export (here: the graph writer's OSError ENOSPC after 1 MiB,
    wrapped as an exporter would) is one line naming the store and the space needed, exit
    2, no traceback; the store holds nothing (no staging folder, no entry)."""
    import errno
    import sys

    from fastsd.export import export_checkpoint

    module = sys.modules[export_checkpoint.__module__]

    def full(module_, spec, args, path, *rest):
        path.write_bytes(b"\0" * 2**20)
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        except OSError as e:
            raise RuntimeError("export failed") from e

    monkeypatch.setattr(module, "export_network", full)
    store = tmp_path / "store"
    assert main(["export", "--model", str(ckpts["eps"]), "--engine-dir", str(store), "--networks", "unet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert f"the engine store {store} ran out of disk space after writing 1 MiB" in err[0]
    assert "MiB free and has" in err[0] and "fastsd engines prune" in err[0]
    assert files_under(store) == set() and not list(store.rglob(".staging-*"))
