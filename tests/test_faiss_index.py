"""fastprompt.faiss_index: faiss's flat inner-product index against the plain matrix product and range search."""

from __future__ import annotations

import faiss
import pytest
import torch
from numerics import assert_close

from fastprompt import faiss_index
from fastprompt.errors import FastPromptError
from fastprompt.faiss_index import inner_products, inner_products_ref, range_search, range_search_ref

SHAPES = [(3, 5, 4), (37, 101, 67), (300, 700, 128)]  # tiny, non-power-of-two, and past faiss's BLAS query threshold


def random_pair(queries: int, keys: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(queries, dim, generator=generator), torch.randn(keys, dim, generator=generator)


@pytest.mark.parametrize(("queries", "keys", "dim"), SHAPES)
def test_inner_products_equal_the_matrix_product(queries, keys, dim):
    query_tensor, key_tensor = random_pair(queries, keys, dim, seed=queries)
    result = inner_products(query_tensor, key_tensor)
    assert result.shape == (queries, keys) and result.dtype == torch.float32 and result.is_contiguous()
    assert_close(result, query_tensor.double() @ key_tensor.double().T, what="faiss inner products")
    assert_close(result, inner_products_ref(query_tensor, key_tensor), what="faiss against the plain product")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_and_strided_inputs_are_converted(dtype):
    query_tensor, key_tensor = random_pair(40, 60, 24)
    queries = query_tensor.to(dtype).T.contiguous().T  # a column-major view: not contiguous
    keys = key_tensor.to(dtype)[::2]  # every other row: strided
    assert not queries.is_contiguous() and not keys.is_contiguous()
    result = inner_products(queries, keys)
    assert result.dtype == torch.float32 and result.shape == (40, 30)
    assert_close(result, queries.double() @ keys.double().T, what=f"inner products from {dtype}")


def test_empty_inputs_give_empty_results():
    query_tensor, key_tensor = random_pair(4, 6, 8)
    assert inner_products(query_tensor[:0], key_tensor).shape == (0, 6)
    assert inner_products(query_tensor, key_tensor[:0]).shape == (4, 0)
    assert len(range_search(query_tensor[:0], key_tensor, 0.0)) == 0
    assert len(range_search(query_tensor, key_tensor[:0], 0.0)) == 0


@pytest.mark.parametrize(
    ("queries", "keys", "message"),
    [
        (torch.ones(3), torch.ones(2, 3), r"needs queries of shape \(count, features\), got \(3,\)"),
        (torch.ones(2, 3), torch.ones(1, 2, 3), r"needs keys of shape \(count, features\), got \(1, 2, 3\)"),
        (torch.ones(2, 0), torch.ones(2, 0), r"needs queries of shape \(count, features\), got \(2, 0\)"),
        (torch.ones(2, 3), torch.ones(4, 5), r"same feature size, got queries \(2, 3\) and keys \(4, 5\)"),
        (torch.ones(2, 3, dtype=torch.int64), torch.ones(4, 3), "needs floating-point queries, got torch.int64"),
        (torch.ones(2, 3), torch.tensor([[1.0, float("nan"), 0.0]]), "got keys holding NaN or infinite values"),
        (torch.ones(2, 3, requires_grad=True), torch.ones(4, 3), "passes no gradient but its queries require one"),
        (torch.ones(2, 3).numpy(), torch.ones(4, 3), "takes torch tensors; its queries are a ndarray"),
    ],
)
def test_bad_inputs_are_one_sentence(queries, keys, message):
    for function in (inner_products, lambda q, k: range_search(q, k, 0.5)):
        with pytest.raises(FastPromptError, match=message) as caught:
            function(queries, keys)
        assert "\n" not in str(caught.value)


def test_faiss_threads_follow_torch_and_are_restored(monkeypatch):
    seen = []
    flat_index = faiss.IndexFlatIP

    class RecordingIndex(flat_index):
        def search(self, *args, **kwargs):
            seen.append(faiss.omp_get_max_threads())
            return super().search(*args, **kwargs)

        def range_search(self, *args, **kwargs):
            seen.append(faiss.omp_get_max_threads())
            return super().range_search(*args, **kwargs)

    monkeypatch.setattr(faiss_index.faiss, "IndexFlatIP", RecordingIndex)
    # Where torch and faiss load the same OpenMP runtime, setting one sets the other: pretend torch chose 3
    monkeypatch.setattr(faiss_index.torch, "get_num_threads", lambda: 3)
    faiss_threads = faiss.omp_get_max_threads()
    try:
        faiss.omp_set_num_threads(5)
        query_tensor, key_tensor = random_pair(8, 9, 4)
        inner_products(query_tensor, key_tensor)
        range_search(query_tensor, key_tensor, 0.0)
        assert seen == [3, 3]
        assert faiss.omp_get_max_threads() == 5
    finally:
        faiss.omp_set_num_threads(faiss_threads)


def planted_unit_vectors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random unit queries and keys where 15 queries are keys plus tiny noise (near-duplicates)."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.nn.functional.normalize(torch.randn(500, 64, generator=generator), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(120, 64, generator=generator), dim=1)
    planted = torch.randperm(120, generator=generator)[:15]
    queries[planted] = torch.nn.functional.normalize(keys[:15] + 0.01 * torch.randn(15, 64, generator=generator))
    return queries, keys


@pytest.mark.parametrize("min_similarity", [0.99, 0.4, -0.2])
def test_range_search_equals_the_plain_computation(min_similarity):
    queries, keys = planted_unit_vectors()
    fast = range_search(queries, keys, min_similarity)
    plain = range_search_ref(queries, keys, min_similarity)
    dense = queries.double() @ keys.double().T
    borderline = {tuple(pair) for pair in torch.nonzero((dense - min_similarity).abs() < 1e-6).tolist()}
    fast_pairs = list(zip(fast.query_index.tolist(), fast.key_index.tolist(), strict=True))
    plain_pairs = list(zip(plain.query_index.tolist(), plain.key_index.tolist(), strict=True))
    assert set(fast_pairs) - borderline == set(plain_pairs) - borderline
    assert fast_pairs == sorted(fast_pairs) and len(fast_pairs) >= 15
    assert fast.query_index.dtype == fast.key_index.dtype == torch.int64 and fast.similarity.dtype == torch.float32
    assert_close(fast.similarity, dense[fast.query_index, fast.key_index], what="range-search similarities")


def test_range_search_bound_is_inclusive():
    queries = torch.tensor([[1.0, 0.0], [0.5, 0.5]])  # every product below is exact in fp32
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    matches = range_search(queries, keys, 0.5)
    assert list(zip(matches.query_index.tolist(), matches.key_index.tolist(), strict=True)) == [(0, 0), (1, 0), (1, 1)]
    assert matches.similarity.tolist() == [1.0, 0.5, 0.5]


@pytest.mark.gpu
def test_cuda_tensors_give_results_on_cuda():
    query_tensor, key_tensor = random_pair(50, 3000, 32)  # more keys than one GPU k-selection takes
    result = inner_products(query_tensor.cuda(), key_tensor.cuda())
    assert result.device.type == "cuda" and result.shape == (50, 3000)
    assert_close(result.cpu(), query_tensor.double() @ key_tensor.double().T, what="inner products on CUDA")
    matches = range_search(query_tensor.cuda(), key_tensor.cuda(), 5.0)
    assert matches.query_index.device.type == "cpu"
