"""tl.autoencoder and tl.scdeepcluster from a backed .h5ad or zarr: X read in row blocks, results as in memory."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch
from anndata._core.sparse_dataset import _CSRDataset
from scipy import sparse

import scembed as se
from scembed._engine import autoencoder as ae
from scembed._engine import counts
from scembed._engine.distributed import World, rank_minibatches

#: small blocks, so that 300 cells make many blocks and several reads: 16-row blocks, 2 per read, 32-row passes
BLOCK, PER_READ, PASS = 16, 2, 32
FAST = dict(n_latent=3, hidden=(16,), max_epochs=3, batch_size=20, show_progress=False)
#: tl.scdeepcluster: both stages, several reads per epoch under the small blocks (300 cells: 19 blocks of 16 rows, 2
#: per read); tol=0 runs every clustering epoch
SDC = dict(max_epochs=(3, 3), tol=0.0, n_latent=3, hidden=(16,), batch_size=20, show_progress=False)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(counts, "BLOCK_ROWS", BLOCK)
    monkeypatch.setattr(counts, "READ_BLOCKS", PER_READ)
    monkeypatch.setattr(counts, "INFER_BATCH", PASS)


@pytest.fixture(scope="module")
def sim() -> ad.AnnData:
    adata = se.datasets.simulate(300, 60, n_celltypes=3, n_batches=2, random_state=4)
    adata.X = sparse.csr_matrix(adata.X)
    return adata


def _backed(adata: ad.AnnData, path, kind: str = "csr") -> ad.AnnData:
    adata = adata.copy()
    adata.X = sparse.csr_matrix(adata.X) if kind == "csr" else np.asarray(adata.X.toarray())
    adata.write_h5ad(path)
    return ad.read_h5ad(path, backed="r")


@pytest.mark.parametrize(
    ("kind", "kwargs"),
    [
        ("csr", {}),
        ("dense", {}),
        # held-out cells chosen explicitly: with a batch penalty the default holds none out
        ("csr", {"batch_key": "batch", "likelihood": "nb", "n_top_genes": 30, "validation_fraction": 0.1}),
    ],
)
def test_backed_equals_in_memory(sim, tmp_path, small_blocks, kind, kwargs):
    """One data path: the same blocks, reads and shuffles from disk as from memory, so the same numbers."""
    memory = sim.copy()
    if kind == "dense":
        memory.X = memory.X.toarray()
    model = se.tl.autoencoder(memory, **FAST, **kwargs, return_model=True)
    backed = _backed(sim, tmp_path / "a.h5ad", kind)
    try:
        assert se.tl.autoencoder(backed, **FAST, **kwargs) is None
        np.testing.assert_array_equal(backed.obsm["X_autoencoder"], memory.obsm["X_autoencoder"])
        assert backed.uns["autoencoder"]["history"] == memory.uns["autoencoder"]["history"]
        assert len(memory.uns["autoencoder"]["history"]["validation_loss"]) == 3
        # the trained model embeds the backed cells too, reading them in row slices
        np.testing.assert_array_equal(model.transform(backed), memory.obsm["X_autoencoder"])
    finally:
        backed.file.close()


@pytest.mark.parametrize("tool", ["autoencoder", "scdeepcluster"])
def test_backed_X_is_never_read_whole(sim, tmp_path, small_blocks, monkeypatch, tool):
    """Every read of the matrix on disk is one slice of at most PASS rows; training reads whole aligned blocks
    (tl.scdeepcluster: in its pretraining and its clustering stage)."""
    reads: list = []
    original = _CSRDataset.__getitem__

    def spy(self, key):
        reads.append(key)
        return original(self, key)

    monkeypatch.setattr(_CSRDataset, "__getitem__", spy)
    backed = _backed(sim, tmp_path / "a.h5ad")
    try:
        if tool == "autoencoder":
            se.tl.autoencoder(backed, **FAST)
        else:
            se.tl.scdeepcluster(backed, n_clusters=3, **SDC)
    finally:
        backed.file.close()
    assert reads and all(isinstance(k, slice) for k in reads), {type(k).__name__ for k in reads}
    sizes = [k.stop - k.start for k in reads]
    assert max(sizes) <= PASS < sim.n_obs
    within_block = [k for k in reads if k.start // BLOCK == (k.stop - 1) // BLOCK and k.stop - k.start <= BLOCK]
    epochs = 3 if tool == "autoencoder" else 6  # scDeepCluster: three pretraining and three clustering epochs
    assert len(within_block) >= epochs * (sim.n_obs // BLOCK)


def test_row_blocks_one_read_is_the_one_permutation():
    """All rows in one read: the batches of one permutation of the rows, as before blocks (same generator draws)."""
    rows = np.sort(np.random.default_rng(0).choice(1000, 700, replace=False))
    blocks = counts.RowBlocks(rows, 512, 16)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    (read_rows, batches), *rest = list(blocks.epoch(64, g1, g1))
    assert not rest and np.array_equal(read_rows, rows)
    expected = rank_minibatches(len(rows), 64, generator=g2)
    assert len(batches) == len(expected) and all(np.array_equal(b, e.numpy()) for b, e in zip(batches, expected))


def test_row_blocks_split_between_ranks(monkeypatch):
    """Every epoch: one shared order of the blocks, disjoint blocks per rank, the same number of steps everywhere."""
    rows = np.setdiff1d(np.arange(203), [5, 17, 18, 90])  # held-out rows are not read for training
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setattr(counts, "world", lambda rank=rank: World(rank=rank, size=2))
        gen = torch.Generator().manual_seed(1)
        epochs = [list(counts.RowBlocks(rows, 16, 2).epoch(10, gen, torch.Generator().manual_seed(rank)))]
        epochs.append(list(counts.RowBlocks(rows, 16, 2).epoch(10, gen, torch.Generator().manual_seed(rank))))
        per_rank.append(epochs)
    for epoch in range(2):
        read = [[r for r, _ in per_rank[rank][epoch]] for rank in (0, 1)]
        steps = [sum(len(b) for _, b in per_rank[rank][epoch]) for rank in (0, 1)]
        assert steps[0] == steps[1] > 0
        blocks = [set(np.concatenate(read[rank]) // 16) for rank in (0, 1)]
        assert not blocks[0] & blocks[1]  # disjoint
        assert len(blocks[0] | blocks[1]) == 12  # 13 blocks: 6 each, one waits for the next epoch
        for rank in (0, 1):
            for r, batches in per_rank[rank][epoch]:
                assert len(set(r // 16)) <= 2  # at most PER_READ blocks in memory
                assert np.isin(r, rows).all() and all(len(b) <= 10 for b in batches)
    first = [set(np.concatenate([r for r, _ in per_rank[0][e]]) // 16) for e in range(2)]
    assert first[0] != first[1]  # a new order every epoch


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        ("fraction", r"adata\.X must hold raw \(integer\) counts"),
        ("negative", r"adata\.X must hold raw counts, but it has negative values \(min -3\)"),
        ("nan", r"adata\.X contains 2 NaN or infinite value\(s\)"),  # in two blocks: counted over all of them
    ],
)
def test_backed_bad_counts_are_named_before_training(sim, tmp_path, small_blocks, mutate, match):
    adata = sim.copy()
    X = adata.X.astype(np.float32)
    if mutate == "fraction":
        X.data[-1] = 0.5
    elif mutate == "negative":
        X.data[len(X.data) // 2] = -3
    else:
        X.data[[0, -1]] = np.nan
    adata.X = X
    backed = _backed(adata, tmp_path / "a.h5ad")
    try:
        with pytest.raises(ValueError, match=match):
            se.tl.autoencoder(backed, **FAST)
        assert "X_autoencoder" not in backed.obsm and "autoencoder" not in backed.uns
    finally:
        backed.file.close()


def test_backed_copy_is_refused(sim, tmp_path):
    backed = _backed(sim, tmp_path / "a.h5ad")
    try:
        with pytest.raises(ValueError, match=r"`copy=True`.*would load adata\.X.*`copy=False`"):
            se.tl.autoencoder(backed, copy=True, **FAST)
        assert "X_autoencoder" not in backed.obsm
    finally:
        backed.file.close()


def test_validation_cells_are_bounded():
    train, val = ae.split_validation(100_000, 0.1, 0)
    assert len(val) == ae.MAX_VALIDATION_ROWS and len(train) == 100_000 - ae.MAX_VALIDATION_ROWS
    train, val = ae.split_validation(1000, 0.1, 0)  # below the bound: the share asked for
    assert len(val) == 100 and np.intersect1d(train, val).size == 0


def _zarr(adata: ad.AnnData, path, kind: str = "csr") -> ad.AnnData:
    """An AnnData whose X stays in a zarr store: anndata's lazy sparse dataset (CSR) or the zarr array (dense)."""
    zarr = pytest.importorskip("zarr")
    adata = adata.copy()
    adata.X = sparse.csr_matrix(adata.X, dtype=np.float32) if kind == "csr" else adata.X.toarray().astype(np.float32)
    adata.write_zarr(path)
    group = zarr.open(str(path), mode="r")
    X = ad.io.sparse_dataset(group["X"]) if kind == "csr" else group["X"]
    return ad.AnnData(X=X, obs=ad.io.read_elem(group["obs"]), var=ad.io.read_elem(group["var"]))


