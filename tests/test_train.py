"""Training: learning, retrieval, determinism, resume, loaders, the stage, DDP on gloo."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
from fixtures import make_problem, small_cfg, unit

from aether_scale.config import TrainSection, load_config
from aether_scale.model import CheckpointError, load_checkpoint, load_projector, load_text_projector
from aether_scale.pipeline import check_ready, run_stage
from aether_scale.stores.triplets import TripletStore, TripletStoreError, write_triplets
from aether_scale.train import (
    InMemoryBatches,
    StreamingBatches,
    cosine_lr,
    train_model,
)
from aether_scale.train.loader import Shard, split_rows, subsample_rows
from aether_scale.train.stage import train_jobs
from aether_scale.workspace import Workspace

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    p = tmp_path_factory.mktemp("trip") / "triplets.zarr"
    return write_triplets(str(p), **make_problem(1000), chunk_rows=128)


def _states(path: str) -> dict[str, torch.Tensor]:
    ck = load_checkpoint(path)
    return {**{"ae." + k: v for k, v in ck["ae_state_dict"].items()},
            **{"txt." + k: v for k, v in ck["txt_state_dict"].items()}}


def _assert_bitwise_equal(a: str, b: str) -> None:
    sa, sb = _states(a), _states(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ----------------------------------------------------------------------------- learning
def test_loss_falls_and_text_to_ae_retrieval_is_far_above_chance(tmp_path) -> None:
    data = make_problem(3500, seed=1)
    train, held = slice(0, 3000), slice(3000, 3500)
    src = write_triplets(str(tmp_path / "t.zarr"), **{k: v[train] for k, v in data.items()},
                         chunk_rows=1024)
    out = str(tmp_path / "model")
    summary = train_model(src, small_cfg(epochs=8, batch_size=256), out, log=None)
    m = json.loads(open(os.path.join(out, "metrics.json")).read())
    l_ap = [e["L_AP"] for e in m["epochs"]]
    assert l_ap[-1] < 0.6 * l_ap[0]
    assert m["epochs"][-1]["L_AE"] < m["epochs"][0]["L_AE"]
    assert summary["best_epoch"] == int(np.argmin(l_ap))

    ae, txt = load_projector(out), load_text_projector(out)
    with torch.no_grad():
        z_ae = ae(torch.from_numpy(data["base"][held]))
        z_t = txt(torch.from_numpy(data["text"][held]))
    sims = z_t @ z_ae.T                                   # text → AE over 500 held-out POIs
    top10 = sims.topk(10, dim=1).indices
    hit = (top10 == torch.arange(500)[:, None]).any(1).float().mean().item()
    chance = 10 / 500
    assert hit > 10 * chance, f"top-10 hit rate {hit:.3f} vs chance {chance:.3f}"


def _city_triplets(tmp_path, n_pois: int, text: str) -> str:
    from aether_scale.config import SynthSection
    from aether_scale.synthetic import generate_city
    from aether_scale.synthetic.diagnostics import descriptions, embed_texts, pool_ae

    city = generate_city(SynthSection(size_px=256, n_pois=n_pois, n_luc_points=50, n_regions=20,
                                      seed=3))
    base = pool_ae(city, city.pois["row"], city.pois["col"], 50.0)
    aug = pool_ae(city, city.pois["row"], city.pois["col"], 100.0)
    ok = np.isfinite(base).all(1) & np.isfinite(aug).all(1)
    desc = descriptions(city)[ok]
    if text == "minilm":
        emb = embed_texts(desc)
    else:  # fast stand-in: a fixed random vector per subcategory and per category, plus noise
        rng = np.random.default_rng(7)
        sub = city.pois["subcategory"].to_numpy(dtype=str)[ok]
        cat = city.pois["category"].to_numpy(dtype=str)[ok]
        vocab = {s: rng.standard_normal(384) for s in sorted(set(sub) | set(cat))}
        emb = unit(np.stack([vocab[s] + 0.7 * vocab[c] for s, c in zip(sub, cat, strict=True)])
                    + 0.3 * rng.standard_normal((ok.sum(), 384)))
    return write_triplets(str(tmp_path / "city.zarr"), base=base[ok], aug=aug[ok], text=emb,
                          poi_id=city.pois["poi_id"].to_numpy()[ok], chunk_rows=1024)


def test_loss_falls_on_the_synthetic_city(tmp_path) -> None:
    src = _city_triplets(tmp_path, 2500, text="standin")
    train_model(src, small_cfg(epochs=6, batch_size=256), str(tmp_path / "m"), log=None)
    ep = json.loads((tmp_path / "m" / "metrics.json").read_text())["epochs"]
    assert ep[-1]["L_AP"] < ep[0]["L_AP"] - 0.3
    assert ep[-1]["loss"] < ep[0]["loss"]


@pytest.mark.slow
def test_loss_falls_on_the_synthetic_city_with_minilm_text(tmp_path) -> None:
    src = _city_triplets(tmp_path, 3000, text="minilm")
    train_model(src, small_cfg(epochs=10, batch_size=256), str(tmp_path / "m"), log=None)
    ep = json.loads((tmp_path / "m" / "metrics.json").read_text())["epochs"]
    assert ep[-1]["L_AP"] < ep[0]["L_AP"] - 0.3


# ----------------------------------------------------------------------------- determinism, resume
@pytest.mark.parametrize("in_memory", ["always", "never"])
def test_same_seed_gives_bitwise_equal_weights(store, tmp_path, in_memory) -> None:
    cfg = small_cfg(epochs=2, in_memory=in_memory)
    for d in ("a", "b"):
        s = train_model(store, cfg, str(tmp_path / d), log=None)
        assert s["loader"] == ("in_memory" if in_memory == "always" else "streaming")
    _assert_bitwise_equal(str(tmp_path / "a" / "last.pt"), str(tmp_path / "b" / "last.pt"))
    train_model(store, small_cfg(epochs=2, in_memory=in_memory, seed=1), str(tmp_path / "c"), log=None)
    a, c = _states(str(tmp_path / "a" / "last.pt")), _states(str(tmp_path / "c" / "last.pt"))
    assert not torch.equal(a["ae.proj.0.weight"], c["ae.proj.0.weight"])


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("in_memory", ["always", "never"])
def test_interrupted_run_resumes_to_the_uninterrupted_result(store, tmp_path, in_memory) -> None:
    cfg = small_cfg(epochs=4, in_memory=in_memory)
    full = str(tmp_path / "full")
    train_model(store, cfg, full, log=None)

    part = str(tmp_path / "part")
    seen: list[str] = []

    def crash_after_two(msg: str) -> None:
        seen.append(msg)
        if msg.startswith("[train] epoch 2/"):
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train_model(store, cfg, part, log=crash_after_two)
    assert load_checkpoint(os.path.join(part, "last.pt"))["epoch"] == 1
    logs: list[str] = []
    s = train_model(store, cfg, part, log=logs.append, resume=True)
    assert s["resumed_from_epoch"] == 2 and s["epochs_run"] == 2
    assert any("resuming" in m for m in logs)
    for name in ("last.pt", "checkpoint.pt"):
        _assert_bitwise_equal(os.path.join(full, name), os.path.join(part, name))
    mf = json.loads(open(os.path.join(full, "metrics.json")).read())
    mp_ = json.loads(open(os.path.join(part, "metrics.json")).read())
    assert [e["L_AP"] for e in mf["epochs"]] == [e["L_AP"] for e in mp_["epochs"]]
    # a finished run resumes to itself without training
    s2 = train_model(store, cfg, part, log=None, resume=True)
    assert s2["epochs_run"] == 0


def test_resume_refuses_a_different_config(store, tmp_path) -> None:
    out = str(tmp_path / "m")
    train_model(store, small_cfg(epochs=1), out, log=None)
    with pytest.raises(CheckpointError, match="lam"):
        train_model(store, small_cfg(epochs=1, lam=0.5), out, log=None, resume=True)
    # runtime knobs may change between runs
    train_model(store, small_cfg(epochs=1, prefetch=0, threads=2), out, log=None, resume=True)


# ----------------------------------------------------------------------------- outputs, options
def test_metrics_checkpoint_and_best_on_train(store, tmp_path) -> None:
    out = tmp_path / "m"
    s = train_model(store, small_cfg(epochs=3, lam=0.4), str(out), log=None)
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["epochs"]) == 3
    for e in m["epochs"]:
        assert set(e) >= {"epoch", "loss", "L_AE", "L_AP", "seconds", "lr_end"}
        assert e["loss"] == pytest.approx(0.4 * e["L_AE"] + 0.6 * e["L_AP"], rel=1e-6)
    best = int(np.argmin([e["L_AP"] for e in m["epochs"]]))
    assert m["best_epoch"] == best == s["best_epoch"]
    assert m["n_triplets"] == 1000 and m["device"] == "cpu" and m["config"]["lam"] == 0.4
    assert m["epochs"][-1]["lr_end"] == pytest.approx(1e-3 * 0.01)
    ck = load_checkpoint(out / "checkpoint.pt")
    assert ck["epoch"] == best and ck["config"]["in_dim"] == 64 and ck["config"]["text_dim"] == 384
    raw = torch.load(out / "last.pt", weights_only=True)  # safe format, incl. optimizer state
    assert raw["epoch"] == 2 and "optimizer" in raw and "rng" in raw


def test_noaug_and_train_fraction(store, tmp_path) -> None:
    s = train_model(store, small_cfg(epochs=2, use_aug=False, train_fraction=0.3),
                    str(tmp_path / "m"), log=None)
    assert s["n_triplets"] == 300
    m = json.loads((tmp_path / "m" / "metrics.json").read_text())
    for e in m["epochs"]:
        assert e["L_AE"] is None and e["loss"] == e["L_AP"]
    a, b = subsample_rows(1000, 0.3, 0), subsample_rows(1000, 0.3, 0)
    assert np.array_equal(a, b) and len(np.unique(a)) == 300
    assert not np.array_equal(a, subsample_rows(1000, 0.3, 1))
    assert subsample_rows(1000, 1.0, 0) is None


def test_validation_split_selects_the_checkpoint_and_epochs_are_kept(store, tmp_path) -> None:
    """train.val_fraction holds triplets out and picks the checkpoint on their L_AP (the
    reference's val_ratio); save_every keeps periodic checkpoints."""
    out = tmp_path / "m"
    s = train_model(store, small_cfg(epochs=4, val_fraction=0.2, save_every=2), str(out),
                    log=None)
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_triplets"] == 800 and m["n_triplets_val"] == 200 and m["selected_on"] == "val_L_AP"
    vals = [e["val_L_AP"] for e in m["epochs"]]
    assert all(np.isfinite(vals)) and m["best_epoch"] == int(np.argmin(vals)) == s["best_epoch"]
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == m["best_epoch"]
    assert sorted(p.name for p in out.glob("epoch_*.pt")) == ["epoch_0002.pt", "epoch_0004.pt"]
    assert load_checkpoint(out / "epoch_0002.pt")["epoch"] == 1
    tr, va = split_rows(1000, 0.5, 0.2, 0)
    assert len(va) == 200 and len(tr) == 400 and not set(tr) & set(va)
    assert split_rows(1000, 0.3, 0.0, 0)[1] is None
    assert np.array_equal(split_rows(1000, 0.3, 0.0, 0)[0], subsample_rows(1000, 0.3, 0))


@pytest.mark.parametrize("kw", [{"use_gate": False}, {"hidden_dim": 512}, {"out_dim": 64}])
def test_reference_layouts_train_and_export(store, tmp_path, kw) -> None:
    """Layouts off the fused path (no gate, identity shortcut) and wider post-MLPs train,
    load with their layout, and export to the reference format."""
    from aether_scale.model import export_reference

    out = tmp_path / "m"
    s = train_model(store, small_cfg(epochs=2, **kw), str(out), log=None)
    assert np.isfinite(s["best_L_AP"])
    lay = load_projector(out).layout()
    assert lay["proj_dim"] == 256 and all(lay[k] == v for k, v in kw.items())
    ref = export_reference(out / "checkpoint.pt")
    assert ("gate" in ref["ae_state_dict"]) == lay["use_gate"]


def test_cosine_schedule_ends_at_the_final_fraction() -> None:
    assert cosine_lr(0, 100, 1e-3, 0.01) == pytest.approx(1e-3)
    assert cosine_lr(50, 100, 1e-3, 0.01) == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5))
    assert cosine_lr(100, 100, 1e-3, 0.01) == pytest.approx(1e-5)


