import re

import pytest
import torch

import contrastive_kernels as ck

N, M, D = 7, 9, 5


def _qk(dtype=torch.float32, n=N, m=M, d=D):
    return torch.randn(n, d, dtype=dtype), torch.randn(m, d, dtype=dtype)


def _shape(*s):
    return re.escape(str(tuple(s)))


def _pair(q, k):
    """clip_loss needs N = M: use the first N keys when both are 2-D tensors."""
    if isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and q.dim() == k.dim() == 2:
        return k[: q.shape[0]]
    return k


# Each loss front door, called as f(query, keys, scale, **kw) with M ≥ N keys.
def _info(q, k, s, **kw):
    return ck.info_nce(q, k, s, **kw)


def _clip(q, k, s, **kw):
    return ck.clip_loss(q, _pair(q, k), s, **kw)


def _gamma(q, k, s, **kw):
    return ck.gamma_contrastive_loss(q, k, s, torch.zeros(len(q), dtype=torch.float32), **kw)


def _stats(q, k, s, **kw):
    return ck.lse_stats(q, k, s, **kw)


def _module(q, k, s, **kw):
    return ck.InfoNCELoss(**{key: kw.pop(key) for key in list(kw) if key in ("backend", "reduction")})(
        q, k, s, **kw)


def _clip_module(q, k, s, **kw):
    return ck.ClipLoss(**kw)(q, _pair(q, k), s)


FRONT_DOORS = [_info, _clip, _gamma, _stats, _module, _clip_module]
IDS = ["info_nce", "clip_loss", "gamma", "lse_stats", "InfoNCELoss", "ClipLoss"]
LABEL_IDS = ["info_nce", "gamma", "lse_stats", "InfoNCELoss"]  # the front doors taking labels


@pytest.mark.parametrize("fn", FRONT_DOORS, ids=IDS)
def test_wrong_rank(fn):
    q, k = _qk()
    with pytest.raises(ValueError, match=r"must be 2-D.*got shape " + _shape(N * D)):
        fn(q.reshape(-1), k, 1.0)
    with pytest.raises(ValueError, match=r"must be 2-D.*got shape " + _shape(1, M, D)):
        fn(q, k[None], 1.0)


@pytest.mark.parametrize("fn", FRONT_DOORS, ids=IDS)
def test_mismatched_feature_dim(fn):
    q, _ = _qk()
    k = torch.randn(M, D + 2)
    with pytest.raises(ValueError, match=r"feature dimensions differ.*" + _shape(N, D) + r".*"
                       + _shape(N if fn in (_clip, _clip_module) else M, D + 2)):
        fn(q, k, 1.0)


@pytest.mark.parametrize("fn", FRONT_DOORS, ids=IDS)
def test_mismatched_dtype(fn):
    q, k = _qk()
    with pytest.raises(TypeError, match=r"dtypes differ.*float32.*float64"):
        fn(q, k.double(), 1.0)


@pytest.mark.parametrize("fn", FRONT_DOORS, ids=IDS)
def test_mismatched_device(fn):
    q, k = _qk()
    q_meta = q.to("meta")  # a second device on any machine
    assert q_meta.device != k.device
    with pytest.raises(ValueError, match=r"devices differ.*meta.*cpu"):
        fn(q_meta, k, 1.0)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
@pytest.mark.parametrize("fn", FRONT_DOORS, ids=IDS)
def test_non_float_features(fn, dtype):
    q, k = _qk()
    with pytest.raises(TypeError, match=r"float64, float32, float16 or bfloat16.*" + str(dtype)):
        fn(q.to(dtype), k.to(dtype), 1.0)


@pytest.mark.parametrize("fn", FRONT_DOORS, ids=IDS)
def test_features_not_tensors(fn):
    q, k = _qk()
    with pytest.raises(TypeError, match=r"must be a torch.Tensor, got list"):
        fn(q.tolist(), k, 1.0)


