"""Small, fast checks of the model pieces: shapes, the footprint loss, gene tokens, windows."""
import itertools

import numpy as np
import pytest
import torch
from conftest import hex_lattice

from models import build_model
from utils.core import geometry as geo
from utils.superres.consistency import global_rescale_factors, kernel_weights, local_rescale_factors, spot_sums
from utils.superres.inputs import GeneTokens, feature_scaling, gather_windows, spot_windows, window_half
from utils.superres.predict import median_of_states, median_prediction, window_cover
from utils.superres.train import footprint_shares, footprint_tokens, spot_loss

DIMS = {"micro": 6, "meso": 5, "macro": 4, "extra": 5}


@pytest.mark.parametrize("opts", [{}, {"use_gene_tokens": False}, {"use_linear_head": False},
                                  {"use_gene_tokens": False, "use_window_attention": False}])
def test_trihrge_shapes_and_positive_output(opts):
    torch.manual_seed(0)
    m = build_model("trihrge", DIMS, 11, 7, d=16, heads=2, depth=1, **opts)
    B = 3
    hist = {k: torch.randn(B, 49, c) for k, c in DIMS.items()}
    hidden = torch.zeros(B, 5, dtype=torch.bool)
    hidden[1] = True  # all hidden: must still be defined
    y = m(hist, torch.rand(B, 5, 11), torch.randn(B, 5, 2), hidden)
    assert y.shape == (B, 49, 11) and torch.isfinite(y).all() and (y > 0).all()


@pytest.mark.parametrize("name,opts", [("mlp", {}), ("trihrge", {"use_gene_tokens": False, "use_window_attention": False})])
def test_per_superpixel_networks_need_no_overlapping_windows(name, opts):
    """A super-pixel's prediction depends on its own features only (not on its window or neighbours),
    so inference windows need not overlap."""
    from models import model_class
    torch.manual_seed(0)
    m = build_model(name, DIMS, 4, 7, **opts).eval()
    hist = {k: torch.randn(2, 49, c) for k, c in DIMS.items()}
    y = m(hist)
    hist2 = {k: v.clone() for k, v in hist.items()}
    hist2["micro"][:, 5] += 1.0
    y2 = m(hist2)
    changed = (y - y2).abs().sum(-1) > 0
    assert changed[:, 5].all() and not changed[:, :5].any() and not changed[:, 6:].any()
    perm = torch.randperm(49)  # nor on where it sits in the window
    assert torch.allclose(m({k: v[:, perm] for k, v in hist.items()}), y[:, perm], atol=1e-6)
    assert model_class(name).inference_stride(3, opts) == 7


def test_positive_output_is_elu_plus_offset_with_its_gradient():
    from models.layers import positive_output
    x = torch.linspace(-30, 30, 2001, dtype=torch.float64, requires_grad=True)
    ref = torch.nn.functional.elu(x, alpha=0.01) + 0.01
    assert torch.allclose(positive_output(x), ref, atol=1e-12)
    with torch.no_grad():  # the in-place inference path
        assert torch.allclose(positive_output(x.detach().clone()), ref, atol=1e-12)
    assert torch.autograd.gradcheck(positive_output, ((x[::50].detach() + 0.013).requires_grad_(),))  # off the kink at 0
    g, = torch.autograd.grad(positive_output(x).sum(), x)
    g_ref, = torch.autograd.grad(ref.sum(), x)
    assert torch.allclose(g, g_ref, atol=1e-12)


@pytest.mark.parametrize("name,opts", [("trihrge", {}), ("trihrge", {"use_gene_tokens": False}),
                                       ("trihrge", {"depth": 2}), ("mlp", {}),
                                       ("trihrge", {"use_gene_tokens": False, "use_window_attention": False})])