# ----------------------------------------------------------------------------- loaders
@pytest.fixture(scope="module")
def index_store(tmp_path_factory) -> str:
    """base[:, 0] (and text[:, 0]) hold the row number so batches can be traced."""
    n = 1000
    base = np.zeros((n, 64), np.float32)
    base[:, 0] = np.arange(n)
    text = np.zeros((n, 8), np.float32)
    text[:, 0] = np.arange(n)
    p = tmp_path_factory.mktemp("idx") / "triplets.zarr"
    return write_triplets(str(p), base=base, aug=base + 0.5, text=text, chunk_rows=96)


def _rows(batches) -> list[np.ndarray]:
    out = []
    for b, a, t in batches:
        assert torch.equal(b[:, 0], t[:, 0]) and torch.equal(a[:, 0], b[:, 0] + 0.5)
        out.append(b[:, 0].numpy().astype(int))
    return out


@pytest.mark.parametrize("fraction", [1.0, 0.7])
def test_streaming_epoch_visits_every_selected_row_once(index_store, fraction) -> None:
    st = TripletStore(index_store)
    rows = subsample_rows(st.n, fraction, 0)
    want = np.arange(st.n) if rows is None else rows
    sb = StreamingBatches(st, batch_size=64, rows=rows, seed=0, device=CPU,
                          shuffle_buffer_chunks=3, prefetch=2)
    sb.start(0, 2)
    e0, e1 = _rows(sb.epoch(0)), _rows(sb.epoch(1))
    sb.close()
    for ep in (e0, e1):
        assert len(ep) == sb.steps_per_epoch()
        assert all(len(b) == 64 for b in ep[:-1])
        assert np.array_equal(np.sort(np.concatenate(ep)), want)
    assert not np.array_equal(np.concatenate(e0), np.concatenate(e1))  # reshuffled per epoch
    # rows are mixed across chunks inside a batch (in-buffer shuffle), not one chunk per batch
    assert len(np.unique(e0[0] // 96)) > 1
    # synchronous (prefetch=0) gives the very same batches
    sync = StreamingBatches(st, batch_size=64, rows=rows, seed=0, device=CPU,
                            shuffle_buffer_chunks=3, prefetch=0)
    assert all(np.array_equal(a, b) for a, b in zip(_rows(sync.epoch(0)), e0, strict=True))


def test_streaming_shards_are_disjoint_with_equal_steps(index_store) -> None:
    st = TripletStore(index_store)
    parts = [StreamingBatches(st, batch_size=64, rows=None, seed=0, device=CPU,
                              shard=Shard(r, 2), prefetch=1) for r in range(2)]
    got = [_rows(p.epoch(3)) for p in parts]
    for p in parts:
        p.close()
    assert len(got[0]) == len(got[1]) == parts[0].steps_per_epoch(3) > 0
    assert all(len(b) == 32 for g in got for b in g)
    r0, r1 = np.concatenate(got[0]), np.concatenate(got[1])
    assert not set(r0) & set(r1)
    assert len(r0) + len(r1) > 0.8 * st.n


def test_in_memory_shards_split_each_global_batch(index_store) -> None:
    st = TripletStore(index_store)
    single = _rows(InMemoryBatches(st, batch_size=64, rows=None, seed=5, device=CPU).epoch(2))
    ranks = [_rows(InMemoryBatches(st, batch_size=64, rows=None, seed=5, device=CPU,
                                   shard=Shard(r, 2)).epoch(2)) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1])
    for g, a, b in zip(single, ranks[0], ranks[1], strict=True):
        assert np.array_equal(g, np.concatenate([a, b]))
    assert np.array_equal(np.sort(np.concatenate(single)), np.arange(st.n))
    with pytest.raises(ValueError, match="divisible"):
        InMemoryBatches(st, batch_size=65, rows=None, seed=0, device=CPU, shard=Shard(0, 2))


def test_bad_stores_are_refused_with_the_field_named(tmp_path) -> None:
    d = make_problem(50)
    import zarr

    p = write_triplets(str(tmp_path / "a.zarr"), **d, chunk_rows=16)
    g = zarr.open_group(p, mode="a")
    del g["text"]
    with pytest.raises(TripletStoreError, match="text"):
        TripletStore(p)
    d2 = dict(d)
    d2["base"] = d["base"].copy()
    d2["base"][17, 3] = np.nan
    p2 = write_triplets(str(tmp_path / "b.zarr"), **d2, chunk_rows=16)
    with pytest.raises(TripletStoreError, match="row 17"):
        train_model(p2, small_cfg(epochs=1, batch_size=16), str(tmp_path / "m"), log=None)
    with pytest.raises(TripletStoreError, match="cannot open"):
        TripletStore(str(tmp_path / "missing.zarr"))
    g3 = zarr.open_group(str(tmp_path / "c.zarr"), mode="w")
    for k, shape in (("poi_id", (10,)), ("base", (10, 64)), ("aug", (10, 64)), ("text", (9, 384))):
        g3.create_array(k, shape=shape, dtype="float32" if k != "poi_id" else "int64")
    with pytest.raises(TripletStoreError, match="'text' has shape"):
        TripletStore(str(tmp_path / "c.zarr"))


# ----------------------------------------------------------------------------- the stage
def _workspace(tmp_path, n: int = 600) -> Workspace:
    ws = Workspace(str(tmp_path / "ws"))
    write_triplets(ws.path("triplets.zarr"), **make_problem(n), chunk_rows=256)
    return ws


def _work_folders(ws: Workspace) -> list[str]:
    wdir = os.path.join(ws.root, ".work")
    return sorted(os.listdir(wdir)) if os.path.isdir(wdir) else []


def test_run_train_writes_model_and_noaug_and_skips_when_current(tmp_path) -> None:
    ws = _workspace(tmp_path)
    cfg = load_config(data={"train": {"epochs": 2, "batch_size": 128, "threads": 1}})
    assert cfg.train.variants == {"noaug": {"use_aug": False}}  # the default variant
    res = run_stage("train", ws, cfg)
    assert not res.skipped and res.outputs.keys() == {"model", "model_noaug"}
    for name in ("model", "model_noaug"):
        for f in ("checkpoint.pt", "last.pt", "metrics.json"):
            assert os.path.exists(os.path.join(ws.path(name), f)), (name, f)
    m = json.loads(open(os.path.join(ws.path("model_noaug"), "metrics.json")).read())
    assert m["config"]["use_aug"] is False and m["epochs"][0]["L_AE"] is None
    assert res.stats["model"]["n_triplets"] == 600
    load_projector(ws.path("model"))
    assert not [d for d in _work_folders(ws) if d.startswith("train-")]  # work folder cleaned up
    assert run_stage("train", ws, cfg).skipped
    # a runtime knob does not invalidate the model; a learned one does
    assert run_stage("train", ws, load_config(data={**cfg.model_dump(), "train": {
        **cfg.section("train"), "threads": 2}})).skipped
    cfg2 = load_config(data={"train": {"epochs": 2, "batch_size": 128, "lam": 0.5,
                                       "variants": {}}})
    res2 = run_stage("train", ws, cfg2)
    assert not res2.skipped and res2.outputs.keys() == {"model"}
    assert not os.path.exists(ws.path("model_noaug"))  # a variant no longer made is removed


def test_run_train_resumes_an_interrupted_training(tmp_path) -> None:
    ws = _workspace(tmp_path)
    cfg = load_config(data={"train": {"epochs": 3, "batch_size": 128, "threads": 1,
                                      "variants": {}}})
    [(name, sub, same)] = train_jobs(cfg)
    assert name == "model" and same is None
    key = check_ready("train", ws, cfg).key
    rdir = ws.work_root("train", key) + "/out/model"

    def crash(msg: str) -> None:
        if msg.startswith("[train] epoch 1/"):
            raise _Interrupt

    with pytest.raises(_Interrupt):  # the crash: one epoch done in the stage's work folder
        train_model(ws.path("triplets.zarr"), sub, rdir, log=crash)
    assert load_checkpoint(os.path.join(rdir, "last.pt"))["epoch"] == 0
    res = run_stage("train", ws, cfg)
    assert res.stats["model"]["resumed_from_epoch"] == 1
    assert not os.path.exists(ws.work_root("train", key))  # removed after success
    ref = str(tmp_path / "uninterrupted")
    train_model(ws.path("triplets.zarr"), sub, ref, log=None)
    _assert_bitwise_equal(os.path.join(ws.path("model"), "last.pt"), os.path.join(ref, "last.pt"))


def test_run_train_needs_triplets(tmp_path) -> None:
    ws = Workspace(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="pool"):
        run_stage("train", ws, load_config())


# ----------------------------------------------------------------------------- DDP (gloo, CPU)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, src: str, out: str, cfg_json: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    try:
        s = train_model(src, TrainSection.model_validate_json(cfg_json), out, log=None)
        with open(f"{out}.rank{rank}.json", "w") as f:
            json.dump(s, f)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: ~8 s idle, ~20 s on shared cores
@pytest.mark.parametrize("in_memory", ["always", "never"])
def test_ddp_two_ranks_on_gloo(store, tmp_path, in_memory) -> None:
    """Two gloo ranks: in memory, the result equals single-process training (no dropout)."""
    import torch.multiprocessing as mp

    cfg = small_cfg(epochs=2, dropout=0.0, in_memory=in_memory)
    out = str(tmp_path / "ddp")
    mp.spawn(_ddp_worker, args=(2, _free_port(), store, out, cfg.model_dump_json()),
             nprocs=2, join=True)
    s = [json.load(open(f"{out}.rank{r}.json")) for r in range(2)]
    assert s[0]["world_size"] == 2 and s[0]["steps_per_epoch"] == s[1]["steps_per_epoch"]
    single = str(tmp_path / "single")
    train_model(store, cfg, single, log=None)
    m_ddp = json.loads(open(os.path.join(out, "metrics.json")).read())
    m_one = json.loads(open(os.path.join(single, "metrics.json")).read())
    if in_memory == "always":  # same global batches → same losses and weights (to rounding)
        for a, b in zip(m_ddp["epochs"], m_one["epochs"], strict=True):
            assert a["L_AP"] == pytest.approx(b["L_AP"], rel=1e-4)
        sa, sb = _states(os.path.join(out, "last.pt")), _states(os.path.join(single, "last.pt"))
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-3, atol=1e-4)
    else:  # streaming shards chunks between ranks: each rank steps through half the data
        assert s[0]["steps_per_epoch"] <= 1000 // 128
        assert m_ddp["epochs"][-1]["L_AP"] < m_ddp["epochs"][0]["L_AP"]