@pytest.mark.parametrize("fn", FRONT_DOORS, ids=IDS)
def test_empty_batch(fn):
    q, k = _qk()
    with pytest.raises(ValueError, match=r"empty batch.*" + _shape(0, D)):
        fn(q[:0], k[:0], 1.0)
    with pytest.raises(ValueError, match=r"feature dimension 0.*" + _shape(N, 0)):
        fn(q[:, :0], k[:, :0], 1.0)


def test_empty_keys_with_labels():
    q, k = _qk()
    with pytest.raises(ValueError, match=r"empty batch.*" + _shape(0, D)):
        ck.info_nce(q, k[:0], 1.0, torch.zeros(N, dtype=torch.int64))


@pytest.mark.parametrize("bad", [M, M + 5, -1])
@pytest.mark.parametrize("fn", [_info, _gamma, _stats, _module], ids=LABEL_IDS)
def test_labels_out_of_range(fn, bad):
    q, k = _qk()
    labels = torch.zeros(N, dtype=torch.int64)
    labels[3] = bad
    lo, hi = min(bad, 0), max(bad, 0)
    with pytest.raises(ValueError, match=re.escape(f"[0, {M})") + r".*" + re.escape(f"[{lo}, {hi}]")):
        fn(q, k, 1.0, labels=labels)