def test_keep_predicts_exactly_the_chosen_tokens(name, opts):
    """Training predicts only footprint tokens (keep); they must equal the full window's values."""
    torch.manual_seed(1)
    kw = {"d": 16, "heads": 2, "depth": 1, **opts} if name == "trihrge" else {}
    m = build_model(name, DIMS, 7, 7, **kw).eval()
    B = 3
    hist = {k: torch.randn(B, 49, c) for k, c in DIMS.items()}
    args = (torch.rand(B, 5, 7), torch.randn(B, 5, 2), torch.zeros(B, 5, dtype=torch.bool))
    fp = np.random.default_rng(0).random((B, 49)) < 0.6
    keep, w = footprint_tokens(fp)
    assert w.sum(1).tolist() == fp.sum(1).tolist() and keep.shape[1] == fp.sum(1).max()
    full = m(hist, *args)
    part = m(hist, *args, keep=torch.from_numpy(keep))
    ref = torch.take_along_dim(full, torch.from_numpy(keep)[..., None], dim=1)
    assert torch.allclose(part, ref, atol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_median_of_states_matches_torch(n):
    x = torch.randn(n, 4, 9, 3)
    assert torch.allclose(median_of_states(x.unbind(0)), x.quantile(0.5, dim=0), atol=1e-6)


@pytest.mark.parametrize("overwrite", [False, True])
def test_median_of_five_is_a_median_network(overwrite):
    """A min/max network selects the median of every input iff it does for every 0-1 input (the 0-1
    principle): all 32 of them, then random ties against torch, with and without overwriting."""
    ones = torch.tensor(list(itertools.product([0.0, 1.0], repeat=5))).t()
    assert torch.equal(median_of_states([x.clone() for x in ones], overwrite=overwrite), ones.median(0).values)
    x = torch.randint(0, 4, (5, 7, 11)).to(torch.bfloat16)
    kept = x.clone()
    assert torch.equal(median_of_states(list(x.unbind(0)), overwrite=overwrite), kept.median(0).values)
    assert overwrite or torch.equal(x, kept)


def test_positive_output_is_non_decreasing_on_every_bfloat16():
    """What lets inference take the median of the states before the activation (median_prediction)."""
    from models.layers import positive_output
    x = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    x = x[~torch.isnan(x)].sort().values
    y = positive_output(x.clone())
    assert (y[1:] >= y[:-1]).all()


@pytest.mark.parametrize("n,dtype", [(5, torch.bfloat16), (3, torch.float32), (4, torch.float32)])
def test_median_prediction_is_the_median_of_the_states_predictions_bit_for_bit(n, dtype):
    torch.manual_seed(2)
    models = [build_model("mlp", DIMS, 300, 7).eval() for _ in range(n)]
    hist = {k: torch.randn(64, 1, c) for k, c in DIMS.items()}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        got = median_prediction(models, (hist,))
        ref = median_of_states([m(hist) for m in models])
    assert got.dtype == dtype and torch.equal(got, ref)


def test_footprint_loss_is_mean_over_footprint():
    pred = torch.tensor([[[1.0], [3.0], [100.0]]])
    keep, share = footprint_shares(np.array([[1.0, 1.0, 0.0]]), "cpu")
    mean = (torch.take_along_dim(pred, keep[..., None], dim=1) * share.unsqueeze(-1)).sum(1)
    assert spot_loss(mean, torch.tensor([[2.0]])).item() == pytest.approx(0.0)
    assert spot_loss(mean, torch.tensor([[0.0]])).item() == pytest.approx(4.0)


def test_spot_windows_hold_the_footprint():
    xy = np.array([[100.3, 200.7], [57.0, 311.9], [16 * 20 + 15.9, 16 * 20 + 0.1]])
    radius = 55.0
    rows, cols, half, fp = spot_windows(xy, radius, (100, 100))
    assert half == window_half(radius) == 3
    from utils.superres.inputs import window_grid
    dr, dc = window_grid(half)
    for i, (x, y) in enumerate(xy):
        r, c = geo.footprint(x, y, radius, (100, 100))
        got = {(rows[i] + a, cols[i] + b) for a, b, f in zip(dr, dc, fp[i]) if f}
        assert got == set(zip(r.tolist(), c.tolist()))


def test_gather_windows_matches_direct_indexing_and_pads():
    rng = np.random.default_rng(0)
    maps = {"micro": rng.normal(size=(10, 12, 3)).astype(np.float16)}
    out, valid = gather_windows(maps, np.array([0, 5]), np.array([0, 6]), 1)
    x = out["micro"]
    assert x.shape == (2, 9, 3)
    np.testing.assert_array_equal(x[1, 4], maps["micro"][5, 6].astype(np.float32))
    np.testing.assert_array_equal(x[1, 0], maps["micro"][4, 5].astype(np.float32))
    assert not valid[0, 0] and (x[0, 0] == 0).all()


def test_feature_scaling_standardises_the_footprints_and_leaves_padding_at_zero():
    rng = np.random.default_rng(5)
    maps = {"micro": (rng.normal(size=(10, 12, 3)) * [0.01, 1.0, 3.0] + [0.2, -1.0, 5.0]).astype(np.float32)}
    maps["micro"][..., 2] = 7.0                                  # a constant channel
    rows, cols = np.array([0, 4, 6]), np.array([0, 5, 8])
    hist, valid = gather_windows(maps, rows, cols, 1)
    fp = valid & (rng.random(valid.shape) < 0.7)
    scaling = feature_scaling(hist, fp)
    scaled, _ = gather_windows(maps, rows, cols, 1, scaling=scaling)
    inside = scaled["micro"][fp]
    np.testing.assert_allclose(inside[:, :2].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(inside[:, :2].std(0), 1, rtol=1e-4)
    assert scaling["micro"][1][2] == 1 and (inside[:, 2] == 0).all()
    assert (scaled["micro"][~valid] == 0).all()


def test_standardised_predictions_do_not_depend_on_each_channels_units():
    """With --standardize-features a channel's offset and scale (its units) do not change what the
    network sees at inference: predict_tissue applies the scaling taken from the spot windows."""
    from utils.superres.predict import predict_tissue
    rng = np.random.default_rng(6)
    maps = {k: rng.normal(size=(12, 10, c)).astype(np.float32) for k, c in DIMS.items()}
    units = {k: (rng.uniform(0.01, 100, c).astype(np.float32), rng.normal(size=c).astype(np.float32))
             for k, c in DIMS.items()}
    other = {k: m * units[k][0] + units[k][1] for k, m in maps.items()}
    rows, cols = np.nonzero(rng.random((12, 10)) < 0.5)
    _, valid = gather_windows(maps, rows, cols, 1)
    torch.manual_seed(6)
    models = [build_model("mlp", DIMS, 6, 3).eval()]
    cfg = {"half": 1, "stride": 3, "n_genes": 6}
    preds = []
    for m in (maps, other):
        scaling = feature_scaling(gather_windows(m, rows, cols, 1)[0], valid)
        preds.append(predict_tissue(models, cfg, m, None, rows, cols, "cpu", batch=4, progress=False, scaling=scaling))
    np.testing.assert_allclose(preds[0], preds[1], rtol=1e-3, atol=1e-5)
    raw = predict_tissue(models, cfg, other, None, rows, cols, "cpu", batch=4, progress=False)
    assert not np.allclose(raw, preds[1], rtol=1e-2)


def test_gene_tokens_leave_self_out():
    xy = hex_lattice(6, 6, 100.0)
    from utils.spots.lattice import describe_lattice, hr_pseudo_spots
    lat = describe_lattice(xy)
    hr, sources = hr_pseudo_spots(xy, lat)
    allp = np.concatenate([xy, hr])
    src = np.full((len(allp), 4), -1)
    src[:len(xy), 0] = np.arange(len(xy))
    for i, s in enumerate(sources):
        src[len(xy) + i, :len(s)] = s
    tok = GeneTokens(allp, np.zeros((len(allp), 2)), src, 100.0, k=5)
    spot = 14
    idx, offs, hid = tok.query(xy[[spot]])
    assert idx[0, 0] == spot and np.allclose(offs[0, 0], 0)
    idx2, offs2, hid2 = tok.query(xy[[spot]], exclude_spot=np.array([spot]))
    assert not hid2.any()
    assert not (src[idx2[0]] == spot).any()  # nothing made from the spot itself
    assert np.linalg.norm(offs2[0], axis=1).min() > 0.8


def test_window_cover_weights_every_superpixel():
    rows, cols = np.nonzero(np.ones((10, 11), bool))
    cr, cc, pix, window, token, weight = window_cover(rows, cols, 3, 3)
    w = 7
    dr, dc = token // w - 3, token % w - 3
    np.testing.assert_array_equal(cr[window] + dr, rows[pix])
    np.testing.assert_array_equal(cc[window] + dc, cols[pix])
    assert set(pix.tolist()) == set(range(len(rows)))      # every super-pixel is covered
    assert (weight > 0).all() and weight.max() == 1.0
    pairs = set(zip(pix.tolist(), window.tolist()))
    assert len(pairs) == len(pix)                          # at most once per window


def test_kernel_weights_and_rescaling():
    spots = np.array([[0.0, 0.0], [100.0, 0.0]])
    pts = np.array([[0.0, 0.0], [50.0, 0.0], [1e4, 0.0]])
    W = kernel_weights(pts, spots, 50.0).toarray()
    np.testing.assert_allclose(W.sum(1), 1.0)
    assert W[1, 0] == pytest.approx(0.5) and W[2, 1] == pytest.approx(1.0)
    vals = np.array([[1.0], [2.0], [4.0]])
    import scipy.sparse as sparse
    M = sparse.csr_matrix((np.ones(3), (np.array([0, 0, 1]), np.array([0, 1, 2]))), shape=(2, 3))
    s = spot_sums(vals, M)
    np.testing.assert_allclose(s, [[3.0], [4.0]])
    measured = np.array([[6.0], [4.0]])
    np.testing.assert_allclose(global_rescale_factors(measured, s), [10 / 7], rtol=1e-6)
    f = local_rescale_factors(measured, s, kernel_weights(spots, spots, 1.0), eps=0.0)
    np.testing.assert_allclose(f[:, 0], [2.0, 1.0], rtol=1e-6)


@pytest.mark.parametrize("sigma,k", [(10.0, 32), (40.0, 5), (2.0, 32)])
def test_kernel_weights_are_the_k_nearest_within_the_cutoff_and_store_no_zeros(sigma, k):
    """The brute-force definition: per point the k nearest spots, Gaussian weights of those within
    3 sigma (a spot at exactly 3 sigma included), normalised; none within reach: the nearest, 1."""
    rng = np.random.default_rng(int(sigma))
    spots = rng.uniform(0, 200, (60, 2))
    pts = np.concatenate([rng.uniform(-50, 250, (300, 2)), spots[:3] + [3 * sigma, 0.0]])
    W = kernel_weights(pts, spots, sigma, k=k)
    d = np.linalg.norm(pts[:, None] - spots[None], axis=-1)
    ref = np.zeros_like(d)
    for i, row in enumerate(d):
        nearest = np.argsort(row, kind="stable")[:k]
        inside = nearest[row[nearest] <= 3 * sigma]
        if len(inside):
            ref[i, inside] = np.exp(-0.5 * (row[inside] / sigma) ** 2)
        else:
            ref[i, nearest[0]] = 1.0
    ref /= ref.sum(1, keepdims=True)
    np.testing.assert_allclose(W.toarray(), ref, rtol=1e-12, atol=0)
    assert (W.data > 0).all()


def test_split_validation_is_seeded_disjoint_and_complete():
    from utils.superres.train import split_validation
    a = split_validation(100, 0.1, np.random.default_rng(3))
    b = split_validation(100, 0.1, np.random.default_rng(3))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert len(a[1]) == 10 and not set(a[0]) & set(a[1]) and len(a[0]) + len(a[1]) == 100
    assert len(split_validation(100, 0.0, np.random.default_rng(3))[1]) == 0
    assert len(split_validation(9, 0.1, np.random.default_rng(3))[1]) == 0  # too few spots: no held-out set


def _piece_setup(lr_schedule="auto"):
    """A small TriHRGE training (dropout on, a rate schedule, held-out spots, bf16): (cfg, data)."""
    rng = np.random.default_rng(1)
    n, T, G = 60, 9, 4
    data = {"hist": {k: rng.normal(size=(n, T, c)).astype(np.float32) for k, c in DIMS.items()},
            "fp": (rng.random((n, T)) < 0.7).astype(np.float32), "target": rng.random((n, G)).astype(np.float32)}
    data["fp"][:, 4] = 1
    cfg = {"model": "trihrge", "dims": DIMS, "n_genes": G, "half": 1, "lr": 3e-3, "weight_decay": 0.0,
           "model_opts": {"d": 16, "dropout": 0.1, "use_gene_tokens": False, "use_window_attention": False},
           "batch_size": 8, "epochs": 9, "loss": "mse", "token_mask": 0.0, "val_fraction": 0.2, "patience": 20,
           "lr_schedule": lr_schedule, "precision": "bf16"}
    return cfg, data


@pytest.mark.parametrize("lr_schedule", ["auto", "plateau"])
def test_a_state_trained_in_pieces_has_the_bits_of_one_trained_in_one_go(lr_schedule):
    """StateTraining.snapshot() -> restore() into a fresh StateTraining after every epoch (as a state
    moves between training workers; the next test sends it between processes) trains the same bits
    and histories as train_state."""
    import copy

    from utils.superres.train import StateTraining, train_state
    cfg, data = _piece_setup(lr_schedule)
    want, want_info = train_state(cfg, data, 5, "cpu", progress=False)
    snap = None
    while True:
        run = StateTraining(cfg, data, 5, "cpu")
        start = run.snapshot() if snap is None else snap
        torch.manual_seed(99)   # what the process ran in between must not matter
        run.restore(start)
        run.run_epoch()
        if run.done:
            break
        snap = copy.deepcopy(run.snapshot())
    got, info = run.result()
    assert info == want_info and info["epochs_run"] == 9
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_states_trained_in_pieces_by_two_workers_equal_the_sequential_ones(tmp_path):
    """_train_in_pieces with one epoch a piece: three states move between two worker processes
    and come out bit-identical, records included, to training them one after another."""
    from utils.core.workers import worker_pool
    from utils.superres import states
    cfg, data = _piece_setup()
    jobs = [(s, "fp", 10 + s, None, tmp_path / f"p{s}.pt", tmp_path / f"p{s}.json", f"state {s}") for s in range(3)]
    with worker_pool(2, setup=(states._start_training_worker, data)) as pool:
        pieces = states._train_in_pieces(pool, jobs, cfg, 2, False, piece_seconds=0.0)
    for s, fp_id, seed, val_idx, pt, meta_p, desc in jobs:
        ref_pt, ref_meta = tmp_path / f"r{s}.pt", tmp_path / f"r{s}.json"
        ref = states._train_to_files(cfg, data, fp_id, seed, val_idx, ref_pt, ref_meta, "cpu", False, desc)
        a, b = (torch.load(p, weights_only=True) for p in (pt, ref_pt))
        assert all(torch.equal(a[k], b[k]) for k in b)
        drop = ("seconds", "spot_epochs_per_second")
        assert {k: v for k, v in pieces[s].items() if k not in drop} == {k: v for k, v in ref.items() if k not in drop}


def test_early_stopping_keeps_the_best_held_out_epoch():
    """Random targets: the held-out loss soon stops improving; training must stop `patience` epochs
    after its best epoch and return that epoch's weights."""
    from utils.superres.train import train_state, validation_loss
    rng = np.random.default_rng(0)
    n, T, G = 80, 9, 3
    data = {"hist": {k: rng.normal(size=(n, T, c)).astype(np.float32) for k, c in DIMS.items()},
            "fp": (rng.random((n, T)) < 0.7).astype(np.float32), "target": rng.random((n, G)).astype(np.float32)}
    data["fp"][:, 4] = 1
    cfg = {"model": "mlp", "dims": DIMS, "n_genes": G, "half": 1, "model_opts": {}, "lr": 3e-3, "weight_decay": 0.0,
           "batch_size": 8, "epochs": 300, "loss": "mse", "token_mask": 0.0, "val_fraction": 0.2, "patience": 5}
    state, info = train_state(cfg, data, 0, torch.device("cpu"), progress=False)
    assert info["val_spots"] == 16 and info["train_spots"] == 64
    assert info["epochs_run"] < 300 and info["epochs_run"] - info["best_epoch"] == 5
    v = info["val_history"]
    best = v[info["best_epoch"] - 1]
    assert best <= min(v) / (1 - 1e-3)  # later epochs improved by less than 0.1% at most
    from utils.superres.train import footprint_shares, split_validation
    _, val_idx = split_validation(n, 0.2, np.random.default_rng(0))
    model = build_model("mlp", DIMS, G, 3)
    model.load_state_dict(state)
    keep, share = footprint_shares(data["fp"], "cpu")
    got = validation_loss(model, data, val_idx, keep, share, torch.from_numpy(data["target"]), cfg, False, "cpu", 8)
    assert got == pytest.approx(best, rel=1e-5)
    state2, info2 = train_state(cfg, data, 0, torch.device("cpu"), progress=False)  # seeded: same run
    assert info2 == info and all(torch.equal(state[k], state2[k]) for k in state)


def _schedule_case(schedule, *, batch_size, epochs):
    """(cfg, data): an MLP on 60 random spots, 20% held out, no early stopping, lr 3e-3."""
    rng = np.random.default_rng(1)
    n, T, G = 60, 9, 3
    data = {"hist": {k: rng.normal(size=(n, T, c)).astype(np.float32) for k, c in DIMS.items()},
            "fp": np.ones((n, T), np.float32), "target": rng.random((n, G)).astype(np.float32)}
    cfg = {"model": "mlp", "dims": DIMS, "n_genes": G, "half": 1, "model_opts": {}, "lr": 3e-3, "weight_decay": 0.0,
           "batch_size": batch_size, "epochs": epochs, "loss": "mse", "token_mask": 0.0, "val_fraction": 0.2,
           "patience": 0, "lr_schedule": schedule}
    return cfg, data


def test_plateau_schedule_cuts_the_rate_after_epochs_without_a_better_held_out_loss():
    """--lr-schedule plateau: the rate of each epoch follows the held-out losses before it (x 0.3
    after 3 epochs in a row without a 0.1% better loss); constant keeps --lr."""
    from utils.superres.train import LR_PLATEAU, MIN_IMPROVEMENT, train_state
    cfg, data = _schedule_case("plateau", batch_size=8, epochs=25)
    _, info = train_state(cfg, data, 0, torch.device("cpu"), progress=False)
    lr, best, bad, expected = cfg["lr"], np.inf, 0, []
    for v in info["val_history"]:
        expected.append(lr)
        best, bad = (v, 0) if v < best * (1 - MIN_IMPROVEMENT) else (best, bad + 1)
        if bad > LR_PLATEAU["patience"]:
            lr, bad = lr * LR_PLATEAU["factor"], 0
    assert info["lr_history"] == pytest.approx(expected) and min(expected) < cfg["lr"]
    _, flat = train_state({**cfg, "lr_schedule": "constant"}, data, 0, torch.device("cpu"), progress=False)
    assert flat["lr_history"] == [cfg["lr"]] * 25


def test_noisy_plateau_cuts_only_a_noisy_held_out_loss_and_stops_at_the_cut_after_the_last():
    """--lr-schedule auto: a smooth plateau keeps the rate; a bouncing one is cut x 0.3 after 3 epochs
    without a better loss, twice, and the third cut due stops the state."""
    from utils.superres.train import LR_AUTO, LR_PLATEAU, NoisyPlateau, loss_noise, train_state
    assert loss_noise(list(0.01 * 0.97 ** np.arange(10))) == pytest.approx(0.0, abs=1e-12)
    bouncing = [1.0, 1.3, 1.05, 1.4, 1.1, 1.35, 1.02, 1.3]
    assert loss_noise(bouncing) > LR_AUTO["noise"] > loss_noise([1.0, 1.001, 1.002, 1.0005, 1.003])

    def replay(losses):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched, rates = NoisyPlateau(opt), []
        for v in losses:
            rates.append(opt.param_groups[0]["lr"])
            if sched.step(v):
                return rates, True
        return rates, False
    smooth, stopped = replay([1.0] + [1.0 + 1e-4 * i for i in range(30)])
    assert smooth == [1.0] * 31 and not stopped
    rates, stopped = replay([1.0] + bouncing[1:] * 4)
    f, p = LR_PLATEAU["factor"], LR_PLATEAU["patience"]
    # the best stays the first epoch: cuts after epochs p + 1 and 2 (p + 1), the stop at 3 (p + 1)
    assert stopped and len(rates) == 3 * (p + 1) + 1
    assert rates == [1.0] * (p + 2) + [f] * (p + 1) + [f * f] * (p + 1)
    # train_state follows the same rule on its held-out losses
    cfg, data = _schedule_case("auto", batch_size=4, epochs=40)
    _, info = train_state(cfg, data, 0, torch.device("cpu"), progress=False)
    rates, stopped = replay(info["val_history"])
    assert info["lr_history"] == pytest.approx([r * cfg["lr"] for r in rates])
    assert stopped and info["epochs_run"] < cfg["epochs"] and min(rates) == pytest.approx(f * f)


def test_batch_rule_is_n_over_16_capped_at_batch_max_and_old_configurations_keep_istars_cap():
    from utils.superres.config import BATCH_MAX, ISTAR_BATCH_MAX, HistexConfig
    from utils.superres.train import batch_spots
    rule = HistexConfig().model_config({"micro": 3}, 5, 3)
    assert rule["batch_size"] == 0 and rule["batch_max"] == BATCH_MAX == 32
    assert [batch_spots(rule, n) for n in (10, 75, 528, 2620)] == [1, 4, 32, 32]
    fixed = HistexConfig(batch_size=64).model_config({"micro": 3}, 5, 3)
    assert "batch_max" not in fixed and batch_spots(fixed, 2620) == 64
    # a configuration from before batch_max (a stored state's run.json) trained with iStar's cap
    older = {k: v for k, v in rule.items() if k != "batch_max"}
    assert batch_spots(older, 2620) == ISTAR_BATCH_MAX == 128 and batch_spots(older, 75) == 4


def test_a_state_log_line_says_when_its_learning_rate_was_cut(caplog):
    from utils.superres.states import _log_trained
    meta = {"epochs_run": 12, "best_epoch": 4, "loss_history": [0.1], "seconds": 1.0}
    with caplog.at_level("INFO", logger="trihrge"):
        _log_trained("state 1/2", {"epochs": 500, "lr": 1e-3}, {**meta, "lr_history": [1e-3] * 8 + [9e-5] * 4})
        _log_trained("state 2/2", {"epochs": 500, "lr": 1e-3}, {**meta, "lr_history": [1e-3] * 12})
    first, second = [r.getMessage() for r in caplog.records]
    assert "stopped after 12 epochs" in first and "learning rate cut to 9e-05" in first
    assert "learning rate" not in second


def test_opt_in_parts_name_the_run_and_keep_older_states_valid():
    from utils.superres.config import HistexConfig
    assert HistexConfig().run_name == "trihrge" and HistexConfig().fusion == "stack"
    assert HistexConfig(gene_tokens=True).run_name == "trihrge-tokens"
    assert HistexConfig(window_attention=True, no_macro=True).run_name == "trihrge-nomacro-attn"
    # a setting the model ignores names nothing (and HISTEX warns about it)
    mlp = HistexConfig(model="mlp", gene_tokens=True, no_linear_head=True, residual=True, standardize_features=True)
    assert mlp.run_name == "mlp-resid-std" and mlp.ignored_options == ["--gene-tokens", "--no-linear-head"]
    interp = HistexConfig(model="interp", residual=True, standardize_features=True, no_macro=True)
    assert interp.run_name == "interp" and interp.ignored_options == ["--no-macro", "--residual", "--standardize-features"]
    # training and network settings too: a model without weights trains nothing, an MLP has no heads
    assert HistexConfig(model="interp", epochs=3, cross_fit=False, lr=0.01).ignored_options == [
        "--epochs", "--no-cross-fit", "--lr"]
    assert HistexConfig(model="mlp", heads=8, epochs=3).ignored_options == ["--heads"]
    assert HistexConfig(token_mask=0.2).ignored_options == ["--token-mask"]      # without gene tokens
    assert HistexConfig(token_mask=0.2, gene_tokens=True, heads=8).ignored_options == []
    # with gene tokens the window always has attention: --window-attention changes nothing
    assert HistexConfig(gene_tokens=True, window_attention=True).run_name == "trihrge-tokens"
    default = HistexConfig().model_config({"micro": 3}, 5, 3)
    assert default["model_opts"]["use_window_attention"] is False and default["stride"] == 7
    # with attention the options are those of states trained before the option existed (same fingerprint)
    attn = HistexConfig(window_attention=True).model_config({"micro": 3}, 5, 3)
    assert "use_window_attention" not in attn["model_opts"] and attn["stride"] == 3
    # a schedule is recorded (its states differ); constant, as before the option existed, is not
    assert default["lr_schedule"] == "auto"
    assert HistexConfig(lr_schedule="plateau").model_config({"micro": 3}, 5, 3)["lr_schedule"] == "plateau"
    assert "lr_schedule" not in HistexConfig(lr_schedule="constant").model_config({"micro": 3}, 5, 3)


@pytest.mark.parametrize("name,opts", [("trihrge", {"use_gene_tokens": False, "use_window_attention": False}),
                                       ("trihrge", {"use_linear_head": False}), ("mlp", {})])
def test_fused_footprint_mean_equals_the_mean_of_the_predictions(name, opts):
    """model.footprint_mean (the fused output layer of training) gives the footprint mean of
    forward()'s predictions and the same gradients, with and without an output bias."""
    from utils.superres.train import footprint_shares, predicted_means
    torch.manual_seed(2)
    kw = {"d": 16, "heads": 2, "depth": 1, "dropout": 0.0, **opts} if name == "trihrge" else {}
    m = build_model(name, DIMS, 300, 7, **kw)
    B = 3
    hist = {k: torch.randn(B, 49, c) for k, c in DIMS.items()}
    inputs = (hist, torch.rand(B, 5, 300), torch.randn(B, 5, 2), torch.zeros(B, 5, dtype=torch.bool))
    keep, share = footprint_shares(np.random.default_rng(0).random((B, 49)) < 0.6, "cpu")
    target = torch.rand(B, 300)
    grads = []
    for f in (lambda: m.footprint_mean(*inputs, keep=keep, weights=share), lambda: predicted_means(m, inputs, keep, share)):
        m.zero_grad()
        mean = f()
        ((mean - target) ** 2).mean().backward()
        grads.append((mean.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]))
    (a, ga), (b, gb) = grads
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-7) and len(ga) == len(gb)
    assert all(torch.allclose(x, y, rtol=1e-4, atol=1e-8) for x, y in zip(ga, gb))