class _StopAfter:
    """A ``log`` that interrupts training once ``epoch k/`` has been reported (after last.pt)."""

    def __init__(self, k: int) -> None:
        self.k = k

    def __call__(self, msg: str) -> None:
        if f"epoch {self.k}/" in msg:
            raise _Interrupt(msg)


def _ddp_resume_worker(rank: int, world: int, port: int, src: str, out: str, cfg_json: str,
                       stop_after: int, resume: bool) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    try:
        train_model(src, TrainSection.model_validate_json(cfg_json), out, resume=resume,
                    log=_StopAfter(stop_after) if stop_after else None)
    except _Interrupt:
        pass
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow  # three rounds of two spawned processes
def test_ddp_with_dropout_resumes_bitwise_and_ranks_draw_their_own_masks(store, tmp_path) -> None:
    import torch.multiprocessing as mp

    from aether_scale.train.distributed import rank_seed

    assert len({rank_seed(0, r) for r in range(8)}) == 8 and rank_seed(3, 1) == rank_seed(3, 1)
    cfg = small_cfg(epochs=3, dropout=0.1, in_memory="always").model_dump_json()
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    mp.spawn(_ddp_resume_worker, args=(2, _free_port(), store, full, cfg, 0, False), nprocs=2, join=True)
    mp.spawn(_ddp_resume_worker, args=(2, _free_port(), store, part, cfg, 2, False), nprocs=2, join=True)
    saved = torch.load(os.path.join(part, "last.pt"), weights_only=True)
    assert saved["epoch"] == 1 and len(saved["rng_ranks"]) == 2
    assert not torch.equal(saved["rng_ranks"][0]["torch"], saved["rng_ranks"][1]["torch"])
    mp.spawn(_ddp_resume_worker, args=(2, _free_port(), store, part, cfg, 0, True), nprocs=2, join=True)
    _assert_bitwise_equal(os.path.join(full, "last.pt"), os.path.join(part, "last.pt"))