@pytest.mark.parametrize("fn", [_info, _gamma, _stats, _module], ids=LABEL_IDS)
def test_labels_bad_type_shape_device(fn):
    q, k = _qk()
    with pytest.raises(TypeError, match=r"labels must be int64, got torch.int32"):
        fn(q, k, 1.0, labels=torch.zeros(N, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"labels must be int64, got torch.float32"):
        fn(q, k, 1.0, labels=torch.zeros(N))
    with pytest.raises(TypeError, match=r"labels must be a torch.Tensor.*got list"):
        fn(q, k, 1.0, labels=[0] * N)
    with pytest.raises(ValueError, match=re.escape(f"shape ({N},), got {(N, 1)}")):
        fn(q, k, 1.0, labels=torch.zeros(N, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match=re.escape(f"shape ({N},), got {(N - 1,)}")):
        fn(q, k, 1.0, labels=torch.zeros(N - 1, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"labels are on meta.*cpu"):
        fn(q, k, 1.0, labels=torch.zeros(N, dtype=torch.int64, device="meta"))


@pytest.mark.parametrize("fn", [_info, _gamma, _stats, _module], ids=LABEL_IDS)
def test_fewer_keys_than_queries_without_labels(fn):
    q, k = _qk(n=M, m=N)
    with pytest.raises(ValueError, match=rf"M >= N.*N={M}, M={N}.*labels"):
        fn(q, k, 1.0)
    fn(q, k, 1.0, labels=torch.arange(M) % N)  # with labels it is fine


@pytest.mark.parametrize("fn", [_clip, _clip_module], ids=["clip_loss", "ClipLoss"])
def test_clip_batch_sizes_differ(fn):
    q, k = _qk()
    with pytest.raises(ValueError, match=r"batch sizes must match.*" + _shape(N, D) + r".*" + _shape(M, D)):
        ck.clip_loss(q, k, 1.0) if fn is _clip else ck.ClipLoss()(q, k, 1.0)


@pytest.mark.parametrize("scale,err,msg", [
    (float("nan"), ValueError, r"finite and > 0, got nan"),
    (float("inf"), ValueError, r"finite and > 0, got inf"),
    (-float("inf"), ValueError, r"finite and > 0, got -inf"),
    (0.0, ValueError, r"finite and > 0, got 0"),
    (-2.5, ValueError, r"finite and > 0, got -2.5"),
    (0, ValueError, r"finite and > 0, got 0"),
    (torch.tensor(float("nan")), ValueError, r"finite and > 0, got nan"),
    (torch.tensor(-1.0, requires_grad=True), ValueError, r"finite and > 0, got -1"),
    (torch.tensor([1.0, 2.0]), ValueError, r"one value, got shape \(2,\)"),
    (torch.ones(2, 2), ValueError, r"one value, got shape \(2, 2\)"),
    (torch.ones(0), ValueError, r"one value, got shape \(0,\)"),
    (torch.tensor(3), TypeError, r"floating-point tensor, got torch.int64"),
    (True, TypeError, r"float or a tensor, got bool"),
    ("10", TypeError, r"float or a tensor, got str"),
    (None, TypeError, r"float or a tensor, got NoneType"),
], ids=["nan", "inf", "-inf", "zero", "negative", "int-zero", "tensor-nan", "tensor-negative",
        "two-elements", "2x2", "empty", "int-tensor", "bool", "str", "none"])
@pytest.mark.parametrize("fn", FRONT_DOORS, ids=IDS)
def test_bad_logit_scale(fn, scale, err, msg):
    q, k = _qk()
    with pytest.raises(err, match=msg):
        fn(q, k, scale)


def test_one_element_scale_shapes_are_accepted():
    q, k = _qk(dtype=torch.float64)
    base = ck.info_nce(q, k, 3.0, backend="chunked")
    for s in (torch.tensor([3.0]), torch.tensor([[3.0]]), torch.tensor(3.0, dtype=torch.float16)):
        torch.testing.assert_close(ck.info_nce(q, k, s, backend="chunked"), base)


@pytest.mark.parametrize("fn", [_info, _clip, _gamma], ids=["info_nce", "clip_loss", "gamma"])
def test_wrong_reduction(fn):
    q, k = _qk()
    with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"):
        fn(q, k, 1.0, reduction="avg")


def test_wrong_reduction_module():
    q, k = _qk()
    with pytest.raises(ValueError, match=r"reduction must be one of .*got 'elementwise'"):
        ck.InfoNCELoss(reduction="elementwise")(q, k, 1.0)


@pytest.mark.parametrize("fn", FRONT_DOORS, ids=IDS)
def test_unknown_backend(fn):
    q, k = _qk()
    with pytest.raises(ValueError, match=r"backend must be one of .*'auto'.*got 'gpu'"):
        fn(q, k, 1.0, backend="gpu")


@pytest.mark.parametrize("fn", FRONT_DOORS, ids=IDS)
def test_explicit_unavailable_backend(fn):
    q, k = _qk()
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: 'cuda' may be usable here")
    ok, _ = ck.availability("cuda")
    assert not ok
    with pytest.raises(RuntimeError, match=r"backend 'cuda' is not usable: .*(CUDA|cuda)"):
        fn(q, k, 1.0, backend="cuda")


def test_unknown_backend_availability():
    with pytest.raises(ValueError, match=r"unknown backend 'gpu'"):
        ck.availability("gpu")


def test_log_u_errors():
    q, k = _qk()
    with pytest.raises(ValueError, match=re.escape(f"log_u must have shape ({N},)") + r".*" + _shape(N, 1)):
        ck.gamma_contrastive_loss(q, k, 1.0, torch.zeros(N, 1))
    with pytest.raises(ValueError, match=re.escape(f"log_u must have shape ({N},)") + r".*" + _shape(M)):
        ck.gamma_contrastive_loss(q, k, 1.0, torch.zeros(M))
    with pytest.raises(TypeError, match=r"log_u must be floating point, got torch.int64"):
        ck.gamma_contrastive_loss(q, k, 1.0, torch.zeros(N, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"log_u must be a torch.Tensor, got list"):
        ck.gamma_contrastive_loss(q, k, 1.0, [0.0] * N)
    with pytest.raises(ValueError, match=r"log_u is on meta.*cpu"):
        ck.gamma_contrastive_loss(q, k, 1.0, torch.zeros(N, device="meta"))


def test_errors_leave_no_state_behind():
    # A rejected call must not poison later valid calls (no half-registered state, no caching).
    q, k = _qk(dtype=torch.float64)
    with pytest.raises(ValueError):
        ck.info_nce(q, k, -1.0, backend="chunked")
    torch.testing.assert_close(ck.info_nce(q, k, 2.0, backend="chunked"),
                               ck.reference.info_nce(q, k, 2.0))


def test_logit_scale_on_meta_device():
    q, k = _qk()
    with pytest.raises(ValueError, match=r"logit_scale.*meta"):
        ck.info_nce(q, k, torch.tensor(2.0, device="meta"))


# ---------------------------------------------------------------------------------------------
# second wave: nt_xent_loss, supcon_loss, siglip_loss
# ---------------------------------------------------------------------------------------------

def test_nt_xent_bad_views():
    a = torch.randn(N, D)
    with pytest.raises(ValueError, match=r"same shape: view_a " + _shape(N, D) + r" vs view_b "
                       + _shape(N + 1, D)):
        ck.nt_xent_loss(a, torch.randn(N + 1, D), 1.0)
    with pytest.raises(ValueError, match=r"same shape.*" + _shape(N, D + 1)):
        ck.nt_xent_loss(a, torch.randn(N, D + 1), 1.0)
    with pytest.raises(TypeError, match=r"dtypes differ.*float32.*float64"):
        ck.nt_xent_loss(a, a.double(), 1.0)
    with pytest.raises(ValueError, match=r"devices differ.*cpu.*meta"):
        ck.nt_xent_loss(a, a.to("meta"), 1.0)
    with pytest.raises(ValueError, match=r"empty batch"):
        ck.nt_xent_loss(a[:0], a[:0], 1.0)
    with pytest.raises(ValueError, match=r"finite and > 0, got -1"):
        ck.nt_xent_loss(a, a, -1.0)
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        ck.NTXentLoss(reduction="avg")(a, a, 1.0)


def test_supcon_bad_labels_and_reference_set():
    f = torch.randn(N, D)
    lab = torch.zeros(N, dtype=torch.int64)
    with pytest.raises(ValueError, match=re.escape(f"labels must have shape ({N},), got {(N - 1,)}")):
        ck.supcon_loss(f, lab[:-1], 1.0)
    with pytest.raises(TypeError, match=r"labels must be int64, got torch.float32"):
        ck.supcon_loss(f, lab.float(), 1.0)
    with pytest.raises(ValueError, match=r"labels are on meta.*cpu"):
        ck.supcon_loss(f, lab.to("meta"), 1.0)
    with pytest.raises(TypeError, match=r"labels must be a torch.Tensor.*list"):
        ck.supcon_loss(f, [0] * N, 1.0)
    with pytest.raises(ValueError, match=r"ref_features and ref_labels go together: ref_labels is missing"):
        ck.supcon_loss(f, lab, 1.0, ref_features=torch.randn(M, D))
    with pytest.raises(ValueError, match=r"ref_features and ref_labels go together: ref_features is missing"):
        ck.supcon_loss(f, lab, 1.0, ref_labels=torch.zeros(M, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"feature dimensions differ.*" + _shape(N, D) + r".*" + _shape(M, D + 1)):
        ck.supcon_loss(f, lab, 1.0, ref_features=torch.randn(M, D + 1),
                       ref_labels=torch.zeros(M, dtype=torch.int64))
    with pytest.raises(ValueError, match=re.escape(f"ref_labels must have shape ({M},)")):
        ck.supcon_loss(f, lab, 1.0, ref_features=torch.randn(M, D),
                       ref_labels=torch.zeros(M + 1, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"empty batch"):
        ck.supcon_loss(f[:0], lab[:0], 1.0)
    with pytest.raises(ValueError, match=r"must be 2-D"):
        ck.SupConLoss()(f[0], lab, 1.0)


@pytest.mark.parametrize("bias,err,msg", [
    (float("nan"), ValueError, r"logit_bias must be finite, got nan"),
    (float("inf"), ValueError, r"logit_bias must be finite, got inf"),
    (torch.tensor(float("-inf")), ValueError, r"logit_bias must be finite, got -inf"),
    (torch.tensor([1.0, 2.0]), ValueError, r"logit_bias must hold one value, got shape \(2,\)"),
    (torch.tensor(1), TypeError, r"logit_bias must be a floating-point tensor"),
    ("0", TypeError, r"logit_bias must be a float or a tensor, got str"),
], ids=["nan", "inf", "tensor-inf", "two", "int", "str"])
def test_siglip_bad_bias(bias, err, msg):
    q, k = _qk()
    with pytest.raises(err, match=msg):
        ck.siglip_loss(q, k[:N], 10.0, bias)
    with pytest.raises(err, match=msg):
        ck.SigLipLoss()(q, k[:N], 10.0, bias)


def test_siglip_bad_features_scale_and_labels():
    q, k = _qk()
    with pytest.raises(ValueError, match=r"batch sizes must match.*" + _shape(N, D) + r".*" + _shape(M, D)):
        ck.siglip_loss(q, k, 10.0, -10.0)
    with pytest.raises(TypeError, match=r"dtypes differ"):
        ck.siglip_loss(q, k[:N].double(), 10.0)
    with pytest.raises(ValueError, match=r"finite and > 0, got 0"):
        ck.siglip_loss(q, k[:N], 0.0, -10.0)
    with pytest.raises(ValueError, match=r"finite and > 0, got nan"):
        ck.SigLipLoss()(q, k[:N], torch.tensor(float("nan")), -10.0)
    with pytest.raises(ValueError, match=re.escape(f"labels must have shape ({N},)")):
        ck.siglip_loss(q, k[:N], 10.0, labels=torch.zeros(N + 1, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"dist_impl must be 'bidir', 'shift', 'reduce' or 'gather'"):
        ck.SigLipLoss(dist_impl="ring")
    with pytest.raises(RuntimeError, match="init_process_group"):
        ck.SigLipLoss(rank=0, world_size=2)(q, k[:N], 10.0, -10.0)


def test_lse_stats_bad_classes():
    q, k = _qk()
    with pytest.raises(ValueError, match=r"query_classes and key_classes go together"):
        ck.lse_stats(q, k, 1.0, query_classes=torch.zeros(N, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"labels .* or classes .*not both"):
        ck.lse_stats(q, k, 1.0, torch.zeros(N, dtype=torch.int64),
                     query_classes=torch.zeros(N, dtype=torch.int64),
                     key_classes=torch.zeros(M, dtype=torch.int64))
    with pytest.raises(ValueError, match=re.escape(f"key_classes must have shape ({M},)")):
        ck.lse_stats(q, k, 1.0, query_classes=torch.zeros(N, dtype=torch.int64),
                     key_classes=torch.zeros(N, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"exclude_self must be a bool"):
        ck.lse_stats(q, k, 1.0, exclude_self=1)


def test_cuda_backend_lacks_the_second_wave_and_auto_never_picks_it(monkeypatch):
    from contrastive_kernels import backends
    monkeypatch.setattr(backends, "availability", lambda name: (name != "triton", "test"))
    monkeypatch.setattr(backends, "device_ok", lambda name, device: (True, ""))
    cuda = torch.device("cuda")
    for feats in ("exclude_self", "classes", "sigmoid", "exclude_self,classes"):
        with pytest.raises(NotImplementedError, match=r"backend 'cuda' does not implement .* yet"):
            backends.resolve("cuda", cuda, torch.float32, feats)
        assert backends.resolve("auto", cuda, torch.float32, feats) == "chunked"
    assert backends.resolve("auto", cuda, torch.float32, "") == "cuda"
    assert backends.resolve("cuda", cuda, torch.float32, "") == "cuda"


def test_numpy_scale_is_accepted():
    np = pytest.importorskip("numpy")
    q, k = _qk(dtype=torch.float64)
    base = ck.info_nce(q, k, 14.25, backend="chunked")
    for s in (np.float32(14.25), np.float64(14.25), np.int64(14)):
        expect = base if not isinstance(s, np.integer) else ck.info_nce(q, k, 14.0, backend="chunked")
        torch.testing.assert_close(ck.info_nce(q, k, s, backend="chunked"), expect)