def test_independent_tokens_are_predicted_per_superpixel_as_by_windows():
    """Networks whose tokens do not see each other are predicted at the tissue super-pixels
    directly; the values are those of the window path (up to w v / w rounding)."""
    from utils.superres.predict import _predict_windows, predict_tissue
    torch.manual_seed(3)
    rng = np.random.default_rng(3)
    maps = {k: rng.normal(size=(12, 10, c)).astype(np.float16) for k, c in DIMS.items()}
    rows, cols = np.nonzero(rng.random((12, 10)) < 0.5)
    models = [build_model("trihrge", DIMS, 6, 3, d=16, use_gene_tokens=False, use_window_attention=False).eval()
              for _ in range(3)]
    assert all(m.independent_tokens for m in models)
    cfg = {"half": 1, "stride": 3, "n_genes": 6}
    direct = predict_tissue(models, cfg, maps, None, rows, cols, "cpu", batch=2, progress=False)
    windows = _predict_windows(models, cfg, maps, None, rows, cols, "cpu", 2, False, np.empty_like(direct))
    np.testing.assert_allclose(direct, windows, rtol=1e-5)   # the batched projection rounds by batch size


def test_footprint_tokens_first_are_the_whole_windows_tokens():
    """Without attention the kept tokens are fused alone (training): the values of the whole
    window's fusion and token selection, with dropout drawn for the kept tokens only."""
    from models.layers import take_tokens
    m = build_model("trihrge", DIMS, 5, 7, d=16, use_gene_tokens=False, use_window_attention=False).train()
    hist = {k: torch.randn(3, 49, c) for k, c in DIMS.items()}
    keep, _ = footprint_tokens(np.random.default_rng(1).random((3, 49)) < 0.5)
    keep = torch.from_numpy(keep)
    torch.manual_seed(4)
    got = m.hidden(hist, keep=keep)
    torch.manual_seed(4)
    raw = torch.cat([hist[k] for k in m.fusion.names], dim=-1)
    want = m.head[:-1](torch.cat([m.drop(take_tokens(m.fusion(hist), keep)), take_tokens(raw, keep)], dim=-1))
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(m.eval().hidden(hist, keep=keep), got, atol=1e-3)  # dropout was on