@pytest.mark.filterwarnings("ignore:Writing zarr v2 data")
@pytest.mark.parametrize("kind", ["csr", "dense"])
def test_zarr_store_equals_in_memory_and_is_read_in_blocks(sim, tmp_path, small_blocks, monkeypatch, kind):
    """X in a zarr store: the same blocks and numbers as in memory, every read of the store at most PASS rows."""
    memory = sim.copy()
    memory.X = sparse.csr_matrix(memory.X, dtype=np.float32)
    if kind == "dense":
        memory.X = memory.X.toarray()
    se.tl.autoencoder(memory, **FAST)
    lazy = _zarr(sim, tmp_path / "a.zarr", kind)
    reads: list = []
    cls = type(lazy.X)
    original = cls.__getitem__

    def spy(self, key):
        reads.append(key)
        return original(self, key)

    monkeypatch.setattr(cls, "__getitem__", spy)
    se.tl.autoencoder(lazy, **FAST)
    np.testing.assert_array_equal(lazy.obsm["X_autoencoder"], memory.obsm["X_autoencoder"])
    rows = [k[0] if isinstance(k, tuple) else k for k in reads]
    assert rows and all(isinstance(k, slice) for k in rows), {type(k).__name__ for k in rows}
    assert max((k.stop or sim.n_obs) - (k.start or 0) for k in rows) <= PASS < sim.n_obs


