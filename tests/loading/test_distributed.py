"""Real torch.distributed process groups (gloo, CPU): sharding, epochs, seed checks, resuming, scripts/train.py.

Every rank is a child process (``ddp_child.py``) started with ``RANK``,
``WORLD_SIZE`` and ``INIT_METHOD``, a ``file://`` rendezvous in tmp_path (no
port: one picked free and released before the ranks bind it could be taken
meanwhile); each writes its findings as JSON into tmp_path. All children of a
run are killed after a timeout, so a hang fails one test.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from conftest import SIZES

from arrayloaders import ZarrSparseDataset

sys.path.insert(0, str(Path(__file__).parent))
from ddp_child import dataset, epoch, head  # noqa: E402

N = sum(SIZES)
CHILD = Path(__file__).with_name("ddp_child.py")
TRAIN = Path(__file__).parents[2] / "scripts" / "train.py"


def launch(scenario: str, store: Path, outdir: Path, world_size: int, timeout: float = 60, child: Path = CHILD,
           **args) -> list[dict]:  # fmt: skip
    """Run ``child``'s ``scenario`` on ``world_size`` ranks (one process without a group for 1); their results by
    rank."""
    outdir.mkdir(parents=True, exist_ok=True)
    rendezvous = outdir / f"rendezvous-{os.urandom(4).hex()}"  # a new file: torch's FileStore must not find one
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "INIT_METHOD"):
            env.pop(k, None)
        if world_size > 1:
            env.update(INIT_METHOD=f"file://{rendezvous}", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
        log = open(outdir / f"log{rank}.txt", "w")
        cmd = [sys.executable, str(child), scenario, str(store), str(outdir), json.dumps(args)]
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
        log.close()
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{scenario} on {world_size} ranks did not finish within {timeout} s (hang?)\n" + logs(outdir))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    assert not failed, f"ranks {failed} of {scenario} failed\n" + logs(outdir)
    return [json.loads((outdir / f"rank{r}.json").read_text()) for r in range(world_size)]


def logs(outdir: Path) -> str:
    return "\n".join(f"--- {p.name}:\n{p.read_text()[-3000:]}" for p in sorted(outdir.glob("log*.txt")))


def rows(batches: list) -> list[int]:
    return [i for index, _ in batches for i in index]


# --------------------------------------------------------------------------- sharding under a process group


@pytest.fixture(scope="module")
def matrix(store, tmp_path_factory):
    """Per world size, the ``matrix`` scenario's results by rank (one run of W processes, made on first use)."""
    runs: dict[int, list[dict] | str] = {}

    def get(world_size: int) -> list[dict]:
        if world_size not in runs:
            try:
                runs[world_size] = launch("matrix", store, tmp_path_factory.mktemp(f"matrix{world_size}"), world_size, 90)
            except BaseException as e:  # remembered: the tests sharing this run fail at once instead of rerunning it
                runs[world_size] = f"{type(e).__name__}: {e}"
                raise
        if isinstance(runs[world_size], str):
            pytest.fail(f"the matrix run on {world_size} ranks failed:\n{runs[world_size]}")
        return runs[world_size]

    return get


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("equalize", ["drop", "pad"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_are_disjoint_cover_the_store_and_yield_equal_counts(matrix, world_size, equalize, num_workers):
    results = [r[f"{equalize}-{num_workers}"] for r in matrix(world_size)]
    for e in (0, 1):
        per_rank = [rows(r[f"epoch{e}"]) for r in results]
        counts = [len(r[f"epoch{e}"]) for r in results]
        # Every rank yields the same number of batches, and len(ds) says so on every rank.
        assert len(set(counts)) == 1 and counts[0] > 1, counts
        assert [r[f"len{e}"] for r in results] == counts
        # Every rank yields the same number of rows: floor(n/W) with "drop", ceil(n/W) with "pad".
        expected = N // world_size if equalize == "drop" else -(-N // world_size)
        assert [len(r) for r in per_rank] == [expected] * world_size
        # Full batches everywhere but at the end.
        for r in results:
            sizes = [len(index) for index, _ in r[f"epoch{e}"]]
            assert all(s == 50 for s in sizes[:-1]) and 0 < sizes[-1] <= 50
        # Pairwise disjoint across ranks; within a rank, repeats only as "pad" fillers.
        sets = [set(r) for r in per_rank]
        for a in range(world_size):
            for b in range(a + 1, world_size):
                assert not sets[a] & sets[b], (a, b, sorted(sets[a] & sets[b])[:10])
        for rank, (r, s) in enumerate(zip(per_rank, sets)):
            own = (rank + 1) * N // world_size - rank * N // world_size  # the rank's share of the epoch
            assert len(s) == (expected if equalize == "drop" else own), (rank, len(s))
        union = set().union(*sets)
        assert union <= set(range(N))
        if equalize == "drop":
            assert N - world_size < len(union) == world_size * (N // world_size)
        else:
            assert union == set(range(N))


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("world_size", [2, 3])
def test_set_epoch_gives_every_rank_a_new_order_still_disjoint(matrix, world_size, num_workers):
    for equalize in ("drop", "pad"):
        results = [r[f"{equalize}-{num_workers}"] for r in matrix(world_size)]
        for rank, r in enumerate(results):
            e0, e1 = rows(r["epoch0"]), rows(r["epoch1"])
            assert e0 != e1, f"rank {rank}: epoch 1 repeats epoch 0's order"
            assert set(e0) != set(e1), f"rank {rank}: epoch 1 has the same cells as epoch 0 (chunks not reshuffled)"
        sets = [set(rows(r["epoch1"])) for r in results]
        assert sum(map(len, sets)) == len(set().union(*sets))  # disjoint in epoch 1 as well
        assert len({len(r["epoch1"]) for r in results}) == 1
        assert [r["len1"] for r in results] == [len(r["epoch1"]) for r in results]


@pytest.mark.parametrize("equalize", ["drop", "pad"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_each_rank_gets_the_same_batches_for_any_num_workers(matrix, world_size, equalize):
    for rank, r in enumerate(matrix(world_size)):
        for e in (0, 1):
            a, b = r[f"{equalize}-0"][f"epoch{e}"], r[f"{equalize}-2"][f"epoch{e}"]
            assert len(a) == len(b) > 0
            for k, (x, y) in enumerate(zip(a, b)):
                assert x == y, f"rank {rank} epoch {e} batch {k}: indices or X differ between num_workers 0 and 2"


@pytest.mark.parametrize("equalize", ["drop", "pad"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_explicit_rank_and_world_size_match_the_group(store, matrix, world_size, equalize):
    import torch.distributed as dist

    assert not (dist.is_available() and dist.is_initialized())  # this process has no group
    for rank, r in enumerate(matrix(world_size)):
        with dataset(store, equalize=equalize, rank=rank, world_size=world_size) as ds:
            for e in (0, 1):
                ds.set_epoch(e)
                assert len(ds) == r[f"{equalize}-0"][f"len{e}"]
                assert epoch(ds) == r[f"{equalize}-0"][f"epoch{e}"], f"rank {rank} epoch {e}"


def test_explicit_rank_and_world_size_are_validated():
    with pytest.raises(ValueError, match="both rank and world_size"):
        ZarrSparseDataset(rank=0)
    with pytest.raises(ValueError, match="rank must be in"):
        ZarrSparseDataset(rank=2, world_size=2)


def test_seed_mismatch_across_ranks_raises_on_every_rank(store, tmp_path):
    results = launch("seed_mismatch", store, tmp_path, 2, timeout=60)
    for r in results:
        assert r["error"] is not None, f"rank {r['rank']} iterated although the seeds differ"
        assert "seed" in r["error"] and "rank 0=0" in r["error"] and "rank 1=1" in r["error"], r["error"]
        assert r["barrier"]


def test_ranks_resuming_at_different_positions_are_refused(store, tmp_path):
    results = launch("resume_mismatch", store, tmp_path, 2, timeout=60)
    for r in results:
        assert r["error"] is not None and "resume_at" in r["error"], r["error"]


# --------------------------------------------------------------------------- resuming


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_in_a_new_process_continues_the_epoch_exactly(store, tmp_path, num_workers):
    # The uninterrupted run: epochs 1 and 2 (epoch 0 comes first in every run below).
    with dataset(store, num_workers=num_workers) as ds:
        epoch(ds)
        full, following = epoch(ds), epoch(ds)
    n = len(full)
    assert n > 3
    ks = sorted({0, 1, n // 2, n - 1, n})
    states, firsts = {}, {}
    for k in ks:
        with dataset(store, num_workers=num_workers) as ds:
            epoch(ds)  # all of epoch 0
            firsts[k], state = head(ds, k)  # k batches of epoch 1, and the state taken then
        json.dumps(state)  # plain JSON
        # A complete epoch's state points at the start of the next one.
        assert (state["epoch"], state["batches_yielded"]) == ((1, k) if k < n else (2, 0))
        path = tmp_path / f"state_k{k}.json"
        path.write_text(json.dumps(state))
        states[f"k{k}"] = str(path)
    (res,) = launch("resume_load", store, tmp_path / "load", 1, num_workers=num_workers, states=states)
    for k in ks:
        rest = res["rest"][f"k{k}"]
        if k < n:
            assert len(firsts[k]) == k and len(rest) == n - k, (k, len(rest))
            for b, (got, want) in enumerate(zip(firsts[k] + rest, full)):
                assert got == want, f"k={k}: batch {b} differs from the uninterrupted epoch"
        else:  # saved after the epoch's last batch: the restored dataset goes on with the next epoch
            assert firsts[k] == full and rest == following, f"k={k}"


def test_resume_under_ddp_each_rank_restores_its_own_state(store, tmp_path):
    k = 3
    saved = launch("resume_save", store, tmp_path / "save", 2, timeout=60, k=k, num_workers=2)
    pattern = str(tmp_path / "save" / "state{rank}.json")
    loaded = launch("resume_load", store, tmp_path / "load", 2, timeout=60, num_workers=2, states={"k": pattern},
                    other_rank_state=pattern)  # fmt: skip
    for s, l in zip(saved, loaded):
        rank = s["rank"]
        assert s["state"]["rank"] == rank and s["state"]["world_size"] == 2
        assert s["state"]["batches_yielded"] == k and s["state"]["epoch"] == 1
        assert len(s["full"]) > k
        assert s["first"] + l["rest"]["k"] == s["full"], f"rank {rank}: first {k} + rest != the uninterrupted epoch"
        assert l["other_rank_rest"] == l["rest"]["k"]  # the state is the same whichever rank saved it
    assert not set(rows(saved[0]["full"])) & set(rows(saved[1]["full"]))
    assert {k: v for k, v in saved[0]["state"].items() if k != "rank"} == {
        k: v for k, v in saved[1]["state"].items() if k != "rank"}  # fmt: skip


# --------------------------------------------------------------------------- scripts/train.py

LINE = re.compile(r"^rank (\d+) epoch (\d+): (\d+) batches, ([\d,.]+) cells/s, mean loss (\S+)$", re.M)


def run_train(cmd: list[str], timeout: float = 120) -> tuple[list[tuple], dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(k, None)
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{cmd} did not finish within {timeout} s\n{e.stdout}\n{e.stderr}")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = [(int(r), int(e), int(b), float(loss)) for r, e, b, _, loss in LINE.findall(res.stdout)]
    summaries = [line for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1, res.stdout  # one JSON line: rank 0 only
    return lines, json.loads(summaries[0])


def check_training(lines: list[tuple], summary: dict, world_size: int, epochs: int) -> None:
    assert sorted((r, e) for r, e, _, _ in lines) == [(r, e) for r in range(world_size) for e in range(epochs)]
    batches = {(r, e): b for r, e, b, _ in lines}
    per_rank = N // world_size
    for e in range(epochs):
        assert len({batches[r, e] for r in range(world_size)}) == 1  # equal batch counts on every rank
        assert batches[0, e] == -(-per_rank // 64)
    assert summary["world_size"] == world_size
    assert summary["batches_per_rank"] == [sum(batches[r, e] for e in range(epochs)) for r in range(world_size)]
    assert summary["cells_per_rank"] == [epochs * per_rank] * world_size
    assert all(math.isfinite(loss) for *_, loss in lines)
    losses = summary["epoch_losses"]
    assert math.isfinite(summary["final_loss"]) and summary["final_loss"] == pytest.approx(losses[-1])
    assert losses[-1] < losses[0], losses  # it learns


def test_train_script_under_torchrun_with_two_ranks(store):
    # No --num-workers: the default divides this process's cores between the node's two ranks.
    # --standalone: torchrun's own store binds a free port itself (port 0) and the ranks join it: no port to race for.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(TRAIN), "--store", str(store), "--epochs", "2", "--batch-size", "64", "--lr", "0.05"]  # fmt: skip
    lines, summary = run_train(cmd)
    check_training(lines, summary, 2, 2)
    assert summary["num_workers_per_rank"] == [max(1, min(len(os.sched_getaffinity(0)) // 2, 16))] * 2


@pytest.mark.parametrize(
    "local_world_size, cores, workers",
    [(None, 2, 2), ("1", 64, 16), ("8", 64, 8), ("4", 2, 1), ("3", 64, 16), ("", 4, 4), ("many", 4, 4)],
)
def test_defaults_are_shared_by_the_ranks_of_a_node(monkeypatch, local_world_size, cores, workers):
    """Under torchrun, each of LOCAL_WORLD_SIZE ranks gets its share of the cores and of the ring memory."""
    import psutil

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=96 * 2**30))
    if local_world_size is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world_size)
    ranks = int(local_world_size) if (local_world_size or "").isdigit() else 1
    ds = ZarrSparseDataset(64)
    assert ds.num_workers == workers
    assert ds.memory_budget == 96 * 2**30 // 4 // ranks


def test_train_script_in_one_process(store):
    cmd = [sys.executable, str(TRAIN), "--store", str(store), "--epochs", "2", "--batch-size", "64",
           "--num-workers", "0", "--lr", "0.05"]  # fmt: skip
    lines, summary = run_train(cmd)
    check_training(lines, summary, 1, 2)


# --------------------------------------------------------------------------- checkpoints taken between loops


def test_state_taken_right_after_set_epoch_resumes_that_epoch(store):
    with dataset(store) as ds:
        epoch(ds)  # all of epoch 0
        ds.set_epoch(1)
        state = ds.state_dict()  # e.g. a checkpoint at the start of epoch 1
    with dataset(store) as ds:
        ds.set_epoch(1)
        want = epoch(ds)
    with dataset(store) as ds:
        ds.load_state_dict(state)
        assert epoch(ds) == want


def test_state_taken_right_after_load_state_dict_keeps_the_position(store):
    with dataset(store) as ds:
        full = epoch(ds)
    with dataset(store) as ds:
        first, state = head(ds, 3)
    with dataset(store) as ds:
        ds.load_state_dict(state)
        again = ds.state_dict()  # e.g. a checkpoint written right after resuming
    with dataset(store) as ds:
        ds.load_state_dict(again)
        assert first + epoch(ds) == full


# --------------------------------------------------------------------------- samplers


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_sampler_is_shared_out_between_ranks_in_its_order(store, tmp_path, num_workers):
    (alone,) = launch("sampler", store, tmp_path / "one", 1, num_workers=num_workers)
    ranks = launch("sampler", store, tmp_path / "two", 2, timeout=60, num_workers=num_workers)
    for e in ("epoch0", "epoch1"):
        sequence = rows(alone[e])
        assert len(sequence) == 601
        halves = [rows(r[e]) for r in ranks]
        assert halves == [sequence[:300], sequence[300:600]]  # contiguous, equal shares (one index dropped)
    assert rows(alone["epoch0"]) != rows(alone["epoch1"])
    assert {r["len"] for r in ranks} == {-(-300 // 50)}


def test_samplers_that_differ_between_ranks_are_refused_on_every_rank(store, tmp_path):
    results = launch("sampler_mismatch", store, tmp_path, 2, timeout=60)
    for r in results:
        assert r["error"] is not None and "sampled" in r["error"], r["error"]