def test_spot_sums_read_only_the_footprint_superpixels():
    import scipy.sparse as sp
    rng = np.random.default_rng(5)
    fp = sp.random(6, 50, density=0.1, random_state=5, format="csr", dtype=np.float64)
    values = rng.random((50, 4), dtype=np.float32)
    np.testing.assert_array_equal(spot_sums(values, fp), fp @ values.astype(np.float64))


def test_bf16_footprint_mean_is_float32_and_close_to_fp32():
    """Under --precision bf16 only the matrix products are bfloat16: the fused footprint mean and
    every gradient come back in float32, within bfloat16 rounding of the fp32 ones."""
    from utils.core.device import autocast
    from utils.superres.train import footprint_shares, spot_means
    torch.manual_seed(4)
    m = build_model("trihrge", DIMS, 300, 7, d=16, dropout=0.0, use_gene_tokens=False, use_window_attention=False)
    B = 4
    hist = {k: torch.randn(B, 49, c) for k, c in DIMS.items()}
    keep, share = footprint_shares(np.random.default_rng(1).random((B, 49)) < 0.6, "cpu")
    target = torch.rand(B, 300)
    runs = {}
    for precision in ("fp32", "bf16"):
        m.zero_grad()
        mean = spot_means(m, (hist, None, None, None), keep, share, precision)
        ((mean - target) ** 2).mean().backward()
        runs[precision] = (mean.detach(), [p.grad.clone() for p in m.parameters()])
    (a, ga), (b, gb) = runs["fp32"], runs["bf16"]
    assert b.dtype == torch.float32 and all(g.dtype == torch.float32 for g in gb)
    assert not torch.equal(a, b)  # the products really ran in bfloat16
    assert torch.allclose(a, b, rtol=0.02, atol=1e-3)
    for x, y in zip(ga, gb):
        assert (x - y).norm() <= 0.05 * x.norm() + 1e-6
    with autocast("cpu", "fp32"):
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_footprint_mean_does_not_depend_on_the_gene_chunk(precision, monkeypatch):
    """The gene chunk of the torch passes (GPUs) is a speed setting only: the chunks gene_chunk picks
    (64, 128, 256) give the same bits, forward and backward (a chunk of 100 genes does not: other kernels)."""
    from models import layers
    from models.layers import footprint_output, gene_chunk
    from utils.core.device import autocast
    monkeypatch.setattr(layers, "_use_loops", lambda hm: False)   # the torch passes, here on the CPU
    torch.manual_seed(5)
    lin = torch.nn.Linear(16, 300, bias=False)
    h = torch.randn(6, 11, 16, requires_grad=True)
    w = torch.rand(6, 11)
    runs = []
    for chunk in (64, 128, 256, None):
        lin.zero_grad()
        h.grad = None
        with autocast("cpu", precision):
            out = footprint_output(h, lin, w, chunk)
        (out * torch.arange(300)).sum().backward()
        runs.append((out.detach(), lin.weight.grad.clone(), h.grad.clone()))
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run))
    assert gene_chunk(615) == 256 and gene_chunk(5120) == 128 and gene_chunk(100_000) == 64


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("bias", [False, True])
def test_footprint_loops_are_the_torch_passes_with_their_gradients(precision, bias, monkeypatch):
    """On the CPU the output layer's element-wise part runs in numba loops (models/footprint_loops.py)
    with their own exp: the torch passes' values within float32 rounding, forward and backward, and a
    token's values do not depend on its batch (nor on where its genes fall in a vector loop)."""
    from models import footprint_loops, layers
    from models.layers import footprint_output
    from utils.core.device import autocast
    torch.manual_seed(7)
    lin = torch.nn.Linear(16, 333, bias=bias)
    h, w = (3 * torch.randn(7, 13, 16)).requires_grad_(), torch.rand(7, 13)
    target = torch.rand(7, 333)
    runs = []
    for loops in (True, False):
        monkeypatch.setattr(layers, "_use_loops", footprint_loops.supports if loops else (lambda hm: False))
        lin.zero_grad()
        h.grad = None
        with autocast("cpu", precision):
            out = footprint_output(h, lin, w)
        ((out - target) ** 2).sum().backward()
        runs.append([out.detach(), h.grad.clone()] + [p.grad.clone() for p in lin.parameters()])
        if loops:
            with autocast("cpu", precision), torch.no_grad():
                part = footprint_output(h[2:5], lin, w[2:5])
            assert torch.equal(part, out[2:5].detach())
    tol = 1e-5 if precision == "fp32" else 0.02   # bf16: the loops' exp moves values across roundings
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=tol, atol=1e-6)
    for a, b in zip(runs[0][1:], runs[1][1:]):   # gradients: sums with cancellation, compared as a whole
        assert (a - b).norm() <= tol * b.norm()
    x = torch.tensor([[[-100.0, -20.0, -1e-3, 0.0, 1e-3, 5.0]]])
    got, slope = footprint_loops.spot_means(x, torch.ones(1, 1), True)
    e = 0.01 * torch.exp(x[0, 0].double().clamp(max=0))   # exact where torch's ELU cancels (ELU(-20) + 0.01)
    torch.testing.assert_close(got[0], (x[0, 0].clamp(min=0) + e).float(), rtol=2e-7, atol=1e-36)
    torch.testing.assert_close(slope[0, 0], torch.where(x[0, 0] > 0, 1.0, e).float(), rtol=2e-7, atol=1e-36)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("bias", [False, True])