# ------------------------------------------------------------------------------------------------ tl.scdeepcluster


@pytest.mark.parametrize(
    ("kind", "kwargs"),
    [("csr", {"n_clusters": 3}), ("dense", {"n_clusters": 0, "batch_key": "batch", "n_top_genes": 40})],
)
def test_scdeepcluster_backed_equals_in_memory(sim, tmp_path, small_blocks, kind, kwargs):
    """Pretraining and the clustering stage read the same blocks from disk as from memory: the same numbers."""
    memory = sim.copy()
    if kind == "dense":
        memory.X = memory.X.toarray()
    model = se.tl.scdeepcluster(memory, **SDC, **kwargs, return_model=True)
    backed = _backed(sim, tmp_path / "a.h5ad", kind)
    try:
        assert se.tl.scdeepcluster(backed, **SDC, **kwargs) is None
        for key in ("X_scdeepcluster", "scdeepcluster_proba"):
            np.testing.assert_array_equal(backed.obsm[key], memory.obsm[key])
        assert backed.obs["scdeepcluster"].equals(memory.obs["scdeepcluster"])
        assert backed.uns["scdeepcluster"]["history"] == memory.uns["scdeepcluster"]["history"]
        assert len(memory.uns["scdeepcluster"]["history"]["cluster_loss"]) == 3
        # the model assigns the backed cells too, reading them in row slices
        labels, proba, latent = model.predict(backed)
        np.testing.assert_array_equal(latent, memory.obsm["X_scdeepcluster"])
        np.testing.assert_array_equal(proba, memory.obsm["scdeepcluster_proba"])
        np.testing.assert_array_equal(labels.astype(str), memory.obs["scdeepcluster"].to_numpy().astype(str))
    finally:
        backed.file.close()


def test_scdeepcluster_clusters_from_many_reads(monkeypatch):
    """The clustering stage from reads of 2 blocks of 16 rows finds the types as well as from one read of all cells."""
    from sklearn.metrics import adjusted_rand_score

    adata = se.datasets.simulate(600, 300, n_celltypes=4, random_state=1)
    kw = dict(n_clusters=4, max_epochs=(60, 60), n_latent=8, hidden=(64,), batch_size=64, show_progress=False)
    one_read = adata.copy()
    se.tl.scdeepcluster(one_read, **kw)
    monkeypatch.setattr(counts, "BLOCK_ROWS", BLOCK)
    monkeypatch.setattr(counts, "READ_BLOCKS", PER_READ)
    many = adata.copy()
    se.tl.scdeepcluster(many, **kw)
    # the draws differ (blocks of 16 rows instead of one permutation), so the numbers do; the clusters must not
    assert not np.array_equal(many.obsm["X_scdeepcluster"], one_read.obsm["X_scdeepcluster"])
    truth = adata.obs["celltype"]
    ari_one = adjusted_rand_score(truth, one_read.obs["scdeepcluster"])
    ari_many = adjusted_rand_score(truth, many.obs["scdeepcluster"])
    assert ari_one > 0.9 and ari_many > 0.9, (ari_one, ari_many)


def test_scdeepcluster_backed_bad_counts_and_copy_are_refused(sim, tmp_path, small_blocks):
    adata = sim.copy()
    X = adata.X.astype(np.float32)
    X.data[-1] = 0.5  # in the last block: found by the pass over every block, before training
    adata.X = X
    backed = _backed(adata, tmp_path / "bad.h5ad")
    try:
        with pytest.raises(ValueError, match=r"adata\.X must hold raw \(integer\) counts"):
            se.tl.scdeepcluster(backed, n_clusters=3, **SDC)
        assert "X_scdeepcluster" not in backed.obsm and "scdeepcluster" not in backed.uns
        assert "scdeepcluster" not in backed.obs
    finally:
        backed.file.close()
    backed = _backed(sim, tmp_path / "a.h5ad")
    try:
        with pytest.raises(ValueError, match=r"`copy=True`.*would load adata\.X.*`copy=False`"):
            se.tl.scdeepcluster(backed, n_clusters=3, copy=True, **SDC)
        assert "X_scdeepcluster" not in backed.obsm
    finally:
        backed.file.close()
