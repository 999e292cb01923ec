"""The generation cache on shared storage: several processes writing one cache directory at once
(no Ray, no models: the cache is the thing under test)."""

from __future__ import annotations

import json
import multiprocessing as mp
import random
import time

import pytest

from mars_ray.generation import cache as C


def _writer(directory: str, lo: int, hi: int, seed: int, barrier, out_q) -> None:
    """Write keys lo..hi-1 in small random batches, then read back every key any writer wrote."""
    rng = random.Random(seed)
    cache = C.ShardedCache(directory)
    keys = list(range(lo, hi))
    rng.shuffle(keys)
    for i in range(0, len(keys), 7):
        cache.put_many([(f"k{j}", f"text of {j} " * (1 + j % 5)) for j in keys[i : i + 7]], model=f"w{seed}")
        time.sleep(rng.random() * 0.003)
        cache.get_many([f"k{rng.randrange(0, 500)}" for _ in range(5)])  # reads while others write
    barrier.wait()
    got = cache.get_many([f"k{j}" for j in range(500)])
    out_q.put(
        (seed, len(got), sum(got[f"k{j}"] == f"text of {j} " * (1 + j % 5) for j in range(500) if f"k{j}" in got))
    )


def test_several_processes_share_one_cache_directory_without_loss(tmp_path):
    ctx = mp.get_context("spawn")
    barrier, out_q = ctx.Barrier(4), ctx.Queue()
    spans = [(0, 200), (100, 300), (200, 400), (300, 500)]  # every key but the ends written twice
    procs = [
        ctx.Process(target=_writer, args=(str(tmp_path), lo, hi, s, barrier, out_q)) for s, (lo, hi) in enumerate(spans)
    ]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    results = sorted(out_q.get(timeout=10) for _ in procs)
    # every process saw all 500 entries, each with its text, once all had written
    assert results == [(s, 500, 500) for s in range(4)]
    fresh = C.ShardedCache(tmp_path)
    assert len(fresh) == 500 and fresh.corrupt == 0
    assert sorted(fresh.by_model().values()) and sum(fresh.by_model().values()) == 500
    shards = sorted(tmp_path.glob("shard-*.jsonl"))
    lines = sum(len(f.read_text().splitlines()) for f in shards)
    print(f"\n[cache] 4 processes, {len(shards)} shard files, {lines} lines written for 500 keys (100-key overlaps), "
          f"500 readable, 0 lost, {time.perf_counter() - t0:.1f} s")  # fmt: skip
    assert len(shards) == 4 and lines == 800


def test_a_line_in_progress_is_not_read_and_a_corrupt_one_is_counted(tmp_path):
    cache = C.ShardedCache(tmp_path)
    cache.put_many([("a", "alpha"), ("b", "beta")], model="m")
    shard = next(tmp_path.glob("shard-*.jsonl"))
    with shard.open("a") as f:
        f.write(json.dumps({"k": "c", "t": "gamma", "d": C.text_digest("gamma")})[:20])  # a write in progress
    other = tmp_path / "shard-x-1-00000000.jsonl"
    other.write_text(json.dumps({"k": "d", "t": "delta (edited)", "d": C.text_digest("delta")}) + "\n")
    reader = C.ShardedCache(tmp_path)
    assert reader.get_many(["a", "b", "c", "d"]) == {"a": "alpha", "b": "beta"}
    # d fails its checksum at the end of its shard: read again a few times (it may be torn), then
    # counted as corrupt (the caller regenerates it)
    for _ in range(C.ShardedCache.TAIL_RETRIES):
        assert reader.corrupt == 0 and reader.get_many(["d"]) == {}
    assert reader.corrupt == 1
    with shard.open("a") as f:  # the write completes
        f.write(json.dumps({"k": "c", "t": "gamma", "d": C.text_digest("gamma")})[20:] + "\n")
    assert reader.get_many(["c"]) == {"c": "gamma"}