def test_footprint_mean_without_gradient_skips_the_slope_and_gives_the_same_bits(precision, bias):
    """Validation and out-of-fold predictions (no gradient) take the path that does not compute
    f' for backward: the same values, bit for bit, as training's autograd function."""
    from models.layers import _FootprintMean, footprint_output
    from utils.core.device import autocast
    torch.manual_seed(6)
    lin = torch.nn.Linear(16, 300, bias=bias)
    h, w = torch.randn(5, 13, 16), torch.rand(5, 13)
    calls = []
    original = _FootprintMean.forward
    _FootprintMean.forward = staticmethod(lambda *a: calls.append(1) or original(*a))
    try:
        with autocast("cpu", precision):
            trained = footprint_output(h, lin, w)
            with torch.no_grad():
                evaluated = footprint_output(h, lin, w)
    finally:
        _FootprintMean.forward = staticmethod(original)
    assert len(calls) == 1 and trained.requires_grad and not evaluated.requires_grad
    assert evaluated.dtype == torch.float32 and torch.equal(trained.detach(), evaluated)


def test_fast_dropout_is_inverted_dropout_seeded_by_torch():
    """FastDropout keeps about 1 - p of the values, scaled by 1 / (1 - p) (so the mean is kept), its
    gradient is the same mask, it is the identity in eval mode, and torch.manual_seed fixes its masks."""
    from models.layers import FastDropout

    def masked(seed):
        torch.manual_seed(seed)
        drop = FastDropout(0.1).train()
        x = torch.ones(64, 40, 64, requires_grad=True)
        y = drop(x)
        y.sum().backward()
        return y.detach(), x.grad, drop
    y, grad, drop = masked(3)
    kept = y > 0
    assert abs(kept.float().mean().item() - 0.9) < 0.005 and abs(y.mean().item() - 1.0) < 0.01
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.9))
    torch.testing.assert_close(grad, y)                             # d(x * mask) / dx = mask
    assert torch.equal(masked(3)[0], y) and not torch.equal(masked(4)[0], y)
    x = torch.randn(5, 7)
    assert drop.eval()(x) is x and FastDropout(0.0).train()(x) is x


@pytest.mark.parametrize("tokens", [(3, 7), (2, 300)])   # 600 tokens: three blocks of scale_gate.BLOCK, the last partial
def test_fused_scale_gate_is_the_torch_fusion_with_its_gradients(tokens):
    """MultiScaleFusion on the CPU (the numba loops of models/scale_gate.py) computes the function of
    its torch operations, forward and backward, with or without gradients."""
    from models.trihrge import MultiScaleFusion
    torch.manual_seed(0)
    fusion = MultiScaleFusion(DIMS, 16)
    with torch.no_grad():   # away from LayerNorm's initial 1 / 0, and a gate that matters
        for p in fusion.parameters():
            p.add_(0.3 * torch.randn_like(p))
    hist = {k: torch.randn(*tokens, c) for k, c in DIMS.items()}
    probe = torch.randn(*tokens, 16)

    def run(forward):
        fusion.zero_grad()
        out = forward(hist)
        (out * probe).sum().backward()
        return out.detach(), [p.grad.clone() for p in fusion.parameters()]
    got, got_grads = run(fusion)
    want, want_grads = run(fusion.unfused)
    assert got.shape == want.shape == (*tokens, 16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        assert torch.equal(fusion(hist), got)
