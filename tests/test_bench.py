"""The benchmark scripts at toy sizes: they run, write their reports, and their helpers are right.

No timing is asserted (CI machines are shared); what is checked are the values that do not
depend on speed: recall, exactness of the torch search, index sizes, report structure.
"""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _run_main(name: str, argv: list[str]) -> None:
    """Run a bench script's argparse ``main()`` with ``argv`` as its command line."""
    saved = sys.argv
    sys.argv = [f"{name}.py", *argv]
    try:
        _load(name).main()
    finally:
        sys.argv = saved


@pytest.fixture(scope="module")
def search() -> ModuleType:
    return _load("search")


@pytest.fixture(scope="module")
def gpu_bench() -> ModuleType:
    return _load("gpu_bench")


def test_recall_counts_overlap_and_score_ties(search: ModuleType) -> None:
    gt_ids = np.array([[0, 1, 2], [5, 6, 7]])
    gt_scores = np.array([[0.9, 0.8, 0.7], [0.9, 0.8, 0.7]], dtype=np.float32)
    found = np.array([[2, 0, 9], [5, 8, -1]])
    scores = np.array([[0.7, 0.9, 0.1], [0.9, 0.7 - 1e-7, -np.inf]], dtype=np.float32)
    # query 0: two of three; query 1: id 5, plus id 8 tied with the exact 3rd score; -1 is "nothing"
    assert search.recall_at_k(found, scores, gt_ids, gt_scores, 3) == pytest.approx(4 / 6)


def test_torch_blockwise_topk_is_exact(search: ModuleType) -> None:
    gen = torch.Generator().manual_seed(0)
    queries, gallery = torch.randn(7, 16, generator=gen), torch.randn(1000, 16, generator=gen)
    values, ids = search.torch_exact_topk(queries, gallery, 5, block=128)
    want_v, want_i = (queries @ gallery.T).topk(5, dim=1)
    assert torch.equal(ids, want_i)
    assert torch.allclose(values, want_v)


def test_generated_galleries(search: ModuleType) -> None:
    uniform = search.SyntheticGallery(1000, 32, 10, "uniform", seed=1)
    rows = np.concatenate(list(uniform.chunks(rows=256)))
    again = np.concatenate(list(search.SyntheticGallery(1000, 32, 10, "uniform", seed=1).chunks(rows=256)))
    assert rows.shape == (1000, 32) and np.array_equal(rows, again)
    assert np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)

    clustered = search.SyntheticGallery(2000, 256, 20, "clustered", seed=0)
    with pytest.raises(RuntimeError):
        clustered.queries()  # consumer queries exist only once their items were generated
    gallery = np.concatenate(list(clustered.chunks(rows=512)))
    queries = clustered.queries()
    assert np.allclose(np.linalg.norm(queries, axis=1), 1.0, atol=1e-5)
    # query j is a photo of item j, whose shop images are gallery rows 4j..4j+3: they rank first
    best4 = np.argsort(-(queries @ gallery.T), axis=1)[:, :4]
    own = np.arange(20)[:, None] * 4 + np.arange(4)[None, :]
    assert np.array_equal(np.sort(best4, axis=1), own)