def _stage_worker(rank: int, world: int, port: int, root: str, result_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    try:
        cfg = load_config(data={"train": {"epochs": 2, "batch_size": 128, "threads": 1}})
        res = run_stage("train", Workspace(root), cfg)  # default variants: noaug
        with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"skipped": res.skipped, "outputs": sorted(res.outputs)}, f)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_run_train_under_two_ranks_rank0_owns_the_workspace(tmp_path) -> None:
    """torchrun-style: rank 0 runs the stage, rank 1 joins both trainings; a rerun skips on both."""
    import torch.multiprocessing as mp

    ws = _workspace(tmp_path)
    for expect_skipped in (False, True):
        mp.spawn(_stage_worker, args=(2, _free_port(), ws.root, str(tmp_path)), nprocs=2, join=True)
        r = [json.load(open(tmp_path / f"rank{k}.json")) for k in range(2)]
        assert r[0] == {"skipped": expect_skipped, "outputs": ["model", "model_noaug"]}
        assert r[1]["skipped"] is expect_skipped and r[1]["outputs"] == []
    m = json.loads(open(os.path.join(ws.path("model"), "metrics.json")).read())
    assert m["world_size"] == 2 and m["n_triplets"] == 600


# ----------------------------------------------------------------------------- raw chunk reads
def test_uncompressed_chunks_are_written_as_zarr_writes_them(tmp_path) -> None:
    """``append_rows`` writes the chunk files of an uncompressed array itself: the files
    (values, padding of the short last chunk, crc32c) and the metadata are byte for byte
    what Zarr's own ``append`` writes, the rows read back equal, and an array that is not
    at a chunk boundary (or is compressed) goes through Zarr."""
    import zarr

    from aether_scale.stores.chunks import StoreRef, compressors
    from aether_scale.stores.rows import _raw_layout, append_rows

    rng = np.random.default_rng(0)
    data = rng.normal(size=(23, 5)).astype(np.float32)
    arrays = {}
    for name in ("mine", "zarr"):
        g = zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="w", zarr_format=3)
        arrays[name] = (g.create_array("v", shape=(0, 5), chunks=(8, 5), dtype="float32",
                                       compressors=compressors(None),
                                       config={"write_empty_chunks": True}),
                        g.create_array("z", shape=(0,), chunks=(8,), dtype="int64",
                                       compressors=compressors()))
    ref = StoreRef.of(tmp_path / "mine.zarr")
    mine, ours_z = arrays["mine"]
    assert _raw_layout(ref, mine) is not None  # the direct path is the one under test
    for a, b in [(0, 16), (16, 20), (20, 23)]:  # 20: not at a chunk boundary → Zarr
        append_rows(ref, "v", mine, data[a:b])
        arrays["zarr"][0].append(data[a:b], axis=0)
        append_rows(ref, "z", ours_z, np.arange(a, b))
        arrays["zarr"][1].append(np.arange(a, b), axis=0)
    def files(root):
        return {str(p.relative_to(root)): p.read_bytes()
                for p in sorted(root.rglob("*")) if p.is_file()}
    got, want = files(tmp_path / "mine.zarr"), files(tmp_path / "zarr.zarr")
    assert sorted(got) == sorted(want) and "v/c/2/0" in got
    assert got == want
    back = zarr.open_group(str(tmp_path / "mine.zarr"), mode="r")
    np.testing.assert_array_equal(back["v"][:], data)
    np.testing.assert_array_equal(back["z"][:], np.arange(23))