def test_the_backend_follows_the_file_system_and_sticks(tmp_path, monkeypatch):
    assert C.filesystem_type(tmp_path) is not None  # read from /proc/mounts
    local = tmp_path / "local"
    assert C.choose_backend(local) == "sqlite" and (local / C.BACKEND_FILE).read_text().strip() == "sqlite"
    assert isinstance(C.default_cache(str(local)), C.GenerationCache)
    with pytest.raises(ValueError, match="would split it"):
        C.choose_backend(local, "shards")
    # a cache directory on NFS: shards, and SQLite is refused with the reason
    monkeypatch.setattr(C, "filesystem_type", lambda p: "nfs4")
    shared = tmp_path / "shared"
    with pytest.raises(ValueError, match="network file system"):
        C.choose_backend(shared, "sqlite")
    assert C.choose_backend(shared) == "shards"
    assert isinstance(C.default_cache(str(shared)), C.ShardedCache)
    assert C.is_network_fs("fuse.gcsfuse") and not C.is_network_fs("ext4")


def test_encoder_embeds_each_text_once_and_keeps_embeddings_across_instances(tmp_path, tiny_bert_dir):
    """The gate's encoder: a text repeated in a call is encoded once; a second encoder on the same
    cache directory (another epoch, strategy or trial) encodes only what is new; the vectors equal
    fresh ones to float32 rounding; generation entries are not touched."""
    import numpy as np

    from mars_ray.generation.cache import default_cache
    from mars_ray.stages.embed import Encoder

    texts = ["the sky is blue", "grass is green", "the sky is blue", "water is wet"]
    first = Encoder(str(tiny_bert_dir), cache_dir=str(tmp_path), cache=True)
    a = first.embed(texts)
    assert first.stats == {"hits": 0, "encoded": 3} and np.array_equal(a[0], a[2])
    second = Encoder(str(tiny_bert_dir), cache_dir=str(tmp_path), cache=True)
    b = second.embed(["water is wet", "a new sentence", "grass is green"])
    assert second.stats == {"hits": 2, "encoded": 1}
    fresh = Encoder(str(tiny_bert_dir)).embed(["water is wet", "a new sentence", "grass is green"])
    np.testing.assert_allclose(b, fresh, atol=1e-5)
    np.testing.assert_array_equal(b[0], a[3])  # the stored vector itself
    assert len(default_cache(str(tmp_path))) == 0  # embeddings have their own store
    # a stored vector of another size (another encoder once kept under this ref) is not used
    import base64

    second.store.put_many([(second._key("odd size"), base64.b64encode(np.zeros(3, np.float32).tobytes()).decode())])
    odd = second.embed(["odd size"])
    assert odd.shape == (1, second.dim) and second.stats["encoded"] == 2


def test_a_torn_tail_is_read_again_once_whole_and_unchanged_shards_are_not_opened(tmp_path, monkeypatch):
    """Issue 39, defect 13: on NFS a reader can see a line's full length before its bytes (zeros in
    their place). Such a line used to be skipped for good, and its entry generated again; now the
    tail is read again until whole. A miss opens only the shards that grew."""
    line = json.dumps({"k": "e", "t": "epsilon", "d": C.text_digest("epsilon")}) + "\n"
    shard = tmp_path / "shard-y-2-00000000.jsonl"
    shard.write_bytes(line[:10].encode() + b"\0" * (len(line) - 11) + b"\n")  # torn, same length
    reader = C.ShardedCache(tmp_path)
    assert reader.get_many(["e"]) == {} and reader.corrupt == 0
    shard.write_bytes(line.encode())  # the bytes arrive
    assert reader.get_many(["e"]) == {"e": "epsilon"} and reader.corrupt == 0
    opened = []
    real_open = open

    def spy(path, *a, **kw):
        opened.append(str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr("builtins.open", spy)
    assert reader.get_many(["missing"]) == {}
    assert not [p for p in opened if "shard-" in p]  # nothing grew: nothing opened