def test_search_bench_quick_writes_recall_report(search: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "search.json"
    assert search.main(["--quick", "--data", "clustered", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["dim"] == 64 and report["settings"]["sizes"] == [2000]
    by_method = {r["method"]: r for r in report["results"]}
    assert set(by_method) == {"flat-faiss", "flat-torch", "ivf", "hnsw"}
    assert all("error" not in r for r in report["results"])
    assert by_method["flat-faiss"]["recall"] == 1.0
    assert by_method["flat-torch"]["recall"] == 1.0  # the torch search is exact too
    for method in ("flat-faiss", "flat-torch"):
        r = by_method[method]
        assert r["bytes_per_vector"] == 64 * 4
        assert 0 < r["gemm_fraction"] and r["gemm_gflops"] > 0 and r["peak_rss_mib"] > 0
        assert 0 <= r["build_s"] and r["generate_s"] > 0
    ivf, hnsw = by_method["ivf"], by_method["hnsw"]
    assert ivf["bytes_per_vector"] > 64 * 4 + 8  # codes + ids + the coarse centroids
    assert hnsw["bytes_per_vector"] > 64 * 4  # vectors + graph links
    recalls = [p["recall"] for p in ivf["sweep"]]
    assert all(0.0 <= r <= 1.0 for r in recalls + [p["recall"] for p in hnsw["sweep"]])
    assert recalls == sorted(recalls)  # scanning more lists never loses a neighbour
    allowed = [p for p in search.NPROBE_SWEEP if p <= ivf["nlist"]]
    probes = [p["nprobe"] for p in ivf["sweep"]]
    assert probes == allowed[: len(probes)]
    last = ivf["sweep"][-1]  # the sweep runs until recall saturates or a setting is slower than exact
    assert probes[-1] == allowed[-1] or last["recall"] >= search.SWEEP_STOP_RECALL or last["speedup_vs_flat"] < 1.0
    assert set(report["summary"]) >= {"exact_gemm_fraction", "ann_at_2000", "ann_target"}


def test_gpu_bench_smoke_writes_json_and_table(gpu_bench: ModuleType, tmp_path: Path) -> None:
    assert gpu_bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert report["smoke"] is True and report["settings"]["backbone"] == "resnet18"
    assert report["settings"]["size"] == 64 and report["settings"]["steps"] == 2
    expected = {"train/mmfl/eager", "train/mmfl-frozen-bn/eager", "train/bare/eager", "extract/mmfl", "extract/bare",
                "loader/jpeg", "e2e/mmfl/resident", "e2e/mmfl/jpeg", "loader/jpeg-gpu-decode",
                "e2e/mmfl/jpeg-gpu-decode"}
    results = report["results"]
    assert set(results) == expected | {"profile/mmfl/eager", "profile/mmfl-frozen-bn/eager"}
    profile = (tmp_path / results["profile/mmfl/eager"]["file"]).read_text()
    assert "Self CPU" in profile and "aten::" in profile  # the op table of the eager training step
    frozen = (tmp_path / results["profile/mmfl-frozen-bn/eager"]["file"]).read_text()
    # trained BN runs batch-norm operators; the frozen backbone's BN is a multiply-add (the neck's BN remains)
    # (``aten::addcmul_``, in place, is the CPU AdamW's)
    assert "batch_norm" in profile and re.search(r"aten::addcmul\s", frozen) and not re.search(r"aten::addcmul\s", profile)
    for name in expected:
        assert "error" not in results[name], (name, results[name])
        assert results[name]["images_per_s"] > 0
    for name in ("train/mmfl/eager", "train/bare/eager", "extract/mmfl", "extract/bare"):
        assert results[name]["gflops_per_image"] > 0 and results[name]["mfu"] > 0
    # MMFL-Net (stride-16 last stage, fusion neck, 13 heads) does more work per image than the bare net
    assert results["train/mmfl/eager"]["gflops_per_image"] > results["train/bare/eager"]["gflops_per_image"]
    # training costs about three forwards
    ratio = results["train/bare/eager"]["gflops_per_image"] / results["extract/bare"]["gflops_per_image"]
    assert 2.5 < ratio < 3.5
    assert results["e2e/mmfl/jpeg"]["ratio_vs_resident"] > 0
    # data.decode=gpu's pipeline runs on the smoke run's CPU device: the code path, not a GPU number
    assert results["e2e/mmfl/jpeg-gpu-decode"]["ratio_vs_resident"] > 0
    assert results["loader/jpeg-gpu-decode"]["decode_device"] == "cpu" and "decode_device" not in results["loader/jpeg"]
    summary = report["summary"]
    assert set(summary) >= {"gemm_tflops", "mmfl_train_best", "e2e_over_resident",
                            "extract_images_per_s_mmfl_over_bare", "e2e_gpu_decode_over_resident",
                            "loader_gpu_decode_over_cpu_workers"}
    assert summary["e2e_gpu_decode_over_resident"] > 0 and summary["loader_gpu_decode_over_cpu_workers"] > 0
    table = (tmp_path / "gpu_bench.md").read_text()
    assert "| train/mmfl/eager |" in table and "MFU" in table and "**Smoke run**" in table
    assert results["train/mmfl/eager"]["cuda_graph"] is False  # graphed rows and the parity check need CUDA


def test_gpu_bench_compile_runs_are_checked(gpu_bench: ModuleType) -> None:
    assert gpu_bench.parse_compile_runs("mmfl:default, bare:reduce-overhead") == (
        ("mmfl", "default"), ("bare", "reduce-overhead"))
    assert gpu_bench.parse_compile_runs("") == ()
    with pytest.raises(SystemExit, match="mmfl:fast"):
        gpu_bench.parse_compile_runs("mmfl:fast")
    assert gpu_bench.parse_compile_runs("bare:default+graph") == (("bare", "default+graph"),)
    assert gpu_bench.split_mode("default+graph") == ("default", True)
    assert gpu_bench.split_mode("max-autotune-no-cudagraphs") == ("max-autotune-no-cudagraphs", False)
    with pytest.raises(SystemExit, match="reduce-overhead\\+graph"):  # its own CUDA graphs cannot nest in ours
        gpu_bench.parse_compile_runs("mmfl:reduce-overhead+graph")


def test_gpu_bench_compile_cache_round_trip(gpu_bench: ModuleType, tmp_path: Path) -> None:
    """Compiled artifacts are saved where the next session can pre-load them; a torn file is reported, not fatal."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: (x * 2.0).sin().sum())
    assert float(compiled(torch.ones(8))) == pytest.approx(8 * np.sin(2.0), rel=1e-5)
    path = gpu_bench.cache_file(tmp_path, "mmfl", "default+graph")
    assert path.name.startswith("mmfl-default+graph-torch")
    saved = gpu_bench.save_compile_cache(path)
    assert saved["saved_bytes"] > 0 and path.stat().st_size == saved["saved_bytes"]
    assert gpu_bench.load_compile_cache(path) == {"loaded": True, "loaded_bytes": saved["saved_bytes"]}
    assert gpu_bench.load_compile_cache(tmp_path / "absent.bin") == {"loaded": False}
    path.write_bytes(b"not a cache")
    torn = gpu_bench.load_compile_cache(path)
    assert torn["loaded"] is False and torn["load_error"]


def test_augment_bench_reports_every_pipeline(tmp_path: Path) -> None:
    out = tmp_path / "augment.json"
    _run_main("augment", ["--sizes", "48", "--items", "3", "--repeats", "1", "--json", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["size"] == 48 and row["images"] >= 6
    assert set(row["images_per_s"]) == {"decode-only", "tensor-colorjitter", "pil-colorjitter", "affine-jitter"}
    assert all(rate > 0 for rate in row["images_per_s"].values())


def test_decode_bench_reduced_jpeg_decode_matches_the_full_one(capsys: pytest.CaptureFixture[str]) -> None:
    """Photos 10x the model input: the reduced decode (1/8 scale) gives the model nearly the same tensor."""
    _run_main("decode", ["--generate", "2", "--photo-size", "640x480", "--size", "48", "--repeats", "1"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["images"] == 2 and report["first_shape"] == "640x480"
    assert set(report["images_per_s"]) == {"pil-full", "pil-reduced", "torchvision.io"}
    assert report["mean_abs_diff_vs_full"]["pil-reduced"] < 0.01


def test_step_ops_batched_loss_launches_fewer_operators(tmp_path: Path) -> None:
    out = tmp_path / "ops.json"
    _run_main("step_ops", ["--backbone", "resnet18", "--size", "32", "--items", "20", "--repeats", "1",
                           "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    loop, batched = rows["per-head loop"]["ops"], rows["batched"]["ops"]
    assert batched["forward"] == loop["forward"]  # same model
    # 11 embeddings of 2 widths: two batched triplet passes and one ID call instead of eleven each
    assert batched["loss"] * 3 < loop["loss"]
    assert batched["backward"] < loop["backward"]


def test_growth_bench_measures_each_size(tmp_path: Path) -> None:
    """Two toy dataset sizes through train, index and search; the sizes and bytes (not times) are checked."""
    out = tmp_path / "growth.json"
    assert _load("growth").main(["--quick", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    small, large = report["rows"]
    assert (small["items"], large["items"]) == (12, 24)
    assert large["epoch_images"] == 2 * small["epoch_images"]  # one 8 x 4 batch per 8 items
    assert large["gallery"] > small["gallery"] > 0
    for row in (small, large):
        assert row["train_epoch_s"] > 0 and row["index_build_s"] > 0 and row["query_p50_ms"] > 0
        assert row["train_peak_rss_mib"] > 100 and row["index_peak_rss_mib"] > 100  # torch alone is more
    growth, fits = report["growth_largest_over_smallest"], report["linear_fits"]
    # the index holds one float32 vector (plus labels) per gallery image: bytes grow with the gallery
    assert 0.8 * growth["gallery"] < growth["index_bytes"] < 1.2 * growth["gallery"]
    assert fits["index_bytes"]["per"] == "gallery" and fits["index_bytes"]["per_unit"] > 4 * 64