def test_uncompressed_chunks_are_read_in_place_and_checked(tmp_path) -> None:
    """The triplets' vectors (codecs bytes + crc32c) are read straight from their files:
    the rows equal Zarr's for any range (parts of chunks, the short last chunk), a
    chunk-sized buffer is filled in place, and a flipped byte or a truncated file anywhere
    in a chunk fails its read naming the chunk, also when only some of its rows are asked
    for (the checksum covers the whole chunk)."""
    import shutil

    import zarr

    from aether_scale.stores.chunks import CorruptStoreError, StoreRef
    from aether_scale.stores.rows import _raw_layout, read_rows

    d = make_problem(300)
    p = write_triplets(str(tmp_path / "t.zarr"), **d, chunk_rows=64)
    ref = StoreRef.of(p)
    z = zarr.open_array(f"{p}/text")
    assert _raw_layout(ref, z) is not None  # the fast path is the one under test
    assert _raw_layout(ref, zarr.open_array(f"{p}/poi_id")) is None  # zstd: through Zarr
    for a, b in [(0, 300), (0, 64), (5, 6), (60, 70), (63, 200), (256, 300), (299, 300)]:
        got = read_rows(ref, "text", a, b, fix="fix it")
        assert got.dtype == np.float32 and np.array_equal(got, d["text"][a:b]), (a, b)
    buf = np.full((64, d["text"].shape[1]), np.nan, np.float32)
    last = read_rows(ref, "text", 256, 300, fix="fix it", out=buf)
    assert np.shares_memory(last, buf) and np.array_equal(last, d["text"][256:300])
    with pytest.raises(ValueError, match="cannot hold"):
        read_rows(ref, "text", 0, 65, fix="fix it", out=buf)

    st = TripletStore(p)
    slots = st.buffers(st.chunk_rows)
    base, aug, text = st.read(64, 128, out=slots)
    assert all(np.shares_memory(x, s) for x, s in zip((base, aug, text), slots, strict=True))
    assert np.array_equal(aug, d["aug"][64:128]) and np.array_equal(text, d["text"][64:128])

    for damage in ("flip", "truncate"):
        q = tmp_path / damage / "t.zarr"
        shutil.copytree(p, q)
        chunk = q / "text" / "c" / "2" / "0"
        raw = bytearray(chunk.read_bytes())
        if damage == "flip":
            raw[len(raw) - 100] ^= 0x01  # a row near the end of the chunk
            chunk.write_bytes(bytes(raw))
        else:
            chunk.write_bytes(bytes(raw[:-9]))
        qref = StoreRef.of(str(q))
        assert np.array_equal(read_rows(qref, "text", 0, 128, fix="x"), d["text"][:128])
        for a, b in [(128, 192), (130, 131), (100, 300)]:  # only rows before the damage, too
            with pytest.raises(CorruptStoreError,
                               match=r"t\.zarr: chunk text/c/2/0 cannot be decoded.*damaged — "
                                     r"rerun"):
                read_rows(qref, "text", a, b, fix="rerun")
